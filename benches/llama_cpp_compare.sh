#!/usr/bin/env bash
# shadowmoe's engine against llama.cpp on the same weights, side by side (issue 12):
#
#   bash benches/llama_cpp_compare.sh [MODEL_DIR ...]
#
# Default models: the bundled reference model (hidden 64) and function-preserving inflated
# copies at hidden 1024 (expert width 256) and hidden 2048 (width 128), all in memory (bf16).
# Steps, each kept for the next run under $SHADOWMOE_LLAMA_DIR (~/.cache/shadowmoe/llama):
#   1. llama.cpp from the llama-cpp-python 0.3.36 sdist, built with cmake (GGML_NATIVE=ON):
#      about 10 minutes on 2 cores (apt: cmake g++);
#   2. a Python venv with the sdist's convert_hf_to_gguf.py requirements (torch CPU, ~1 GB);
#   3. each checkpoint converted to GGUF bf16 (the bundled tokenizer's pre-tokenizer is
#      llama.cpp's `qwen2` split rule; the script says so to the converter);
#   4. `cargo bench --profile dev --bench engine_speed` (the test build, every crate optimised): decode (tg64) and prefill (pp128) tok/s at 1 and 2
#      threads, the two engines alternating, 3 repeats, medians; weight bytes per decode token,
#      the GB/s each reaches, and this machine's memory-read bandwidth in the same run;
#   5. the same on quantised files (QUANTS, default "Q8_0 Q4_K_M", made by llama-quantize from
#      the bf16 file): both engines read the very same GGUF file.
# PREPARE_ONLY=1 stops after step 3 (build, convert: nothing timed), so that the timed part can
# run later on a quiet machine. SAME_GGUF=1 also times shadowmoe on the converted file itself
# (what step 4 gives llama.cpp), beside the quantised ones.
#
# gpt-oss: `python benches/make_gpt_oss_shaped.py --out DIR` writes a checkpoint at gpt-oss-20b's
# widths with the hub's MXFP4 experts (4 layers, random weights); then
#   QUANTS="" SAME_GGUF=1 bash benches/llama_cpp_compare.sh DIR
# times shadowmoe on the hub files (MXFP4 on f32 activations, transformers' arithmetic) and on
# the converted GGUF (MXFP4 on Q8_0 activations, llama.cpp's), and llama.cpp on that GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${SHADOWMOE_LLAMA_DIR:-$HOME/.cache/shadowmoe/llama}
mkdir -p "$CACHE"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}

# 1. llama.cpp
SRC="$CACHE/llama_cpp_python-0.3.36/vendor/llama.cpp"
if [ ! -x "$SRC/build/bin/llama-bench" ] || [ ! -x "$SRC/build/bin/llama-quantize" ]; then
  if [ ! -d "$SRC" ]; then
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python \
      llama-cpp-python==0.3.36 -d "$CACHE"
    tar -xzf "$CACHE"/llama_cpp_python-0.3.36.tar.gz -C "$CACHE"
  fi
  echo "building llama.cpp (about 10 minutes on 2 cores)" >&2
  t=$(date +%s)
  cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF > "$CACHE/cmake.log"
  cmake --build "$SRC/build" -j"$(nproc)" --target llama-bench llama-quantize >> "$CACHE/cmake.log"
  echo "built llama-bench in $(( $(date +%s) - t )) s" >&2
fi
BENCH="$SRC/build/bin/llama-bench"
QUANTIZE="$SRC/build/bin/llama-quantize"

# 2. the converter's Python
PY="$CACHE/venv/bin/python"
if ! "$PY" -c "import gguf, torch, transformers" 2>/dev/null; then
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install -q --extra-index-url https://download.pytorch.org/whl/cpu \
    -r "$SRC/requirements/requirements-convert_hf_to_gguf.txt" || \
  "$CACHE/venv/bin/pip" install -q numpy sentencepiece transformers torch safetensors
  "$CACHE/venv/bin/pip" install -q -e "$SRC/gguf-py"
