"""A decode graph's first kernel: the step's inputs from host staging to the graph's device buffers.

A decode step used to put three copies on the stream before its graph (the inputs, the block tables, the
placeholder tokens from the step before) and one after it; each costs its own launch and gap on the GPU, about 9
µs a step in all (benchmarks/step_overhead_probe.py, session 33). Here the graph reads the host's pinned staging
in place (mapped memory, over PCIe) in its first kernel, and takes each placeholder's token from the step
before's sampled tokens on the device, so no copy runs outside the graph.

The staging (`moeserve.runner.cuda_graphs.StepStaging`; `cuda_graphs.load_step_inputs` is this kernel's
reference) is written by the host while the step before may still be queued; the host waits until that step's
kernel has read it, which this kernel reports by storing the step's number to `consumed` (host memory) once every
program has read its row.

Reads of host memory use ``.cv`` (fetch again, never a cached line): the host rewrites the staging between
replays.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moeserve.kernels.counters import completion_counters, last_to_arrive
from moeserve.kernels.pdl import launch_kwargs, pdl_enter


@triton.jit
def _load_kernel(meta, tokens, seq_lens, tables, consumed, d_tokens, d_seq_lens, d_num_real, d_tables, d_step,
                 sampled, counters, rows, MB: tl.constexpr, stride_t, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """Program i: row i's inputs from the staging to the device; program 0 also the step's number and real
    rows; the last program to finish stores the step's number to consumed. meta: the step's number, its real
    rows, the tables' width; tokens: rows of MB: ids, positions, slots, sources."""
    pdl_enter(USE_PDL)
    i = tl.program_id(0)
    step = tl.load(meta, cache_modifier=".cv")
    width = tl.load(meta + 2, cache_modifier=".cv").to(tl.int32)
    src = tl.load(tokens + 3 * MB + i, cache_modifier=".cv")
    token = tl.load(tokens + i, cache_modifier=".cv")
    token = tl.where(src >= 0, tl.load(sampled + src, mask=src >= 0, other=0), token)
    tl.store(d_tokens + i, token)
    tl.store(d_tokens + MB + i, tl.load(tokens + MB + i, cache_modifier=".cv"))
    tl.store(d_tokens + 2 * MB + i, tl.load(tokens + 2 * MB + i, cache_modifier=".cv"))
    tl.store(d_seq_lens + i, tl.load(seq_lens + i, cache_modifier=".cv"))
    row = i.to(tl.int64) * stride_t
    for c in range(0, width, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        ok = offs < width
        tl.store(d_tables + row + offs, tl.load(tables + row + offs, mask=ok, cache_modifier=".cv"), mask=ok)
    if i == 0:
        tl.store(d_num_real, tl.load(meta + 1, cache_modifier=".cv").to(tl.int32))
        tl.store(d_step, step)
    if last_to_arrive(counters, rows):  # every program's reads are done: their stores depend on them
        tl.store(consumed, step)


def load_step_inputs(staging, dev, rows: int) -> None:
    """Rows [0, rows) of the staging (a `StepStaging`, pinned) to the device buffers (a `StepTargets`): see
    `_load_kernel`."""
    mb = dev.tokens.shape[1]
    assert staging.tokens.shape[1] == mb and staging.tables.shape == dev.tables.shape
    assert staging.tables.stride(0) == dev.tables.stride(0)
    _load_kernel[(rows,)](
        staging.meta, staging.tokens, staging.seq_lens, staging.tables, staging.consumed, dev.tokens,
        dev.seq_lens, dev.num_real, dev.tables, dev.step, dev.sampled, completion_counters(dev.tokens.device, 1),
        rows, MB=mb, stride_t=dev.tables.stride(0), BLOCK=64, num_warps=1, **launch_kwargs(dev.tokens.device),
    )
