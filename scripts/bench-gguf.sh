#!/usr/bin/env bash
# GGUF at equal file size, measured by llama.cpp itself: `compress --format gguf` against
# llama-quantize's own Q4_K_M / Q3_K_M / Q2_K of our bf16 GGUF export of the same model, plain
# and with an importance matrix (llama-imatrix over the same CALIBRATION text rfid-moe uses: the
# strongest llama.cpp recipe; the types and so the file sizes are the same).
# Perplexity is llama-perplexity's (-c 512, second half of each chunk scored) on TEXT.
#
# Usage: scripts/bench-gguf.sh MODEL CALIBRATION TEXT WORKDIR [TYPE[:OTHER]...]
#   MODEL        model directory (bf16 safetensors with tokenizer.json)
#   CALIBRATION  calibration text for compress
#   TEXT         the text perplexity is measured on (held-out, never the calibration windows)
#   WORKDIR      where the files go (created)
#   TYPE         a llama-quantize type (default Q4_K_M:q8_0 Q3_K_M:q5_0 Q2_K:q4_0); OTHER is
#                the --other-type of our output at that size (default q8_0): the ggml type of
#                the weights outside the routed experts, which llama-quantize quantises too
# The rfid-moe binary is $RFID_MOE_BIN or target/release/rfid-moe; llama.cpp comes from
# scripts/llama-cpp.sh. Each of our outputs gets the --ratio that makes its file as large as
# llama-quantize's: the routed experts keep the file size less what the rest of the file takes.
# Prints a markdown table and writes WORKDIR/gguf-bench.json.
set -euo pipefail
MODEL=$1; CALIBRATION=$2; TEXT=$3; WORK=$4
shift 4
TYPES=("$@"); [ ${#TYPES[@]} -gt 0 ] || TYPES=(Q4_K_M:q8_0 Q3_K_M:q5_0 Q2_K:q4_0)
HERE=$(cd "$(dirname "$0")/.." && pwd)
RFID=${RFID_MOE_BIN:-${CARGO_TARGET_DIR:-$HERE/target}/release/rfid-moe}
LLAMA=$("$HERE/scripts/llama-cpp.sh" | tail -n 1)
mkdir -p "$WORK"
if [ ! -x "$LLAMA/llama-imatrix" ]; then
  # cmake and ninja live in the build's own venv (scripts/llama-cpp.sh).
  PATH="$(dirname "$(dirname "$LLAMA")")/V/bin:$PATH" \
    cmake --build "$(dirname "$LLAMA")" --target llama-imatrix -j 2 > /dev/null
fi

ppl() { # llama-perplexity's running estimate after the last chunk it printed: "CHUNKS PPL"
  local last
  last=$("$LLAMA/llama-perplexity" -m "$1" -f "$TEXT" -c 512 -t 2 2>"$1.ppl.log" \
    | tr ',' '\n' | sed -n 's/^\[\([0-9]*\)\]\([0-9.]*\)$/\1 \2/p' | tail -n 1) || true
  [ -n "$last" ] || { echo "llama-perplexity failed on $1 (see $1.ppl.log)" >&2; return 1; }
  echo "$last"
}
compress() { # OUT ARGS...
  local out=$1; shift
  [ -f "$out/model.gguf" ] || "$RFID" compress --model "$MODEL" --calibration "$CALIBRATION" \
    --format gguf --out "$out" --force --quiet "$@" > "$out.log" 2>&1
}
size() { stat -c %s "$1"; }

compress "$WORK/bf16" --ratio 0
read -r BASE_CHUNKS BASE <<< "$(ppl "$WORK/bf16/model.gguf")"
IMATRIX="$WORK/imatrix.gguf"
[ -f "$IMATRIX" ] || "$LLAMA/llama-imatrix" -m "$WORK/bf16/model.gguf" -f "$CALIBRATION" \
  -o "$IMATRIX" -c 512 -t 2 > "$IMATRIX.log" 2>&1
ROWS=()
for ENTRY in "${TYPES[@]}"; do
  T=${ENTRY%%:*}; OTHER=q8_0; [ "$ENTRY" = "$T" ] || OTHER=${ENTRY#*:}
  # What the file holds besides the routed experts with the other weights as OTHER.
  compress "$WORK/other-$OTHER" --ratio 0 --other-type "$OTHER"
  ROUTED=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['stored_bytes']['routed_experts'])" "$WORK/other-$OTHER/compression_report.json")
  REST=$(( $(size "$WORK/other-$OTHER/model.gguf") - ROUTED ))
  THEIRS="$WORK/llama-$T.gguf"
  [ -f "$THEIRS" ] || "$LLAMA/llama-quantize" "$WORK/bf16/model.gguf" "$THEIRS" "$T" > "$THEIRS.log" 2>&1
  TARGET=$(size "$THEIRS")
  RATIO=$(python3 -c "print(f'{1 - ($TARGET - $REST) / $ROUTED:.6f}')")
  if compress "$WORK/ours-$T" --ratio "$RATIO" --other-type "$OTHER"; then
    read -r _ P_OURS <<< "$(ppl "$WORK/ours-$T/model.gguf")"
    OURS_SIZE=$(size "$WORK/ours-$T/model.gguf")
  else
    # The budget cannot be met at that size (see the log): no row of ours.
    P_OURS=nan; OURS_SIZE=0
  fi
  read -r _ P_THEIRS <<< "$(ppl "$THEIRS")"
  WEIGHTED="$WORK/llama-imatrix-$T.gguf"
  [ -f "$WEIGHTED" ] || "$LLAMA/llama-quantize" --imatrix "$IMATRIX" "$WORK/bf16/model.gguf" \
    "$WEIGHTED" "$T" > "$WEIGHTED.log" 2>&1
  read -r _ P_WEIGHTED <<< "$(ppl "$WEIGHTED")"
  ROWS+=("$T $TARGET $P_THEIRS $OURS_SIZE $P_OURS $RATIO $OTHER $(size "$WEIGHTED") $P_WEIGHTED")
done
python3 - "$WORK" "$BASE" "$BASE_CHUNKS" "$(size "$WORK/bf16/model.gguf")" "${ROWS[@]}" <<'PY'
import json, math, sys
work, base, chunks, base_size, rows = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
print(f"bf16 GGUF: {base_size} bytes, PPL {base:.4f} ({chunks} chunks of 512, llama-perplexity)")
print("| llama-quantize type | its file | its PPL | with imatrix: file, PPL | rfid-moe --format gguf at that size | its PPL |")
print("| --- | --- | --- | --- | --- | --- |")
out = {"bf16": {"bytes": base_size, "perplexity": base, "chunks": chunks}, "rows": []}
for row in rows:
    t, ts, tp, os_, op, ratio, other, ws, wp = row.split()
    ts, tp, os_, op, ws, wp = int(ts), float(tp), int(os_), float(op), int(ws), float(wp)
    d = lambda p: f"{100 * (p / base - 1):+.2f}%"
    ours = "cannot be met" if math.isnan(op) else f"{op:.4f} ({d(op)})"
    print(f"| {t} | {ts} B | {tp:.4f} ({d(tp)}) | {ws} B, {wp:.4f} ({d(wp)}) | {os_} B (--ratio {ratio} --other-type {other}) | {ours} |")
    out["rows"].append({"type": t, "llama_bytes": ts, "llama_perplexity": tp, "ours_bytes": os_,
                        "ours_perplexity": None if math.isnan(op) else op, "ratio": float(ratio), "other_type": other,
                        "llama_imatrix_bytes": ws, "llama_imatrix_perplexity": wp})
json.dump(out, open(f"{work}/gguf-bench.json", "w"), indent=1)
PY
