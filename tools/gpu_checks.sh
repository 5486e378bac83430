#!/usr/bin/env bash
# The GPU checks of fxquant in one go (what a lent H100/H200 runs): kernel tests on CUDA (the same
# tests CI runs in the Triton interpreter), the lowered models vs fake quantization, and the kernel
# benchmarks. Writes logs and JSON under ${OUT:-gpu_out}.
#   bash tools/gpu_checks.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out=${OUT:-gpu_out}; mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { tail "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$out/kernel_tests.log" | tail -25
timeout 120 python3 tools/check_lowered.py --device cuda --json "$out/lowered.json"
timeout 240 python3 tools/bench_kernels.py --json "$out/bench_kernels.json"
timeout 60 python3 tools/bench_bitlog2.py --json "$out/bench_bitlog2.json"
