#!/usr/bin/env bash
# One command for a GPU machine (an H200 here): the kernel benchmark on CUDA, where Inductor emits Triton.
#   bash recipes/bench_gpu.sh [OUT]      # results: recipes/results/kernels_gpu.{json,md}, copied to OUT
# Steps in order of importance, each under its own time limit (seconds, overridable) so that a slow step
# leaves the others' results, all merged into one file: the OLMoE shape at 1, 16 and 128 tokens for bf16
# and DynaMo mixed by Inductor's loops and by the hand-written Triton kernel (FIRST_S); the same at 1 and
# 16 tokens replayed as CUDA graphs, into kernels_gpu_cudagraphs (GRAPHS_S); end-to-end decode of an
# OLMoE-shaped model (E2E_S); the other variants and 4 tokens (REST_S); the Qwen3 shape (QWEN3_S). A cold Inductor cache on the H200
# machine took 45-65 s per dynamoq variant and graph (2026-11-29), hence the order; the first step has two graphs
# (decode, prefill) for each dynamoq variant, and the Triton kernels' autotuning on top (5 configurations for each of
# the decode kernel's two modes and the grouped kernel's two projections: 20 compiles, 2-7 s each on our 2-core CPU), hence 400 s.
# The "(Triton kernel)" rows time dynamoq/triton_decode.py (1 and 16 tokens) and dynamoq/triton_grouped.py (128
# tokens), off by default (dynamoq.kernels.TRITON) until they beat the default paths here (Inductor's loops; the
# grouped path of 16-bit copies); their error column compares them with those run eagerly (correctness).
# Wheels in .whl/ (a machine with no network and other package versions) are installed to /tmp/site first.
# The lent H200 had torch 2.11, transformers 5.17 and no torchao (2026-11-29); fetch the pinned ones with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl transformers==5.24.0 torchao==0.18.0
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-recipes/results}}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchao', torchao.__version__)" 2>&1 | grep -v "Failed to load"
rm -f recipes/results/kernels_gpu.json recipes/results/kernels_gpu_cudagraphs.json
step() {  # step SECONDS NAME ARGS...: one run of the benchmark, stopped after SECONDS, merged into NAME
  local s=$1 name=$2; shift 2
  local m=$([ -f "recipes/results/$name.json" ] && echo --merge)
  echo "== $name $* (limit ${s} s)"; local t0=$SECONDS
  timeout -k 10 "$s" python3 recipes/bench_kernels.py --device cuda --name "$name" $m "$@"
  echo "== rc $? after $((SECONDS - t0)) s"
}
MAIN=("bf16 grouped_mm" "dynamoq mixed 2/4/6/8" "dynamoq mixed 2/4/6/8 (Triton kernel)")
step "${FIRST_S:-400}" kernels_gpu --shapes olmoe --tokens 1 16 128 --variants "${MAIN[@]}" --no-e2e
# launch-bound at 1 token: the same rows replayed as CUDA graphs
step "${GRAPHS_S:-150}" kernels_gpu_cudagraphs --cudagraphs --shapes olmoe --tokens 1 16 --variants "${MAIN[@]}" --no-e2e
step "${E2E_S:-150}" kernels_gpu --shapes
step "${REST_S:-300}" kernels_gpu --shapes olmoe --no-e2e
step "${QWEN3_S:-300}" kernels_gpu --shapes qwen3 --no-e2e
cp recipes/results/kernels_gpu*.json recipes/results/kernels_gpu*.md "$OUT"/ 2>/dev/null
ls -la "$OUT"
