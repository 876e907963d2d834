#!/usr/bin/env bash
# Every GPU figure from one prepared call (docs/CUDA.md, "The device check").
#
# Here, with Rust: build and pack into one folder what a lent GPU machine needs (the CLI, the
# device-check test binary, the decode and compress benchmarks, this script and its report
# helper). There, without Rust or network: run every step from that folder in one command, each
# step under its own time limit inside one overall limit, its figures appended to one JSON file
# as it ends (so a run cut short keeps what it measured), and a short text summary.
# --cpu does the same with the CPU build, so that CI runs every step (in a --quick form).
#
#   scripts/gpu-check.sh pack [--cpu] [--dir DIR]
#   DIR/gpu-check.sh run [--cpu] [--quick] [OUT]
#   scripts/gpu-check.sh all [--cpu] [--quick] [--dir DIR] [OUT]     (pack, then run)
#
# DIR defaults to .device/gpu-check (.device/gpu-check-cpu with --cpu); OUT to $OUT, else
# DIR/out. It receives gpu-check.json, summary.txt and logs/; large scratch files (checkpoints)
# go to a temporary folder that is removed at the end. The fixtures and mini-moe-docs are read
# from the repository around DIR (or RFID_MOE_REPO_ROOT). Exit status: 0 when every step passed,
# 1 otherwise.
#
# Environment: GPU_CHECK_BUDGET_S (overall limit, default 450 s on a device), CUDA_LIB_DIR (the
# CUDA 13 runtime libraries; default: the PyTorch virtualenv's).
set -euo pipefail

SELF=$(readlink -f "$0")
HERE=$(dirname "$SELF")

usage() {
  sed -n '2,24p' "$SELF" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

COMMAND=${1:-}
[ -n "$COMMAND" ] || usage
shift
if [ "$COMMAND" != _step ]; then
  MODE=cuda QUICK=0 DIR="" OUT_DIR=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --cpu) MODE=cpu ;;
      --quick) QUICK=1 ;;
      --dir)
        DIR=${2:?--dir needs a folder}
        shift
        ;;
      -h | --help) usage ;;
      -*)
        echo "gpu-check: unknown option $1" >&2
        usage
        ;;
      *) OUT_DIR=$1 ;;
    esac
    shift
  done
fi

# ----------------------------------------------------------------------------------------------
# Packing (here).

REPORT_HELPER=gpu-check-report.py

# Prints "name test? path" for every executable in cargo's JSON messages on stdin.
executables() {
  python3 -c 'import json, sys
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], int(m["profile"]["test"]), m["executable"])'
}

# Builds the binaries of $MODE; prints "pack-name path" lines.
build() {
  local repo=$1 json
  if [ "$MODE" = cuda ]; then
    # One cargo invocation, so every crate is compiled once with one feature set.
    json=$("$repo/scripts/build-cuda.sh" --run cargo build --release --features cuda \
      -p rfid-moe -p rfid-moe-cli -p rfid-moe-bench --bins --test device \
      --message-format=json-render-diagnostics)
  else
    # The test and the CLI exactly as `cargo test` at the root builds them (so in CI they are
    # already built), the benchmarks in their own package (candle-transformers is outside the
    # root's build).
    json=$(cd "$repo" && cargo test --no-run --test device --message-format=json-render-diagnostics &&
      cargo build --bin rfid-moe --message-format=json-render-diagnostics &&
      cargo build -p rfid-moe-bench --bin decode --bin compress \
        --message-format=json-render-diagnostics)
  fi
  printf '%s\n' "$json" | executables | while read -r name test path; do
    case "$name:$test" in
      rfid-moe:0|decode:0|compress:0) echo "$name $path" ;;
      device:1) echo "test-device $path" ;;
    esac
  done
}

