#!/usr/bin/env bash
# Per-unit time and memory of a split run (`compress --plan/--unit/--merge`) against the same
# compression in one process, on a random checkpoint with Qwen3-30B-A3B's exact layer shapes
# (128 experts of 768×2048, hidden 2048; vocabulary cut to 8192 so that the embedding does not
# dominate). Every step runs as its own process under /usr/bin/time; the printed table gives each
# step's wall and CPU seconds and peak resident memory, and the ratio of the split steps' CPU
# time to the single process's (the split's overhead: the plan's forward pass, each unit's
# input read back, the merge). Checks that the merged output equals the single process's byte
# for byte.
# Usage: scripts/bench-split.sh [WORKDIR] [LAYERS] [EXTRA COMPRESS FLAGS...]
#   default WORKDIR /tmp/rfid-moe-splitbench, LAYERS 2, flags: --preset paper --ratio 0.4
set -euo pipefail

WORK=${1:-/tmp/rfid-moe-splitbench}
LAYERS=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
FLAGS=("$@")
[ ${#FLAGS[@]} -eq 0 ] && FLAGS=(--preset paper --ratio 0.4)
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rfid-moe/target}"
cargo build --release -q -p rfid-moe-cli
cargo build --release -q -p rfid-moe --example synthetic_checkpoint
BIN="$CARGO_TARGET_DIR/release/rfid-moe"
MODEL="$WORK/model"
mkdir -p "$WORK"
if [ ! -f "$MODEL/config.json" ]; then
  "$CARGO_TARGET_DIR/release/examples/synthetic_checkpoint" qwen3-30b-a3b "$LAYERS" "$MODEL" --vocab 8192
fi
ARGS=(compress --quiet --model "$MODEL" --calibration "$MODEL/calibration.safetensors"
      --samples 4 --seq-len 256 "${FLAGS[@]}")
rm -rf "$WORK/single" "$WORK/out" "$WORK/out.run"
TIMES="$WORK/times.tsv"
: > "$TIMES"
step() {  # step NAME ARGS...: runs the binary, appends "NAME wall user+sys maxrss_kb"
  local name=$1; shift
  /usr/bin/time -f "$name\t%e\t%U\t%S\t%M" -a -o "$TIMES" "$BIN" "$@" > /dev/null
}
# Both write the same path (the output records it), the single run's then moved aside.
step single "${ARGS[@]}" --out "$WORK/out"
mv "$WORK/out" "$WORK/single"
SPLIT=("${ARGS[@]}" --out "$WORK/out")
step plan "${SPLIT[@]}" --plan --units "$LAYERS"
while :; do
  STATUS=$("$BIN" "${SPLIT[@]}" --status)
  NEXT=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["next"])' "$STATUS")
  case "$NEXT" in
    offer|apply)
      for unit in $(python3 -c 'import json,sys; print(*json.loads(sys.argv[1])["pending"])' "$STATUS"); do
        step "$NEXT-$unit" "${SPLIT[@]}" --unit "$unit"
      done ;;
    solve) step solve "${SPLIT[@]}" --solve ;;
    merge) step merge "${SPLIT[@]}" --merge ;;
    done) break ;;
    *) echo "unexpected status: $STATUS" >&2; exit 1 ;;
  esac
done
diff -r "$WORK/single" "$WORK/out" > /dev/null && same=yes || same=no
python3 - "$TIMES" "$same" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("| step | wall s | CPU s | peak RSS GiB |")
print("| --- | ---: | ---: | ---: |")
cpu = {}
for name, wall, user, sys_, rss in rows:
    cpu[name] = float(user) + float(sys_)
    print(f"| {name} | {float(wall):.1f} | {cpu[name]:.1f} | {int(rss) / 2**20:.2f} |")
split = sum(v for k, v in cpu.items() if k != "single")
print(f"\nsplit steps' CPU / single process's CPU: {split / cpu['single']:.3f}")
print(f"merged output byte-identical to the single process's: {sys.argv[2]}")
PY
