"""The engine over several GPUs against one GPU: greedy agreement and offline throughput per GPU.

Random-weight bf16 checkpoints with the real shapes of Qwen3-30B-A3B and DeepSeek-V2-Lite, with fewer layers
(`offline_gpu.build_checkpoint`). Per model, N random prompts run through:
- one GPU's engine (`LLM`, the baseline);
- `LLM(data_parallel_size=R, expert_parallel_size=R)`, the Ray worker group with one actor per GPU, for each
  MoE dispatcher x two-batch-overlap setting.

Reported per run: seconds, output tokens/s, output tokens/s per GPU against the one-GPU figure, the mean
decode step (the run against a one-token run of other prompts, see `run`), and how many requests' greedy tokens
equal the one-GPU run's. With bf16 random weights, a near-tie may flip a few requests;
the tiny fp32 tests (`pytest -m multigpu`) are the strict check. Prints a table and writes JSON.

    python benchmarks/multigpu_engine.py --out benchmarks/out/multigpu_engine.json           # on R GPUs
    python benchmarks/multigpu_engine.py --tiny --device cpu --ranks 2 --out /tmp/mge.json   # logic check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from offline_gpu import build_checkpoint, engine_options, free, random_prompts, timed_generate  # noqa: E402

log = logging.getLogger("multigpu_engine")


def run(path: Path, prompts: list[list[int]], warm: list[list[int]], one_token: list[list[int]], args,
        device: torch.device, **options) -> dict:
    """One engine (one rank, or R through Ray when options ask for it) over the prompts, from a cold start, after
    a short greedy warm-up over `warm`. Also times `one_token` (other prompts of the same lengths, so neither
    run finds the other's prefixes cached) with one output token each, so that the decode steps' share comes out:
    decode_ms = (full run - one-token run) / (output_len - 1), the mean step while the requests decode."""
    from moeserve import LLM

    llm = LLM(str(path), **engine_options(args, device), **options)
    try:
        timed_generate(llm, warm, 8)
        one_token_s, _ = timed_generate(llm, one_token, 1)
        seconds, outs = timed_generate(llm, prompts, args.output_len)
    finally:
        llm.shutdown()
        del llm
        free(device)
    decode_ms = (seconds - one_token_s) / max(args.output_len - 1, 1) * 1e3
    return dict(seconds=seconds, decode_ms=decode_ms, tokens=[o.token_ids for o in outs])


def bench_model(name: str, args, device: torch.device) -> dict:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    path = Path(args.ckpt_dir) / name
    hf = build_checkpoint(name, args.layers, path, device, dtype, args.tiny)
    vocab = hf.config.vocab_size
    del hf
    free(device)
    prompts = random_prompts(args.num_requests, args.input_len, vocab, seed=0)
    # Warm-up, then the one-token run: as many prompts as the timed run, so its prefill and decode batch sizes
    # compile (Triton) before the clock.
    warm, one_token = (random_prompts(args.num_requests, args.input_len, vocab, seed=seed) for seed in (999, 998))
    out_tokens = args.num_requests * args.output_len
    base = run(path, prompts, warm, one_token, args, device)
    rows = [dict(setup="1 GPU", ranks=1, seconds=base["seconds"], decode_ms=base["decode_ms"],
                 same=args.num_requests)]
    settings = [(d, tbo, graphs) for d in args.dispatchers.split(",") for tbo in args.tbo for graphs in args.graphs
                if graphs or d in ("all_gather", "by_mode", "auto")]  # graphs off matters where decode replays them
    for dispatcher, tbo, graphs in settings:
        setup = f"{dispatcher}, TBO {'on' if tbo else 'off'}" + ("" if graphs else ", graphs off")
        options = dict(data_parallel_size=args.ranks, expert_parallel_size=args.ranks, moe_dispatcher=dispatcher,
                       enable_tbo=tbo, async_scheduling=args.async_scheduling, enable_cuda_graphs=graphs)
        try:
            got = run(path, prompts, warm, one_token, args, device, **options)
        except Exception as exc:  # report and go on with the next setting
            log.exception("%s %s failed", name, setup)
            rows.append(dict(setup=setup, error=repr(exc)))
            continue
        same = sum(a == b for a, b in zip(got["tokens"], base["tokens"]))
        rows.append(dict(setup=setup, ranks=args.ranks, seconds=got["seconds"], decode_ms=got["decode_ms"],
                         same=same))
    for row in rows:
        if "seconds" in row:
            row["output_tok_s"] = out_tokens / row["seconds"]
            row["per_gpu_vs_one"] = row["output_tok_s"] / row["ranks"] / rows[0]["output_tok_s"]
    return dict(model=name, layers=args.layers, rows=rows)


def print_table(result: dict, args) -> None:
    print(f"\n{result['model']} ({result['layers']} layers), {args.num_requests} x ({args.input_len} -> "
          f"{args.output_len}), greedy")
    print("| setup | GPUs | s | output tok/s | per GPU vs 1 GPU | decode ms/step | same tokens as 1 GPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['setup']} | | failed: {r['error'][:60]} | | | | |")
            continue
        print(f"| {r['setup']} | {r['ranks']} | {r['seconds']:.2f} | {r['output_tok_s']:.0f} | "
              f"{r['per_gpu_vs_one']:.2f} | {r['decode_ms']:.2f} | {r['same']}/{args.num_requests} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-30b-a3b,deepseek-v2-lite")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=None, help="DP = EP ranks (default: every visible GPU)")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--dispatchers", default="all_to_all,all_gather")
    ap.add_argument("--tbo", default="off,on", help="comma list of off, on")
    ap.add_argument("--graphs", default="on", help="comma list of on, off: CUDA graphs (the all-gather's decode)")
    ap.add_argument("--async-scheduling", choices=["on", "off"], default="on")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (checks this script on a CPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ckpt-dir", default="/tmp/moeserve_multigpu")
    ap.add_argument("--out", default="benchmarks/out/multigpu_engine.json")
    args = ap.parse_args()
    args.tbo = [{"off": False, "on": True}[t] for t in args.tbo.split(",")]
    args.graphs = [{"off": False, "on": True}[t] for t in args.graphs.split(",")]
    args.async_scheduling = args.async_scheduling == "on"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    if args.ranks is None:
        args.ranks = torch.cuda.device_count() if device.type == "cuda" else 2
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = []
    for name in args.models.split(","):
        log.info("benchmarking %s", name)
        results.append(bench_model(name, args, device))
        print_table(results[-1], args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(card=card, date=time.strftime("%Y-%m-%d"), args=vars(args), results=results),
                              indent=1))


if __name__ == "__main__":
    main()
