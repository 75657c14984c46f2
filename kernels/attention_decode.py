"""Paged decode attention for GQA/MQA/MHA: split-KV ("flash decoding") plus a reduce over the splits.

Each program owns one request, one KV head (and up to ``BLOCK_H`` of the query heads that share it) and one
contiguous slice of the request's context. Loading a KV tile once for the whole query-head group is what makes
decode bandwidth-bound instead of L2-bound: the K/V cache is read from HBM exactly once. Slices of one request
are merged from their normalised partial outputs and log-sum-exps, either in the same launch (the last slice
of a (request, KV head) to finish merges them, elected through `moeserve.kernels.counters`) or by a second
launch, `split_reduce`; the same math either way (summed in another order: equal up to rounding).

The grid depends on (num_reqs, num_kv_heads, num_splits) only, never on context lengths. By default
`num_splits` is chosen from the step's max_seq_len; a caller that captures CUDA graphs passes a fixed one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.counters import completion_counters, last_to_arrive
from moeserve.kernels.device import num_sms
from moeserve.kernels.pdl import launch_kwargs, pdl_enter

LOG2E = 1.4426950408889634


DEFAULT_BLOCK_N = 32  # context tokens per k step, but see `choose_block_n`
MAX_SPLITS = 32


def choose_block_n(num_splits: int) -> int:
    """Context tokens per k step: 64 where the split count is at its cap (a CUDA graph of at most a few requests,
    sized for the model's longest context), else 32.

    With the cap's 32 splits a context of up to 2048 tokens takes one k step per split instead of two, and
    each k step is a dependent chain (page-table entry, then K and V) of reads that in a decode step come from
    HBM. Measured on the H100 (CUDA-graph replay, Qwen3-30B-A3B's 32/4 heads, context 1040, kernel µs without
    PDL; benchmarks/RESULTS.md, session 18): 1 request, 32 splits: 4.2 µs against 5.3 at 32 tokens a step;
    10 requests (14 splits) and 64 (3 splits) were slower at 64 (+6%, +7%), so they keep 32."""
    return 64 if num_splits >= MAX_SPLITS else DEFAULT_BLOCK_N


def choose_num_splits(
    num_programs: int, max_seq_len: int, block_n: int, device: torch.device, programs_per_sm: float = 4.0,
    min_steps: int = 4,
) -> int:
    """Split each request's context so that about ``programs_per_sm`` programs per multiprocessor run.

    More splits raise memory parallelism but each costs a partial output write and read. A split of fewer
    than ``min_steps`` k steps of ``block_n`` tokens (at max_seq_len) is not made: the MLA kernels keep 4,
    whose programs fill a multiprocessor and whose partials are 512 wide. GQA decode takes 1 (see
    `gqa_num_splits`).
    """
    target = int(programs_per_sm * num_sms(device))
    splits = triton.cdiv(target, max(num_programs, 1))
    max_useful = max(1, triton.cdiv(max_seq_len, min_steps * block_n))
    return int(max(1, min(splits, max_useful, MAX_SPLITS)))


@triton.jit
def split_range(SeqLens, req, split, num_splits, BLOCK_N: tl.constexpr):
    """Tokens [start, end) of request ``req`` that split ``split`` of ``num_splits`` attends over.

    Each slice is rounded up to whole BLOCK_N tiles, so only the last tile of the request is partial; a
    context shorter than the split count allows leaves the last splits empty (start >= end)."""
    seq_len = tl.load(SeqLens + req)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    return start, tl.minimum(start + split_len, seq_len)


@triton.jit
def split_out_rows(Out, PartOut, req, heads, split, stride_ot, stride_oh, stride_pt, stride_ph, stride_ps,
                   SPLIT_OUT: tl.constexpr):
    """[len(heads), 1] pointers to where this program writes its normalised output rows (column 0): Out's
    rows of (req, heads) with one split, else split ``split``'s fp32 partial rows in PartOut."""
    if SPLIT_OUT:
        rows = PartOut + req * stride_pt + heads[:, None] * stride_ph + split * stride_ps
    else:
        rows = Out + req * stride_ot + heads[:, None] * stride_oh
    return rows


@triton.jit
def store_split_lse(PartLse, part_rows, stride_ps, split, m_i, l_i, mask):
    """Store a split's log2-sum-exp per row: m_i + log2(l_i), or -inf for an empty split (l_i == 0).

    part_rows: offsets of (token, head, split 0) in PartOut; the lse rows share its strides divided by Dv
    (`alloc_partials`), so the lse of a row sits at part_rows // stride_ps + split in PartLse."""
    has_keys = l_i > 0.0
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(PartLse + part_rows // stride_ps + split, lse, mask=mask)


@triton.jit
def _gqa_decode_kernel(
    Q, K, V, BlockTables, SeqLens, Out, PartOut, PartLse,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DK: tl.constexpr, BLOCK_DK: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, num_splits, SPLIT_OUT: tl.constexpr,
    Counters, FUSED_REDUCE: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    req = tl.program_id(0)
    head_blocks: tl.constexpr = (GROUP + BLOCK_H - 1) // BLOCK_H
    kvh = tl.program_id(1) // head_blocks
    hb = tl.program_id(1) % head_blocks
    split = tl.program_id(2)

    rows = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # head index inside the group
    row_ok = rows < GROUP
    heads = kvh * GROUP + rows
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < HEAD_DK
    dv_ok = offs_dv < HEAD_DV

    start, end = split_range(SeqLens, req, split, num_splits, BLOCK_N)

    q = tl.load(
        Q + req * stride_qt + heads[:, None] * stride_qh + offs_dk[None, :],
        mask=row_ok[:, None] & dk_ok[None, :], other=0.0,
    )
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    table = BlockTables + req * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        page = tl.load(table + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        slot_in_page = offs_n % PAGE
        k_rows = page * stride_kb + slot_in_page * stride_kt + kvh * stride_kh
        v_rows = page * stride_vb + slot_in_page * stride_vt + kvh * stride_vh
        k = tl.load(K + k_rows[:, None] + offs_dk[None, :], mask=n_ok[:, None] & dk_ok[None, :], other=0.0)
        v = tl.load(V + v_rows[:, None] + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale_log2  # [BLOCK_H, BLOCK_N], log2 domain
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new

    has_keys = l_i > 0.0  # false only for an empty slice (context shorter than the split count allows)
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    dst = split_out_rows(Out, PartOut, req, heads, split, stride_ot, stride_oh, stride_pt, stride_ph, stride_ps,
                         SPLIT_OUT)
    tl.store(dst + offs_dv[None, :], out.to(dst.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    if SPLIT_OUT:
        part_rows = req * stride_pt + heads * stride_ph
        store_split_lse(PartLse, part_rows, stride_ps, split, m_i, l_i, row_ok)
        if FUSED_REDUCE:  # the last split of (request, kv head, head block) to arrive merges them all
            if last_to_arrive(Counters + req * tl.num_programs(1) + tl.program_id(1), num_splits):
                _merge_splits(
                    PartOut, PartLse, Out, part_rows, req * stride_ot + heads * stride_oh,
                    row_ok, stride_ps, num_splits, BLOCK_H, HEAD_DV, BLOCK_DV, BLOCK_S, 4,
                )


@triton.jit
def _merge_splits(
    PartOut, PartLse, Out, part_rows, out_rows, row_ok, stride_ps, num_splits,
    ROWS: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Merge the splits of a block of (token, head) rows by their log-sum-exps (`split_reduce`'s math, summed
    in split order): Out[out_rows] = sum_s part_s * 2^(lse_s - m) / sum_s 2^(lse_s - m).

    part_rows: [ROWS] offsets of (token, head, split 0) in PartOut (the lse of a row sits at part_rows // stride_ps
    in PartLse); out_rows: [ROWS] offsets in Out. Whole rows at a time: no reduction across threads but one max.
    Loads use ".cg": other programs of this launch wrote the partials (see `last_to_arrive`).
    """
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DV
    lse_rows = part_rows // stride_ps
    lse = tl.load(PartLse + lse_rows[:, None] + offs_s[None, :], mask=row_ok[:, None] & (offs_s < num_splits)[None, :],
                  other=float("-inf"), cache_modifier=".cg")
    m = tl.where(row_ok, tl.max(lse, 1), 0.0)  # finite for real rows: split 0 always holds a key
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    den = tl.zeros([ROWS], dtype=tl.float32)
    for s0 in range(0, num_splits, UNROLL):
        for u in tl.static_range(UNROLL):  # unrolled: UNROLL splits' loads in flight at once
            ok = row_ok & (tl.full([ROWS], s0 + u, tl.int32) < num_splits)
            w = tl.exp2(tl.load(PartLse + lse_rows + s0 + u, mask=ok, other=float("-inf"), cache_modifier=".cg") - m)
            part = tl.load(PartOut + part_rows[:, None] + (s0 + u) * stride_ps + offs_d[None, :],
                           mask=ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
            acc += part * w[:, None]
            den += w
    out = acc / tl.where(row_ok, den, 1.0)[:, None]
    tl.store(Out + out_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _split_reduce_kernel(
    PartOut, PartLse, Out,
    stride_pt, stride_ph, stride_ps,
    stride_ot, stride_oh,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    num_splits, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DV
    base = t * stride_pt + h * stride_ph
    lse = tl.load(PartLse + base // stride_ps + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)  # finite: split 0 always holds at least one key
    w = tl.exp2(lse - m)
    part = tl.load(PartOut + base + offs_s[:, None] * stride_ps + offs_d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + t * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)


# The merging program reads num_splits x heads x Dv fp32 partials alone, on the critical path, where the
# `split_reduce` launch spreads them over num_reqs x num_heads programs. Measured on the H100 (CUDA-graph
# replay, Qwen3-30B-A3B shapes, context 1024, two launches vs one): batch 64, 3 splits (12 KB per merging
# program): 58.8 vs 53.8 us; batch 16, 8-9 splits (32-36 KB): 14.5-14.7 vs 14.6 us; batch 1, 8/16/32 splits
# (32/64/128 KB): 8.4/6.4/6.3 vs 9.4/7.5/11.9 us (one launch loses: its merge is the whole tail).
FUSED_REDUCE_MAX_BYTES = 16 * 1024


def use_fused_reduce(num_splits: int, heads_per_program: int, head_dim_v: int) -> bool:
    """Whether the splits are merged in the decode launch itself: worth a launch (~2 us of graph time) while
    the merging program's read stays small."""
    return num_splits > 1 and num_splits * heads_per_program * head_dim_v * 4 <= FUSED_REDUCE_MAX_BYTES


def head_grid(group: int, kv_heads: int, block_h: int) -> tuple[int, int]:
    """(query heads a program takes, programs per request): a program takes up to block_h of a KV head's
    query heads, at least 16 rows (tl.dot's minimum)."""
    block_h = max(16, min(block_h, triton.next_power_of_2(group)))
    return block_h, kv_heads * triton.cdiv(group, block_h)


def gqa_num_splits(num_reqs: int, num_heads: int, kv_heads: int, max_seq_len: int, device: torch.device,
                   block_h: int = 16, block_n: int | None = None) -> int:
    """The split count `paged_decode_attention` takes when none is given (a CUDA graph's is fixed at capture,
    for max_seq_len = the context limit).

    Splits may be as short as one k step. In a decode step the KV, the page table and the context lengths
    come from HBM (the layer's MoE weights have streamed through L2 since), so each k step is a chain of
    dependent HBM reads, and at small batches the chain, not the bytes, sets the kernel's time. With the
    MLA kernels' 4-step minimum, a batch-1 graph for max_model_len 1344 took 11 splits of three 32-token
    steps: on the H100 (Qwen3-30B-A3B, context 1024, no PDL) the kernel took 8.9 µs a layer, 4.9 with 32
    splits of one 64-token step, and the merge 1.7 against 2.6 (benchmarks/RESULTS.md, session 19)."""
    _, grid_hb = head_grid(num_heads // kv_heads, kv_heads, block_h)
    return choose_num_splits(num_reqs * grid_hb, max_seq_len, block_n or DEFAULT_BLOCK_N, device, min_steps=1)


def alloc_partials(num_tokens: int, num_heads: int, num_splits: int, head_dim_v: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for split-KV: part_out [T, H, S, Dv] fp32 and part_lse [T, H, S] fp32 (log2 domain).

    The lse rows use the same (t, h, s) strides divided by Dv, which the kernels rely on.
    """
    part_out = torch.empty(num_tokens, num_heads, num_splits, head_dim_v, dtype=torch.float32, device=device)
    part_lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=device)
    return part_out, part_lse


def split_reduce(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> None:
    """Merge split-KV partials into ``out``.

    part_out: [T, H, S, Dv] fp32, each slice normalised by its own softmax sum;
    part_lse: [T, H, S] fp32, log2 of each slice's softmax denominator (-inf for an empty slice);
    out:      [T, H, Dv], any float dtype, written in place (last dim contiguous).
    """
    t, h, s, dv = part_out.shape
    assert part_out.is_contiguous() and part_lse.is_contiguous() and out.stride(-1) == 1
    _split_reduce_kernel[(t, h)](
        part_out, part_lse, out,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        out.stride(0), out.stride(1),
        HEAD_DV=dv, BLOCK_DV=triton.next_power_of_2(dv),
        num_splits=s, BLOCK_S=max(triton.next_power_of_2(s), 2),
        num_warps=4, **launch_kwargs(out.device),
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_h: int = 16,
    num_warps: int = 4,
    num_stages: int = 2,
    fused_reduce: bool | None = None,
) -> torch.Tensor:
    """One new query per request attends over its whole paged context.

    q:            [num_reqs, num_q_heads, head_dim_k], fp16/bf16/fp32 (row i belongs to request i)
    k_cache:      [num_blocks, block_size, num_kv_heads, head_dim_k] (last dim contiguous)
    v_cache:      [num_blocks, block_size, num_kv_heads, head_dim_v] (may be a strided view)
    block_tables: [num_reqs, max_blocks], int32; seq_lens: [num_reqs], int32 (>= 1)
    max_seq_len:  host-side max of seq_lens (sizes the split count without a device sync)
    fused_reduce: with several splits, merge them in the same launch (the last split of each request and
                  KV head to finish merges, in split order) instead of a second `split_reduce` launch;
                  None: `use_fused_reduce`. Both give the same values up to rounding.
    block_n:      context tokens per k step; None: `choose_block_n` for the split count.
    Returns [num_reqs, num_q_heads, head_dim_v] in q's dtype.
    """
    num_reqs, num_heads, dk = q.shape
    _, page, kv_heads, _ = k_cache.shape
    dv = v_cache.shape[-1]
    assert num_heads % kv_heads == 0, "query heads must be a multiple of KV heads"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert block_tables.shape[0] == num_reqs and seq_lens.shape[0] == num_reqs
    group = num_heads // kv_heads
    block_h, grid_hb = head_grid(group, kv_heads, block_h)
    if num_splits is None:
        num_splits = gqa_num_splits(num_reqs, num_heads, kv_heads, max_seq_len, q.device, block_h, block_n)
    block_n = block_n or choose_block_n(num_splits)
    if fused_reduce is None:
        fused_reduce = use_fused_reduce(num_splits, min(group, block_h), dv)
    fused_reduce = fused_reduce and num_splits > 1
    out = q.new_empty(num_reqs, num_heads, dv)
    if num_splits > 1:
        part_out, part_lse = alloc_partials(num_reqs, num_heads, num_splits, dv, q.device)
    else:
        part_out = part_lse = out  # unused by the kernel's single-split branch
    counters = completion_counters(q.device, num_reqs * grid_hb) if fused_reduce else out
    _gqa_decode_kernel[(num_reqs, grid_hb, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2) if num_splits > 1 else 1,
        GROUP=group, BLOCK_H=block_h,
        HEAD_DK=dk, BLOCK_DK=triton.next_power_of_2(dk),
        HEAD_DV=dv, BLOCK_DV=triton.next_power_of_2(dv),
        PAGE=page, BLOCK_N=block_n, num_splits=num_splits, SPLIT_OUT=num_splits > 1,
        Counters=counters, FUSED_REDUCE=fused_reduce,
        # Read only by the fused merge: a constant otherwise, so each split count does not compile a kernel.
        BLOCK_S=max(triton.next_power_of_2(num_splits), 2) if fused_reduce else 2,
        num_warps=num_warps, num_stages=num_stages, **launch_kwargs(q.device),
    )
    if num_splits > 1 and not fused_reduce:
        split_reduce(part_out, part_lse, out)
    return out
