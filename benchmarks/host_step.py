"""Host time of one decode step at a large batch, split by engine stage (CPU, demo model, fp32).

Fills the engine with `--num-requests` requests, runs their prefills, then times `--steps` decode steps with
timing wrappers patched onto the engine's objects here (nothing in moeserve is changed). The tiny model's CPU
forward stands in for the GPU step; every other row is host work a GPU step would have to hide.

    python benchmarks/host_step.py --num-requests 256 --steps 40
    python benchmarks/host_step.py --profile     # also print the top functions by own time (cProfile)

Rows are inclusive times per step; indented rows are parts of the row above, and "(rest)" rows are what the
parent spent outside its listed parts.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

# (label, parent label or None): the table's rows in order. Parents are timed inclusively.
ROWS: list[tuple[str, str | None]] = [
    ("step", None),
    ("schedule", "step"),
    ("launch", "step"),  # runner.launch: queue the forward and the sampling
    ("build_batch", "launch"),
    ("build_forward_batch", "build_batch"),
    ("forward", "launch"),
    ("compute_logits", "launch"),
    ("sampler", "launch"),
    ("resolve", "step"),  # waiting for the sampled tokens and turning them into a ModelOutput
    ("update", "step"),
    ("emit", "step"),
    ("detokenize", "emit"),
]


class Timers:
    """Accumulates inclusive wall time and call counts per label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.enabled = False

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        return timed

    def patch(self, obj: object, attr: str, label: str) -> None:
        """Replace obj.attr by a timed version (on the instance, or on the class for slotted objects)."""
        fn = getattr(obj, attr)
        try:
            setattr(obj, attr, self.wrap(label, fn))
        except AttributeError:  # __slots__ instance: patch the class; its methods take self explicitly
            cls = type(obj)
            setattr(cls, attr, self.wrap(label, getattr(cls, attr)))


def instrument(engine, timers: Timers) -> None:
    """Patch timing wrappers onto the engine's stages (the labels of ROWS)."""
    import moeserve.engine.detokenizer as detok_mod
    import moeserve.runner.model_runner as runner_mod

    runner = engine.runner
    for obj, attr, label in ((engine, "step", "step"), (engine.scheduler, "schedule", "schedule"),
                             (engine.scheduler, "update", "update"), (engine, "_emit", "emit"),
                             (runner, "launch", "launch"), (runner, "build_batch", "build_batch"),
                             (runner.model, "forward", "forward"), (runner.model, "compute_logits", "compute_logits"),
                             (runner.sampler, "launch", "sampler")):
        timers.patch(obj, attr, label)
    runner_mod.PendingStep.resolve = timers.wrap("resolve", runner_mod.PendingStep.resolve)
    # The runner calls build_forward_batch through its module global.
    runner_mod.build_forward_batch = timers.wrap("build_forward_batch", runner_mod.build_forward_batch)
    cls = detok_mod.IncrementalDetokenizer
    cls.update = timers.wrap("detokenize", cls.update)
    cls.flush = timers.wrap("detokenize", cls.flush)


def fill_engine(engine, args) -> None:
    """Add the requests and step until every one is decoding (prefills done) plus a few warm-up steps."""
    from moeserve import SamplingParams

    rng = random.Random(0)
    vocab = min(engine.vocab_size, 256)  # byte tokens: every sampled id decodes to text
    stop = [args.stop] if args.stop else []
    # Requests admitted early decode while later prompts prefill: leave room so none finishes while timed.
    prefill_steps = args.num_requests * args.input_len // args.max_num_batched_tokens + 2
    max_tokens = args.steps + args.warmup + prefill_steps + 4
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, stop=stop)
    for i in range(args.num_requests):
        prompt = [rng.randrange(32, vocab) for _ in range(args.input_len)]
        engine.add_request(prompt, params, f"bench-{i}")
    for _ in range(10_000):
        sched = engine.scheduler
        decoding = not sched.waiting and all(r.num_output_tokens > 0 for r in sched.running)
        if decoding:
            break
        engine.step()
    for _ in range(args.warmup):
        engine.step()
    running = len(engine.scheduler.running)
    if running != args.num_requests:
        raise SystemExit(f"only {running} of {args.num_requests} requests run at once: raise --kv-blocks")


def table(timers: Timers, steps: int) -> list[dict]:
    """Per-step milliseconds in tree order, with a "(rest)" row after each parent's children: the time the
    parent spent outside them."""
    children: dict[str | None, list[str]] = defaultdict(list)
    for label, parent in ROWS:
        children[parent].append(label)

    def ms(label: str) -> float:
        return timers.seconds[label] * 1e3 / steps

    rows: list[dict] = []

    def walk(label: str, depth: int) -> None:
        rows.append({"stage": label, "depth": depth, "ms_per_step": ms(label),
                     "calls_per_step": timers.calls[label] / steps})
        for child in children[label]:
            walk(child, depth + 1)
        if children[label]:
            rest = ms(label) - sum(ms(c) for c in children[label])
            rows.append({"stage": f"({label} rest)", "depth": depth + 1, "ms_per_step": rest,
                         "calls_per_step": None})

    for root in children[None]:
        walk(root, 0)
    return rows


