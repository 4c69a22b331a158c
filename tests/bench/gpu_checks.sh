#!/usr/bin/env bash
# Every GPU check in one run, well under 5 minutes on one GPU: the `gpu`-marked tests (CUDA
# workers against single-process PyTorch, also pushing buckets to a sharded server, mixed
# precision, quantisation on the device, three ranks sharing the GPU through Gloo summing in
# rank order), then the parameter server's
# figures (a) (a 100 MB exchange whose gradient and parameters live on the GPU and travel
# through pinned host buffers), (c) (a 1-worker CUDA job against plain PyTorch on the GPU) and
# (g) (two GPU workers pushing buckets while backward runs, their parameters pulled beside).
# Run from the repository root with a Python whose torch has CUDA:
#   PYTHON=.venv/bin/python bash tests/bench/gpu_checks.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-.venv/bin/python}"
out="${1:-bench-results/gpu}"
mkdir -p "$out"
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
"$python" -m pytest -m gpu -q tests/integration/test_gpu.py tests/unit/test_quant.py tests/unit/test_collective.py \
    2>&1 | tee "$out/pytest-gpu.txt"
"$python" tests/bench/bench_ps.py --device cuda --figures a c g --transports unix tcp --iters 6 \
    --batches 32 128 --steps 500 --repeats 1 --out "$out" 2>&1 | tee "$out/bench_ps.txt"
