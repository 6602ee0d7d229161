#!/usr/bin/env python3
"""GGUF golden files: the repo's HF fixtures converted by llama.cpp's own converter (and
quantized by its llama-quantize), what llama.cpp's own reader (gguf-py) sees in them, llama.cpp's
logits on them, and gguf-py's dequantisation of every block type the engine reads.

    python engine/tests/golden/make_gguf.py \
        --llama-cpp ~/.cache/shadowmoe/llama/llama_cpp_python-0.3.36/vendor/llama.cpp \
        [--out engine/tests/golden/gguf] [--only mixtral,olmoe,...,dequant] [--all-wide-types]
    python engine/tests/golden/make_gguf.py --llama-cpp DIR --reference

DIR (--llama-cpp) is the llama.cpp source tree the `llama-cpp-python` 0.3.36 sdist vendors
(`vendor/llama.cpp`: `convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`), built with cmake so that
DIR/build/bin/llama-quantize exists. The Python running this needs the converter's requirements
(numpy, torch, transformers 5, sentencepiece, safetensors), `gguf` from that tree
(`pip install -e DIR/gguf-py`) and llama-cpp-python built from the same sdist:

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" nice pip install \
        ~/.cache/shadowmoe/llama/llama_cpp_python-0.3.36.tar.gz      # ~4 min on 2 cores

benches/llama_cpp_compare.sh prepares the source tree, its build and the venv
(~/.cache/shadowmoe/llama/venv) under ~/.cache/shadowmoe/llama. Everything written is
deterministic: a rerun gives the same bytes.

For each fixture (FIXTURES) and output type it writes, under --out:

  <fixture>-<type>.gguf        converter output (bf16, f16, f32, q8_0) or llama-quantize output
                               from the f16 file (q4_k_m; qwen3_moe_wide's `mix`: one ggml type
                               per matrix, WIDE_MIX)
  <fixture>-<type>.json        every metadata key with its GGUF value type and value, and every
                               tensor's name, dims (ne order: innermost first), ggml type,
                               absolute data offset, byte length and sha256 of its bytes, as
                               gguf-py's GGUFReader reads them; the engine's reader must read the
                               same (engine/tests/gguf.rs)
  <fixture>-<type>.llama.safetensors
                               logits f32 [T, V]: llama.cpp's logits at every position of the
                               fixture's golden prompt_ids (one evaluation, logits_all)
  <fixture>-<type>.llama.json  the referee: llama.cpp's 16 greedy tokens after the prompt (argmax,
                               EOS ignored), its tokenization of the golden prompt text
                               (prompt_tokens; BOS as tokenizer.ggml.add_bos_token says) and of
                               golden.json's rendered chat text (chat_tokens, special tokens
                               parsed), the ggml types the file holds ({type: tensor count}),
                               versions and settings (CPU, one thread, f32 KV cache, no flash
                               attention), and the check that the logits rows are per position
  dequant.safetensors, dequant.json
                               per ggml type (DEQUANT_TYPES) 8 blocks of seeded random bytes with
                               sane f16 scales, `<TYPE>.bytes` U8 and gguf-py's dequantisation
                               `<TYPE>.values` F32 (checked bit for bit against ggml's C code);
                               and per DOT_TYPES type ggml's own CPU dot products (dot_golden,
                               seed DOT_SEED): 8 rows of 512 values `<TYPE>.dot_rows` U8, 3
                               activation vectors `<TYPE>.dot_x` F32, ggml's quantisation of them
                               to the type's vec_dot_type (from_float) `<TYPE>.dot_xq` U8 and
                               vec_dot's results `<TYPE>.dot` F32 [rows, tokens]; dequant.json's
                               `dot` says each vec_dot_type, its block layout and the CPU code
                               path (system_info) that made the bits

With --reference it writes only models/reference/checkpoint-q8_0.gguf, the bundled reference
model (models/reference/checkpoint, bf16) converted to bf16 and quantised by llama-quantize to
Q8_0 (the same file benches/llama_cpp_compare.sh times), and its checkpoint-q8_0.llama.json /
.llama.safetensors beside it, as above (prompt: the model's golden.json prompt_ids).

The llama.cpp files (.llama.*), the ggml cross-check and the dot products need llama-cpp-python
importable; without it they are skipped. Where llama.cpp and transformers differ on a fixture, llama.cpp is the
referee for the GGUF path: the GGUF carries no sliding window (mixtral's sliding_window 9 is
dropped by the converter and llama.cpp attends to all positions) and no clip_qkv (olmoe's 4.0:
the converter's OlmoeModel does not write attention.clamp_kqv, llama.cpp's olmoe graph does not
clamp), so those logits differ from golden.safetensors' beyond the weights' rounding. On
qwen3_next_gguf llama.cpp computes transformers' function (an f32 conversion's logits are within
1.4e-5 of golden.safetensors'); its bf16 file's differ by up to 0.4, all of it the rounding of
activations to bf16 for its matrices, as llama.cpp computes them.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# (fixture, converter output types, llama-quantize outputs). A llama-quantize output is
# (name, llama-quantize type, pure, overrides): it is made from the fixture's f16 GGUF (a
# temporary one where f16 is not among the converter types); `pure` passes --pure (every
# quantizable tensor in that type, no K-quant mixture), each override (tensor-name regex, type)
# a --tensor-type. Routers (ffn_gate_inp) and norms stay F32. The hidden-64 fixtures' rows are not multiples of 256, so there
# llama-quantize falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); the `.llama.json`
# `types` say what each file holds. qwen3_moe and qwen2_moe are not here: their dense first layer
# (`mlp_only_layers`) is one llama.cpp's qwen3moe/qwen2moe architectures cannot hold (the
# converter refuses it); qwen3_moe_gguf and qwen3_moe_wide are qwen3_moe without it (make.py).
# Nor is qwen3_next: llama.cpp's qwen3next loader requires a router in every layer and value
# heads as wide as key heads (ssm.state_size); qwen3_next_gguf is qwen3_next with both (make.py).
Q4_K_M = ("q4_k_m", "Q4_K_M", False, [])
# qwen3_moe_wide's every other type in one file (--tensor-type overrides; a file per type would
# take ~1.3 MB each): each K-quant, legacy quant and MXFP4 on an expert tensor or two and on
# attention, embedding or output matrices. Q5_0, Q5_1 and Q8_0 experts are also in the hidden-64
# q4_k_m files; Q6_K experts in the wide q4_k_m.
WIDE_MIX = [
    ("blk\\.0\\.ffn_gate_exps", "q2_k"), ("blk\\.0\\.ffn_up_exps", "q3_k"), ("blk\\.0\\.ffn_down_exps", "q5_k"),
    ("blk\\.1\\.ffn_gate_exps", "q4_0"), ("blk\\.1\\.ffn_up_exps", "q4_1"), ("blk\\.1\\.ffn_down_exps", "mxfp4"),
    ("blk\\.0\\.attn_q", "q5_0"), ("blk\\.0\\.attn_k", "q5_1"), ("blk\\.0\\.attn_v", "q6_k"), ("blk\\.0\\.attn_output", "q2_k"),
    ("blk\\.1\\.attn_q", "q3_k"), ("blk\\.1\\.attn_k", "q5_k"), ("blk\\.1\\.attn_v", "q4_0"), ("blk\\.1\\.attn_output", "q4_1"),
    ("token_embd", "q3_k"), ("output", "q5_1"),
]
# With --all-wide-types (not committed: ~14 MB): qwen3_moe_wide once per type, --pure.
WIDE_PURE = [
    ("q6_k", "Q6_K", True, []),
    ("q2_k", "Q2_K", True, []),
    ("q3_k", "Q3_K_S", True, []),  # --pure: every matrix Q3_K
    ("q5_k", "Q5_K_M", True, []),  # --pure: every matrix Q5_K
    ("q4_0", "Q4_0", True, []),
    ("q4_1", "Q4_1", True, []),
    ("q5_0", "Q5_0", True, []),
    ("q5_1", "Q5_1", True, []),
    ("mxfp4_moe", "MXFP4_MOE", False, []),  # expert matrices MXFP4, the rest Q8_0
]
FIXTURES = [
    ("mixtral", ["bf16", "q8_0", "f32", "f16"], [Q4_K_M]),
    ("olmoe", ["f16", "q8_0"], [Q4_K_M]),
    ("qwen3_moe_gguf", ["f16", "q8_0"], [Q4_K_M]),
    # Every matrix row 256 wide: K-quants apply everywhere.
    ("qwen3_moe_wide", [], [Q4_K_M, ("mix", "Q4_K_M", True, WIDE_MIX)]),
    # Qwen3-Next (llama.cpp's qwen3next): bf16 is the fixture's own dtype (every value exact).
    ("qwen3_next_gguf", ["bf16", "q8_0"], [Q4_K_M]),
    # GLM-4.5 (llama.cpp's glm4moe): partial rotary, q/k norms, q/k/v biases, the sigmoid router
    # with its selection bias, a shared expert and a dense first layer.
    ("glm4_moe_gguf", ["bf16", "q8_0"], [Q4_K_M]),
    # DeepSeek-V3 (llama.cpp's deepseek2): latent attention with its kv_b_proj split into
    # attn_k_b (transposed) and attn_v_b, yarn rope with DeepSeek's mscale, grouped sigmoid
    # routing with its selection bias, a shared expert, a dense first layer.
    ("deepseek_v3_gguf", ["f32", "bf16", "q8_0"], [Q4_K_M]),
    # gpt-oss (llama.cpp's gpt-oss): attention sinks, sliding and full layers, the biased router,
    # experts de-interleaved by the converter with their biases; from bf16 experts, and from the
    # hub's MXFP4 experts, which the converter repacks into ggml's MXFP4 as they are.
    ("gpt_oss_gguf", ["f32", "q8_0"], []),
    ("gpt_oss_mxfp4", ["f32", "q8_0"], []),
]
# Extra converter arguments per (fixture, output type); "f16" also covers the f16 file that
# llama-quantize reads. Qwen3-Next checkpoints carry a multi-token-prediction block (`mtp.*`,
# which transformers does not load; hf_copy adds one to the fixture, MTP_SEED) and the
# converter writes it as one more block (`{arch}.nextn_predict_layers` 1, block_count 5) unless
# told --no-mtp: the q8_0 file has it, as recent conversions of Qwen3-Next do; the bf16 and
# q4_k_m files have not, as earlier ones.
CONVERT_ARGS = {
    ("qwen3_next_gguf", "bf16"): ["--no-mtp"],
    ("qwen3_next_gguf", "f16"): ["--no-mtp"],
}
MTP_SEED = 18
# --reference: the bundled reference model and the Q8_0 GGUF file made from it.
REFERENCE = os.path.normpath(os.path.join(HERE, "..", "..", "..", "models", "reference", "checkpoint"))
REFERENCE_GGUF = REFERENCE + "-q8_0.gguf"
# The dequantisation golden's types: (name, byte ranges of the block's f16 scale fields).
# Each block gets random bytes with these fields overwritten by sane f16 values.
DEQUANT_TYPES = [
    ("Q4_0", [(0, 2)]),
    ("Q4_1", [(0, 2), (2, 4)]),
    ("Q5_0", [(0, 2)]),
    ("Q5_1", [(0, 2), (2, 4)]),
    ("Q8_0", [(0, 2)]),
    ("Q2_K", [(80, 82), (82, 84)]),
    ("Q3_K", [(108, 110)]),
    ("Q4_K", [(0, 2), (2, 4)]),
    ("Q5_K", [(0, 2), (2, 4)]),
    ("Q6_K", [(208, 210)]),
    ("IQ4_NL", [(0, 2)]),
    ("MXFP4", []),  # byte 0: E8M0 exponent
    ("F16", None),
    ("BF16", None),
]
DEQUANT_BLOCKS = 8
DEQUANT_SEED = 16
# The dot-product golden (dot_golden): ggml's CPU vec_dot of DOT_ROWS rows of DOT_K values of
# each of these types with DOT_TOKENS activation vectors, its own seed.
DOT_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
             "MXFP4", "F16", "BF16"]
DOT_K = 512
DOT_ROWS = 8
DOT_TOKENS = 3
DOT_SEED = 17
# The activation block types a vec_dot_type can be, as their bytes are laid out (little endian).
VEC_DOT_LAYOUTS = {
    "Q8_0": "32 values: d f16, qs i8[32]; value = d * q",
    "Q8_1": "32 values: d f16, s f16 (f16 of the f32 d times the sum of qs), qs i8[32]; value = d * q",
    "Q8_K": "256 values: d f32, qs i8[256], bsums i16[16] (sum of each 16 consecutive qs); value = d * q",
    "F16": "one IEEE half per value",
    "BF16": "one bfloat16 per value (top 16 bits of the f32)",
}


def patched_converter(llama, work):
    """A copy of the converter that treats the fixtures' pre-tokenizer as qwen2's (its hash is
    not in the converter's table; its split rule is qwen2's)."""
    dst = os.path.join(work, "convert")
    os.makedirs(dst)
    shutil.copy(os.path.join(llama, "convert_hf_to_gguf.py"), dst)
    conv = os.path.join(llama, "conversion")
    if os.path.isdir(conv):
        shutil.copytree(conv, os.path.join(dst, "conversion"))
    for root, _, files in os.walk(dst):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(root, f)
                text = open(p, encoding="utf-8").read()
                new = re.sub(r"^(\s*)res = None$", r'\1res = "qwen2"', text, flags=re.M)
                if new != text:
                    open(p, "w", encoding="utf-8").write(new)
    return os.path.join(dst, "convert_hf_to_gguf.py")


def hf_copy(src, work):
    """The fixture as the converter reads it: the hub spellings of two renamed config keys, and
    transformers 5's fused expert tensors (`mlp.experts.gate_up_proj` [E, 2I, H] and
    `mlp.experts.down_proj` [E, H, I], the olmoe fixture's layout) split back into the per-expert
    `mlp.experts.{e}.{gate,up,down}_proj.weight` that the converter's OlmoeModel stacks (it
    fails with "Unprocessed experts" on the fused names). A tied checkpoint (the olmoe fixture)
    gets an explicit `lm_head.weight`, a copy of the embeddings, and tie_word_embeddings false:
    the converter writes no output.weight for a tied model, and llama.cpp's olmoe loader requires
    one ("check_tensor_dims: tensor 'output.weight' not found"). Values are copied unchanged."""
    dst = os.path.join(work, "hf-" + os.path.basename(src))
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("golden.*"))
    cfg_path = os.path.join(dst, "config.json")
    c = json.load(open(cfg_path))
    c.setdefault("num_experts", c.get("num_local_experts"))
    rp = c.get("rope_parameters") or {}
    c.setdefault("rope_theta", rp.get("rope_theta", 1e6))
    tied = c.get("tie_word_embeddings", False)
    if tied:
        c["tie_word_embeddings"] = False
    json.dump(c, open(cfg_path, "w"), indent=2)
    # gpt_oss's converter reads transformers' fused, interleaved experts as they are.
    if c.get("model_type") != "gpt_oss":
        unfuse_experts(dst, untie=tied)
    if c.get("model_type") == "qwen3_next":
        add_mtp(dst, c)
    return dst


def add_mtp(d, c):
    """Qwen3-Next's multi-token-prediction block as its hub checkpoints hold it (`mtp.*`, shaped
    as Qwen3-Next-80B-A3B's: fc [H, 2H], three norms, one full-attention MoE layer with a shared
    expert), which transformers neither makes nor loads: seeded random values (MTP_SEED) in the
    checkpoint's dtype, added to its single safetensors file. llama.cpp's converter refuses a
    Qwen3NextForCausalLM without it unless told --no-mtp; with it, the converter writes it as
    block `num_hidden_layers` (nextn) and llama.cpp's main pass does not run it."""
    import math
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = os.path.join(d, "model.safetensors")
    with safe_open(path, "pt") as sf:
        meta = sf.metadata()
        out = {n: sf.get_tensor(n) for n in sf.keys()}
    dtype = out["model.embed_tokens.weight"].dtype
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    e, i, sh = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    shapes = [
        ("mtp.fc.weight", [h, 2 * h]),
        ("mtp.pre_fc_norm_embedding.weight", [h]),
        ("mtp.pre_fc_norm_hidden.weight", [h]),
        ("mtp.norm.weight", [h]),
        ("mtp.layers.0.input_layernorm.weight", [h]),
        ("mtp.layers.0.post_attention_layernorm.weight", [h]),
        ("mtp.layers.0.self_attn.q_proj.weight", [2 * heads * hd, h]),
        ("mtp.layers.0.self_attn.k_proj.weight", [kv * hd, h]),
        ("mtp.layers.0.self_attn.v_proj.weight", [kv * hd, h]),
        ("mtp.layers.0.self_attn.o_proj.weight", [h, heads * hd]),
        ("mtp.layers.0.self_attn.q_norm.weight", [hd]),
        ("mtp.layers.0.self_attn.k_norm.weight", [hd]),
        ("mtp.layers.0.mlp.gate.weight", [e, h]),
    ]
    for x in range(e):
        shapes += [(f"mtp.layers.0.mlp.experts.{x}.gate_proj.weight", [i, h]),
                   (f"mtp.layers.0.mlp.experts.{x}.up_proj.weight", [i, h]),
                   (f"mtp.layers.0.mlp.experts.{x}.down_proj.weight", [h, i])]
    shapes += [
        ("mtp.layers.0.mlp.shared_expert.gate_proj.weight", [sh, h]),
        ("mtp.layers.0.mlp.shared_expert.up_proj.weight", [sh, h]),
        ("mtp.layers.0.mlp.shared_expert.down_proj.weight", [h, sh]),
        ("mtp.layers.0.mlp.shared_expert_gate.weight", [1, h]),
    ]
    gen = torch.Generator().manual_seed(MTP_SEED)
    for n, shape in shapes:
        v = torch.randn(shape, generator=gen)
        v = 0.3 * v if n.endswith("norm.weight") else v / math.sqrt(shape[-1])  # zero-centred
        out[n] = v.to(dtype).contiguous()
    save_file(out, path, metadata=meta)


