#!/usr/bin/env python3
"""Writes a random-init twin of a trained checkpoint: the same config and tokenizer, random
weights (seeded), in bf16. The model card compares the trained model's routing with its twins'.

`--init transformers` (default): the weights as transformers initialises them (normal, std
`initializer_range` = 0.02, norms 1). `--init unit`: the init of the engine's random test
checkpoints (`engine/tests/golden/make.py`): embeddings of std 1, matrices of std 1/sqrt(fan-in),
routers 3/sqrt(fan-in), norms 1 ± 0.3.

    python models/reference/random_twin.py --trained models/reference/checkpoint --out /tmp/ref-random
    python models/reference/random_twin.py --trained models/reference/checkpoint --out /tmp/ref-unit --init unit
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--trained", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--init", choices=["transformers", "unit"], default="transformers")
args = ap.parse_args()

torch.manual_seed(args.seed)
cfg = AutoConfig.from_pretrained(args.trained)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
if args.init == "unit":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "engine" / "tests" / "golden"))
    from make import init_weights  # noqa: E402

    init_weights(model, torch.Generator().manual_seed(args.seed))
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
model.to(torch.bfloat16).save_pretrained(out)
for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
    src = Path(args.trained) / f
    if src.exists():
        shutil.copy(src, out / f)
print(f"wrote {out}")
