#!/usr/bin/env bash
# One device call on a host with several GPUs (`.whl` from benchmarks/multigpu_bundle.sh carried): install Ray and
# Serve, run the multi-GPU tests (DP = EP over every GPU against one GPU, EPLB moving weights between GPUs), the
# two-batch-overlap benchmark for both dispatchers, and the Serve endpoint at DP = EP = N against DP = 1 on the
# demo model. Logs and JSON under $OUT (or benchmarks/out).
#   usage (repo root): bash benchmarks/multigpu_session.sh
# (GPUS, DEVICE=cpu, BACKEND=gloo, EP_TOKENS, NUM_PROMPTS let the script itself be checked on CPU ranks.)
set -u
out=${OUT:-benchmarks/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3
# NVLink multicast stays off on shared hosts (the device tool's KINDS.md).
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    RAY_USAGE_STATS_ENABLED=0
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
{ nvidia-smi -L; nvidia-smi topo -m; } 2>&1 | tee "$out/card.txt"
timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -s -m multigpu -p no:cacheprovider -rf \
    tests/test_cluster_ep.py tests/test_eplb_cluster.py 2>&1 | grep -E "balancedness|passed|failed|skipped|Error" \
    | tee "$out/multigpu_tests.txt"
for dispatcher in all_gather all_to_all; do
    for tokens in ${EP_TOKENS:-128 512 4096}; do
        timeout 150 python3 benchmarks/ep_overlap.py --ranks "$gpus" --backend "${BACKEND:-nccl}" --dispatcher "$dispatcher" \
            --tokens "$tokens" --hidden 7168 --experts $((16 * gpus)) --topk 8 --inter 2048 --layers 8 \
            --attn-rank 2048 --repeats 5 --out "$out/ep_overlap_${dispatcher}_$tokens.json" 2>&1 \
            | grep -E "ranks|compute|communication|TBO|speed-up" | tee -a "$out/ep_overlap.txt"
    done
done
for dp in 1 "$gpus"; do
    python3 -m moeserve.cli serve --device "${DEVICE:-cuda}" --dp "$dp" --ep "$dp" --port 8000 \
        > "$out/serve_dp$dp.log" 2>&1 &
    server=$!
    for _ in $(seq 300); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
    timeout 300 python3 benchmarks/serving.py --num-prompts "${NUM_PROMPTS:-256}" --input-len 128 --output-len 64 \
        --max-concurrency 64 --out "$out/serving_dp$dp.json" 2>&1 | grep -v "^wrote" | tail -28 | tee -a "$out/serving.txt"
    kill "$server"  # SIGTERM: the CLI deletes the app and its local Ray cluster goes with it
    wait "$server" 2>/dev/null
done
