#!/usr/bin/env python3
"""GGUF golden files: the repo's HF fixtures converted by llama.cpp's own converter, and what
llama.cpp's own reader (gguf-py) sees in them.

    python engine/tests/golden/make_gguf.py --llama-cpp DIR [--out engine/tests/golden/gguf]

DIR is the llama.cpp source tree the `llama-cpp-python` 0.3.36 sdist vendors
(`vendor/llama.cpp`: `convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`); the Python running this
needs the converter's requirements (numpy, torch, transformers, sentencepiece) and `gguf` from
that tree (`pip install -e DIR/gguf-py`). benches/llama_cpp_compare.sh prepares both under
~/.cache/shadowmoe/llama.

For each fixture and output type it writes `<arch>-<type>.gguf` and `<arch>-<type>.json`: every
metadata key with its GGUF value type and value, and every tensor's name, dims (ne order:
innermost first), ggml type, absolute data offset, byte length and the sha256 of its bytes, all
as gguf-py's GGUFReader reads them. The engine's reader must read the same
(engine/tests/gguf.rs).

With `llama-cpp-python` importable (`pip install llama_cpp_python-0.3.36.tar.gz`: it builds the
same vendored llama.cpp), it also writes `<arch>-<type>.llama.safetensors` and `.llama.json`:
llama.cpp's logits for every position of the fixture's golden prompt ids (one evaluation with all
logits, one thread), its greedy continuation, and its tokenization of the fixture's prompt and
chat text — the referee the engine's GGUF path is held to.
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
# (fixture, output types). The qwen3_moe and qwen2_moe fixtures have a dense first layer
# (`mlp_only_layers`),
# which llama.cpp's qwen3moe architecture cannot hold; the converter refuses it.
FIXTURES = [("mixtral", ["bf16", "q8_0", "f32"])]


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
    """The fixture with the hub spellings of two renamed config keys the converter reads."""
    dst = os.path.join(work, "hf-" + os.path.basename(src))
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("golden.*"))
    cfg_path = os.path.join(dst, "config.json")
    c = json.load(open(cfg_path))
    c.setdefault("num_experts", c.get("num_local_experts"))
    rp = c.get("rope_parameters") or {}
    c.setdefault("rope_theta", rp.get("rope_theta", 1e6))
    json.dump(c, open(cfg_path, "w"), indent=2)
    return dst


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


def referee(gguf, fixture, out_stem):
    """llama.cpp's view of `gguf`: logits over the fixture's prompt ids, greedy tokens, and
    its tokenization of the prompt and of the rendered chat text."""
    import numpy as np
    from llama_cpp import Llama
    from safetensors.numpy import save_file

    golden = json.load(open(os.path.join(fixture, "golden.json")))
    ids = golden["prompt_ids"]
    n_new = len(golden["generated"])
    llm = Llama(model_path=gguf, n_ctx=256, n_batch=256, logits_all=True, n_threads=1,
                seed=0, verbose=False)
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
    prompt_tokens = llm.tokenize(golden["prompt"].encode(), add_bos=True, special=False)
    chat_tokens = llm.tokenize(golden["chat_text"].encode(), add_bos=False, special=True)
    save_file({"logits": logits}, out_stem + ".llama.safetensors")
    with open(out_stem + ".llama.json", "w") as f:
        json.dump({
            "made_by": "engine/tests/golden/make_gguf.py",
            "referee": "llama.cpp through llama-cpp-python 0.3.36 (logits_all, n_threads=1)",
            "prompt_ids": ids,
            "generated": generated,
            "prompt": golden["prompt"],
            "prompt_tokens": prompt_tokens,
            "chat_text": golden["chat_text"],
            "chat_tokens": chat_tokens,
        }, f, indent=1, ensure_ascii=False)
    del llm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", required=True)
    ap.add_argument("--out", default=os.path.join(HERE, "gguf"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        convert = patched_converter(a.llama_cpp, work)
        for arch, types in FIXTURES:
            hf = hf_copy(os.path.join(HERE, arch), work)
            for ty in types:
                gguf = os.path.join(a.out, f"{arch}-{ty}.gguf")
                subprocess.run(
                    [sys.executable, convert, hf, "--outtype", ty, "--outfile", gguf],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE if os.environ.get("QUIET") else None,
                )
                d = dump(gguf)
                with open(os.path.join(a.out, f"{arch}-{ty}.json"), "w") as f:
                    json.dump(d, f, indent=1, ensure_ascii=False)
                print(f"{gguf}: {len(d['tensors'])} tensors, {len(d['metadata'])} keys, v{d['version']}")
                try:
                    import llama_cpp  # noqa: F401
                except ImportError:
                    print("  (llama_cpp not importable: no referee logits)")
                    continue
                referee(gguf, os.path.join(HERE, arch), os.path.join(a.out, f"{arch}-{ty}"))


if __name__ == "__main__":
    main()
