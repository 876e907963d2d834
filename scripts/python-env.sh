#!/usr/bin/env bash
# Creates, or reuses when already complete, the pinned Python environment that makes the
# transformers reference outputs (tests/fixtures/*/reference.safetensors and
# tests/fixtures/generate/*.json): torch 2.11.0 and transformers 5.17.0 used on CPU (the versions
# in tests/fixtures/fixtures.json), safetensors and numpy, plus compressed-tensors 0.20.1 (what
# transformers loads compressed-tensors checkpoints with, tests/compressed_tensors.rs). The venv lives OUTSIDE the clone, at
# ${RFID_MOE_PY_ENV:-$HOME/.cache/rfid-moe/py-tf5.17}; the last line printed is its python.
# Usage: PY=$(scripts/python-env.sh | tail -n 1); "$PY" scripts/generate_reference.py --help
# Idempotent: a marker file written last records a complete install. `cargo test` runs it once
# for tests/transformers_load.rs (which loads our outputs in transformers); the other tests only
# read the files this environment wrote.
#
# How the install is kept small (checked on Linux x86_64, Python 3.11, PyPI only:
# download.pytorch.org and its +cpu wheels are not reachable from the build machines):
# - PyPI has only the CUDA build of torch 2.11.0 for Linux (530 MB wheel). Its default install
#   pulls cuda-toolkit 13.0.2, cuda-bindings, triton and the nvidia-* libraries: 4.7 GB, 50 s.
# - `torch --no-deps` plus the pure-Python dependencies alone does NOT import: libtorch_cpu.so,
#   libtorch_cuda.so and libtorch_python.so list libcudart, libcupti, libcublas(Lt), libcufft,
#   libcurand, libcusparse(Lt), libcufile, libnccl, libcudnn and libnvshmem_host as DT_NEEDED,
#   so `import torch` fails ("libcudart.so.13: cannot open shared object file").
# - What works: torch with --no-deps, then exactly those load-time nvidia-* library wheels
#   (pinned to the versions cuda-toolkit 13.0.2 selects; nvjitlink because libcusparse needs it)
#   with --no-deps, then the pure-Python deps. Left out: triton (641 MB, torch.compile on GPU
#   only), nvidia-cuda-nvrtc (220 MB, dlopen'ed for GPU JIT only), cuda-bindings,
#   cuda-pathfinder, nvidia-nvtx and the cuda-toolkit meta package. Result with transformers:
#   4.0 GB (3.8 GB for torch and its libraries), about 2 minutes on a fast link with 2 cores.
#   pip then prints "torch 2.11.0 requires triton / cuda-toolkit ..., which is not installed":
#   expected, harmless on CPU. Checked: `import torch`, a matmul, and transformers reproducing
#   every tests/fixtures/tiny-*/reference.safetensors to < 3e-6.
# - If the trimmed install's smoke test fails (another platform, a changed wheel), the script
#   falls back to the plain `pip install torch==2.11.0` (full CUDA dependency set).
set -euo pipefail

ENV_DIR=${RFID_MOE_PY_ENV:-$HOME/.cache/rfid-moe/py-tf5.17}
PYTHON=${PYTHON:-python3}
TORCH_PIN="torch==2.11.0"
TRANSFORMERS_PIN="transformers==5.17.0"
# Load-time CUDA libraries of the torch 2.11.0 Linux wheel (versions from cuda-toolkit==13.0.2).
NVIDIA_LIBS=(
  "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cupti==13.0.85" "nvidia-cublas==13.1.0.3"
  "nvidia-cufft==12.0.0.61" "nvidia-cufile==1.15.1.6" "nvidia-curand==10.4.0.35"
  "nvidia-cusolver==12.0.4.66" "nvidia-cusparse==12.6.3.3" "nvidia-nvjitlink==13.0.88"
  "nvidia-cusparselt-cu13==0.8.0" "nvidia-nccl-cu13==2.28.9" "nvidia-cudnn-cu13==9.19.0.56"
  "nvidia-nvshmem-cu13==3.4.5"
)
# torch 2.11.0's own pure-Python requirements (from its wheel METADATA).
TORCH_PURE_DEPS=(
  "filelock" "typing-extensions>=4.10.0" "setuptools<82" "sympy>=1.13.3" "networkx>=2.5.1"
  "jinja2" "fsspec>=0.8.5"
)
OTHER_PINS=("$TRANSFORMERS_PIN" "safetensors" "numpy")
# compressed-tensors 0.20.1 asks for torch>=2.10, transformers>=4.45, pydantic>=2, loguru and
# psutil; installed with --no-deps plus the last two so that pip never touches the pins above
# (pydantic already comes with transformers' dependencies).
COMPRESSED_TENSORS_PIN="compressed-tensors==0.20.1"
COMPRESSED_TENSORS_DEPS=("loguru" "psutil")
MARKER="$ENV_DIR/.rfid-moe-env-complete"
MARKER_TEXT="$TORCH_PIN $TRANSFORMERS_PIN safetensors numpy $COMPRESSED_TENSORS_PIN"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$MARKER_TEXT" ] && [ -x "$ENV_DIR/bin/python" ]; then
  echo "reusing complete environment $ENV_DIR" >&2
  echo "$ENV_DIR/bin/python"
  exit 0
fi

if [ ! -x "$ENV_DIR/bin/python" ]; then
  mkdir -p "$(dirname "$ENV_DIR")"
  "$PYTHON" -m venv "$ENV_DIR"
fi
PY="$ENV_DIR/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
rm -f "$MARKER"

smoke_test() {
  "$PY" -c 'import torch; x = torch.randn(2, 2) @ torch.randn(2, 2); assert x.shape == (2, 2)' \
    >/dev/null 2>&1
}

# An environment made before compressed-tensors joined the pins keeps its torch and transformers.
if "$PY" -c 'import torch, transformers
assert torch.__version__.split("+")[0] == "2.11.0" and transformers.__version__ == "5.17.0"' \
  >/dev/null 2>&1; then
  echo "torch and transformers already in $ENV_DIR; adding $COMPRESSED_TENSORS_PIN" >&2
else
  echo "installing trimmed CPU torch into $ENV_DIR" >&2
  "${PIP[@]}" --no-deps "$TORCH_PIN" "${NVIDIA_LIBS[@]}"
  "${PIP[@]}" "${TORCH_PURE_DEPS[@]}"
  if ! smoke_test; then
    echo "trimmed torch does not import; falling back to the full CUDA dependency set" >&2
    "${PIP[@]}" "$TORCH_PIN"
    smoke_test
  fi
  # transformers and friends do not depend on torch, so this leaves the torch install alone.
  "${PIP[@]}" "${OTHER_PINS[@]}"
fi
"${PIP[@]}" --no-deps "$COMPRESSED_TENSORS_PIN"
"${PIP[@]}" "${COMPRESSED_TENSORS_DEPS[@]}"
"$PY" -c 'import torch, transformers, safetensors, numpy
assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
assert transformers.__version__ == "5.17.0", transformers.__version__
import compressed_tensors
from compressed_tensors.compressors import ModelCompressor
assert compressed_tensors.__version__.startswith("0.20.1"), compressed_tensors.__version__
print("torch", torch.__version__, "transformers", transformers.__version__,
      "compressed-tensors", compressed_tensors.__version__)' >&2

echo "$MARKER_TEXT" >"$MARKER"
echo "$PY"
