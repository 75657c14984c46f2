#!/bin/bash
# Session 30's GPU calls: the decode stack against session 29's kernel (BASELINE, a copy of that version's
# kernels/decode_stack_gluon.py: `git show 5f127dd:kernels/decode_stack_gluon.py > benchmarks/out/decode_stack_5f127dd.py`,
# carried to the GPU box; AB=0 skips it; AB_LAYERS, RINGS), the stack's GPU tests (TESTS=0 skips them), then the
# engine's batch-1 step with the stack on and off (STACK; ENGINE=0 skips it; LAYERS). Each under a time limit: a
# kernel that hangs costs that, not the call (-k: killed for good, so that it cannot hold the GPU for the next).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
BASELINE=${BASELINE:-benchmarks/out/decode_stack_5f127dd.py}
if [ "${AB:-1}" != 0 ]; then
  timeout -k 10 ${AB_LIMIT:-150} python benchmarks/decode_stack_ab.py --layers ${AB_LAYERS:-8} \
    $( [ -f "$BASELINE" ] && echo --baseline "$BASELINE" ) ${RINGS:+--rings $RINGS} --out $OUT/ab.json 2>&1 | tail -60
fi
if [ "${TESTS:-1}" != 0 ]; then
  timeout -k 10 300 python -m pytest -q -m gpu tests/test_gpu_decode_stack.py -s -p no:cacheprovider 2>&1 | tail -25
fi
if [ "${ENGINE:-1}" != 0 ]; then
  for s in ${STACK:-on off}; do
    timeout -k 10 240 python benchmarks/offline_gpu.py --models qwen3-30b-a3b --layers ${LAYERS:-8} --skip-hf \
      --skip-sync --decode-batches 1 --num-requests 8 --output-len 8 --steps 20 --decode-stack $s \
      --profile-kernels --out $OUT/og_${LAYERS:-8}_$s 2>&1 | grep "^| 1 |\|decode stack" | head -3
  done
fi
