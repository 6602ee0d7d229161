#!/usr/bin/env python3
"""Turns the corpus's held-out split into a prompt dataset for trace-collect: one line per
held-out document, its first CHARS characters as a raw prompt, tagged with its domain.

    python3 models/reference/eval_prompts.py --corpus models/reference/corpus --out datasets/corpus_heldout.jsonl

Used for the reference model's routing statistics (model card) and the shadow predictor's
held-out evaluation: no profile or predictor is trained on it. Deterministic (corpus order).
"""
import argparse
import json

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--corpus", default="models/reference/corpus")
ap.add_argument("--out", default="datasets/corpus_heldout.jsonl")
ap.add_argument("--chars", type=int, default=1200, help="characters of each document kept")
ap.add_argument("--per-domain", type=int, default=40, help="documents per domain at most")
args = ap.parse_args()

seen = {}
lines = []
with open(f"{args.corpus}/heldout.jsonl", encoding="utf-8") as f:
    for line in f:
        d = json.loads(line)
        n = seen.get(d["domain"], 0)
        if n >= args.per_domain:
            continue
        seen[d["domain"]] = n + 1
        text = d["text"][: args.chars]
        lines.append({"id": f"corpus-{d['domain']}-{n:03d}", "domain": d["domain"], "prompt": text})
with open(args.out, "w", encoding="utf-8") as f:
    for l in lines:
        f.write(json.dumps(l, ensure_ascii=False) + "\n")
print(f"wrote {args.out}: {len(lines)} prompts {seen}")
