#!/usr/bin/env bash
# Build llama.cpp's own benchmark tools (llama-bench, llama-quantize) from the llama.cpp sources vendored in
# llama-cpp-python's source package, so that llama.cpp's speed is measured natively (no Python in its decode
# loop). Needs cmake and a C++ compiler; about 5 minutes on 2 cores.
#
#   bash benchmarks/build_llama_bench.sh [DIR]      # default DIR: build/llama.cpp; prints the llama-bench path
#
# The instruction sets are chosen from what this CPU reports (/proc/cpuinfo), not with GGML_NATIVE: a native build
# also compiles llama.cpp's AMX kernels on CPUs that list AMX, and those died with SIGILL (tileloadd) inside a
# virtual machine that lists amx_tile but does not let processes use it. AMX is therefore left off; every other
# extension the CPU reports is on.
set -euo pipefail
dir="${1:-build/llama.cpp}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
python="${PYTHON:-.venv/bin/python}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
if [ ! -d "$dir/src/vendor/llama.cpp" ]; then
  echo "fetching llama-cpp-python $version (source package) ..." >&2
  "$python" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$dir/sdist"
  rm -rf "$dir/src" && mkdir -p "$dir/src"
  tar xzf "$dir"/sdist/llama_cpp_python-*.tar.gz -C "$dir/src" --strip-components=1
fi
has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
flags=(-DGGML_NATIVE=OFF -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)"
       -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX512="$(has avx512f)"
       -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
       -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AVX_VNNI="$(has avx_vnni)"
       -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
echo "configuring: ${flags[*]}" >&2
cmake -S "$dir/src/vendor/llama.cpp" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
  "${flags[@]}" > "$dir/cmake.log" 2>&1 || { tail -5 "$dir/cmake.log" >&2; exit 1; }
echo "building llama-bench and llama-quantize ..." >&2
cmake --build "$dir/build" --target llama-bench llama-quantize -j "$(nproc)" > "$dir/build.log" 2>&1 \
  || { tail -5 "$dir/build.log" >&2; exit 1; }
echo "$dir/build/bin/llama-bench"
