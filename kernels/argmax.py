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

CHUNK = 4096  # vocabulary entries per program: 38 programs a row for a 152k vocabulary


@triton.jit
def _argmax_kernel(X, stride_x, vocab, PartVal, PartIdx, Out, Counters, num_chunks,
                   CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
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


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [S, V] (fp16/bf16/fp32, last dim contiguous) -> [S] int64, equal to logits.argmax(dim=-1)."""
    assert logits.dim() == 2 and logits.stride(-1) == 1, "argmax_rows takes [S, V] logits, rows contiguous"
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    num_chunks = triton.cdiv(vocab, CHUNK)
    part_val = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    _argmax_kernel[(rows, num_chunks)](
        logits, logits.stride(0), vocab, part_val, part_idx, out, completion_counters(logits.device, rows),
        num_chunks, CHUNK=CHUNK, BLOCK_C=max(2, triton.next_power_of_2(num_chunks)), num_warps=4,
    )
    return out
