"""Sort the (token, choice) pairs of a routed batch by expert, padded per expert to the GEMM block size.

The grouped GEMMs of `fused_moe` walk this layout: block b of BLOCK_M consecutive slots belongs to one
expert, its first `block_rows[b]` slots hold flat pair indices ``m * top_k + j`` and the rest are padding.
Choices with id -1 (expert not on this rank) or out of range are dropped, so only experts that received pairs
own blocks and only their weights are read.

Everything runs on the device with no host sync, into buffers whose size depends only on (num_pairs,
num_experts, BLOCK_M): the layout is CUDA-graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .counters import completion_counters, last_to_arrive
from .pdl import launch_kwargs, pdl_enter

# Up to SINGLE_PROGRAM_MAX_PAIRS pairs one program does the whole job. Up to RANKED_MAX_PAIRS one launch
# of many programs: each counts all pairs itself (cheap at this size), writes one chunk of the block tables,
# then places its own RANK_CHUNK pairs by their rank among earlier pairs of the same expert (no atomics, no
# zeroed buffer, deterministic order). Above it a zero-fill, a histogram launch and a scatter launch
# (atomics, one program per _SCATTER_CHUNK pairs), since every ranked program would re-count too many pairs.
# Measured on the H100 (graph replay, E=128, 2026-11-25): one program 15-35 us at 256-4096 pairs (the block
# tables are written serially), ranked 9-14 us up to 4096 and 33 us at 16384, zero-fill + count + scatter
# 11-13 us from 2048 to 16384 with 1024-pair programs, 6.5 us (4096 pairs) and 9.3 us (16384) with 256-pair
# programs (benchmarks/align_probe.py: the whole Qwen3 M=512 call 465 -> 459 us).
SINGLE_PROGRAM_MAX_PAIRS = 32
RANKED_MAX_PAIRS = 2048
METHODS = ("single", "ranked", "scatter")
_CHUNK = 1024
_SCATTER_CHUNK = 256
_RANK_CHUNK = 128
_BLOCKS_CHUNK = 32


@dataclass(slots=True)
class AlignedRouting:
    """sorted_ids: [max_blocks * block_m] int32, flat pair index m*top_k+j per slot (padding slots undefined);
    block_expert: [max_blocks] int32, expert of each block, -1 for unused blocks (which follow the used ones);
    block_rows: [max_blocks] int32, valid slots at the start of each block (0 for unused blocks);
    block_ready: [max_blocks] int32, all 0: gate/up counts the N tiles of each block's act it has written here
    when down overlaps it (`MoEConfig.overlap`)."""

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    block_rows: torch.Tensor
    block_m: int
    block_ready: torch.Tensor

    @property
    def max_blocks(self) -> int:
        return self.block_expert.shape[0]


def max_blocks_for(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on blocks: every pair, plus at most block_m-1 padding slots per expert that gets any."""
    return max(1, triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m))


@triton.jit
def _valid_expert(ids_ptr, offs, num_pairs, num_experts):
    e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
    valid = (offs < num_pairs) & (e >= 0) & (e < num_experts)
    return e, valid


@triton.jit
def _count_chunk(ids_ptr, start, num_pairs, num_experts, E_POW2: tl.constexpr, CHUNK: tl.constexpr):
    offs = start + tl.arange(0, CHUNK)
    e, valid = _valid_expert(ids_ptr, offs, num_pairs, num_experts)
    # Dropped pairs land in bin num_experts (< E_POW2), which the layout ignores.
    return tl.histogram(tl.where(valid, e, num_experts), E_POW2)