pack() {
  [ -f "$HERE/../Cargo.toml" ] || {
    echo "gpu-check: pack runs from the repository's scripts/ folder" >&2
    exit 2
  }
  local repo
  repo=$(cd "$HERE/.." && pwd)
  local level=-6 suffix=""
  if [ "$MODE" = cpu ]; then
    level=-0 # CI packs to test the packing, not to carry anything
    suffix=-cpu
  fi
  DIR=${DIR:-$repo/.device/gpu-check$suffix}
  local built
  built=$(build "$repo")
  for name in rfid-moe test-device decode compress; do
    grep -q "^$name " <<<"$built" || {
      echo "gpu-check: the build produced no $name" >&2
      exit 1
    }
  done
  rm -rf "$DIR"
  mkdir -p "$DIR/bin"
  while read -r name path; do
    strip -o "$DIR/bin/$name" "$path"
    xz -T2 "$level" -f "$DIR/bin/$name"
  done <<<"$built"
  cp "$SELF" "$DIR/gpu-check.sh"
  cp "$HERE/$REPORT_HELPER" "$DIR/$REPORT_HELPER"
  local commit dirty=false
  commit=$(git -C "$repo" rev-parse --short HEAD)
  git -C "$repo" diff --quiet HEAD || dirty=true
  python3 -c 'import json, os, sys
d, mode, commit, dirty = sys.argv[1:5]
files = {}
for root, _, names in os.walk(d):
    for n in names:
        p = os.path.join(root, n)
        files[os.path.relpath(p, d)] = os.path.getsize(p)
json.dump({"mode": mode, "commit": commit, "dirty": dirty == "true",
           "compute_cap": os.environ.get("CUDA_COMPUTE_CAP", "90") if mode == "cuda" else None,
           "files": files, "bytes": sum(files.values())}, open(os.path.join(d, "manifest.json"), "w"), indent=1)' \
    "$DIR" "$MODE" "$commit" "$dirty"
  # The folder's size, and with the repository's tracked files (which travel beside it when
  # the whole working tree is carried).
  git -C "$repo" ls-files -z | python3 -c 'import os, sys
d, repo = sys.argv[1:3]
packed = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(d) for n in ns)
tracked = sum(os.path.getsize(os.path.join(repo, p))
              for p in sys.stdin.read().split("\0") if p and os.path.isfile(os.path.join(repo, p)))
mib = lambda b: b / 2**20
print(f"packed {d}: {mib(packed):.1f} MiB (limit 64 MiB); with the tracked repository files "
      f"({mib(tracked):.1f} MiB) {mib(packed + tracked):.1f} MiB")
sys.exit(1 if packed >= 64 * 2**20 else 0)' "$DIR" "$repo" || {
    echo "gpu-check: the packed folder is over 64 MiB" >&2
    exit 1
  }
  ls -l "$DIR" "$DIR/bin"
}

# ----------------------------------------------------------------------------------------------
# Running (there): the steps, in priority order. Each is "name limit-on-a-device function args";
# the function runs under `timeout` in a fresh copy of this script.

STEPS="
tests                  150 step_tests
decode-anchor           60 step_decode anchor
decode-original         45 step_decode original
decode-pruned-lowrank   60 step_decode prune-lowrank:0.4
decode-4bit             75 step_decode quantise:q4_k
decode-3bit             75 step_decode quantise:q3_k
decode-int8             75 step_decode method:int8
compress-bench         150 step_compress
cli                     60 step_cli
"
# Exit status of a step that cannot apply to this build (it is recorded as skipped with the
# reason it writes to $STEP_REASON); only the steps named here may skip.
SKIP=77
MAY_SKIP=""

# The run's sizes: the real shapes on a device (or with --cpu alone), tiny ones with --quick.
settings() {
  if [ "$MODE" = cuda ]; then
    DEVICE=cuda DTYPE=bf16
  else
    DEVICE=cpu DTYPE=f32
  fi
  if [ "$QUICK" = 1 ]; then
    SHAPE_ARGS="--layers 1 --experts 16 --expert-intermediate 256 --vocab 1024"
    DECODE_ARGS="$SHAPE_ARGS --context 16 --batches 1,8 --prefill-repeats 1 --warmup 1 --steps 2"
    COMPRESS_ARGS="$SHAPE_ARGS --samples 2 --seq-len 32 --check-forward"
    CLI_EVAL_ARGS="--max-windows 4 --seq-len 128"
    CLI_COMPRESS_ARGS="--samples 4 --seq-len 64"
    BUDGET_S=${GPU_CHECK_BUDGET_S:-900}
    # A busy 2-core CI machine, not a GPU: each step may take twice its device limit.
    LIMIT_SCALE=2
  else
    DECODE_ARGS="--layers 2 --vocab 8192 --context 512 --batches 1,8 --prefill-repeats 3 --warmup 3 --steps 20"
    COMPRESS_ARGS="--layers 2 --vocab 8192 --samples 4 --seq-len 256"
    CLI_EVAL_ARGS=""
    CLI_COMPRESS_ARGS="--samples 32 --seq-len 512"
    BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
    LIMIT_SCALE=1
  fi
}

# Marks the current step as not applicable, with the reason.
skip() {
  echo "skipped: $1"
  printf '%s' "$1" >"$STEP_REASON"
  exit "$SKIP"
}

