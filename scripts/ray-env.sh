#!/usr/bin/env bash
# Creates, or reuses when already complete, a Python environment with Ray Core (PyPI's `ray`
# without extras) for scripts/ray_compress.py, the driver that fans one `rfid-moe compress` out
# over a Ray cluster, and for its test (cli/tests/ray.rs, which starts a local two-node cluster).
# The venv lives OUTSIDE the clone, at ${RFID_MOE_RAY_ENV:-$HOME/.cache/rfid-moe/ray-<version>},
# keyed on the pinned version by its marker file; the last line printed is the venv's bin
# directory (holding `python` and `ray`). Every node of a cluster needs the same Ray version:
# run this script on each of them (or on a shared home directory once).
# Usage: BIN=$(scripts/ray-env.sh | tail -n 1); "$BIN/ray" start --head
#        "$BIN/python" scripts/ray_compress.py --address HOST:6379 -- COMPRESS-ARGS...
# Idempotent: a marker file written last records a complete install.
set -euo pipefail

# Pinned because the head, the workers and the driver must all run the same Ray; Ray Core alone
# (no dashboard, no Ray Data/Train/Serve extras) is what the driver uses.
VERSION=2.60.0
ENV_DIR=${RFID_MOE_RAY_ENV:-$HOME/.cache/rfid-moe/ray-$VERSION}
PYTHON=${PYTHON:-python3}
MARKER="$ENV_DIR/.rfid-moe-ray-complete"
MARKER_TEXT="ray==$VERSION"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$MARKER_TEXT" ] && [ -x "$ENV_DIR/bin/python" ] \
  && [ -x "$ENV_DIR/bin/ray" ]; then
  echo "reusing complete environment $ENV_DIR" >&2
  echo "$ENV_DIR/bin"
  exit 0
fi

if [ ! -x "$ENV_DIR/bin/python" ]; then
  mkdir -p "$(dirname "$ENV_DIR")"
  "$PYTHON" -m venv "$ENV_DIR" >&2
fi
rm -f "$MARKER"
# --only-binary: a missing wheel for this platform fails here rather than starting a long
# source build of Ray (C++ with Bazel).
"$ENV_DIR/bin/python" -m pip install -q --disable-pip-version-check --only-binary ray \
  "ray==$VERSION" >&2
"$ENV_DIR/bin/python" -c "import ray; assert ray.__version__ == '$VERSION', ray.__version__
print('ray', ray.__version__)" >&2
test -x "$ENV_DIR/bin/ray"

echo "$MARKER_TEXT" >"$MARKER"
echo "$ENV_DIR/bin"