def unfuse_experts(d, untie):
    from safetensors import safe_open
    from safetensors.torch import save_file

    renamed = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".safetensors"):
            continue
        path = os.path.join(d, f)
        with safe_open(path, "pt") as sf:
            names = list(sf.keys())
            add_head = untie and "model.embed_tokens.weight" in names and "lm_head.weight" not in names
            if not add_head and not any(n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) for n in names):
                continue
            meta = sf.metadata()
            out = {}
            for n in names:
                t = sf.get_tensor(n)
                if n.endswith("mlp.experts.gate_up_proj"):
                    base, inter = n[: -len("gate_up_proj")], t.shape[1] // 2
                    for e in range(t.shape[0]):
                        out[f"{base}{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                        out[f"{base}{e}.up_proj.weight"] = t[e, inter:].contiguous()
                elif n.endswith("mlp.experts.down_proj"):
                    base = n[: -len("down_proj")]
                    for e in range(t.shape[0]):
                        out[f"{base}{e}.down_proj.weight"] = t[e].contiguous()
                else:
                    out[n] = t
            if add_head:
                out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
        save_file(out, path, metadata=meta)
        renamed.update({n: f for n in out})
    index = os.path.join(d, "model.safetensors.index.json")
    if renamed and os.path.exists(index):
        ix = json.load(open(index))
        wm = {k: v for k, v in ix["weight_map"].items() if not k.endswith(("gate_up_proj", "down_proj"))}
        wm.update(renamed)
        ix["weight_map"] = wm
        json.dump(ix, open(index, "w"), indent=2)


def quantize(llama, src, dst, qtype, pure, overrides, src_label="<f16.gguf>"):
    exe = os.path.join(llama, "build", "bin", "llama-quantize")
    opts = (["--pure"] if pure else []) + [a for n, t in overrides for a in ("--tensor-type", f"{n}={t}")]
    cmd = [exe] + opts + [src, dst, qtype, "2"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout)
        raise SystemExit(f"llama-quantize {qtype} failed: {' '.join(cmd)}")
    return " ".join(["llama-quantize"] + opts + [src_label, "<out.gguf>", qtype])


def value_of(field, GGUFValueType):
    t = field.types[0]
    if t == GGUFValueType.ARRAY:
        return {"type": "ARRAY", "item_type": field.types[-1].name, "value": field.contents()}
    v = field.contents()
    if isinstance(v, float) and v != v:
        v = "NaN"
    return {"type": t.name, "value": v}


def dump(path):
    from gguf import GGUFReader, GGUFValueType

    r = GGUFReader(path)
    meta = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue  # the reader's own header pseudo-fields
        meta[name] = value_of(field, GGUFValueType)
    tensors = []
    for t in r.tensors:
        raw = t.data.tobytes()
        assert len(raw) == t.n_bytes, (t.name, len(raw), t.n_bytes)
        tensors.append({
            "name": t.name,
            "dims": [int(x) for x in t.shape],
            "type": t.tensor_type.name,
            "offset": int(t.data_offset),
            "n_bytes": int(t.n_bytes),
            "sha256": hashlib.sha256(raw).hexdigest(),
        })
    version = int(r.fields["GGUF.version"].contents())
    return {
        "made_by": "engine/tests/golden/make_gguf.py",
        "reader": "gguf-py (llama.cpp vendored by llama-cpp-python 0.3.36)",
        "version": version,
        "alignment": int(r.alignment),
        "data_offset": int(r.data_offset),
        "metadata": meta,
        "tensors": tensors,
    }


def referee(gguf, fixture, out_stem, types, made_with):
    """llama.cpp's view of `gguf`, computed on the CPU with one thread: logits at every position
    of the fixture's prompt ids (one evaluation with logits_all), its greedy tokens, and its
    tokenization of the prompt and of the rendered chat text. The KV cache is f32 and flash
    attention is off, so that the only approximations left are the weights' own and llama.cpp's
    quantization of activations for quantized dot products."""
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama
    from safetensors.numpy import save_file

    golden = json.load(open(os.path.join(fixture, "golden.json")))
    ids = golden["prompt_ids"]
    n_new = len(golden["generated"])
    settings = dict(n_ctx=128, n_batch=128, n_ubatch=128, n_threads=1, n_threads_batch=1,
                    n_gpu_layers=0, offload_kqv=False, flash_attn=False,
                    type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                    seed=0, verbose=False)

    def load(logits_all):
        return Llama(model_path=gguf, logits_all=logits_all, **settings)

    llm = load(True)
    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    # Greedy continuation: argmax of the last position, then one token at a time.
    generated = []
    nxt = int(np.argmax(logits[-1]))
    for _ in range(n_new):
        generated.append(nxt)
        llm.eval([nxt])
        nxt = int(np.argmax(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)))
    add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true")
    # add_bos=True is llama_tokenize's add_special: it adds BOS only where the vocabulary's
    # tokenizer.ggml.add_bos_token says so.
    prompt_tokens = llm.tokenize(golden["prompt"].encode(), add_bos=True, special=False)
    chat_tokens = llm.tokenize(golden["chat_text"].encode(), add_bos=False, special=True)
    del llm

    # The rows are per position: a fresh context's single evaluation (last logits only) of the
    # whole prompt and of its first half gives the last and the middle row again.
    checks = {}
    fresh = load(False)
    for k in (len(ids), len(ids) // 2):
        fresh.reset()
        fresh.eval(ids[:k])
        last = np.ctypeslib.as_array(fresh._ctx.get_logits(), shape=(n_vocab,)).copy()
        diff = float(np.abs(last - logits[k - 1]).max())
        scale = float(np.abs(logits[k - 1]).max())
        assert diff <= 1e-4 * max(1.0, scale), (gguf, k, diff)
        checks[f"row_{k - 1}_vs_fresh_eval_max_abs_diff"] = diff
    del fresh
    assert float(np.abs(logits[0] - logits[-1]).max()) > 1e-3, "rows are not per position"

    save_file({"logits": logits}, out_stem + ".llama.safetensors")
    with open(out_stem + ".llama.json", "w") as f:
        json.dump({
            "made_by": "engine/tests/golden/make_gguf.py",
            "made_with": made_with,
            "referee": {
                "llama-cpp-python": llama_cpp.__version__,
                "llama.cpp": lib_versions(llama_cpp) + ", the copy vendored by llama-cpp-python "
                             + llama_cpp.__version__,
                "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                "settings": "CPU only (n_gpu_layers=0), n_threads=1, n_threads_batch=1, "
                            "prompt as one batch with logits_all, KV cache f32, flash attention off",
                "checks": checks,
            },
            "prompt_ids": ids,
            "generated": generated,
            "prompt": golden["prompt"],
            "add_bos": add_bos,
            "prompt_tokens": prompt_tokens,
            "chat_text": golden["chat_text"],
            "chat_tokens": chat_tokens,
            "types": types,
        }, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return generated, prompt_tokens, chat_tokens


def lib_versions(llama_cpp):
    """The versions in the installed libraries' names: libllama.so.X.Y.Z, libggml-base.so.X.Y.Z."""
    names = os.listdir(os.path.join(os.path.dirname(llama_cpp.__file__), "lib"))
    found = []
    for lib, label in (("libllama.so.", "libllama"), ("libggml-base.so.", "ggml")):
        v = [n[len(lib):] for n in names if n.startswith(lib) and n.count(".") >= 4]
        if v:
            found.append(f"{label} {max(v)}")
    return ", ".join(found) or "unknown"


def random_blocks(np, rng, name, fields, type_size, n, zero, neg_zero):
    """`n` blocks of a DEQUANT_TYPES type: random bytes whose f16 scale fields (`fields`) are
    overwritten by sane f16 values (magnitude 1e-3..1, either sign; blocks in `zero` get every
    field +0, those in `neg_zero` the first one -0) and, for MXFP4, the E8M0 byte 0 in 115..135
    (127 in `zero` blocks); U8 [n, type_size]. F16/BF16 (fields None): n*32 finite values
    (magnitudes 1e-4..1e2 times a normal, the first four 0, -0 and two f16 subnormals; BF16 by
    truncation), U8 [n*32*type_size]. The order of draws from `rng` is fixed: the committed
    `<TYPE>.bytes` depend on it."""
    if fields is None:
        v = (rng.standard_normal(n * 32) * 10.0 ** rng.uniform(-4, 2, n * 32)).astype(np.float32)
        v[:4] = [0.0, -0.0, 1e-6, -3e-7]  # f16 subnormals
        if name == "F16":
            return v.astype(np.float16).view(np.uint8)
        return (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # truncated
    raw = rng.integers(0, 256, (n, type_size), dtype=np.uint8)
    for b in range(n):
        for i, (lo, hi) in enumerate(fields):
            f = (10.0 ** rng.uniform(-3, 0, 1) * rng.choice([-1.0, 1.0], 1)).astype(np.float16)
            if b in zero:
                f[:] = 0.0
            elif b in neg_zero and i == 0:
                f[:] = -0.0
            raw[b, lo:hi] = f.view(np.uint8)
    if name == "MXFP4":
        raw[:, 0] = rng.integers(115, 136, n)
        for b in zero:
            raw[b, 0] = 127
    return raw


def dequant_golden(out):
    """gguf/dequant.safetensors and dequant.json: per type, DEQUANT_BLOCKS blocks of random
    bytes (numpy, seed DEQUANT_SEED) whose f16 scale/min fields are overwritten with sane
    values (magnitudes 1e-3..1, either sign; block 2 has every scale field +0, block 5 its
    first one -0), MXFP4's E8M0 exponent byte in 115..135 (block 2: 127, 2^0), and gguf-py's
    dequantisation of them: `<TYPE>.bytes` U8 [blocks, type_size], `<TYPE>.values` F32
    [blocks, block_size]. F16 and BF16 get 32 values per row of finite random numbers (some
    f16 subnormals, zeros of both signs)."""
    import numpy as np
    import gguf
    from gguf.quants import dequantize
    from importlib.metadata import version
    from safetensors.numpy import save_file

    rng = np.random.default_rng(DEQUANT_SEED)

    tensors, info = {}, {}
    for name, fields in DEQUANT_TYPES:
        qt = gguf.GGMLQuantizationType[name]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
        raw = random_blocks(np, rng, name, fields, type_size, DEQUANT_BLOCKS, zero=(2,), neg_zero=(5,))
        if fields is None:  # F16 / BF16: rows of 32 values
            raw = raw.reshape(DEQUANT_BLOCKS, 32 * type_size)
        values = dequantize(raw, qt).astype(np.float32)
        assert values.shape[0] == DEQUANT_BLOCKS and np.isfinite(values).all(), name
        tensors[f"{name}.bytes"] = np.ascontiguousarray(raw)
        tensors[f"{name}.values"] = np.ascontiguousarray(values.reshape(DEQUANT_BLOCKS, -1))
        info[name] = {"ggml_type": int(qt), "block_size": block_size, "type_size": type_size,
                      "rows": DEQUANT_BLOCKS, "values_per_row": int(values.size // DEQUANT_BLOCKS),
                      "scale_fields": fields}
    checked = ggml_check(tensors, info)
    dot = dot_golden(tensors, dict(DEQUANT_TYPES))
    save_file(tensors, os.path.join(out, "dequant.safetensors"))
    with open(os.path.join(out, "dequant.json"), "w") as f:
        json.dump({
            "made_by": "engine/tests/golden/make_gguf.py",
            "dequantized_by": "gguf-py " + version("gguf") + " gguf.quants.dequantize "
                              "(llama.cpp vendored by llama-cpp-python 0.3.36)",
            "seed": DEQUANT_SEED,
            "note": "bytes: random (numpy default_rng(seed)) with the f16 scale fields (byte "
                    "ranges in scale_fields) overwritten by sane f16 values, magnitude 1e-3..1, "
                    "either sign; block 2 has every scale field +0, block 5 its first -0. MXFP4: "
                    "E8M0 byte 0 in 115..135 (block 2: 127). F16/BF16: rows of 32 finite values.",
            "checked_against": checked,
            "types": info,
            "dot": dot,
        }, f, indent=1)
        f.write("\n")
    print(f"{out}/dequant.safetensors: {len(info)} types"
          + (f", ggml dot products for {len(dot['types'])}" if dot else ""))


def dot_x(np, rng):
    """DOT_TOKENS activation vectors of DOT_K f32 values. Token 0: normals with a per-32-block
    scale 10^(-1..0.5). Token 1: 0.05 * normals with 8 outliers of magnitude 10..100 (in 0..479),
    four f16-subnormal/tiny values, and its last 32-block (480..511) holding 127.0 and
    half-integers (+-0.5 .. +-15.5: ties for the activation quantiser's rounding, whose scale is
    exactly 1 there for Q8_0/Q8_1 and -1 for Q8_K). Token 2: normals with exact zeros at 32..63
    (a zero Q8_0/Q8_1 block) and 256..511 (a zero Q8_K block, eight zero Q8_0 blocks; -0.0 at 40,
    300 and 301), and |x| maxima tied in 0..255: -7.5 at 5, +7.5 at 10 and 100."""
    k = DOT_K
    x = np.zeros((DOT_TOKENS, k), np.float32)
    x[0] = rng.standard_normal(k) * np.repeat(10.0 ** rng.uniform(-1, 0.5, k // 32), 32)
    x[1] = 0.05 * rng.standard_normal(k)
    at = rng.choice(480, 8, replace=False)
    x[1, at] = rng.uniform(10, 100, 8) * rng.choice([-1.0, 1.0], 8)
    x[1, [3, 70, 200, 333]] = [1e-6, -3e-7, 6e-8, -2e-5]
    halves = np.arange(31, dtype=np.float32) - 15.0
    halves = np.where(halves >= 0, halves + 0.5, halves - 0.5)
    x[1, 480] = 127.0
    x[1, 481:512] = rng.permutation(halves)
    x[2] = rng.standard_normal(k)
    x[2, 32:64] = 0.0
    x[2, 256:512] = 0.0
    x[2, [40, 300, 301]] = -0.0
    x[2, 5], x[2, 10], x[2, 100] = -7.5, 7.5, 7.5
    assert np.abs(np.delete(x[2, :256], [5, 10, 100])).max() < 7.5
    return x


def dot_golden(tensors, fields_of):
    """Where llama-cpp-python is installed: per DOT_TYPES type, llama.cpp's own CPU dot products,
    the ones its matrix multiplication runs row by row (ggml_compute_forward_mul_mat without
    the repacked or llamafile kernels). Adds to `tensors`:

      <TYPE>.dot_rows  U8 [DOT_ROWS, row bytes]  rows of DOT_K values made like `<TYPE>.bytes`
                       (random_blocks; in block 2 and block 3*nb+7 every scale field +0, in
                       block 5 and 6*nb+11 the first -0; nb blocks per row)
      <TYPE>.dot_x     F32 [DOT_TOKENS, DOT_K]   activations (dot_x)
      <TYPE>.dot_xq    U8 [DOT_TOKENS, bytes]    ggml's quantisation of each token to the type's
                       vec_dot_type: ggml_get_type_traits_cpu(vec_dot_type)->from_float
      <TYPE>.dot       F32 [DOT_ROWS, DOT_TOKENS] ggml_get_type_traits_cpu(type)->vec_dot(DOT_K,
                       &s, 0, row, 0, xq, 0, 1)

    and returns the description for dequant.json (None without llama-cpp-python). The bytes of
    dot_xq and dot depend on the CPU code path libggml-cpu was built for (system_info)."""
    import ctypes
    import numpy as np
    import gguf
    from gguf.quants import dequantize

    try:
        import llama_cpp
    except ImportError:
        print("(llama_cpp not importable: no ggml dot products in dequant.safetensors)")
        return None
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    base = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))
    cpu = ctypes.CDLL(os.path.join(lib_dir, "libggml-cpu.so"))

    class Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h), the leading fields
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p)]

    class CpuTraits(ctypes.Structure):  # struct ggml_type_traits_cpu (ggml-cpu.h)
        _fields_ = [("from_float", ctypes.c_void_p),  # ggml_from_float_t
                    ("vec_dot", ctypes.c_void_p),     # ggml_vec_dot_t
                    ("vec_dot_type", ctypes.c_int),   # enum ggml_type
                    ("nrows", ctypes.c_int64)]

    assert ctypes.sizeof(CpuTraits) == 32
    base.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(CpuTraits)
    cpu.ggml_cpu_init.restype = None
    cpu.ggml_cpu_init()  # the f16 and e8m0 tables the CPU kernels read
    from_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    vec_dot_t = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
                                 ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                 ctypes.c_int)

    def act_values(vt, xq):
        """The activations an xq row stands for, f64 (for the sanity check only)."""
        if vt in ("F16", "BF16"):
            return dequantize(xq, gguf.GGMLQuantizationType[vt]).astype(np.float64)
        if vt == "Q8_K":
            b = xq.reshape(-1, 292)
            d = b[:, :4].copy().view(np.float32).astype(np.float64)
            return (d * b[:, 4:260].view(np.int8)).reshape(-1)
        size = {"Q8_0": 34, "Q8_1": 36}[vt]
        b = xq.reshape(-1, size)
        d = b[:, :2].copy().view(np.float16).astype(np.float64)
        return (d * b[:, size - 32:].view(np.int8)).reshape(-1)

    rng = np.random.default_rng(DOT_SEED)
    types = {}
    for name in DOT_TYPES:
        qt = gguf.GGMLQuantizationType[name]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
        ct = cpu.ggml_get_type_traits_cpu(int(qt)).contents
        vt = gguf.GGMLQuantizationType(ct.vec_dot_type).name
        vtr = base.ggml_get_type_traits(ct.vec_dot_type).contents
        vct = cpu.ggml_get_type_traits_cpu(ct.vec_dot_type).contents
        assert ct.vec_dot and vct.from_float, name
        assert (vtr.blck_size, vtr.type_size) == tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[vt]]), vt
        assert vt in VEC_DOT_LAYOUTS, (name, vt)

        nb = DOT_K // block_size
        fields = fields_of[name]
        n = DOT_ROWS * nb if fields is not None else DOT_ROWS * DOT_K // 32  # F16/BF16: 32 a "block"
        raw = random_blocks(np, rng, name, fields, type_size, n,
                            zero=(2, 3 * nb + 7), neg_zero=(5, 6 * nb + 11))
        rows = np.ascontiguousarray(raw.reshape(DOT_ROWS, nb * type_size))
        x = dot_x(np, rng)
        xq_bytes = DOT_K // vtr.blck_size * vtr.type_size
        xq = np.zeros((DOT_TOKENS, xq_bytes), np.uint8)
        dot = np.zeros((DOT_ROWS, DOT_TOKENS), np.float32)
        s = ctypes.c_float()
        for t in range(DOT_TOKENS):
            xt = np.ascontiguousarray(x[t])
            from_float_t(vct.from_float)(xt.ctypes.data, xq[t].ctypes.data, DOT_K)
            for r in range(DOT_ROWS):
                s.value = float("nan")
                vec_dot_t(ct.vec_dot)(DOT_K, ctypes.byref(s), 0, rows[r].ctypes.data, 0,
                                      xq[t].ctypes.data, 0, 1)
                dot[r, t] = s.value

        # Sanity: ggml's dot is the dot of gguf-py's dequantised row with the activations xq
        # stands for, up to f32 rounding (and Q8_1's f16 block sums).
        w = dequantize(rows, qt).astype(np.float64).reshape(DOT_ROWS, DOT_K)
        a = np.stack([act_values(vt, xq[t]) for t in range(DOT_TOKENS)])
        exact = w @ a.T
        scale = np.abs(w) @ np.abs(a).T
        err = np.abs(dot - exact)
        assert np.isfinite(dot).all() and (err <= 2e-3 * scale + 1e-6).all(), (name, float(err.max()))
        assert np.abs(a - x).max() <= 0.01 * np.abs(x).max() + 1e-30, name  # xq stands for x

        tensors[f"{name}.dot_rows"] = rows
        tensors[f"{name}.dot_x"] = x
        tensors[f"{name}.dot_xq"] = xq
        tensors[f"{name}.dot"] = dot
        types[name] = {
            "vec_dot_type": vt, "vec_dot_ggml_type": int(ct.vec_dot_type), "nrows": int(ct.nrows),
            "row_bytes": int(rows.shape[1]), "blocks_per_row": nb, "xq_bytes": xq_bytes,
            "max_rel_diff_vs_f64": float((err / np.maximum(scale, 1e-30)).max()),
        }
    layouts = {}
    for vt in sorted({t["vec_dot_type"] for t in types.values()}):
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[vt]]
        layouts[vt] = {"ggml_type": int(gguf.GGMLQuantizationType[vt]), "block_size": block_size,
                       "type_size": type_size, "layout": VEC_DOT_LAYOUTS[vt]}
    return {
        "computed_by": "ggml's CPU backend: libggml-cpu of llama-cpp-python " + llama_cpp.__version__
                       + " (" + lib_versions(llama_cpp) + "), through ctypes: "
                       "ggml_cpu_init(); per type ggml_get_type_traits_cpu(type) gives vec_dot and "
                       "vec_dot_type; ggml_get_type_traits_cpu(vec_dot_type)->from_float(x, xq, K) "
                       "quantises each token; vec_dot(K, &s, 0, row, 0, xq, 0, 1) per row",
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "seed": DOT_SEED,
        "k": DOT_K, "rows": DOT_ROWS, "tokens": DOT_TOKENS,
        "tensors": "<TYPE>.dot_rows U8 [rows, row_bytes]; <TYPE>.dot_x F32 [tokens, k]; "
                   "<TYPE>.dot_xq U8 [tokens, xq_bytes] (vec_dot_type blocks); <TYPE>.dot F32 "
                   "[rows, tokens]",
        "note": "rows: random blocks made as for <TYPE>.bytes (numpy default_rng(seed), drawn per "
                "type in this order: rows, then x), with every scale field +0 in blocks 2 and "
                "3*blocks_per_row+7 and the first -0 in blocks 5 and 6*blocks_per_row+11 (MXFP4: "
                "exponent 127 in the zero blocks); F16/BF16 rows as F16/BF16.bytes. x: token 0 "
                "normals with block scales 10^(-1..0.5); token 1 0.05*normals, 8 outliers "
                "|10..100| in 0..479, tiny values at 3, 70, 200, 333, and 480..511 = 127.0 then "
                "half-integers +-0.5..+-15.5 (rounding ties at scale 1); token 2 normals with "
                "exact zeros at 32..63 and 256..511 (-0.0 at 40, 300, 301) and tied |x| maxima "
                "-7.5 at 5, +7.5 at 10 and 100. xq and dot are the bits of the CPU code path in "
                "system_info (x86 AVX2 here: Q8_0/Q8_1 from_float takes id = 127/amax and "
                "rounds half to even; Q8_K's is quantize_row_q8_K_ref on every CPU); another "
                "build may differ in the last bits of dot. llama.cpp's model path may instead "
                "run repacked (REPACK) or llamafile sgemm kernels for some types, with other "
                "summation orders. max_rel_diff_vs_f64: |dot - f64 dot of gguf-py's dequantised "
                "row and xq's values| / sum |w*a|.",
        "vec_dot_types": layouts,
        "types": types,
    }