@triton.jit
def _layout(counts, num_experts, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    experts = tl.arange(0, E_POW2)
    counts = tl.where(experts < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    return counts, ends - padded, ends


@triton.jit
def _write_block_tables(block_expert_ptr, block_rows_ptr, ready_ptr, first_block, max_blocks, counts, starts,
                        ends, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, BLOCKS_CHUNK: tl.constexpr):
    blocks = first_block + tl.arange(0, BLOCKS_CHUNK)
    slot = blocks * BLOCK_M
    experts = tl.arange(0, E_POW2)
    # [blocks, experts]: which expert's padded range holds the block's first slot (at most one does).
    mine = (starts[None, :] <= slot[:, None]) & (slot[:, None] < ends[None, :])
    expert = tl.sum(tl.where(mine, experts[None, :], 0), axis=1)
    rows = tl.sum(tl.where(mine, counts[None, :] + starts[None, :] - slot[:, None], 0), axis=1)
    used = tl.sum(mine.to(tl.int32), axis=1) > 0
    in_range = blocks < max_blocks
    tl.store(block_expert_ptr + blocks, tl.where(used, expert, -1), mask=in_range)
    tl.store(block_rows_ptr + blocks, tl.where(used, tl.minimum(rows, BLOCK_M), 0), mask=in_range)
    tl.store(ready_ptr + blocks, tl.zeros([BLOCKS_CHUNK], dtype=tl.int32), mask=in_range)


@triton.jit
def _scatter_chunk(ids_ptr, sorted_ptr, starts_ptr, cursor_ptr, start, num_pairs, num_experts,
                   CHUNK: tl.constexpr):
    offs = start + tl.arange(0, CHUNK)
    e, valid = _valid_expert(ids_ptr, offs, num_pairs, num_experts)
    e = tl.where(valid, e, 0)
    # Slot order inside an expert is whatever the atomics hand out; the top-k sum does not depend on it.
    rank = tl.atomic_add(cursor_ptr + e, 1, mask=valid, sem="relaxed")
    base = tl.load(starts_ptr + e, mask=valid, other=0, volatile=True)
    tl.store(sorted_ptr + base + rank, offs, mask=valid)


@triton.jit(do_not_specialize=["num_pairs", "max_blocks"])
def _align_single_kernel(ids_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr, ready_ptr, work_ptr,
                         num_pairs, num_experts, max_blocks,
                         BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCKS_CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        counts += _count_chunk(ids_ptr, start, num_pairs, num_experts, E_POW2, CHUNK)
    counts, starts, ends = _layout(counts, num_experts, BLOCK_M, E_POW2)
    experts = tl.arange(0, E_POW2)
    tl.store(work_ptr + experts, starts)  # starts_ptr
    tl.store(work_ptr + E_POW2 + experts, tl.zeros([E_POW2], dtype=tl.int32))  # cursor_ptr
    for first in range(0, max_blocks, BLOCKS_CHUNK):
        _write_block_tables(block_expert_ptr, block_rows_ptr, ready_ptr, first, max_blocks, counts, starts,
                            ends, BLOCK_M, E_POW2, BLOCKS_CHUNK)
    # The starts/cursor written above by this program's threads must be visible to all of them.
    tl.debug_barrier()
    for start in range(0, num_pairs, CHUNK):
        _scatter_chunk(ids_ptr, sorted_ptr, work_ptr, work_ptr + E_POW2, start, num_pairs, num_experts, CHUNK)


@triton.jit(do_not_specialize=["num_pairs", "max_blocks"])
def _align_ranked_kernel(ids_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr, ready_ptr, work_ptr,
                         num_pairs, num_experts, max_blocks,
                         BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
                         RANK_CHUNK: tl.constexpr, BLOCKS_CHUNK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    first = pid * RANK_CHUNK
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    before = tl.zeros([E_POW2], dtype=tl.int32)  # per expert: valid pairs with index < first
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        e, valid = _valid_expert(ids_ptr, offs, num_pairs, num_experts)
        counts += tl.histogram(tl.where(valid, e, num_experts), E_POW2)
        before += tl.histogram(tl.where(valid & (offs < first), e, num_experts), E_POW2)
    counts, starts, ends = _layout(counts, num_experts, BLOCK_M, E_POW2)
    for i in range(0, BLOCKS_PER_PROGRAM, BLOCKS_CHUNK):
        _write_block_tables(block_expert_ptr, block_rows_ptr, ready_ptr, pid * BLOCKS_PER_PROGRAM + i,
                            max_blocks, counts, starts, ends, BLOCK_M, E_POW2, BLOCKS_CHUNK)
    # Per-expert base slot of this program's pairs, gathered through this program's own scratch row.
    experts = tl.arange(0, E_POW2)
    base_ptr = work_ptr + pid * E_POW2
    tl.store(base_ptr + experts, starts + before)
    tl.debug_barrier()
    idx = tl.arange(0, RANK_CHUNK)
    offs = first + idx
    e, valid = _valid_expert(ids_ptr, offs, num_pairs, num_experts)
    e = tl.where(valid, e, num_experts)
    # Rank of each pair among the earlier pairs of its expert inside this chunk.
    same = (e[:, None] == e[None, :]) & (idx[None, :] < idx[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(base_ptr + e, mask=valid, other=0)
    tl.store(sorted_ptr + base + rank, offs, mask=valid)


@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(ids_ptr, counts_ptr, num_pairs, num_experts, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
                  USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    counts = _count_chunk(ids_ptr, tl.program_id(0) * CHUNK, num_pairs, num_experts, E_POW2, CHUNK)
    experts = tl.arange(0, E_POW2)
    tl.atomic_add(counts_ptr + experts, counts, mask=(experts < num_experts) & (counts > 0), sem="relaxed")


@triton.jit(do_not_specialize=["num_pairs", "max_blocks"])
def _scatter_kernel(ids_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr, ready_ptr, work_ptr,
                    num_pairs, num_experts, max_blocks,
                    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCKS_CHUNK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    counts = tl.load(work_ptr + experts)  # counts_ptr, complete: written by the previous launch
    counts, starts, ends = _layout(counts, num_experts, BLOCK_M, E_POW2)
    # Every program writes the same starts; each reads back only what it wrote itself, after the barrier.
    starts_ptr = work_ptr + E_POW2
    tl.store(starts_ptr + experts, starts)
    for i in range(0, BLOCKS_PER_PROGRAM, BLOCKS_CHUNK):
        first = pid * BLOCKS_PER_PROGRAM + i
        _write_block_tables(block_expert_ptr, block_rows_ptr, ready_ptr, first, max_blocks, counts, starts,
                            ends, BLOCK_M, E_POW2, BLOCKS_CHUNK)
    tl.debug_barrier()
    cursor_ptr = work_ptr + 2 * E_POW2
    _scatter_chunk(ids_ptr, sorted_ptr, starts_ptr, cursor_ptr, pid * CHUNK, num_pairs, num_experts, CHUNK)
    # work is completion counters: the last program to finish leaves counts, starts and cursor 0 again.
    if last_to_arrive(work_ptr + 3 * E_POW2, tl.num_programs(0)):
        zero = tl.zeros([E_POW2], dtype=tl.int32)
        tl.store(work_ptr + experts, zero)
        tl.store(starts_ptr + experts, zero)
        tl.store(cursor_ptr + experts, zero)


def align_plan(num_pairs: int, method: str | None = None) -> tuple[str, int]:
    """(method, CHUNK) of `moe_align` for num_pairs entries of topk_ids: the method by default by the count (see
    SINGLE_PROGRAM_MAX_PAIRS). Pairs are counted CHUNK at a time; at decode sizes a full 1024-wide histogram
    would be mostly masked. The scatter path runs one program per chunk. Each (method, CHUNK) is its own
    compiled kernel."""
    if method is None:
        method = ("single" if num_pairs <= SINGLE_PROGRAM_MAX_PAIRS else
                  "ranked" if num_pairs <= RANKED_MAX_PAIRS else "scatter")
    return method, min(_SCATTER_CHUNK if method == "scatter" else _CHUNK,
                       max(16, triton.next_power_of_2(num_pairs)))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
              method: str | None = None) -> AlignedRouting:
    """topk_ids: [M, top_k] int32, contiguous; -1 or ids >= num_experts are dropped.
    method: one of METHODS, default by the number of pairs (see SINGLE_PROGRAM_MAX_PAIRS).
    Returns the block layout described in `AlignedRouting`, on topk_ids' device."""
    assert topk_ids.dtype == torch.int32 and topk_ids.is_contiguous(), "topk_ids must be contiguous int32"
    assert block_m >= 16 and block_m & (block_m - 1) == 0, f"block_m: power of 2 >= 16, got {block_m}"
    num_pairs = topk_ids.numel()
    method, chunk = align_plan(num_pairs, method)
    if method not in METHODS:
        raise ValueError(f"moe_align: method must be one of {METHODS}, got {method!r}")
    device = topk_ids.device
    max_blocks = max_blocks_for(num_pairs, num_experts, block_m)
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    # The three block tables in one allocation (every entry of each is written by the align). Each row starts
    # 16 bytes aligned whatever max_blocks is: Triton compiles a kernel apart for each pointer alignment, and
    # the tables' would otherwise change with the call's size (so would the kernels a warm-up compiled).
    row = -(-max_blocks // 4) * 4
    tables = torch.empty(3, row, dtype=torch.int32, device=device)[:, :max_blocks]
    block_expert, block_rows, block_ready = tables.unbind(0)
    e_pow2 = triton.next_power_of_2(num_experts + 1)
    meta = dict(E_POW2=e_pow2, CHUNK=chunk, **launch_kwargs(device))
    layout = dict(meta, BLOCK_M=block_m, BLOCKS_CHUNK=_BLOCKS_CHUNK)
    args = (num_pairs, num_experts, max_blocks)
    if method == "single":
        work = torch.empty(2 * e_pow2, dtype=torch.int32, device=device)
        _align_single_kernel[(1,)](topk_ids, sorted_ids, block_expert, block_rows, block_ready, work, *args,
                                   **layout)
    elif method == "ranked":
        # Enough programs that each writes one chunk of block tables (the slowest step) and ranks at most
        # one chunk of pairs.
        programs = max(1, triton.cdiv(num_pairs, _RANK_CHUNK), triton.cdiv(max_blocks, _BLOCKS_CHUNK))
        work = torch.empty(programs * e_pow2, dtype=torch.int32, device=device)  # one scratch row each
        _align_ranked_kernel[(programs,)](topk_ids, sorted_ids, block_expert, block_rows, block_ready, work, *args,
                                          RANK_CHUNK=_RANK_CHUNK, num_warps=8,
                                          BLOCKS_PER_PROGRAM=_blocks_per_program(max_blocks, programs), **layout)
    else:
        # work = [counts | starts | cursor | arrivals] in the device's completion counters: 0 on entry, and
        # 0 again when the scatter launch ends, so no memset launch precedes the count.
        work = completion_counters(device, 3 * e_pow2 + 1)
        programs = max(1, triton.cdiv(num_pairs, chunk))
        _count_kernel[(programs,)](topk_ids, work, num_pairs, num_experts, **meta)
        try:
            _scatter_kernel[(programs,)](topk_ids, sorted_ids, block_expert, block_rows, block_ready, work, *args,
                                         BLOCKS_PER_PROGRAM=_blocks_per_program(max_blocks, programs), **layout)
        except Exception:
            # The counts are in the shared counters and no scatter program will zero them: every later
            # "last program" election on this device would go wrong.
            work[:3 * e_pow2 + 1].zero_()
            raise
    return AlignedRouting(sorted_ids, block_expert, block_rows, block_m, block_ready)


def _blocks_per_program(max_blocks: int, programs: int) -> int:
    return triton.cdiv(triton.cdiv(max_blocks, programs), _BLOCKS_CHUNK) * _BLOCKS_CHUNK


def moe_align_reference(topk_ids: torch.Tensor, num_experts: int,
                        block_m: int) -> list[tuple[int, list[int]]]:
    """Reference layout as [(expert, sorted pair indices)] per used block, in expert order (pure torch)."""
    flat = topk_ids.reshape(-1).long().cpu()
    blocks: list[tuple[int, list[int]]] = []
    for e in range(num_experts):
        pairs = (flat == e).nonzero(as_tuple=True)[0].tolist()
        for i in range(0, len(pairs), block_m):
            blocks.append((e, sorted(pairs[i:i + block_m])))
    return blocks
