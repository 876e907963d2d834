#!/usr/bin/env bash
# Builds, or reuses when already complete, llama.cpp's llama-perplexity and llama-quantize from
# the source PyPI's llama-cpp-python 0.3.36 sdist vendors (llama.cpp 0c1e570), for the tests and
# benchmarks that run our GGUF outputs in llama.cpp itself. Everything lives OUTSIDE the clone,
# at ${RFID_MOE_LLAMA_CPP:-$HOME/.cache/rfid-moe/llama.cpp-0.3.36}; the last line printed is
# the directory holding the binaries. Needs python3 with venv and a C++ compiler; cmake and ninja
# come from PyPI. About 7 CPU-minutes once (-j2). Idempotent: a marker written last records a
# complete build.
# Usage: BIN=$(scripts/llama-cpp.sh | tail -n 1); "$BIN/llama-perplexity" -m X.gguf -f text -c 512
set -euo pipefail

VERSION=0.3.36
ROOT=${RFID_MOE_LLAMA_CPP:-$HOME/.cache/rfid-moe/llama.cpp-$VERSION}
PYTHON=${PYTHON:-python3}
MARKER="$ROOT/.rfid-moe-build-complete"
TARGETS=(llama-perplexity llama-quantize)
# Not -march=native: on virtual machines whose CPU reports AMX that the kernel does not enable,
# a native build runs AMX tile instructions for Q4_0/Q8_0 matrices and dies of SIGILL (seen
# here). AVX2 with FMA and F16C runs on any x86-64 machine of the last decade.
CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
BUILD_ID="$VERSION ${TARGETS[*]} ${CPU_FLAGS[*]}"

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$BUILD_ID" ]; then
  echo "reusing llama.cpp build $ROOT" >&2
  echo "$ROOT/build/bin"
  exit 0
fi

mkdir -p "$ROOT"
cd "$ROOT"
if [ ! -x V/bin/python ]; then
  "$PYTHON" -m venv V >&2
fi
V/bin/pip install -q scikit-build-core cmake ninja >&2
SDIST="llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  # --no-build-isolation: otherwise pip builds cmake and ninja from source to read metadata.
  V/bin/pip download -q --no-deps --no-build-isolation --no-binary :all: \
    "llama-cpp-python==$VERSION" -d . >&2
fi
rm -rf src && mkdir src && tar xzf "$SDIST" -C src
SOURCE="src/llama_cpp_python-$VERSION/vendor/llama.cpp"
export PATH="$ROOT/V/bin:$PATH"
rm -rf build
cmake -S "$SOURCE" -B build -G Ninja "${CPU_FLAGS[@]}" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DCMAKE_BUILD_TYPE=Release >&2
cmake --build build -j2 --target "${TARGETS[@]}" >&2
for t in "${TARGETS[@]}"; do
  test -x "build/bin/$t"
done
echo "$BUILD_ID" > "$MARKER"
echo "$ROOT/build/bin"
