#!/usr/bin/env bash
# The headline experiment: the bundled reference model inflated past this machine's memory
# (hidden 2048, experts of Qwen3-Coder-Next's shape: 6,291,456 bytes each, 25.9 GB in all),
# experts read with O_DIRECT, live sweeps next to the simulator calibrated on the same machine.
#
#   bash experiments/headline.sh [OUT]          # default OUT: runs/headline
#
# Steps (finished ones are kept: rerunning continues where it stopped):
#   inflate → calibrate (I/O at depths 1..8 vs a random-bytes file, compute, baselines) →
#   trace-collect on the inflated model (experts from disk, --capacity) → trace-stats →
#   train-shadow → trace of the live prompts → calibrate again (shadow predictor; reads from
#   the live prompts' working set) → live sweep → simulated sweep
#   with the calibration → figures.
#
# Environment: SRC (models/reference/checkpoint; checkpoint-4bit: the MLX 4-bit copy, experts of
# 1,769,472 bytes, 7.3 GB), BIG (models/inflated/h2048-i512), CAPACITY (32,64,128,160,192,256; the simulated
# grid), LIVE_CAPACITY (CAPACITY), LIVE_MORE (1; 0: live grid A and depth 2 at 160 only), REPEAT (3), TRAIN_TOKENS (16: new tokens per training prompt), TRAIN_SHARD (0/1: every N-th prompt of both traces),
# LIVE_DATASET (datasets/live-short.jsonl), LIVE_PROMPTS (2), LIVE_TOKENS (40), IO_THREADS (4), CONTROL (1:
# also read a random-bytes file the size of the experts; needs 26 GB free), PROFILE (dev: the
# build `cargo test` makes, every crate optimised), BIN (a folder of built binaries: nothing is built).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/headline}
SRC=${SRC:-models/reference/checkpoint}
BIG=${BIG:-models/inflated/h2048-i512}
CAPACITY=${CAPACITY:-32,64,128,160,192,256}
REPEAT=${REPEAT:-3}
IO_THREADS=${IO_THREADS:-4}
# Short prompts: a prompt's prefill at low capacity reads most of the 25.8 GB, decode is the point.
LIVE_DATASET=${LIVE_DATASET:-datasets/live-short.jsonl}
PROFILE=${PROFILE:-dev}
DIR=$PROFILE; [ "$PROFILE" = dev ] && DIR=debug
# BIN: a folder of already built binaries (then nothing is built).
PREBUILT=${BIN:-}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/$DIR}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
t0=$(date +%s)
step() { echo "== $(( $(date +%s) - t0 ))s: $*" >&2; }

if [ -n "$PREBUILT" ]; then
  :
elif [ "$PROFILE" = dev ]; then
  cargo test --workspace --no-run -q
else
  cargo build --workspace --profile "$PROFILE" -q
fi
mkdir -p "$OUT"

step "inflate"
[ -d "$BIG" ] || "$BIN/shadowmoe" inflate --model "$SRC" --out "$BIG" \
  --hidden 2048 --moe-intermediate 512

step "calibrate (I/O, compute, baselines)"
if [ ! -f "$OUT/calibration-io.json" ]; then
  control=(); [ "${CONTROL:-1}" = 1 ] && control=(--control-file "$OUT/control-random.bin")
  "$BIN/bench-sweep" calibrate --model "$BIG" --depths 1..8 --reads 192 "${control[@]}" \
    --predictor gate-lookahead,previous-token --out "$OUT/calibration-io.json"
  rm -f "$OUT/control-random.bin"
fi

# Traces of the inflated model itself (experts from disk through a cache of 256 per layer).
cat datasets/code.jsonl datasets/chat.jsonl datasets/math.jsonl datasets/tools.jsonl > "$OUT/train.jsonl"
for set in train heldout; do
  ds="$OUT/train.jsonl"; [ "$set" = heldout ] && ds=datasets/heldout.jsonl
  step "trace-collect $set"
  [ -f "$OUT/$set.parquet" ] || "$BIN/trace-collect" --model "$BIG" --dataset "$ds" \
    --out "$OUT/$set.parquet" --max-new-tokens "${TRAIN_TOKENS:-16}" --shard "${TRAIN_SHARD:-0/1}" --temperature 0.8 --seed 0 \
    --hidden-layers all --hidden-dtype f16 --no-chat-template --resume --capacity 256 --io direct
done
step "trace-stats"
[ -f "$OUT/profile.json" ] || "$BIN/trace-stats" --trace "$OUT/train.parquet" --out "$OUT/stats" \
  --profile "$OUT/profile.json" > "$OUT/stats.txt"
