#!/usr/bin/env python3
"""MLX-quantised copies of the golden fixtures and what mlx-lm itself computes on them.

flash-moe's users hold checkpoints written by `mlx_lm.convert -q`; the referee for reading them
is mlx-lm. For each fixture (made by make.py) and each quantisation asked for, this script runs
`mlx_lm.convert` and then mlx-lm's own model on the fixture's golden prompt:

    <out>/<arch>-q<bits>g<group>/   config.json (with its `quantization` block), model.safetensors
                                    (u32 `weight`, `scales`, `biases` per quantised linear; experts
                                    stacked as `switch_mlp.{gate,up,down}_proj`), tokenizer files
    .../golden.safetensors          prompt_ids i64 [T], logits f32 [T, V], generated i64 [N]
    .../golden.json                 versions, bits, group size, dtype, prompt ids, generated ids

Scales and biases are kept in f32 (`--dtype float32`, the default here) so that mlx-lm's
arithmetic and the engine's can be compared tightly; `--dtype bfloat16` writes them as the hub's
4-bit checkpoints do. Layers whose input width is not a multiple of the group size stay
unquantised (mlx-lm's rule), so a fixture mixes both.

mlx-lm's own unquantised f32 run of the fixtures was compared with transformers' golden logits
first: it differs by 2.0 on qwen3_moe, whose fixture uses yarn rope (mlx-lm reads it from
`rope_scaling` its own way), so the MLX copies are made with plain rope; and by 0.11 on
qwen3_next (greedy tokens equal).

Usage (pinned versions: mlx[cpu]==0.32.4, mlx-lm==0.32.2 run on a Linux CPU):
    python3 -m venv /tmp/mlx && /tmp/mlx/bin/pip install "mlx[cpu]==0.32.4" "mlx-lm==0.32.2"
    /tmp/mlx/bin/python engine/tests/golden/make_mlx.py --out engine/tests/golden/mlx

With --convert SRC it only quantises the checkpoint SRC into --out (no golden files), with
bf16 scales as the hub's 4-bit checkpoints hold them: the bundled reference model and its
inflated copies in flash-moe's format (at hidden 2048, width 512, 4-bit group 64 an expert is
1,769,472 bytes, Qwen3-Coder-Next's):
    /tmp/mlx/bin/python engine/tests/golden/make_mlx.py --convert models/reference/checkpoint \
        --out models/reference/checkpoint-4bit --quant 4:64 --dtype bfloat16

With --inflated BIN it judges `shadowmoe inflate` on quantised checkpoints (BIN: the shadowmoe
binary): it inflates models/reference/checkpoint-4bit to its own hidden size at expert width 64
(its 16-wide down projections are then quantised, the only rounding inflate adds) and to hidden
512 (two copies of the real dimensions, norm shift 1), runs mlx-lm on both (scales cast to f32,
so mlx-lm computes in f32), checks that the two agree within 1e-4, and writes mlx-lm's logits
and greedy tokens of the first to <out>/inflated-q4g64/golden.*:
    /tmp/mlx/bin/python engine/tests/golden/make_mlx.py --inflated target/debug/shadowmoe \
        --out engine/tests/golden/mlx
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm import convert, load
from mlx_lm.models.cache import make_prompt_cache
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
GENERATE = 16


def golden_prompt(fixture: Path):
    meta = json.loads((fixture / "golden.json").read_text())
    return meta["prompt_ids"]


def run(model, ids):
    """Logits for every prompt position (one pass), then GENERATE greedy tokens through mlx-lm's
    cache (EOS does not stop it)."""
    x = mx.array([ids])
    logits = model(x).astype(mx.float32)
    mx.eval(logits)
    all_logits = np.array(logits[0])
    cache = make_prompt_cache(model)
    out = model(x, cache=cache)
    generated = []
    for _ in range(GENERATE):
        nxt = int(mx.argmax(out[0, -1]).item())
        generated.append(nxt)
        out = model(mx.array([[nxt]]), cache=cache)
    return all_logits, generated


def write_golden(out, ids, logits, generated, meta):
    """golden.safetensors (prompt ids, logits, greedy tokens) and golden.json (`meta` plus the
    smallest gap between the top two logits) in `out`."""
    save_file(
        {
            "prompt_ids": np.array(ids, dtype=np.int64),
            "logits": np.ascontiguousarray(logits, dtype=np.float32),
            "generated": np.array(generated, dtype=np.int64),
        },
        str(out / "golden.safetensors"),
    )
    top2 = np.sort(logits, axis=-1)[:, -2:]
    meta["min_logit_top2_gap"] = float((top2[:, 1] - top2[:, 0]).min())
    (out / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")


def hub_spelling(fixture: Path, tmp: Path) -> Path:
    """The fixture with its config in the hub's spellings, which mlx-lm reads: transformers 5
    writes `rope_parameters` and (for some families) `num_local_experts`."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in fixture.iterdir():  # links, not copies: the source may be larger than memory
        if f.name != "config.json":
            (tmp / f.name).symlink_to(f.resolve())
    c = json.loads((fixture / "config.json").read_text())
    if "num_experts" not in c and "num_local_experts" in c:
        c["num_experts"] = c["num_local_experts"]
    rp = c.get("rope_parameters") or {}
    c.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in rp:
        c.setdefault("partial_rotary_factor", rp["partial_rotary_factor"])
    if rp.get("rope_type", "default") != "default":
        # mlx-lm reads yarn from `rope_scaling` its own way: its unquantised f32 run of the
        # qwen3_moe fixture was measured 2.0 away from transformers' logits. The MLX fixtures
        # keep plain rope, so that the two runtimes compute the same function and the referee
        # judges the quantised weights alone.
        theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
        keep = {k: v for k, v in rp.items() if k == "partial_rotary_factor"}
        c["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **keep}
        c["rope_theta"] = theta
        c.pop("rope_scaling", None)
    # mlx-lm's qwen3_next places its full-attention layers by `full_attention_interval` alone.
    types = c.get("layer_types")
    if c.get("model_type") == "qwen3_next" and types and "full_attention_interval" not in c:
        interval = types.index("full_attention") + 1
        want = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(len(types))]
        if types != want:
            sys.exit(f"{fixture}: layer_types {types} is not one full-attention layer every N; mlx-lm cannot load it")
        c["full_attention_interval"] = interval
    (tmp / "config.json").write_text(json.dumps(c, indent=1))
    return tmp


