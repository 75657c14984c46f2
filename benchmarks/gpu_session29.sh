#!/bin/bash
# Session 29's GPU calls: the decode stack's GPU tests (TESTS=0 skips them), then the engine's batch-1 decode step
# with the stack on and off (STACK="on off"), LAYERS layers, each with its graph's kernel profile.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
if [ "${TESTS:-1}" != 0 ]; then
  python -m pytest -q -m gpu tests/test_gpu_decode_stack.py -s -p no:cacheprovider 2>&1 | tail -45
fi
for s in ${STACK:-on off}; do
  python benchmarks/offline_gpu.py --models qwen3-30b-a3b --layers ${LAYERS:-8} --skip-hf --skip-sync \
    --decode-batches 1 --num-requests 8 --output-len 8 --steps 20 --decode-stack $s --profile-kernels \
    --out $OUT/og_${LAYERS:-8}_$s 2>&1 | grep "^| 1 |" | head -1
  python -c "
import json; d=json.load(open('$OUT/og_${LAYERS:-8}_$s/qwen3-30b-a3b.json'))['result']['decode'][0]
k=d['kernels']; print('$s', {x: k[x] for x in k if x != 'top'}); [print(' ', r) for r in k.get('top', [])[:6]]"
done