def ggml_check(tensors, info):
    """Where llama-cpp-python is installed: its libggml-base's own dequantisers (the type
    traits' to_float, the C code llama.cpp runs) must give gguf-py's values bit for bit."""
    import ctypes
    import numpy as np

    try:
        import llama_cpp
    except ImportError:
        return None
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    lib = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))

    class Traits(ctypes.Structure):
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p)]

    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    for name, i in info.items():
        tr = lib.ggml_get_type_traits(i["ggml_type"]).contents
        assert tr.type_name.decode().upper() == name, (tr.type_name, name)
        assert (tr.blck_size, tr.type_size) == (i["block_size"], i["type_size"]), name
        raw = np.ascontiguousarray(tensors[f"{name}.bytes"])
        want = tensors[f"{name}.values"]
        got = np.zeros(want.size, np.float32)
        to_float_t(tr.to_float)(raw.ctypes.data, got.ctypes.data, want.size)
        assert np.array_equal(got.view(np.uint32), want.reshape(-1).view(np.uint32)), name
    return ("bit-identical to ggml's C dequantisers (ggml_get_type_traits(type)->to_float in "
            "libggml-base of llama-cpp-python " + llama_cpp.__version__ + ")")


def reference(llama, convert, work, have_llama):
    """--reference: the bundled reference model (models/reference/checkpoint: qwen3_moe, bf16)
    as llama.cpp users would run it, REFERENCE_GGUF: converted by the converter to bf16 (as
    benches/llama_cpp_compare.sh does: the hub spellings of two config keys, the tokenizer's
    pre-tokenizer treated as qwen2's), then `llama-quantize ... Q8_0` (the expert down
    projections, rows of 16 values, are not whole Q8_0 blocks: llama-quantize keeps them F16),
    and llama.cpp's referee outputs beside it (checkpoint-q8_0.llama.json / .llama.safetensors,
    as for the fixtures; the prompt is golden.json's prompt_ids)."""
    hf = hf_copy(REFERENCE, work)
    bf16 = os.path.join(work, "reference-bf16.gguf")
    subprocess.run([sys.executable, convert, hf, "--outtype", "bf16", "--outfile", bf16],
                   check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE if os.environ.get("QUIET") else None)
    made_with = ("convert_hf_to_gguf.py --outtype bf16, then "
                 + quantize(llama, bf16, REFERENCE_GGUF, "Q8_0", False, [], src_label="<bf16.gguf>"))
    counts = {}
    for t in dump(REFERENCE_GGUF)["tensors"]:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    print(f"{REFERENCE_GGUF}: {sum(counts.values())} tensors {counts}, {os.path.getsize(REFERENCE_GGUF)} bytes")
    if have_llama:
        stem = REFERENCE_GGUF[: -len(".gguf")]
        gen, _, _ = referee(REFERENCE_GGUF, REFERENCE, stem, counts, made_with)
        print(f"  llama.cpp greedy: {gen}")