step_tests() {
  RFID_MOE_TEST_DEVICE=$DEVICE "$BIN/test-device" --test-threads=1 --nocapture 2>&1 |
    tee "$SCRATCH/tests.out"
  grep -Eq "test result: ok\. [1-9][0-9]* passed" "$SCRATCH/tests.out" || {
    echo "no device check ran"
    exit 1
  }
}

step_decode() {
  local variant=$1
  # shellcheck disable=SC2086 # the argument lists are words
  "$BIN/decode" --device "$DEVICE" --dtype "$DTYPE" $DECODE_ARGS --variants "$variant" \
    --work "$SCRATCH/decode" --json "$STEP_FIGURES"
}

step_compress() {
  # shellcheck disable=SC2086
  "$BIN/compress" --shape qwen3-30b-a3b --device "$DEVICE" $COMPRESS_ARGS --no-reference \
    --work "$SCRATCH/compress" --json "$STEP_FIGURES"
}

step_cli() {
  local mini=$DATA/models/mini-moe-docs dir=$SCRATCH/cli
  mkdir -p "$dir"
  local dtype=()
  [ "$MODE" = cuda ] && dtype=(--dtype bf16)
  # shellcheck disable=SC2086
  "$BIN/rfid-moe" eval --model "$mini" --text "$mini/test.txt" --device "$DEVICE" \
    $CLI_EVAL_ARGS --quiet --json "$dir/eval-original.json"
  # shellcheck disable=SC2086
  "$BIN/rfid-moe" compress --model "$mini" --calibration "$mini/calibration.txt" \
    --device "$DEVICE" $CLI_COMPRESS_ARGS --out "$dir/mini-rfid" --quiet --json "$dir/compress.json"
  # shellcheck disable=SC2086
  "$BIN/rfid-moe" eval --model "$dir/mini-rfid" --reference "$mini" --text "$mini/test.txt" \
    --device "$DEVICE" $CLI_EVAL_ARGS --quiet --json "$dir/eval-compressed.json"
  "$BIN/rfid-moe" generate --model "$dir/mini-rfid" --device "$DEVICE" "${dtype[@]}" \
    --prompt "The kernel" --max-new-tokens 32 --ignore-eos 2>&1 | tee "$dir/generate.log"
  "$PY" "$HELPER" cli-figures "$dir" "$STEP_FIGURES"
}

# Finds the repository data (tests/fixtures, models/mini-moe-docs) around the packed folder.
find_data() {
  local d=${RFID_MOE_REPO_ROOT:-}
  if [ -z "$d" ]; then
    d=$HERE
    while [ "$d" != / ] && [ ! -d "$d/tests/fixtures" ]; do d=$(dirname "$d"); done
  fi
  [ -d "$d/tests/fixtures" ] && [ -d "$d/models/mini-moe-docs" ] || return 1
  echo "$d"
}

# Where the CUDA 13 runtime libraries are on the device.
cuda_libraries() {
  local d
  for d in ${CUDA_LIB_DIR:-} /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib; do
    [ -e "$d/libcublas.so.13" ] && { echo "$d"; return 0; }
  done
  return 1
}