fi
# Our checkpoints' tokenizer_config.json names transformers 5's `TokenizersBackend`, which the
# converter's pinned transformers 4.57 does not know.
"$PY" -c "import transformers, sys; sys.exit(transformers.__version__ < '5')" 2>/dev/null || \
  "$CACHE/venv/bin/pip" install -q transformers==5.23.0
# Our tokenizer's pre-tokenizer hash is unknown to the converter; its split rule is qwen2's.
# A patched copy beside its own modules (this llama.cpp splits the converter into conversion/).
CONVERT_DIR="$CACHE/convert"
rm -rf "$CONVERT_DIR"; mkdir -p "$CONVERT_DIR"
cp "$SRC/convert_hf_to_gguf.py" "$CONVERT_DIR/"
[ -d "$SRC/conversion" ] && cp -r "$SRC/conversion" "$CONVERT_DIR/"
grep -rl --include='*.py' '^\s*res = None$' "$CONVERT_DIR" | xargs sed -i 's/^\(\s*\)res = None$/\1res = "qwen2"/'
CONVERT="$CONVERT_DIR/convert_hf_to_gguf.py"

# 3. the checkpoints
# The test build: every crate optimised (Cargo.toml's dev profile), and no second build of burn.
cargo test --workspace --no-run -q
SM="$CARGO_TARGET_DIR/debug/shadowmoe"
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=(models/reference/checkpoint)
  for spec in 1024:256 2048:128; do
    h=${spec%%:*} w=${spec##*:}
    d="$CACHE/reference-h$h-i$w"
    [ -d "$d" ] || "$SM" inflate --model models/reference/checkpoint --out "$d" --hidden "$h" --moe-intermediate "$w"
    models+=("$d")
  done
fi
for m in "${models[@]}"; do
  name=$(basename "$m")
  gguf="$CACHE/$name.bf16.gguf"
  if [ ! -f "$gguf" ]; then
    # The converter reads the hub spellings of two renamed config keys.
    tmp="$CACHE/hf-$name"; rm -rf "$tmp"; mkdir -p "$tmp"
    for f in "$m"/*; do ln -s "$(realpath "$f")" "$tmp/"; done
    rm "$tmp/config.json"
    "$PY" - "$m/config.json" "$tmp/config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
c.setdefault("num_experts", c.get("num_local_experts"))
rp = c.get("rope_parameters") or {}
c.setdefault("rope_theta", rp.get("rope_theta", 1e6))
json.dump(c, open(sys.argv[2], "w"), indent=2)
EOF
    "$PY" "$CONVERT" "$tmp" --outtype bf16 --outfile "$gguf" > "$CACHE/convert-$name.log" 2>&1
  fi
  quants=()
  for q in ${QUANTS-Q8_0 Q4_K_M}; do
    qg="$CACHE/$name.$q.gguf"
    [ -f "$qg" ] || "$QUANTIZE" "$gguf" "$qg" "$q" > "$CACHE/quantize-$name-$q.log" 2>&1
    quants+=("$qg")
  done
  [ "${SAME_GGUF:-0}" = 1 ] && quants+=("$gguf")
  [ "${PREPARE_ONLY:-0}" = 1 ] && { echo "prepared $gguf ${quants[*]}"; continue; }
  echo
  # Both engines' files in the page cache before anything is timed (the bench's warm-up pass
  # touches only the experts its tokens route to).
  cat "$m"/*.safetensors "$gguf" > /dev/null
  SHADOWMOE_BENCH_MODEL="$(realpath "$m")" SHADOWMOE_LLAMA_BENCH="$BENCH" SHADOWMOE_LLAMA_GGUF="$gguf" \
    cargo bench -q --workspace --profile dev --bench engine_speed
  # Quantised: shadowmoe reads the same GGUF file llama.cpp does.
  for qg in "${quants[@]}"; do
    echo
    cat "$qg" > /dev/null
    SHADOWMOE_BENCH_MODEL="$qg" SHADOWMOE_LLAMA_BENCH="$BENCH" SHADOWMOE_LLAMA_GGUF="$qg" \
      cargo bench -q --workspace --profile dev --bench engine_speed
  done
done
