"""Greedy sampling's argmax over the vocabulary, in one launch.

`torch.argmax` over one row of a 152k vocabulary runs as one reduction of the whole row: 8.8 µs on the H100
after each batch-1 decode step, 2.8 µs here (benchmarks/RESULTS.md, session 19). Here each program takes a chunk of
a row, and the last of a row's programs to finish (`counters.last_to_arrive`) picks among the chunks' maxima.
The result is torch.argmax's: the first index of the row's maximum. NaN counts as +inf (torch ranks NaN above
+inf); a row of -inf gives 0, as torch does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.counters import completion_counters, last_to_arrive
from moeserve.kernels.pdl import launch_kwargs, pdl_enter

CHUNK = 4096  # vocabulary entries per program: 38 programs a row for a 152k vocabulary


@triton.jit
def _argmax_kernel(X, stride_x, vocab, PartVal, PartIdx, Out, HostOut, stride_h, Step, Counters, num_chunks,
                   CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, HOST: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(X + row.to(tl.int64) * stride_x + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(PartVal + row * num_chunks + chunk, best)
    tl.store(PartIdx + row * num_chunks + chunk, chunk * CHUNK + at)
    if last_to_arrive(Counters + row, num_chunks):
        c = tl.arange(0, BLOCK_C)
        ok = c < num_chunks
        vals = tl.load(PartVal + row * num_chunks + c, mask=ok, other=float("-inf"), cache_modifier=".cg")
        idxs = tl.load(PartIdx + row * num_chunks + c, mask=ok, other=0, cache_modifier=".cg")
        top = tl.max(vals, 0)
        # Chunks hold increasing indices and each reports its first maximum: the lowest of the tied chunks'
        # indices is the row's first maximum.
        first = tl.min(tl.where(ok & (vals == top), idxs, vocab), 0)
        tl.store(Out + row, first.to(tl.int64))
        if HOST:
            tl.store(HostOut + (tl.load(Step) % 2) * stride_h + row, first.to(tl.int64))


def argmax_rows(logits: torch.Tensor, out: torch.Tensor | None = None, host_out: torch.Tensor | None = None,
                step: torch.Tensor | None = None) -> torch.Tensor:
    """logits [S, V] (fp16/bf16/fp32, last dim contiguous) -> [S] int64, equal to logits.argmax(dim=-1).

    out: [>= S] int64 on the device to write (else a new tensor). host_out: [2, >= S] int64 in pinned host memory
    that also takes the result, in row (step[0] % 2), step: [1] int64 on the device (a CUDA graph's step number:
    the host reads one step's tokens while the next is written to the other row). Returns out[:S]."""
    assert logits.dim() == 2 and logits.stride(-1) == 1, "argmax_rows takes [S, V] logits, rows contiguous"
    assert (host_out is None) == (step is None), "host_out and step come together"
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device) if out is None else out[:rows]
    if rows == 0:
        return out
    num_chunks = triton.cdiv(vocab, CHUNK)
    part_val = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    host = host_out is not None
    _argmax_kernel[(rows, num_chunks)](
        logits, logits.stride(0), vocab, part_val, part_idx, out, host_out if host else out,
        host_out.stride(0) if host else 0, step if host else out, completion_counters(logits.device, rows),
        num_chunks, CHUNK=CHUNK, BLOCK_C=max(2, triton.next_power_of_2(num_chunks)), HOST=host, num_warps=4,
        **launch_kwargs(logits.device),
    )
    return out
