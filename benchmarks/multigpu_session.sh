#!/usr/bin/env bash
# One device call on a host with several GPUs (`.whl` from benchmarks/multigpu_bundle.sh carried): install Ray and
# Serve, run the multi-GPU tests (DP = EP over the GPUs against one GPU, EPLB moving weights between GPUs), the
# engine on real-shape random-weight models at DP = EP = N against one GPU (benchmarks/multigpu_engine.py), the
# two-batch-overlap benchmark for both dispatchers side by side, and the Serve endpoint at DP = EP = N against
# DP = 1 on the demo model. Logs and JSON under $OUT (or benchmarks/out).
#   usage (repo root): [STAGES="tests engine overlap serve"] [DEADLINE_S=570] bash benchmarks/multigpu_session.sh
# Every step's timeout is cut to what is left of DEADLINE_S, so the call ends inside the device tool's 600 s;
# a later call can run the stages left over. TESTS_S (default 240) bounds the tests. (GPUS, DEVICE=cpu,
# BACKEND=gloo, EP_TOKENS, NUM_PROMPTS let the script itself be checked on CPU ranks; ATTN_RANK sizes
# ep_overlap's dense stand-in for attention.)
set -u
out=${OUT:-benchmarks/out}
stages=${STAGES:-tests engine overlap serve}
end=$((SECONDS + ${DEADLINE_S:-570}))
mkdir -p "$out"
# seconds for the next step: its own limit, or what is left of the deadline when that is less
budget() { local left=$((end - SECONDS)); echo $(( left < $1 ? (left > 0 ? left : 1) : $1 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3
# NVLink multicast stays off on shared hosts (the device tool's KINDS.md).
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    RAY_USAGE_STATS_ENABLED=0
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
{ nvidia-smi -L; nvidia-smi topo -m; } 2>&1 | tee "$out/card.txt"
if [[ " $stages " == *" tests "* ]]; then
    timeout "$(budget "${TESTS_S:-240}")" python3 -m pytest -q -s -m multigpu -p no:cacheprovider -rf \
        tests/test_cluster_ep.py tests/test_eplb_cluster.py 2>&1 \
        | grep -E "balancedness|passed|failed|skipped|Error" | tee "$out/multigpu_tests.txt"
fi
if [[ " $stages " == *" engine "* ]]; then
    timeout "$(budget 360)" python3 benchmarks/multigpu_engine.py --device "${DEVICE:-cuda}" --ranks "$gpus" \
        ${ENGINE_ARGS:-} --out "$out/multigpu_engine.json" 2>&1 | grep -E "^\||^[a-z].*greedy|Error" \
        | tee "$out/multigpu_engine.txt"
fi
if [[ " $stages " == *" overlap "* ]]; then
    for tokens in ${EP_TOKENS:-128 512 4096}; do
        for dispatcher in all_gather all_to_all; do  # side by side, same machine
            timeout "$(budget 120)" python3 benchmarks/ep_overlap.py --ranks "$gpus" --backend "${BACKEND:-nccl}" \
                --dispatcher "$dispatcher" --tokens "$tokens" --hidden 7168 --experts $((16 * gpus)) --topk 8 \
                --inter 2048 --layers 8 --attn-rank "${ATTN_RANK:-2048}" --repeats 5 \
                --out "$out/ep_overlap_${dispatcher}_$tokens.json" 2>&1 \
                | grep -E "ranks|compute|communication|TBO|speed-up" | tee -a "$out/ep_overlap.txt"
        done
    done
fi
if [[ " $stages " == *" serve "* ]]; then
    for dp in 1 "$gpus"; do
        port=$((8000 + dp))
        python3 -m moeserve.cli serve --device "${DEVICE:-cuda}" --dp "$dp" --ep "$dp" --port "$port" \
            > "$out/serve_dp$dp.log" 2>&1 &
        server=$!
        for _ in $(seq "$(budget 300)"); do
            curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
            kill -0 "$server" 2> /dev/null || break  # the server died: its log says why
            sleep 1
        done
        timeout "$(budget 240)" python3 benchmarks/serving.py --base-url "http://127.0.0.1:$port" \
            --num-prompts "${NUM_PROMPTS:-256}" --input-len 128 --output-len 64 --max-concurrency 64 \
            --out "$out/serving_dp$dp.json" 2>&1 | grep -v "^wrote" | tail -28 | tee -a "$out/serving.txt"
        kill "$server" 2> /dev/null  # SIGTERM: the CLI deletes the app and its local Ray cluster goes with it
        wait "$server" 2> /dev/null
    done
fi
