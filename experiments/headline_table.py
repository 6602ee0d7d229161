#!/usr/bin/env python3
"""The headline table from a run folder of experiments/headline.sh: one row per (capacity,
pinning, predictor, depth, span), live figures as median (min-max) over repeats, the
simulator's figures beside them, and the sim/live ratio of decode tok/s.

    python3 experiments/headline_table.py runs/headline [--capacity 160] [--markdown]

Needs pyarrow (any recent version). Reads sweep-live/results.parquet and sweep-sim/results.parquet.
"""
import argparse
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq


def rows(path):
    t = pq.read_table(path).to_pylist()
    return [r for r in t if not r["error"]]


def key(r):
    return (r["capacity"], r["pinning"], r["predictor"], r["prefetch_depth"], r["prefetch_span"])


def med(vals):
    vals = [v for v in vals if v is not None and v == v]
    if not vals:
        return (float("nan"),) * 3
    return statistics.median(vals), min(vals), max(vals)


def short(p):
    if p.startswith("shadow:"):
        return "shadow"
    if "/" in p:
        return "pin " + p.rsplit("/", 1)[1]
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--capacity", type=int, action="append")
    args = ap.parse_args()
    run = Path(args.run)
    live = rows(run / "sweep-live/results.parquet")
    sim = {key(r): r for r in rows(run / "sweep-sim/results.parquet")}
    groups = {}
    for r in live:
        groups.setdefault(key(r), []).append(r)
    print(
        "| capacity | pinning | predictor | depth | span | live tok/s (min-max) | sim tok/s | sim/live "
        "| stall ms/tok live / sim | decode hit live / sim | precision | late prefetch | late pred. "
        "| MB read/tok | peak RSS GB |"
    )
    print("|" + "---:|" * 15)
    base = {}
    for k in sorted(groups):
        cap, pin, pred, depth, span = k
        if args.capacity and cap not in args.capacity:
            continue
        g = groups[k]
        tok = med([r["decode_tok_s"] for r in g])
        s = sim.get(k)
        st = s["est_decode_tok_s"] if s else float("nan")
        if pred == "none":
            base[(cap, pin)] = tok[0]
        hit = med([r["hit_rate_decode"] for r in g])[0]
        stall = med([r["stall_ms_per_token"] for r in g])[0]
        prec = med([r["prefetch_precision"] for r in g])[0]
        late = med([r["prefetch_late"] for r in g])[0]
        latep = med([r["predictions_late"] for r in g])[0]
        mb = med([r["bytes_per_token"] for r in g])[0] / 1e6
        rss = med([r["peak_rss_bytes"] for r in g])[0] / 1e9
        print(
            f"| {cap} | {short(pin)} | {short(pred)} | {depth} | {span if depth else ''} "
            f"| {tok[0]:.2f} ({tok[1]:.2f}-{tok[2]:.2f}) | {st:.2f} | {st / tok[0]:.2f} "
            f"| {stall:.1f} / {s['stall_ms_per_token'] if s else float('nan'):.1f} "
            f"| {hit:.3f} / {s['hit_rate_decode'] if s else float('nan'):.3f} "
            f"| {prec:.2f} | {late:.0f} | {latep:.0f} | {mb:.1f} | {rss:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
