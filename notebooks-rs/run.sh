#!/usr/bin/env bash
# Redraws one figure (fig1 … fig9) or all of them from a run folder:
#   bash notebooks-rs/run.sh fig2 runs/pipeline [figures/]
#   bash notebooks-rs/run.sh all  runs/pipeline [figures/]
# Builds the workspace as the tests do (a `-p` build would rebuild polars and burn).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 fig1..fig9|all RUN_DIR [OUT]" >&2; exit 2; }
cargo test --workspace --no-run -q
BIN=${CARGO_TARGET_DIR:-target}/debug
for f in "$BIN"/fig[1-9]_*; do
  [ -x "$f" ] || continue
  name=$(basename "$f")
  case "$1" in all|"${name:0:4}") "$f" "$2" "${3:-figures}" ;; esac
done
