#!/usr/bin/env bash
# The whole pipeline on the bundled reference model, as one command:
#   prompts → trace-collect → trace-stats (profile) → train-shadow → bench-sweep (sim)
#
#   bash experiments/pipeline.sh [OUT]            # default OUT: runs/pipeline
#
# Environment: SHADOWMOE_MODEL (default models/reference/checkpoint), NEW_TOKENS (64),
# CAPACITY (160..256:32), EXPERT_BYTES (1769472: one Qwen3-Coder-Next expert at 4 bits),
# PROFILE (release), LOSS (softmax; `both` also trains BCE and keeps the better), EPOCHS (10),
# BACKEND (auto: a hardware GPU through wgpu, else Burn's CPU backend; or wgpu, cpu).
# Finished steps are kept: rerunning continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/pipeline}
MODEL=${SHADOWMOE_MODEL:-models/reference/checkpoint}
NEW=${NEW_TOKENS:-64}
CAPACITY=${CAPACITY:-160..256:32}
EXPERT_BYTES=${EXPERT_BYTES:-1769472}
# PROFILE=dev reuses the test build (dependencies optimised, our crates at opt-level 1).
PROFILE=${PROFILE:-release}
DIR=$PROFILE; [ "$PROFILE" = dev ] && DIR=debug
BIN=${CARGO_TARGET_DIR:-target}/$DIR

cargo build --profile "$PROFILE" -p shadowmoe-experiments --bins
mkdir -p "$OUT"

# Training prompts: the four training sets in one file (the held-out set stays out).
cat datasets/code.jsonl datasets/chat.jsonl datasets/math.jsonl datasets/tools.jsonl > "$OUT/train.jsonl"
for set in train heldout; do
  ds="$OUT/train.jsonl"; [ "$set" = heldout ] && ds=datasets/heldout.jsonl
  [ -f "$OUT/$set.parquet" ] || "$BIN/trace-collect" --model "$MODEL" --dataset "$ds" \
    --out "$OUT/$set.parquet" --max-new-tokens "$NEW" --temperature 0.8 --seed 0 \
    --hidden-layers all --no-chat-template --resume
done

# Statistics and the expert profile of the training traces (what --pin reads).
"$BIN/trace-stats" --trace "$OUT/train.parquet" --out "$OUT/stats" --profile "$OUT/profile.json" --by-domain

# The shadow predictor, tested on the held-out prompts against every baseline.
[ -f "$OUT/shadow/predictor.json" ] || "$BIN/train-shadow" --traces "$OUT/train.parquet" \
  --eval-traces "$OUT/heldout.parquet" --model "$MODEL" --depth 1..4 --top-k 8 \
  --backend "${BACKEND:-auto}" --loss "${LOSS:-softmax}" --epochs "${EPOCHS:-10}" --patience 2 --out "$OUT/shadow"

# Cache sweep on the held-out trace: capacity × pinning × predictor at depth 4.
"$BIN/bench-sweep" --trace "$OUT/heldout.parquet" --model "$MODEL" --capacity "$CAPACITY" \
  --pinning "off,$OUT/profile.json:32" --prefetch-depth 0,1,4 \
  --predictor "none,popularity,previous-token,gate-lookahead,shadow:$OUT/shadow,oracle" \
  --expert-bytes "$EXPERT_BYTES" --backend "${BACKEND:-auto}" --out "$OUT/sweep"
echo "pipeline: results in $OUT (shadow/report.json, sweep/results.parquet)"
