#!/usr/bin/env bash
# On the GPU box (device tool, carry [".fi"] built by benchmarks/flashinfer_bundle.sh): install FlashInfer
# into /tmp/site and export what later commands of the same call need. Source it, then run the probe/tests:
#   . benchmarks/flashinfer_device.sh && python3 benchmarks/flashinfer_probe.py --out "$OUT"
# Modules compiled by an earlier call and saved under .fi/aot/ (the probe copies each .so it builds to its
# --out folder) are loaded ahead of time instead of being compiled again (~45 s with 16 cores).
export MAX_JOBS=${MAX_JOBS:-16} FLASHINFER_WORKSPACE_BASE=/tmp/fiws PATH=/opt/torch/.venv/bin:$PATH
for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0; do
    [ -n "$d" ] && [ -x "$d/bin/nvcc" ] && export CUDA_HOME=$d && break
done
mkdir -p /tmp/site
tar -xJf .fi/fi.tar.xz -C /tmp/site || return 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .fi/apache_tvm_ffi-*.whl \
    || return 1
for so in .fi/aot/*.so; do
    [ -f "$so" ] || continue
    n=$(basename "$so" .so); mkdir -p "/tmp/site/flashinfer/data/aot/$n"; cp "$so" "/tmp/site/flashinfer/data/aot/$n/"
done
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)"
