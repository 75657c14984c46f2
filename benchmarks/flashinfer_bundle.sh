#!/usr/bin/env bash
# Build .fi/ on a machine where pip has network: FlashInfer for the GPU box, which has none.
# FlashInfer is a pure-Python wheel that JIT-compiles its CUDA sources with nvcc at first use; the wheel is
# trimmed to the JIT sources attention needs (decode, MLA, prefill + templates and headers) so that it fits a
# device call (README of the device tool: 64 MiB per call). apache-tvm-ffi travels as a cp312 wheel; everything
# else FlashInfer imports is already on the box. Then, on the box: `bash benchmarks/flashinfer_device.sh`.
#   usage (repo root): bash benchmarks/flashinfer_bundle.sh [OUT_DIR, default .fi]   (needs pip, unzip, xz)
set -euo pipefail
version=${FLASHINFER_VERSION:-0.7.2.post1}
tvm_ffi=${TVM_FFI_VERSION:-0.1.15.post2}
out=${1:-.fi}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$tmp" \
    "flashinfer-python==$version" "apache-tvm-ffi==$tvm_ffi"
unzip -q "$tmp"/flashinfer_python-*.whl -d "$tmp/unz"
data="$tmp/unz/flashinfer/data"
find "$data/csrc" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
find "$data/csrc" -maxdepth 1 -type f ! -name '*.jinja' ! -name '*.h' \
    ! -name 'batch_decode*' ! -name 'batch_mla*' ! -name 'batch_prefill*' -delete
rm -rf "$data"/cccl/{python,benchmarks,ci,docs} "$data"/cutlass/{python,examples,test} \
    "$tmp"/unz/flashinfer/experimental/*/csrc
(cd "$tmp/unz" && tar -cJf - flashinfer) > "$out/fi.tar.xz"
cp "$tmp"/apache_tvm_ffi-*.whl "$out/"
du -sh "$out"
