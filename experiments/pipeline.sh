#!/usr/bin/env bash
# The whole pipeline on the bundled reference model, as one command:
#   prompts → trace-collect → trace-stats (profile) → train-shadow → bench-sweep (sim and live)
#   → plot-figures
#
#   bash experiments/pipeline.sh [OUT]            # default OUT: runs/pipeline
#
# Environment: SHADOWMOE_MODEL (default models/reference/checkpoint), NEW_TOKENS (32),
# CAPACITY (160..256:32), EXPERT_BYTES (1769472: one Qwen3-Coder-Next expert at 4 bits),
# PROFILE (dev: the build `cargo test` makes; release for speed), LOSS (softmax; `both` also
# trains BCE and keeps the better), EPOCHS (3), BACKEND (auto: a hardware GPU through wgpu, else
# Burn's CPU backend; or wgpu, cpu), LIVE_PROMPTS (8: held-out prompts of the live sweep),
# LIVE_TOKENS (16), QUALITY_TOKENS (1000), QUALITY_PROMPTS (2), QUALITY_CAPACITY (32,64,128),
# PREDICTOR_MS (0.6: modelled shadow predictor time per layer call in the sim
# sweep; see README for the measured figure), GGUF (models/reference/checkpoint-q8_0.gguf: the
# bundled model as llama.cpp's Q8_0 file, traced and swept live in the `gguf` step).
# Finished steps are kept: rerunning continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/pipeline}
MODEL=${SHADOWMOE_MODEL:-models/reference/checkpoint}
NEW=${NEW_TOKENS:-32}
CAPACITY=${CAPACITY:-160..256:32}
EXPERT_BYTES=${EXPERT_BYTES:-1769472}
PROFILE=${PROFILE:-dev}
DIR=$PROFILE; [ "$PROFILE" = dev ] && DIR=debug
BIN=${CARGO_TARGET_DIR:-target}/$DIR
BACKEND=${BACKEND:-auto}
# wgpu's adapter probe asks the desktop session for a runtime dir; without one it prints errors.
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
t0=$(date +%s)
step() { echo "== $(( $(date +%s) - t0 ))s: $*" >&2; }

# The whole workspace, as the tests build it: `-p` alone would unify features differently and
# rebuild polars and burn.
if [ "$PROFILE" = dev ]; then
  cargo test --workspace --no-run -q
else
  cargo build --workspace --profile "$PROFILE" -q
fi
mkdir -p "$OUT"

# Training prompts: the four training sets in one file (the held-out set stays out).
cat datasets/code.jsonl datasets/chat.jsonl datasets/math.jsonl datasets/tools.jsonl > "$OUT/train.jsonl"
for set in train heldout; do
  ds="$OUT/train.jsonl"; [ "$set" = heldout ] && ds=datasets/heldout.jsonl
  step "trace-collect $set"
  [ -f "$OUT/$set.parquet" ] || "$BIN/trace-collect" --model "$MODEL" --dataset "$ds" \
    --out "$OUT/$set.parquet" --max-new-tokens "$NEW" --temperature 0.8 --seed 0 \
    --hidden-layers all --no-chat-template --resume
done

# Statistics and the expert profile of the training traces (what --pin reads).
step "trace-stats"
"$BIN/trace-stats" --trace "$OUT/train.parquet" --out "$OUT/stats" --profile "$OUT/profile.json" --by-domain > "$OUT/stats.txt"

# The shadow predictor, tested on the held-out prompts against every baseline.
step "train-shadow"
[ -f "$OUT/shadow/predictor.json" ] || "$BIN/train-shadow" --traces "$OUT/train.parquet" \
  --eval-traces "$OUT/heldout.parquet" --model "$MODEL" --depth 1..4 --top-k 8 \
  --backend "$BACKEND" --loss "${LOSS:-softmax}" --epochs "${EPOCHS:-3}" --patience 2 --out "$OUT/shadow"

