#!/usr/bin/env bash
# One device call: GPU tests, then the engine benchmark; logs and JSON under $OUT (or benchmarks/out).
# Usage (repo root, no install needed): bash benchmarks/gpu_session.sh [offline_gpu.py options]
# GPU_TESTS_TIMEOUT (seconds, default 300) bounds the test part; GPU_TESTS=0 skips it.
set -u
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export PYTHONPATH=$PWD
# FlashInfer (optional): installed from .fi/ when the call carries it (benchmarks/flashinfer_bundle.sh builds it).
if [ -f .fi/fi.tar.xz ]; then
    . benchmarks/flashinfer_device.sh
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/card.txt"
if [ "${GPU_TESTS:-1}" != 0 ]; then
    timeout "${GPU_TESTS_TIMEOUT:-300}" python -m pytest -q -m gpu -p no:cacheprovider -rf \
        tests/test_gpu_engine.py tests/test_kernels_moe.py tests/test_kernels_attention.py \
        tests/test_kernels_fused_small.py tests/test_kernels_router_topk.py tests/test_kernels_skinny.py \
        tests/test_kernels_mla_tma.py tests/test_kernels_mla_gluon.py tests/test_flashinfer_backend.py 2>&1 \
        | tail -30 | tee "$out/gpu_tests.txt"
fi
python benchmarks/offline_gpu.py --out "$out/offline_gpu" "$@" 2>&1 | grep -v "^Writing\|it/s\]" \
    | tee "$out/offline_gpu.txt"
