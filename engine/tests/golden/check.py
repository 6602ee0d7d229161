#!/usr/bin/env python3
"""Checks the engine against transformers on checkpoints made independently of the committed
fixtures: makes a fresh set with make.py (another seed, another size), runs the `shadowmoe logits`
binary on each, and compares logits, router choices and greedy tokens with what transformers
computed. Exit status 0 only if every architecture matches.

    cargo build --release -p shadowmoe
    python engine/tests/golden/check.py --bin target/release/shadowmoe --seed 7 --size medium
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
LOGIT_TOL = 1e-4


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="path to the shadowmoe binary")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--size", default="medium", choices=["small", "medium"])
    ap.add_argument("--arch", default="all")
    ap.add_argument("--keep", help="make the checkpoints here instead of a temporary directory")
    args = ap.parse_args()

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="shadowmoe-golden-"))
    subprocess.run(
        [sys.executable, str(HERE / "make.py"), "--out", str(out), "--seed", str(args.seed), "--size", args.size,
         "--arch", args.arch],
        check=True,
    )
    failed = False
    for golden_path in sorted(out.glob("*/golden.safetensors")):
        arch_dir = golden_path.parent
        golden = load_file(golden_path)
        meta = json.loads((arch_dir / "golden.json").read_text())
        ids = golden["prompt_ids"].tolist()
        n = len(golden["generated"])
        ours_path = arch_dir / "ours.safetensors"
        subprocess.run(
            [args.bin, "logits", "--model", str(arch_dir), "--tokens", ",".join(map(str, ids)), "--generate", str(n),
             "--out", str(ours_path)],
            check=True,
            env={"RUST_LOG": "warn", "PATH": "/usr/bin:/bin"},
        )
        ours = load_file(ours_path)
        diff = float((ours["logits"] - golden["logits"]).abs().max())
        routes = golden["router_experts"].shape[0] * golden["router_experts"].shape[1]
        route_same = int((ours["router_experts"] == golden["router_experts"]).all(dim=-1).sum())
        gen_same = bool(torch.equal(ours["generated"], golden["generated"]))
        ok = diff <= LOGIT_TOL and route_same == routes and gen_same
        failed |= not ok
        print(
            f"{meta['arch']:10} seed {args.seed} {args.size:6} {meta['on_disk_dtype']:8} "
            f"max|Δlogit| {diff:.2e}  routes {route_same}/{routes}  greedy {'same' if gen_same else 'DIFFERENT'}  "
            f"min router margin {meta['min_router_margin']:.1e}  {'ok' if ok else 'FAIL'}"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
