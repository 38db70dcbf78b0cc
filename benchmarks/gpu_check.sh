#!/usr/bin/env bash
# The GPU checks in one run, a few minutes on one H100: the CUDA tests against torchvision's
# CUDA kernel, then the GPU benchmark (layers eager and compiled, and the example DBNet at
# batch 1 and 8), every ratio measured in this run. Needs torch, torchvision, typer, rich,
# safetensors and pytest; deformcli is imported from this checkout.
#
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.cuda.get_device_name()}")'
python3 -m pytest -q -p no:cacheprovider tests/ops/test_cuda.py tests/ops/test_checks.py
python3 benchmarks/bench_ops.py --device cuda --rounds 31 --skip-memory --compile --model-batches 1,8