def bench_forward_batch(num_reqs: int, contexts: list[int], block_size: int = 16) -> list[dict]:
    """build_forward_batch alone on decode batches: block tables packed from lists each step, or kept across
    steps in a BlockTableRows (a decode step where one request in 16 starts a new block). Median of 5 x 20."""
    rng = random.Random(0)
    return [_time_forward_batch(num_reqs, ctx, block_size, rng) for ctx in contexts]


def _time_forward_batch(num_reqs: int, ctx: int, block_size: int, rng: random.Random) -> dict:
    from moeserve.forward_batch import BlockTableRows, build_forward_batch

    starts = [ctx + rng.randrange(200) for _ in range(num_reqs)]
    tables = [rng.sample(range(10**7), s // block_size + 1) for s in starts]
    tokens = [[rng.randrange(256)] for _ in starts]
    ids = [f"r{i}" for i in range(num_reqs)]
    rows = BlockTableRows()
    rows.pack(ids, tables)
    step = iter(range(10**9))

    def from_lists() -> None:
        build_forward_batch(tokens, starts, [list(t) for t in tables], block_size)

    def from_rows() -> None:
        for i in range(next(step) % 16, num_reqs, 16):
            tables[i].append(rng.randrange(10**7))
        build_forward_batch(tokens, starts, rows.pack(ids, [list(t) for t in tables]), block_size)

    row: dict = {"context": ctx}
    for name, fn in (("lists_ms", from_lists), ("block_table_rows_ms", from_rows)):
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            runs.append((time.perf_counter() - t0) / 20 * 1e3)
        row[name] = sorted(runs)[2]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF checkpoint (default: the demo model)")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40, help="decode steps timed")
    ap.add_argument("--warmup", type=int, default=3, help="decode steps run before timing")
    ap.add_argument("--stop", default=None, help="give every request this stop string")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-blocks", type=int, default=None, help="KV cache blocks (default: engine's)")
    ap.add_argument("--async-scheduling", action="store_true", help="turn the engine's async scheduling on")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions as well")
    ap.add_argument("--out", default="benchmarks/out/host_step.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moeserve import LLM

    if args.model is None:
        from moeserve.testing.tiny_checkpoints import demo_checkpoint

        args.model = str(demo_checkpoint())
    options = dict(device="cpu", dtype="float32", max_num_seqs=args.num_requests,
                   max_num_batched_tokens=max(args.max_num_batched_tokens, args.num_requests))
    if args.kv_blocks:
        options["num_kv_blocks"] = args.kv_blocks
    if args.async_scheduling:
        options["async_scheduling"] = True
    engine = LLM(args.model, **options).engine
    timers = Timers()
    instrument(engine, timers)
    fill_engine(engine, args)

    profiler = cProfile.Profile() if args.profile else None
    timers.enabled = True
    if profiler:
        profiler.enable()
    for _ in range(args.steps):
        engine.step()
    if profiler:
        profiler.disable()
    timers.enabled = False

    rows = table(timers, args.steps)
    print(f"\n{args.num_requests} requests decoding, input {args.input_len}, {args.steps} steps timed, "
          f"torch threads {torch.get_num_threads()}{', cProfile on' if profiler else ''}")
    print(f"{'stage':<30} {'ms/step':>9} {'calls/step':>11}")
    for row in rows:
        name = "  " * row["depth"] + row["stage"]
        calls = "" if row["calls_per_step"] is None else f"{row['calls_per_step']:.0f}"
        print(f"{name:<30} {row['ms_per_step']:>9.3f} {calls:>11}")
    if profiler:
        s = io.StringIO()
        pstats.Stats(profiler, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue())
    fb_rows = bench_forward_batch(args.num_requests, [64, 1024, 4096])
    print(f"\nbuild_forward_batch alone, {args.num_requests} decode rows, block 16 (ms, median)")
    print(f"{'context':>8} {'from lists':>11} {'BlockTableRows':>15}")
    for row in fb_rows:
        print(f"{row['context']:>8} {row['lists_ms']:>11.3f} {row['block_table_rows_ms']:>15.3f}")
    result = {
        "model": args.model,
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "stop": args.stop,
        "async_scheduling": args.async_scheduling,
        "profiled": bool(profiler),
        "rows": rows,
        "build_forward_batch": fb_rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