step "train-shadow"
[ -f "$OUT/shadow/predictor.json" ] || "$BIN/train-shadow" --traces "$OUT/train.parquet" \
  --eval-traces "$OUT/heldout.parquet" --model "$BIG" --depth 1..4 --top-k 10 \
  --backend "${BACKEND:-auto}" --loss softmax --epochs "${EPOCHS:-3}" --patience 2 --out "$OUT/shadow"

# The simulator replays the live run's own routing: a trace of the same prompts, greedy.
step "trace-collect live prompts"
[ -f "$OUT/live.parquet" ] || "$BIN/trace-collect" --model "$BIG" --dataset "$LIVE_DATASET" \
  --limit "${LIVE_PROMPTS:-2}" --out "$OUT/live.parquet" --max-new-tokens "${LIVE_TOKENS:-40}" \
  --hidden-layers all --hidden-dtype f16 --no-chat-template --capacity 256 --io direct

# The simulator's calibration reads the live prompts' working set (warmed once), as the live
# sweep reads it again and again: this machine's virtual disk serves recently read experts
# about twice as fast as random ones (calibration-io.json holds the random reads).
step "calibrate (with the shadow predictor, on the live prompts' working set)"
[ -f "$OUT/calibration.json" ] || "$BIN/bench-sweep" calibrate --model "$BIG" --depths 1..8 \
  --reads 192 --predictor "gate-lookahead,previous-token,shadow:$OUT/shadow" --targets 1 \
  --trace "$OUT/live.parquet" --backend "${BACKEND:-auto}" --out "$OUT/calibration.json"

SH="shadow:$OUT/shadow"
PROF="$OUT/profile.json"
run_sweep() { # NAME MODE ARGS...: one sweep (skipped when its results exist)
  local name=$1 mode=$2; shift 2
  [ -f "$OUT/$name/results.parquet" ] && return 0
  if [ "$mode" = live ]; then
    "$BIN/bench-sweep" --mode live --model "$BIG" --dataset "$LIVE_DATASET" \
      --limit "${LIVE_PROMPTS:-2}" --max-new-tokens "${LIVE_TOKENS:-40}" --no-chat-template --io direct \
      --repeat "$REPEAT" --io-threads "$IO_THREADS" --profile "$PROF" --backend "${BACKEND:-auto}" \
      "$@" --out "$OUT/$name"
  else
    "$BIN/bench-sweep" --mode sim --trace "$OUT/live.parquet" --model "$BIG" \
      --io-profile "$OUT/calibration.json" --io-threads "$IO_THREADS" --profile "$PROF" \
      --backend "${BACKEND:-auto}" "$@" --out "$OUT/$name"
  fi
}
# Live time is dear (a configuration takes ~15 s per repeat here), so the live grid is the
# question's core and the simulator covers the rest of it:
# A: every capacity: no prefetching, gate-lookahead and shadow at depth 1.
# A160: capacity 160: previous-token, gate-lookahead and shadow at depths 2 and 4 too.
# B: capacity 160 with the profile's 32 most used experts pinned.
# C: capacity 160, spans all/wrap; C1: one prefetch reader.
LIVE_CAPACITY=${LIVE_CAPACITY:-$CAPACITY}
for mode in live sim; do
  caps=$CAPACITY; [ "$mode" = live ] && caps=$LIVE_CAPACITY
  step "bench-sweep $mode: A (capacity × predictor × depth)"
  if [ "$mode" = live ]; then
    run_sweep sweep-live-a live --capacity "$caps" --prefetch-depth 0,1 --predictor "none,gate-lookahead,$SH"
    [ "${LIVE_MORE:-1}" = 1 ] && run_sweep sweep-live-a160 live --capacity 160 --prefetch-depth 1 --predictor previous-token
    run_sweep sweep-live-a160g live --capacity 160 --prefetch-depth 2 --predictor "gate-lookahead,$SH"
    [ "${LIVE_MORE:-1}" = 1 ] && run_sweep sweep-live-a160s live --capacity 160 --prefetch-depth 4 --predictor "$SH"
  else
    run_sweep sweep-sim-a sim --capacity "$caps" --prefetch-depth 0,1,2,4 \
      --predictor "none,previous-token,gate-lookahead,$SH,oracle"
  fi
  [ "$mode" = live ] && [ "${LIVE_MORE:-1}" = 0 ] && continue
  step "bench-sweep $mode: B (pinning)"
  run_sweep "sweep-$mode-b" "$mode" --capacity 160 --pinning "$PROF:32" --prefetch-depth 0,1 --predictor "none,$SH"
  step "bench-sweep $mode: C (spans)"
  run_sweep "sweep-$mode-c" "$mode" --capacity 160 --prefetch-depth 2 --prefetch-span all,wrap --predictor "$SH"
done

step "plot-figures"
"$BIN/plot-figures" --results "$OUT" --out "$OUT/figures"
step "done: $OUT (calibration.json, sweep-live-*/, sweep-sim-*/, figures/; python3 experiments/headline_table.py $OUT)"
