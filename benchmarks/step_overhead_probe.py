"""What a decode step costs around its CUDA graph: the copies and launches a step puts on the stream between
two replays, in four arrangements, against replays alone.

A batch-1 engine step (session 32's trace) spends about 30 µs outside its graph's kernels: the greedy argmax,
the tokens' copy back, two input copies and the placeholder copy, each followed by a gap. This probe times those
arrangements with a stand-in graph (a spin kernel of `--work-us`, then a 151936-wide "logits" write), the host
driving it as the engine does (queue step k, then wait for step k-1's event):

- replays:   the graph and an event, nothing else (the floor);
- today:     two input copies, the placeholder copy, the graph, the argmax, the copy back;
- argmax in: the same with the argmax inside the graph;
- one copy:  one input copy; the placeholder taken inside the graph from the argmax's output; the copy back;
- no copies: the graph reads its inputs from pinned host memory and writes the token there (no copy at all).

    python benchmarks/step_overhead_probe.py [--work-us 2500] [--steps 200] [--out benchmarks/out/step_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

from moeserve.kernels.argmax import argmax_rows
from moeserve.kernels.pdl import launch_kwargs, pdl_enter

VOCAB, WIDTH, HEADER = 151936, 64, 32  # logits, block-table entries, int64 header words


@triton.jit
def _resolve_kernel(ids, src, sampled, USE_PDL: tl.constexpr):
    """ids[0] = sampled[src[0]] where src[0] >= 0 (the placeholder)."""
    pdl_enter(USE_PDL)
    s = tl.load(src)
    if s >= 0:
        tl.store(ids, tl.load(sampled + s))


@triton.jit
def _load_kernel(host, dev, flag, sampled, N: tl.constexpr, USE_PDL: tl.constexpr):
    """The step's header from pinned host memory to the device (word 1: the placeholder's source row, word 0:
    the step number, written back to flag once read)."""
    pdl_enter(USE_PDL)
    offs = tl.arange(0, N)
    h = tl.load(host + offs, volatile=True)
    src = tl.sum(tl.where(offs == 1, h, 0), 0)
    tok = tl.load(sampled + tl.maximum(src, 0))
    h = tl.where((offs == 2) & (src >= 0), tok, h)
    tl.store(dev + offs, h)
    tl.store(flag, tl.sum(tl.where(offs == 0, h, 0), 0))  # after the loads: the value depends on them


@triton.jit
def _publish_kernel(dev, sampled, out, USE_PDL: tl.constexpr):
    """The token to pinned host memory, slot (step number % 2)."""
    pdl_enter(USE_PDL)
    step = tl.load(dev)
    tl.store(out + step % 2, tl.load(sampled))


class Setup:
    def __init__(self, work_us: float, device: torch.device) -> None:
        self.device = device
        cycles_per_us = torch.cuda.get_device_properties(device).clock_rate / 1e3  # kHz -> cycles a µs
        self.cycles = int(work_us * cycles_per_us)
        self.kw = launch_kwargs(device)
        self.logits_src = torch.randn(1, VOCAB, device=device).to(torch.bfloat16)
        self.logits = torch.empty_like(self.logits_src)
        self.dev_header = torch.zeros(HEADER, dtype=torch.int64, device=device)
        self.dev_table = torch.zeros(1, 2560, dtype=torch.int32, device=device)
        self.host_header = torch.zeros(HEADER, dtype=torch.int64, pin_memory=True)
        self.host_table = torch.zeros(WIDTH, dtype=torch.int32, pin_memory=True)
        self.host_both = torch.zeros(HEADER * 2 + WIDTH, dtype=torch.int32, pin_memory=True)
        self.dev_both = torch.zeros(HEADER * 2 + WIDTH, dtype=torch.int32, device=device)
        self.src = torch.full((1,), -1, dtype=torch.int64, device=device)
        self.sampled = torch.zeros(1, dtype=torch.int64, device=device)
        self.flag = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        self.out = torch.zeros(2, dtype=torch.int64, pin_memory=True)

    def work(self) -> None:
        torch.cuda._sleep(self.cycles)
        self.logits.copy_(self.logits_src)

    def graph(self, fn) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        stream.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            fn()
        torch.cuda.synchronize()
        return g


def arrangements(s: Setup) -> dict:
    """Each arrangement: a function that queues step k (its host writes included) and returns a callable giving
    the step's token once its event has passed."""
    kw = s.kw
    g_plain = s.graph(s.work)

    def with_argmax():
        s.work()
        s.sampled.copy_(argmax_rows(s.logits))

    g_argmax = s.graph(with_argmax)

    def with_resolve():
        _resolve_kernel[(1,)](s.dev_header[2:], s.src, s.sampled, **kw)
        with_argmax()

    g_resolve = s.graph(with_resolve)

    def with_load():
        _load_kernel[(1,)](s.host_header, s.dev_header, s.flag, s.sampled, N=HEADER, **kw)
        with_argmax()
        _publish_kernel[(1,)](s.dev_header, s.sampled, s.out, **kw)

    g_load = s.graph(with_load)
    copied: list[torch.cuda.Event | None] = [None]

    def wait_copied():
        if copied[0] is not None:
            copied[0].synchronize()

    def copy_back(t: torch.Tensor):
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        return lambda: int(host[0])

    def replays(k):
        g_plain.replay()
        return lambda: k

    def copies_in(k):
        """The two input copies and the placeholder copy, as the engine queued them before the graph."""
        wait_copied()
        s.host_header.numpy()[:3] = (k, 0, 7)
        s.host_table.numpy()[:] = k
        s.dev_header.copy_(s.host_header, non_blocking=True)
        s.dev_table[:, :WIDTH].copy_(s.host_table, non_blocking=True)
        copied[0] = torch.cuda.Event()
        copied[0].record()
        s.dev_header[2:3] = s.sampled

    def today(k):
        copies_in(k)
        g_plain.replay()
        return copy_back(argmax_rows(s.logits))

    def argmax_in(k):
        copies_in(k)
        g_argmax.replay()
        return copy_back(s.sampled)

    def one_copy(k):
        wait_copied()
        both = s.host_both.numpy()
        both[:2] = (k, 0)
        both[HEADER * 2:] = k
        s.dev_both.copy_(s.host_both, non_blocking=True)
        copied[0] = torch.cuda.Event()
        copied[0].record()
        g_resolve.replay()
        return copy_back(s.sampled)

    def no_copies(k):
        while int(s.flag[0]) != k - 1:  # the step before has read its inputs (it has long since, in practice)
            pass
        s.host_header.numpy()[:3] = (k, 0, 7)
        g_load.replay()
        return lambda: int(s.out[k % 2])

    def start_no_copies():
        s.flag.fill_(-1)

    return {"replays": (replays, None), "today": (today, None), "argmax in": (argmax_in, None),
            "one copy": (one_copy, None), "no copies": (no_copies, start_no_copies)}