# --only pretok: llama.cpp's pre-tokenizers the engine builds, each on one vocabulary made to
# tell them apart — byte-level BPE trained on the texts without any split rule, so that its
# merges cross spaces, digits, case and script boundaries, which each pre-tokenizer then allows
# or not — in the glm4_moe_gguf fixture's metadata (`tokenizer.ggml.*` replaced, no tensors),
# and llama.cpp's token ids for PRETOK_TEXTS under each.
PRETOKENIZERS = ["qwen2", "llama3", "gpt-2", "glm4", "gpt-4o", "deepseek-v3", "kimi-k2"]
PRETOK_TEXTS = [
    "Hello World, DON'T stop: we've 1234567 apples; it's 12.5% off!",
    "CamelCaseWords and ALLCAPS words, mixedUP iPhone McDonald's 中文English混合Text",
    "東京タワー と カタカナ ひらがな 漢字123 한국어 中文，标点。",
    "naïve café — émigré's  spaces\t\ttabs\n\n  indented\n}\r\nend",
    "def route(hidden, gate, k):\n    return topk(softmax(gate @ hidden), k)  # 3 x 4",
    "The expert cache keeps 12 experts on disk — naïve café 東京!\nWhy?",
]


def pretok_golden(src_gguf, out_dir):
    """Metadata-only copies of `src_gguf` with `tokenizer.ggml.pre` set to each of
    PRETOKENIZERS (out_dir/pretok/<name>.gguf), and pretok/pretok.json: llama.cpp's ids for every text
    under each (no BOS, special tokens not parsed), and of the first text with BOS as the file
    asks (add_bos_token true)."""
    import llama_cpp
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from llama_cpp import Llama

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[gMASK]", "<|user|>", "<|observation|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PRETOK_TEXTS * 8, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    assert [i for _, i in vocab] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in specials else 1 for t in tokens]
    replaced = {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
    }

    r = GGUFReader(src_gguf)
    arch = r.fields["general.architecture"].contents()
    golden = {"made_by": "engine/tests/golden/make_gguf.py --only pretok", "source": os.path.basename(src_gguf),
              "llama_cpp_python": llama_cpp.__version__, "texts": PRETOK_TEXTS, "ids": {}}
    for pre in PRETOKENIZERS:
        os.makedirs(os.path.join(out_dir, "pretok"), exist_ok=True)
        path = os.path.join(out_dir, "pretok", f"{pre}.gguf")
        w = GGUFWriter(path, arch)
        for name, field in r.fields.items():
            if (name.startswith("GGUF.") or name in ("general.architecture", "tokenizer.ggml.add_bos_token")
                    or name.startswith("tokenizer.ggml.") and name.endswith("_token_id")):
                continue
            value = pre if name == "tokenizer.ggml.pre" else replaced.get(name, field.contents())
            vtype = field.types[0]
            if vtype == GGUFValueType.ARRAY:
                w.add_key_value(name, value, vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(name, value, vtype)
        w.add_bos_token_id(replaced["tokenizer.ggml.bos_token_id"])
        # BOS asked for (llama.cpp adds it under every pre-tokenizer here, GLM's too: the
        # file's bos_token_id stands).
        w.add_add_bos_token(True)
        w.add_eos_token_id(replaced["tokenizer.ggml.eos_token_id"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        llm = Llama(model_path=path, vocab_only=True, verbose=False)
        golden["ids"][pre] = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in PRETOK_TEXTS]
        golden.setdefault("ids_add_special", {})[pre] = llm.tokenize(PRETOK_TEXTS[0].encode(), add_bos=True, special=False)
        del llm
        print(f"{path}: {[len(x) for x in golden['ids'][pre]]} tokens")
    with open(os.path.join(out_dir, "pretok", "pretok.json"), "w") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True)
    ap.add_argument("--out", default=os.path.join(HERE, "gguf"))
    ap.add_argument("--only", default="all",
                    help="comma list of fixture names and/or 'dequant' (default: everything)")
    ap.add_argument("--all-wide-types", action="store_true",
                    help="also qwen3_moe_wide once per type (--pure; ~14 MB, not committed)")
    ap.add_argument("--reference", action="store_true",
                    help="only the bundled reference model: models/reference/checkpoint-q8_0.gguf "
                         "and its referee files (--out and --only do not apply)")
    a = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
        print("(llama_cpp not importable: no referee logits)")
    if a.reference:
        with tempfile.TemporaryDirectory() as work:
            reference(a.llama_cpp, patched_converter(a.llama_cpp, work), work, have_llama)
        return
    only = None if a.only == "all" else set(a.only.split(","))
    os.makedirs(a.out, exist_ok=True)
    if only is None or "dequant" in only:
        dequant_golden(a.out)
    if (only is None or "pretok" in only) and have_llama:
        pretok_golden(os.path.join(a.out, "glm4_moe_gguf-q8_0.gguf"), a.out)
    with tempfile.TemporaryDirectory() as work:
        convert = patched_converter(a.llama_cpp, work)
        for arch, types, quants in FIXTURES:
            if only is not None and arch not in only:
                continue
            hf = hf_copy(os.path.join(HERE, arch), work)
            outputs = [(ty, ["convert_hf_to_gguf.py", "--outtype", ty] + CONVERT_ARGS.get((arch, ty), []), None)
                       for ty in types]
            if arch == "qwen3_moe_wide" and a.all_wide_types:
                quants = quants + WIDE_PURE
            outputs += [(q[0], None, q) for q in quants]
            f16 = os.path.join(a.out, f"{arch}-f16.gguf") if "f16" in types else os.path.join(work, f"{arch}-f16.gguf")
            for ty, conv_args, q in outputs:
                gguf = os.path.join(a.out, f"{arch}-{ty}.gguf")
                if q is None:
                    subprocess.run(
                        [sys.executable, convert, hf, "--outtype", ty, "--outfile", gguf]
                        + CONVERT_ARGS.get((arch, ty), []),
                        check=True,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE if os.environ.get("QUIET") else None,
                    )
                    made_with = " ".join(conv_args)
                else:
                    f16_args = CONVERT_ARGS.get((arch, "f16"), [])
                    if not os.path.exists(f16):
                        subprocess.run(
                            [sys.executable, convert, hf, "--outtype", "f16", "--outfile", f16] + f16_args,
                            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )
                    made_with = (" ".join(["convert_hf_to_gguf.py", "--outtype", "f16"] + f16_args) + ", then "
                                 + quantize(a.llama_cpp, f16, gguf, q[1], q[2], q[3]))
                d = dump(gguf)
                with open(os.path.join(a.out, f"{arch}-{ty}.json"), "w") as f:
                    json.dump(d, f, indent=1, ensure_ascii=False)
                counts = {}
                for t in d["tensors"]:
                    counts[t["type"]] = counts.get(t["type"], 0) + 1
                print(f"{gguf}: {len(d['tensors'])} tensors {counts}, {len(d['metadata'])} keys, v{d['version']}")
                if have_llama:
                    gen, _, _ = referee(gguf, os.path.join(HERE, arch), os.path.join(a.out, f"{arch}-{ty}"),
                                        counts, made_with)
                    print(f"  llama.cpp greedy: {gen}")


if __name__ == "__main__":
    main()
