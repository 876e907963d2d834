#!/usr/bin/env bash
# Prefill and decode speed of rfid-moe's own runtime against llama.cpp's on the same GGUF file,
# in one run, with the same threads: `rfid-moe generate` (greedy, EOS ignored) against
# `llama-bench` (-p PROMPT_TOKENS -n NEW_TOKENS, 3 repetitions), each on every GGUF given.
# Prints a markdown table with each engine's tokens/s and the ratio rfid-moe / llama.cpp; the
# absolute figures depend on the machine and its load, the ratio less so (both measured back to
# back). llama-bench is built into the llama.cpp build of scripts/llama-cpp.sh (one more target,
# about a CPU-minute once).
#
# Usage: scripts/bench-serve-speed.sh PROMPT_FILE NEW_TOKENS THREADS GGUF_DIR...
#   PROMPT_FILE  text for the prompt; its token count (as rfid-moe's tokenizer counts it) is the
#                -p of llama-bench, so both prefill the same number of tokens
#   GGUF_DIR     a `compress --format gguf` output directory (model.gguf + tokenizer.json)
# The rfid-moe binary is $RFID_MOE_BIN, else release/rfid-moe under $CARGO_TARGET_DIR (or target/).
set -euo pipefail
PROMPT=$1; NEW=$2; THREADS=$3
shift 3
HERE=$(cd "$(dirname "$0")/.." && pwd)
RFID=${RFID_MOE_BIN:-${CARGO_TARGET_DIR:-$HERE/target}/release/rfid-moe}
LLAMA=$("$HERE/scripts/llama-cpp.sh" | tail -n 1)
if [ ! -x "$LLAMA/llama-bench" ]; then
  # cmake and ninja live in the build's own venv (scripts/llama-cpp.sh).
  PATH="$(dirname "$(dirname "$LLAMA")")/V/bin:$PATH" \
    cmake --build "$(dirname "$LLAMA")" --target llama-bench -j "$THREADS" > /dev/null
fi
export RAYON_NUM_THREADS=$THREADS

echo "| model | file MB | engine | prefill tok/s | decode tok/s | prefill ours/llama.cpp | decode ours/llama.cpp |"
echo "| --- | ---: | --- | ---: | ---: | ---: | ---: |"
for dir in "$@"; do
  gguf="$dir/model.gguf"
  mb=$(python3 -c "import os,sys; print(f'{os.path.getsize(sys.argv[1])/1e6:.1f}')" "$gguf")
  # Ours: the best of 3 runs (prefill and decode each), as llama-bench reports its mean of 3.
  best_prefill=0; best_decode=0; prompt_tokens=0
  for _ in 1 2 3; do
    line=$("$RFID" generate --model "$dir" --prompt-file "$PROMPT" --max-new-tokens "$NEW" \
      --ignore-eos --ids 2>&1 >/dev/null | grep 'prompt tokens at')
    read -r prompt_tokens prefill decode < <(python3 - "$line" <<'PY'
import re, sys
m = re.search(r"(\d+) prompt tokens at ([0-9.]+) tokens/s; \d+ new tokens, ([0-9.]+) tokens/s", sys.argv[1])
print(m.group(1), m.group(2), m.group(3))
PY
)
    best_prefill=$(python3 -c "print(max($best_prefill, $prefill))")
    best_decode=$(python3 -c "print(max($best_decode, $decode))")
  done
  json=$("$LLAMA/llama-bench" -m "$gguf" -p "$prompt_tokens" -n "$NEW" -t "$THREADS" -r 3 -o json 2>/dev/null)
  python3 - "$json" "$dir" "$mb" "$best_prefill" "$best_decode" "$prompt_tokens" <<'PY'
import json, sys
rows = json.loads(sys.argv[1])
name, mb, prefill, decode = sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
llama_prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
llama_decode = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
print(f"| {name} ({sys.argv[6]} prompt tokens) | {mb} | llama.cpp | {llama_prefill:.1f} | {llama_decode:.1f} | | |")
print(f"| | | rfid-moe | {prefill:.1f} | {decode:.1f} | {prefill / llama_prefill:.2f}× | {decode / llama_decode:.2f}× |")
PY
done
