"""Offline throughput of the moeserve engine against `transformers.generate` on the same model and workload.

Both run greedy decoding of the same random prompts on this machine's CPU; transformers gets the same requests
batched (left padding, its own KV cache). Prints a table and writes JSON.

    python benchmarks/offline_cpu.py --num-requests 32 --input-len 64 --output-len 32
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def make_prompts(n: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(n)]


def run_moeserve(path: str, prompts, output_len: int, args) -> tuple[float, list[list[int]]]:
    from moeserve import LLM, SamplingParams

    llm = LLM(path, device="cpu", dtype="float32", max_num_batched_tokens=args.max_num_batched_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t0, [o.token_ids for o in outs]


def run_transformers(path: str, prompts, output_len: int, batch_size: int) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # generate exactly output_len tokens, like ignore_eos
    gen = GenerationConfig(do_sample=False, max_new_tokens=output_len, eos_token_id=None, pad_token_id=0)
    outs: list[list[int]] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(ids, attention_mask=mask, generation_config=gen)
            outs.extend(out[:, width:].tolist())
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF checkpoint (default: the demo model)")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/out/offline_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from moeserve.testing.tiny_checkpoints import demo_checkpoint

        args.model = str(demo_checkpoint())
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_requests, args.input_len, vocab, seed=0)
    ours_s, ours = run_moeserve(args.model, prompts, args.output_len, args)
    hf_s, hf = run_transformers(args.model, prompts, args.output_len, args.hf_batch_size)
    out_tokens = args.num_requests * args.output_len
    same = sum(a == b for a, b in zip(ours, hf))
    rows = [
        ("moeserve engine", ours_s, out_tokens / ours_s),
        (f"transformers.generate (batch {args.hf_batch_size})", hf_s, out_tokens / hf_s),
    ]
    print(
        f"\nmodel {args.model}: {args.num_requests} requests, input {args.input_len}, output {args.output_len} "
        f"tokens, greedy, CPU threads {torch.get_num_threads()}"
    )
    print(f"{'engine':<40} {'seconds':>9} {'output tok/s':>13}")
    for name, s, tps in rows:
        print(f"{name:<40} {s:>9.2f} {tps:>13.1f}")
    print(
        f"ratio moeserve / transformers: {hf_s / ours_s:.2f}x; identical greedy outputs: {same}/{len(prompts)}"
    )
    result = {
        "model": args.model,
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "threads": torch.get_num_threads(),
        "moeserve_seconds": ours_s,
        "transformers_seconds": hf_s,
        "speedup": hf_s / ours_s,
        "identical_outputs": same,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
