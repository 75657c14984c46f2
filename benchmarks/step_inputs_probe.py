"""How long a decode graph's first kernel takes to read the step's inputs from pinned host memory
(`kernels/step_inputs.py`), and what sets it: the number of dependent PCIe reads, the `.cv` loads, the report of
the read back to host memory.

Each variant runs at one row with a 64-entry block table (a batch-1 step at 1024 tokens of context) as the only
kernel of a CUDA graph; the table gives the kernel's time in the profiler and the replay's time between events.

    python benchmarks/step_inputs_probe.py [--out benchmarks/out/step_inputs_probe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

from moeserve.kernels.counters import completion_counters, last_to_arrive
from moeserve.kernels.step_inputs import load_step_inputs
from moeserve.runner.cuda_graphs import StepStaging, StepTargets


@triton.jit
def _variant(meta, tokens, seq_lens, tables, consumed, d_tokens, d_seq_lens, d_num_real, d_tables, d_step,
             sampled, counters, rows, MB: tl.constexpr, stride_t, BLOCK: tl.constexpr, CV: tl.constexpr,
             ONE_ROUND: tl.constexpr, REPORT: tl.constexpr, HOST: tl.constexpr):
    """CV: .cv loads; ONE_ROUND: the first BLOCK table entries read with the header (not after the width);
    REPORT: 0 none, 1 the last program (atomic), 2 program 0 at once; HOST: False reads nothing from the host."""
    i = tl.program_id(0)
    if HOST:
        if CV:
            step = tl.load(meta, cache_modifier=".cv")
            width = tl.load(meta + 2, cache_modifier=".cv").to(tl.int32)
            src = tl.load(tokens + 3 * MB + i, cache_modifier=".cv")
            token = tl.load(tokens + i, cache_modifier=".cv")
            pos = tl.load(tokens + MB + i, cache_modifier=".cv")
            slot = tl.load(tokens + 2 * MB + i, cache_modifier=".cv")
            sl = tl.load(seq_lens + i, cache_modifier=".cv")
        else:
            step = tl.load(meta)
            width = tl.load(meta + 2).to(tl.int32)
            src = tl.load(tokens + 3 * MB + i)
            token = tl.load(tokens + i)
            pos = tl.load(tokens + MB + i)
            slot = tl.load(tokens + 2 * MB + i)
            sl = tl.load(seq_lens + i)
    else:
        step = tl.load(d_step) + 1
        width = 64
        src = tl.load(d_tokens + i) * 0 - 1
        token = tl.load(d_tokens + i)
        pos = tl.load(d_tokens + MB + i)
        slot = tl.load(d_tokens + 2 * MB + i)
        sl = tl.load(d_seq_lens + i)
    token = tl.where(src >= 0, tl.load(sampled + src, mask=src >= 0, other=0), token)
    tl.store(d_tokens + i, token)
    tl.store(d_tokens + MB + i, pos)
    tl.store(d_tokens + 2 * MB + i, slot)
    tl.store(d_seq_lens + i, sl)
    row = i.to(tl.int64) * stride_t
    offs = tl.arange(0, BLOCK)
    if HOST:
        if ONE_ROUND:
            first = tl.load(tables + row + offs, cache_modifier=".cv")
            tl.store(d_tables + row + offs, first, mask=offs < width)
            start = BLOCK
        else:
            start = 0
        for c in range(start, width, BLOCK):
            o = c + offs
            tl.store(d_tables + row + o, tl.load(tables + row + o, mask=o < width, cache_modifier=".cv"),
                     mask=o < width)
    if i == 0:
        tl.store(d_num_real, 1)
        tl.store(d_step, step)
    if REPORT == 1:
        if last_to_arrive(counters, rows):
            tl.store(consumed, step)
    if REPORT == 2:
        if i == 0:
            tl.store(consumed, step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/step_inputs_probe.json"))
    args = ap.parse_args()
    device = torch.device("cuda")
    mb, max_blocks = 256, 2560
    staging = StepStaging.allocate(mb, max_blocks, pinned=True)
    staging.meta[:] = torch.tensor([1, 1, 64])
    staging.tokens[3].fill_(-1)
    i32, i64 = torch.int32, torch.int64
    dev = StepTargets(torch.zeros(3, mb, dtype=i64, device=device), torch.zeros(mb, dtype=i32, device=device),
                      torch.zeros(1, dtype=i32, device=device), torch.zeros(mb, max_blocks, dtype=i32, device=device),
                      torch.zeros(1, dtype=i64, device=device), torch.zeros(mb, dtype=i64, device=device))
    counters = completion_counters(device, 1)

    def variant(**kw):
        def launch():
            _variant[(1,)](staging.meta, staging.tokens, staging.seq_lens, staging.tables, staging.consumed,
                           dev.tokens, dev.seq_lens, dev.num_real, dev.tables, dev.step, dev.sampled, counters, 1,
                           MB=mb, stride_t=max_blocks, BLOCK=64, num_warps=1, **kw)
        return launch

    cases = {
        "the kernel (kernels/step_inputs.py)": lambda: load_step_inputs(staging, dev, 1),
        "the same, variant's code": variant(CV=True, ONE_ROUND=False, REPORT=1, HOST=True),
        "one round of reads": variant(CV=True, ONE_ROUND=True, REPORT=1, HOST=True),
        "one round, no report": variant(CV=True, ONE_ROUND=True, REPORT=0, HOST=True),
        "one round, program 0 reports": variant(CV=True, ONE_ROUND=True, REPORT=2, HOST=True),
        "one round, plain loads": variant(CV=False, ONE_ROUND=True, REPORT=1, HOST=True),
        "two rounds, no report": variant(CV=True, ONE_ROUND=False, REPORT=0, HOST=True),
        "nothing from the host": variant(CV=True, ONE_ROUND=True, REPORT=0, HOST=False),
    }
    from torch.profiler import ProfilerActivity, profile

    rows = {}
    print(f"card: {torch.cuda.get_device_name(device)}")
    print("| variant | kernel µs (profiler) | replay µs (events) |")
    print("|---|---:|---:|")
    for name, fn in cases.items():
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                g.replay()
            torch.cuda.synchronize()
        ks = [e.device_time_total / e.count for e in prof.key_averages() if e.device_time_total > 0]
        times = []
        for _ in range(3):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(args.reps):
                g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end) * 1e3 / args.reps)
        rows[name] = dict(kernel_us=max(ks) if ks else None, replay_us=statistics.median(times))
        print(f"| {name} | {rows[name]['kernel_us']:.1f} | {rows[name]['replay_us']:.1f} |")
    assert int(staging.consumed[0]) == 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(card=torch.cuda.get_device_name(device), rows=rows), indent=1))


if __name__ == "__main__":
    main()
