#!/usr/bin/env python3
"""Golden outputs of the reference checkpoint, computed by `transformers` (the outside referee).

Writes `golden.safetensors` and `golden.json` into the checkpoint directory, in the format of
engine/tests/golden/make.py (same prompt, chat and greedy length); the engine's parity test
`reference_model_matches_transformers` reads them.

    python models/reference/golden.py --model models/reference/checkpoint
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "engine" / "tests" / "golden"))
import make  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (golden files are written into it)")
    args = ap.parse_args()
    out = Path(args.model)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    meta = {"arch": model.config.model_type, "checkpoint": str(out), "on_disk_dtype": "bfloat16"}
    make.write_golden(model, tok, out, meta)


if __name__ == "__main__":
    main()
