#!/usr/bin/env bash
# Builds `rfid-moe` with the `cuda` feature on a machine without a GPU or CUDA toolkit
# (docs/CUDA.md explains every step). Output: target/release/rfid-moe, and with --pack a
# compressed copy in .device/rfid-moe.xz for carrying to a GPU machine. With --pack-all, also
# the CUDA test binaries (parity, generate) and the decode/compress benchmarks, each
# stripped and xz-compressed into .device/ (run tests there with RFID_MOE_REPO_ROOT=$PWD).
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
make_stub() {
  # libcuda belongs to the driver: link against a stub exporting the symbols cudarc uses; the
  # real driver library is loaded at run time (soname libcuda.so.1).
  local rlibs
  rlibs=$(ls target/release/deps/libcudarc-*.rlib)
  nm -u $rlibs 2>/dev/null | awk '{print $2}' | grep -E '^cu[A-Z]' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$LINK/cuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda-stub.c"
}
if [ ! -f "$LINK/libcuda.so" ] && ls target/release/deps/libcudarc-*.rlib >/dev/null 2>&1; then
  make_stub
fi
if ! cargo build --release --features cuda --bin rfid-moe; then
  # The very first build fails at the link step because the stub needs cudarc's rlib.
  make_stub
  cargo build --release --features cuda --bin rfid-moe
fi
TARGET=${CARGO_TARGET_DIR:-target}
pack() { # pack NAME PATH
  mkdir -p .device
  strip -o ".device/$1" "$2"
  xz -T2 -6 -f ".device/$1"
  ls -la ".device/$1.xz"
}
case "${1:-}" in
  --pack) pack rfid-moe "$TARGET/release/rfid-moe" ;;
  --pack-all)
    pack rfid-moe "$TARGET/release/rfid-moe"
    # Test binaries: cargo prints each executable it builds as JSON.
    cargo test --release --features cuda -p rfid-moe --test parity --test generate --no-run \
      --message-format=json \
      | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m.get("profile", {}).get("test"):
        print(m["target"]["name"], m["executable"])' \
      | while read -r name path; do pack "test-$name" "$path"; done
    cargo build --release -p rfid-moe-bench --features cuda --bins
    pack decode "$TARGET/release/decode"
    [ -x "$TARGET/release/compress" ] && pack compress "$TARGET/release/compress"
    ;;
esac
