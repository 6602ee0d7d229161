#!/usr/bin/env python3
"""A gpt-oss-shaped checkpoint for speed comparisons: gpt-oss-20b's widths (hidden 2880, 64
query and 8 key/value heads of 64, 32 experts of width 2880, top-4, sliding window 128 on
alternate layers, yarn) with fewer layers and a small vocabulary, random weights, and the
experts stored as the hub stores them (MXFP4 `*_blocks` / `*_scales`, E8M0 scales around 2^-5,
biases). Not a model of anything: routing and outputs are noise; what it is for is timing the
same arithmetic in both engines on the same bytes (benches/llama_cpp_compare.sh converts it to
GGUF with llama.cpp's converter, which repacks the MXFP4 experts as they are).

    python benches/make_gpt_oss_shaped.py --out DIR [--layers 4] [--seed 0]

The tokenizer, its config and the chat template are the gpt_oss_mxfp4 golden fixture's
(engine/tests/golden/gpt_oss_mxfp4, vocabulary 384); needs numpy.
"""
import argparse
import json
import os
import shutil

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "engine", "tests", "golden", "gpt_oss_mxfp4")

HIDDEN, WIDTH, EXPERTS, TOP_K = 2880, 2880, 32, 4
HEADS, KV_HEADS, HEAD_DIM, WINDOW = 64, 8, 64, 128
VOCAB = 384


def bf16(rng, shape, scale):
    """Random values rounded to bf16, stored as the upper halves of f32 (safetensors BF16)."""
    x = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    tensors, dtypes = {}, {}

    def put(name, value, dtype="BF16"):
        tensors[name] = value
        dtypes[name] = dtype

    put("model.embed_tokens.weight", bf16(rng, (VOCAB, HIDDEN), 1.0))
    put("lm_head.weight", bf16(rng, (VOCAB, HIDDEN), HIDDEN ** -0.5))
    put("model.norm.weight", bf16(rng, (HIDDEN,), 0.1) + np.uint16(0x3F80))
    for l in range(args.layers):
        p = f"model.layers.{l}."
        put(p + "input_layernorm.weight", np.full(HIDDEN, 0x3F80, np.uint16))
        put(p + "post_attention_layernorm.weight", np.full(HIDDEN, 0x3F80, np.uint16))
        a = p + "self_attn."
        for name, rows, cols in [
            ("q_proj", HEADS * HEAD_DIM, HIDDEN),
            ("k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
            ("v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
            ("o_proj", HIDDEN, HEADS * HEAD_DIM),
        ]:
            put(a + name + ".weight", bf16(rng, (rows, cols), cols ** -0.5))
            put(a + name + ".bias", bf16(rng, (rows,), 0.02))
        put(a + "sinks", bf16(rng, (HEADS,), 1.0))
        m = p + "mlp."
        put(m + "router.weight", bf16(rng, (EXPERTS, HIDDEN), HIDDEN ** -0.5))
        put(m + "router.bias", bf16(rng, (EXPERTS,), 0.1))
        e = m + "experts."
        for name, rows, cols in [("gate_up_proj", 2 * WIDTH, HIDDEN), ("down_proj", HIDDEN, WIDTH)]:
            blocks = rng.integers(0, 256, (EXPERTS, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(118, 124, (EXPERTS, rows, cols // 32), dtype=np.uint8)
            put(e + name + "_blocks", blocks, "U8")
            put(e + name + "_scales", scales, "U8")
            put(e + name + "_bias", bf16(rng, (EXPERTS, rows), 0.02))
    # numpy has no bf16: the safetensors file is written here (the BF16 tensors' bytes are
    # uint16 arrays), tensors in name order.
    path = os.path.join(args.out, "model.safetensors")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(tensors):
        n = tensors[name].nbytes
        header[name] = {"dtype": dtypes[name], "shape": list(tensors[name].shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
    config = json.load(open(os.path.join(FIXTURE, "config.json")))
    config.update(
        hidden_size=HIDDEN,
        intermediate_size=WIDTH,
        num_hidden_layers=args.layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        experts_per_token=TOP_K,
        sliding_window=WINDOW,
        layer_types=["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(args.layers)],
        swiglu_limit=7.0,
        max_position_embeddings=131072,
        vocab_size=VOCAB,
    )
    json.dump(config, open(os.path.join(args.out, "config.json"), "w"), indent=2)
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        if os.path.exists(os.path.join(FIXTURE, f)):
            shutil.copy(os.path.join(FIXTURE, f), args.out)
    print(f"wrote {args.out}: {args.layers} layers, {os.path.getsize(path) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
