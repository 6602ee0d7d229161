#!/usr/bin/env python3
"""Golden outputs of the reference checkpoint, computed by `transformers` (the outside referee).

Writes `golden.safetensors` and `golden.json` into the checkpoint directory, in the format of
engine/tests/golden/make.py (same chat and greedy length); the engine's parity test
`reference_model_matches_transformers` reads them.

The prompt is the first of PROMPTS whose routing has no near-tie: with 512 experts the 10th and
11th router probabilities of some token are often within 1e-6 of each other, and a gap below
what f32 summation order can move (about 1e-7) would make the exact-routing check a coin toss.
PROMPTS starts with make.py's prompt; golden.json records the prompt and its margin.

    python models/reference/golden.py --model models/reference/checkpoint
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "engine" / "tests" / "golden"))
import make  # noqa: E402

# Smallest gap between the k-th and (k+1)-th router probability (prefill and greedy decode).
MIN_MARGIN = 1e-6
PROMPTS = [
    make.PROMPT,
    "The expert cache keeps 8 experts on disk — naïve café 東京!\nWhy?",
    "Let f(x) = x**2 + 1. Then the derivative of f is",
    'def parse_args(argv):\n    """Parse the command line."""',
]


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
    for i, prompt in enumerate(PROMPTS):
        make.PROMPT = prompt
        margin = make.write_golden(model, tok, out, {**meta, "prompt_choice": f"PROMPTS[{i}] of models/reference/golden.py"})
        if margin >= MIN_MARGIN:
            return
        print(f"prompt {i}: router margin {margin:.2e} < {MIN_MARGIN:.0e}, trying the next")
    sys.exit(f"every prompt of PROMPTS has a routing near-tie (< {MIN_MARGIN:.0e}); add one")


if __name__ == "__main__":
    main()
