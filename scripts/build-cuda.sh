#!/usr/bin/env bash
# Builds `rfid-moe` with the `cuda` feature on a machine without a GPU or CUDA toolkit
# (docs/CUDA.md explains every step). Output: target/release/rfid-moe, and with --pack a
# compressed copy in .device/rfid-moe.xz for carrying to a GPU machine.
# `--run COMMAND...` runs COMMAND (a cargo build with `--features cuda`) in the same build
# environment instead; scripts/gpu-check.sh builds everything a device check needs that way.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.cuda-venv
LINK=.cuda-link
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
fi
# Pin the whole toolchain to CUDA 13.0: newer nvvm/crt output may be refused by a 13.0 driver.
"$VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
  "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
  "nvidia-cublas==13.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-curand<10.4.1"
CU=$(ls -d "$PWD"/$VENV/lib/python3*/site-packages/nvidia/cu13)
mkdir -p "$LINK"
# Unversioned names for the linker.
for lib in cudart cublas cublasLt curand nvrtc; do
  target=$(ls "$CU"/lib/lib$lib.so.* 2>/dev/null | sort | head -n 1)
  [ -n "$target" ] && ln -sf "$target" "$LINK/lib$lib.so"
done
export PATH=$CU/bin:$PATH CUDA_ROOT=$CU CUDA_PATH=$CU CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH=$PWD/$LINK${LIBRARY_PATH:+:$LIBRARY_PATH}
TARGET=${CARGO_TARGET_DIR:-target}
make_stub() {
  # libcuda belongs to the driver: link against a stub exporting the symbols cudarc uses; the
  # real driver library is loaded at run time (soname libcuda.so.1).
  local rlibs
  rlibs=$(ls "$TARGET"/release/deps/libcudarc-*.rlib)
  nm -u $rlibs 2>/dev/null | awk '{print $2}' | grep -E '^cu[A-Z]' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$LINK/cuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda-stub.c"
}
if [ ! -f "$LINK/libcuda.so" ] && ls "$TARGET"/release/deps/libcudarc-*.rlib >/dev/null 2>&1; then
  make_stub
fi
if [ "${1:-}" = --run ]; then
  shift
  if [ -f "$LINK/libcuda.so" ]; then
    exec "$@"
  fi
  # The very first build fails at the link step because the stub needs cudarc's rlib.
  "$@" || { make_stub && "$@"; }
  exit
fi
if ! cargo build --release --features cuda --bin rfid-moe; then
  make_stub
  cargo build --release --features cuda --bin rfid-moe
fi
if [ "${1:-}" = --pack ]; then
  mkdir -p .device
  strip -o .device/rfid-moe "$TARGET/release/rfid-moe"
  xz -T2 -6 -f .device/rfid-moe
  ls -la .device/rfid-moe.xz
fi
