#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, one after another (each needs the machine to itself).
# Takes about 80 minutes on 2 cores; results land in benchmarks/results/ and out/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LB=.venv/bin/lowbit
$LB --quiet compare default --methods rtn,gptq,awq --bits 4,3 --group-size 64,-1 --asym --out out/compare-w4w3 --overwrite
$LB --quiet compare default --bits 8 --group-size -1 --out out/compare-8bit --overwrite \
  --methods "rtn,w8a8-naive,llm-int8,llm-int8:outlier_fraction=0.01,w8a8-smooth,w8a8-smooth:act_granularity=tensor,fp8,fp8:act=fp8,fp8-e5m2"
$LB --quiet outliers default --out out/outliers
$PY benchmarks/layer_errors.py
if $PY -c "import llama_cpp" 2>/dev/null; then $PY benchmarks/llamacpp_peer.py; fi