# Decompresses the binaries into $BIN and checks that they load.
unpack() {
  mkdir -p "$BIN"
  local f name
  for f in "$HERE"/bin/*.xz; do
    name=$(basename "$f" .xz)
    xz -dc "$f" >"$BIN/$name"
    chmod +x "$BIN/$name"
    if ldd "$BIN/$name" | grep -q "not found"; then
      echo "gpu-check: $name cannot load: $(ldd "$BIN/$name" | grep "not found" | paste -sd' ' -)"
      return 1
    fi
  done
}

# Runs step NAME under its limit (cut to what the overall limit leaves) and records it.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  local log=$OUT_DIR/logs/$name.log
  export STEP_FIGURES=$SCRATCH/$name.json STEP_REASON=$SCRATCH/$name.reason
  if [ "$left" -lt 10 ]; then
    echo "out of time" >"$log"
    "$PY" "$HELPER" record "$RESULTS" "$name" skipped "$limit" 0 0 \
      "out of time: the run's ${BUDGET_S} s were used up" "$log"
    FAILED+=("$name")
    return
  fi
  limit=$((limit * LIMIT_SCALE))
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)"
  local start end rc=0 status reason=""
  start=$(date +%s.%N)
  timeout -k 10 "$limit" bash "$SELF" _step "$@" >"$log" 2>&1 || rc=$?
  end=$(date +%s.%N)
  case "$rc" in
    0) status=ok ;;
    124 | 137) status=timeout reason="stopped at its limit of ${limit} s" ;;
    "$SKIP") status=skipped reason=$(cat "$STEP_REASON") ;;
    *) status=failed reason="exit status $rc" ;;
  esac
  if [ "$status" != ok ] && ! { [ "$status" = skipped ] && [[ " $MAY_SKIP " == *" $name "* ]]; }; then
    FAILED+=("$name")
  fi
  "$PY" "$HELPER" record "$RESULTS" "$name" "$status" "$limit" "$(awk "BEGIN { print $end - $start }")" \
    "$rc" "$reason" "$log" "$STEP_FIGURES"
  echo "   $status$([ -n "$reason" ] && echo ": $reason")"
}

# A description of the machine, as a JSON object.
describe() {
  local gpu="cpu"
  if [ "$MODE" = cuda ]; then
    gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 |
      head -n 1) || gpu="nvidia-smi failed: $gpu"
  fi
  "$PY" -c 'import json, sys
mode, quick, gpu, manifest, budget, started = sys.argv[1:7]
pack = json.load(open(manifest)) if manifest else {}
print(json.dumps({"mode": mode, "quick": quick == "1", "device": gpu, "cpus": __import__("os").cpu_count(),
                  "pack": {k: pack.get(k) for k in ("commit", "dirty", "compute_cap", "bytes")},
                  "budget_s": int(budget), "started": started}))' \
    "$MODE" "$QUICK" "$gpu" "$( [ -f "$HERE/manifest.json" ] && echo "$HERE/manifest.json")" \
    "$BUDGET_S" "$(date -u +%FT%TZ)"
}

# Records why the run could not start its steps, and stops.
setup_failed() {
  echo "gpu-check: $1" | tee -a "$OUT_DIR/logs/setup.log" >&2
  "$PY" "$HELPER" record "$RESULTS" setup failed 0 0 1 "$1" "$OUT_DIR/logs/setup.log"
  exit 1
}

run() {
  [ -d "$HERE/bin" ] || {
    echo "gpu-check: run from the packed folder (scripts/gpu-check.sh pack makes it)" >&2
    exit 2
  }
  settings
  OUT_DIR=${OUT_DIR:-${OUT:-$HERE/out}}
  mkdir -p "$OUT_DIR/logs"
  OUT_DIR=$(cd "$OUT_DIR" && pwd)
  RESULTS=$OUT_DIR/gpu-check.json HELPER=$HERE/$REPORT_HELPER
  PY=$(command -v python3 || ls /opt/torch/.venv/bin/python3)
  SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
  trap 'rm -rf "$SCRATCH"' EXIT
  BIN=$SCRATCH/bin
  DEADLINE=$(($(date +%s) + BUDGET_S))
  "$PY" "$HELPER" start "$RESULTS" "$(describe)"
  FAILED=()
  if [ "$MODE" = cuda ]; then
    local libs
    libs=$(cuda_libraries) || setup_failed "no CUDA 13 runtime libraries found (set CUDA_LIB_DIR)"
    export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
  unpack >"$OUT_DIR/logs/setup.log" 2>&1 || setup_failed "$(tail -n 1 "$OUT_DIR/logs/setup.log")"
  DATA=$(find_data) || setup_failed \
    "no tests/fixtures and models/mini-moe-docs around $HERE (set RFID_MOE_REPO_ROOT)"
  export MODE QUICK DEVICE DTYPE DECODE_ARGS COMPRESS_ARGS CLI_EVAL_ARGS CLI_COMPRESS_ARGS \
    BIN SCRATCH DATA PY HELPER RFID_MOE_REPO_ROOT=$DATA
  local name limit fn
  while read -r name limit fn args; do
    [ -n "$name" ] || continue
    # shellcheck disable=SC2086
    run_step "$name" "$limit" "$fn" $args
  done <<<"$STEPS"
  "$PY" "$HELPER" finish "$RESULTS"
  echo
  cat "$OUT_DIR/summary.txt"
  echo "figures: $RESULTS"
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu-check: not passed: ${FAILED[*]}" >&2
    exit 1
  fi
}

case "$COMMAND" in
  pack) pack ;;
  run) run ;;
  all)
    pack
    HERE=$DIR SELF=$DIR/gpu-check.sh
    export RFID_MOE_REPO_ROOT=${RFID_MOE_REPO_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
    run
    ;;
  _step)
    # One step, in its own process so that `timeout` can stop it (see run_step).
    fn=${1:?}
    shift
    "$fn" "$@"
    ;;
  *) usage ;;
esac
