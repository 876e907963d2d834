#!/usr/bin/env bash
# Runs one `rfid-moe compress` as Slurm jobs, for sites without Ray (scripts/ray_compress.py does
# the same over a Ray cluster).
#
# Usage: scripts/slurm_compress.sh [--units N] [SBATCH-OPTION...] -- COMPRESS-ARGS...
#   e.g. scripts/slurm_compress.sh --units 8 --partition gpu --gres gpu:1 --time 4:00:00 -- \
#          --model /shared/Qwen3-30B-A3B --calibration /shared/calib.txt --out /shared/out \
#          --device cuda
#
# What it submits, from where the run stands (`rfid-moe compress ARGS --status`):
#   plan   `--plan [--units N]`, as a blocking job (sbatch --wait): the unit count comes from it
#   offer  a job array over the pending units running `--unit-from-env` (model-wide budget only)
#   solve  `--solve`, after the offers succeeded
#   apply  a job array over the units running `--unit-from-env` again, after the solve
#   merge  `--merge`, after the units ended however they ended: the merge checks every unit and
#          refuses, naming the units to rerun, if one is missing
# A job whose dependency can never be met (a unit failed) is cancelled, not left pending. Run
# this script again after any failure: it continues from `--status` and submits only what is
# left. Each unit is journalled, so a unit job that was killed resumes where it stopped.
#
# Every job gets the same SBATCH-OPTIONs, runs in the current directory and inherits this
# environment (sbatch's default --export=ALL): the binary (RFID_MOE_BIN, else rfid-moe on PATH),
# the model, the calibration text, --out and --run must be on storage every node sees at the
# same paths. Slurm writes each job's output to slurm-JOBID.out (slurm-JOBID_TASK.out for units)
# in the current directory.
#
# Not tested here (no Slurm on the build machines); the Ray driver and cli/tests/ray.rs exercise
# the same steps. Needs bash, sbatch, and a working `rfid-moe compress --status` on this machine.
set -euo pipefail
# Arrays that may be empty are expanded as ${A[@]+"${A[@]}"}: bash before 4.4 (still common on
# cluster login nodes) calls an empty "${A[@]}" unbound under `set -u`.

usage() {
  sed -n '5,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

UNITS=()
SBATCH_OPTS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --units) [ $# -ge 2 ] || usage; UNITS=(--units "$2"); shift 2 ;;
    --units=*) UNITS=(--units "${1#--units=}"); shift ;;
    -h|--help) usage ;;
    *) SBATCH_OPTS+=("$1"); shift ;;
  esac
done
[ $# -gt 0 ] || usage
shift
[ "${1:-}" != "compress" ] || shift
[ $# -gt 0 ] || usage
ARGS=("$@")

BIN=${RFID_MOE_BIN:-$(command -v rfid-moe || true)}
if [ -z "$BIN" ]; then
  echo "error: no rfid-moe binary: set RFID_MOE_BIN or put rfid-moe on PATH" >&2
  exit 2
fi
BIN=$(realpath "$BIN")

# The shell command a job runs: the binary with ARGS and the step's flags, quoted.
step_command() {
  local command
  printf -v command '%q ' "$BIN" compress "${ARGS[@]}" "$@"
  # A unit number exported from the submitting shell would override the array's task id.
  echo "unset RFID_MOE_UNIT JOB_COMPLETION_INDEX; exec $command"
}

# Submits a job; prints its id. Arguments: the job's name, extra sbatch options, `--`, the step.
submit() {
  local name=$1 options=()
  shift
  while [ "$1" != "--" ]; do options+=("$1"); shift; done
  shift
  sbatch --parsable ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"} --job-name "rfid-moe-$name" \
    ${options[@]+"${options[@]}"} --wrap "$(step_command "$@")" | cut -d';' -f1
}

STATUS=
read_status() {
  STATUS=$("$BIN" compress "${ARGS[@]}" --status)
}
field() {
  sed -n "s/.*\"$1\": *\"\{0,1\}\([^,\"]*\)\"\{0,1\}[,}].*/\1/p" <<<"$STATUS"
}
# The pending units as a Slurm array list (0,2,5).
pending() {
  sed -n 's/.*"pending": *\[\([0-9, ]*\)\].*/\1/p' <<<"$STATUS" | tr -d ' '
}

read_status
if [ "$(field next)" = plan ]; then
  echo "planning (a blocking job)..." >&2
  if ! PLAN_JOB=$(sbatch --wait --parsable ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"} \
    --job-name rfid-moe-plan --wrap "$(step_command --plan ${UNITS[@]+"${UNITS[@]}"})"); then
    PLAN_JOB=${PLAN_JOB%%;*}
    echo "error: the plan job $PLAN_JOB failed; its output is in slurm-$PLAN_JOB.out" >&2
    exit 1
  fi
  read_status
fi
NEXT=$(field next)
UNIT_COUNT=$(field units)
ALL_UNITS="0-$((UNIT_COUNT - 1))"
echo "run $(field run): $UNIT_COUNT units, next: $NEXT" >&2

AFTER=()
chain() {
  AFTER=(--dependency "$1" --kill-on-invalid-dep=yes)
}
case "$NEXT" in
  done)
    echo "nothing to do: the run is merged" >&2
    exit 0
    ;;
  offer)
    JOB=$(submit offer --array "$(pending)" -- --unit-from-env)
    echo "offers: job array $JOB" >&2
    chain "afterok:$JOB"
    ;&
  solve)
    JOB=$(submit solve ${AFTER[@]+"${AFTER[@]}"} -- --solve)
    echo "solve: job $JOB" >&2
    chain "afterok:$JOB"
    ;&
  apply)
    # After a solve every unit writes its layers; resumed at `apply`, only the pending ones.
    UNIT_LIST=$ALL_UNITS
    [ "$NEXT" != apply ] || UNIT_LIST=$(pending)
    JOB=$(submit units ${AFTER[@]+"${AFTER[@]}"} --array "$UNIT_LIST" -- --unit-from-env)
    echo "units: job array $JOB" >&2
    # afterany: the merge runs however the units ended, and names any it cannot take.
    AFTER=(--dependency "afterany:$JOB")
    ;&
  merge)
    JOB=$(submit merge ${AFTER[@]+"${AFTER[@]}"} -- --merge)
    echo "merge: job $JOB (watch with: squeue -u \"\$USER\"; $BIN compress ... --status)" >&2
    ;;
  *)
    echo "error: unknown step \`$NEXT\` in: $STATUS" >&2
    exit 1
    ;;
esac
