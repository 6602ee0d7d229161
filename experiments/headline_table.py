#!/usr/bin/env python3
"""The headline table from a run folder of experiments/headline.sh: one row per live
configuration (capacity, pinning, predictor, depth, span, prefetch readers), live figures as
median (min-max) over repeats, the simulator's figures for the same configuration beside them,
the sim/live ratio of decode tok/s and the speed-up over no prefetching at the same capacity,
pinning and readers.

    python3 experiments/headline_table.py runs/headline [--capacity 160]

Needs pyarrow (any recent version). Reads every sweep-live*/ and sweep-sim*/ folder
(results.parquet and manifest.json).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq


def folders(run, mode):
    """(readers, row) for every error-free row of every sweep-MODE* folder."""
    out = []
    for d in sorted(run.glob(f"sweep-{mode}*")):
        res = d / "results.parquet"
        if not res.is_file():
            continue
        readers = 0
        man = d / "manifest.json"
        if man.is_file():
            readers = json.loads(man.read_text()).get("source", {}).get("prefetch_readers", 0) or 0
        for r in pq.read_table(res).to_pylist():
            if not r.get("error"):
                out.append((readers, r))
    return out


def key(readers, r):
    depth = r["prefetch_depth"] if r["predictor"] != "none" else 0
    span = r["prefetch_span"] if depth else ""
    return (r["capacity"], r["pinning"], readers, r["predictor"], depth, span)


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
    groups = {}
    for readers, r in folders(run, "live"):
        groups.setdefault(key(readers, r), []).append(r)
    sim = {}
    for readers, r in folders(run, "sim"):
        sim.setdefault(key(readers, r), r)
    if not groups:
        print(f"{run}: no live results (sweep-live*/results.parquet)", file=sys.stderr)
        return 1
    print(
        "| capacity | pinning | readers | predictor | depth | span | live tok/s median (min-max) "
        "| × none | sim tok/s | sim/live | stall ms/tok live / sim | decode hit live / sim "
        "| precision | late prefetches | late predictions | predictor ms/tok fwd / own thread "
        "| MB read/tok | peak RSS GB |"
    )
    print("|" + "---:|" * 18)
    base = {}
    for k in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3] != "none", k[3], k[4], k[5])):
        cap, pin, readers, pred, depth, span = k
        if args.capacity and cap not in args.capacity:
            continue
        g = groups[k]
        tok = med([r["decode_tok_s"] for r in g])
        if pred == "none":
            base[(cap, pin, readers)] = tok[0]
        b = base.get((cap, pin, readers)) or base.get((cap, pin, 0))
        gain = tok[0] / b if b else float("nan")
        s = sim.get(k)
        nan = float("nan")
        st = s["est_decode_tok_s"] if s else nan
        m = lambda name: med([r.get(name) for r in g])[0]
        print(
            f"| {cap} | {short(pin)} | {readers or 'all'} | {short(pred)} | {depth or ''} | {span} "
            f"| {tok[0]:.2f} ({tok[1]:.2f}-{tok[2]:.2f}) | {gain:.2f} | {st:.2f} | {st / tok[0]:.2f} "
            f"| {m('stall_ms_per_token'):.1f} / {s['stall_ms_per_token'] if s else nan:.1f} "
            f"| {m('hit_rate_decode'):.3f} / {s['hit_rate_decode'] if s else nan:.3f} "
            f"| {m('prefetch_precision'):.2f} | {m('prefetch_late'):.0f} | {m('predictions_late'):.0f} "
            f"| {m('predictor_ms_per_token'):.2f} / {m('predictor_busy_ms_per_token'):.2f} "
            f"| {m('bytes_per_token') / 1e6:.1f} | {m('peak_rss_bytes') / 1e9:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