def convert_only(src: Path, out: Path, bits, group, dtype):
    """`mlx_lm.convert -q` of the checkpoint `src` into `out` (the config in the hub's spellings)."""
    if out.exists():
        sys.exit(f"--out: {out} already exists")
    tmp = hub_spelling(src, out.parent / f".src-{out.name}")
    try:
        convert(str(tmp), mlx_path=str(out), quantize=True, q_bits=bits, q_group_size=group, dtype=dtype)
    finally:
        shutil.rmtree(tmp)
    print(f"wrote {out} ({bits}-bit, group {group}, {dtype} scales)")


def make(arch, bits, group, dtype, out_root):
    fixture = hub_spelling(HERE / arch, out_root / f".src-{arch}")
    out = out_root / f"{arch}-q{bits}g{group}"
    if out.exists():
        shutil.rmtree(out)
    convert(
        str(fixture),
        mlx_path=str(out),
        quantize=True,
        q_bits=bits,
        q_group_size=group,
        dtype=dtype,
    )
    shutil.rmtree(fixture)
    model, _ = load(str(out))
    ids = golden_prompt(HERE / arch)
    logits, generated = run(model, ids)
    meta = {
        "made_by": "engine/tests/golden/make_mlx.py",
        "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__},
        "source_fixture": arch,
        "bits": bits,
        "group_size": group,
        "dtype": dtype,
        "prompt_ids": ids,
        "generated": generated,
    }
    write_golden(out, ids, logits, generated, meta)
    print(f"{out.name}: {len(ids)} prompt tokens, generated {generated}")


ROOT = HERE.parents[2]
# The widths the engine's test (engine/tests/inflate.rs) inflates to.
INFLATED = [(64, 64), (512, 64)]


def make_inflated(binary, out_root):
    src = ROOT / "models/reference/checkpoint-4bit"
    ids = json.loads((ROOT / "models/reference/checkpoint/golden.json").read_text())["prompt_ids"]
    out = out_root / "inflated-q4g64"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, width in INFLATED:
            dst = Path(tmp) / f"h{hidden}-i{width}"
            subprocess.run(
                [binary, "inflate", "--model", str(src), "--out", str(dst), "--hidden", str(hidden),
                 "--moe-intermediate", str(width)],
                check=True,
            )
            model, _ = load(str(dst))
            model.set_dtype(mx.float32)  # the bf16 scales and biases, exactly, in f32
            results.append(run(model, ids))
            del model
    (logits, generated), (wide, wide_generated) = results
    diff = float(np.abs(wide - logits).max())
    if diff > 1e-4 or wide_generated != generated:
        sys.exit(f"mlx-lm: the inflated copy at hidden 512 differs from hidden 64 by {diff} (tokens {wide_generated} vs {generated})")
    meta = {
        "made_by": "engine/tests/golden/make_mlx.py --inflated",
        "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__},
        "source": "models/reference/checkpoint-4bit",
        "inflated": [{"hidden": h, "moe_intermediate": w} for h, w in INFLATED],
        "bits": 4,
        "group_size": 64,
        "dtype": "bfloat16 scales, computed in float32",
        "prompt_ids": ids,
        "generated": generated,
        "mlx_max_logit_diff_between_widths": diff,
    }
    write_golden(out, ids, logits, generated, meta)
    print(f"{out.name}: {len(ids)} prompt tokens, widths agree within {diff:.2e}, generated {generated}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory that receives one folder per quantised fixture")
    ap.add_argument("--arch", default="qwen3_moe,qwen3_next")
    ap.add_argument("--quant", default="4:64,8:64", help="comma list of bits:group_size")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--convert", help="only quantise this checkpoint into --out (one --quant)")
    ap.add_argument("--inflated", metavar="BIN", help="only judge `BIN inflate` on the bundled 4-bit model")
    args = ap.parse_args()
    if args.inflated:
        make_inflated(args.inflated, Path(args.out))
        return
    if args.convert:
        bits, group = (int(v) for v in args.quant.split(",")[0].split(":"))
        convert_only(Path(args.convert), Path(args.out), bits, group, args.dtype)
        return
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    for arch in args.arch.split(","):
        if not (HERE / arch / "golden.json").is_file():
            sys.exit(f"--arch: no fixture {HERE / arch} (make it with make.py first)")
        for q in args.quant.split(","):
            bits, group = (int(v) for v in q.split(":"))
            make(arch, bits, group, args.dtype, out_root)


if __name__ == "__main__":
    main()
