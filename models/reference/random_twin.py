#!/usr/bin/env python3
"""Writes the random-init twin of a trained checkpoint: the same config and tokenizer, weights
as transformers initialises them (seeded), in bf16. The model card compares the trained model's
routing with this twin's.

    python models/reference/random_twin.py --trained models/reference/checkpoint --out /tmp/ref-random
"""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--trained", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()

torch.manual_seed(args.seed)
cfg = AutoConfig.from_pretrained(args.trained)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
model.to(torch.bfloat16).save_pretrained(out)
for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
    src = Path(args.trained) / f
    if src.exists():
        shutil.copy(src, out / f)
print(f"wrote {out}")