def run(step, start, steps: int) -> float:
    """µs a step over `steps` steps, the engine's way: queue step k, then wait for step k-1's event."""
    if start is not None:
        start()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    pending = None
    for k in range(steps):
        if k == 10:
            begin.record()
        result = step(k)
        event = torch.cuda.Event()
        event.record()
        if pending is not None:
            pending[1].synchronize()
            pending[0]()
        pending = (result, event)
    end.record()
    pending[1].synchronize()
    pending[0]()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) * 1e3 / (steps - 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-us", type=float, default=2500.0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/step_overhead.json"))
    args = ap.parse_args()
    device = torch.device("cuda")
    s = Setup(args.work_us, device)
    arr = arrangements(s)
    times: dict[str, list[float]] = {name: [] for name in arr}
    errors = {}
    for _ in range(args.rounds):
        for name, (step, start) in arr.items():
            if name in errors:
                continue
            try:
                times[name].append(run(step, start, args.steps))
            except Exception as exc:  # noqa: BLE001 - one arrangement failing must not lose the others
                errors[name] = f"{type(exc).__name__}: {exc}"
    base = statistics.median(times["replays"])
    print(f"card: {torch.cuda.get_device_name(device)}; stand-in graph {args.work_us:.0f} µs of spin")
    print("| arrangement | µs a step (rounds) | over replays alone |")
    print("|---|---|---:|")
    rows = {}
    for name, ts in times.items():
        if not ts:
            print(f"| {name} | failed: {errors.get(name)} | |")
            continue
        med = statistics.median(ts)
        rows[name] = dict(us=ts, median=med, over=med - base)
        print(f"| {name} | {med:.1f} ({', '.join(f'{t:.1f}' for t in ts)}) | {med - base:+.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(card=torch.cuda.get_device_name(device), work_us=args.work_us, rows=rows,
                                        errors=errors), indent=1))


if __name__ == "__main__":
    main()