# Simulated sweeps on the held-out trace, experts the size of Qwen3-Coder-Next's:
# eviction policies and pinning without prefetching; then predictors × prefetch depth.
step "bench-sweep sim: policies"
"$BIN/bench-sweep" --trace "$OUT/heldout.parquet" --model "$MODEL" --capacity "$CAPACITY" \
  --policy lru,lfu,lcp,belady --pinning "off,$OUT/profile.json:32" \
  --expert-bytes "$EXPERT_BYTES" --replace --out "$OUT/sweep-policy"
step "bench-sweep sim: prefetching"
"$BIN/bench-sweep" --trace "$OUT/heldout.parquet" --model "$MODEL" --capacity "$CAPACITY" \
  --prefetch-depth 0,1,2,4 \
  --predictor "none,popularity,previous-token,gate-lookahead,shadow:$OUT/shadow,oracle" \
  --predictor-ms "${PREDICTOR_MS:-0.6}" --profile "$OUT/profile.json" \
  --expert-bytes "$EXPERT_BYTES" --backend "$BACKEND" --replace --out "$OUT/sweep-prefetch"

# The engine itself, live: sync and skip-on-miss, with and without shadow prefetching.
step "bench-sweep live"
"$BIN/bench-sweep" --mode live --model "$MODEL" --dataset datasets/heldout.jsonl \
  --limit "${LIVE_PROMPTS:-8}" --max-new-tokens "${LIVE_TOKENS:-16}" --no-chat-template \
  --capacity "$CAPACITY" --on-miss sync,skip --prefetch-depth 0,4 \
  --predictor "none,shadow:$OUT/shadow" --profile "$OUT/profile.json" \
  --backend "$BACKEND" --replace --out "$OUT/sweep-live"

# Quality at length: 1,000 generated tokens per prompt with skip-on-miss against sync (exact),
# pinning off and on — perplexity, KL and top-1 agreement on the prompts' text, and the
# repetition of what was generated (fig8).
step "bench-sweep live: quality and repetition at ${QUALITY_TOKENS:-1000} tokens"
"$BIN/bench-sweep" --mode live --model "$MODEL" --dataset datasets/heldout.jsonl \
  --limit "${QUALITY_PROMPTS:-2}" --max-new-tokens "${QUALITY_TOKENS:-1000}" --no-chat-template \
  --capacity "${QUALITY_CAPACITY:-32,64,128}" --on-miss sync,skip --pinning "off,$OUT/profile.json:16" \
  --replace --out "$OUT/sweep-quality"

# The same model as llama.cpp's users hold it: its Q8_0 GGUF file (made by llama.cpp's converter
# and llama-quantize; computed as llama.cpp computes it), traced and swept live like the above
# (in gguf/, apart from the figures, which read the folders of OUT one level down).
GGUF=${GGUF:-models/reference/checkpoint-q8_0.gguf}
step "gguf: trace-collect and bench-sweep live on $GGUF"
mkdir -p "$OUT/gguf"
[ -f "$OUT/gguf/heldout.parquet" ] || "$BIN/trace-collect" --model "$GGUF" \
  --dataset datasets/heldout.jsonl --limit "${LIVE_PROMPTS:-8}" --out "$OUT/gguf/heldout.parquet" \
  --max-new-tokens "$NEW" --temperature 0.8 --seed 0 --no-chat-template --resume
"$BIN/bench-sweep" --mode live --model "$GGUF" --dataset datasets/heldout.jsonl \
  --limit "${LIVE_PROMPTS:-8}" --max-new-tokens "${LIVE_TOKENS:-16}" --no-chat-template \
  --capacity "$CAPACITY" --replace --out "$OUT/gguf/sweep-live"

step "plot-figures"
"$BIN/plot-figures" --results "$OUT" --out "$OUT/figures"
step "done: results in $OUT (shadow/report.json, sweep-*/results.parquet, figures/)"
