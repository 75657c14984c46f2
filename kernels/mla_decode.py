"""MLA decode on the latent cache: absorbed queries attend over one shared latent per token.

Cache: ``kv_cache [num_blocks, block_size, 1, kv_lora_rank + rope_dim]``; the value of a token is the first
``kv_lora_rank`` entries of its key. Each program loads a tile of latents once and uses it both as K (all
``lora + rope`` columns) and as V (the ``lora`` prefix), for ``BLOCK_H`` query heads at a time; all heads
share the single latent head, so larger ``BLOCK_H`` means fewer re-reads of the cache (the rest come from L2,
since head blocks of one request are adjacent in launch order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.attention_decode import LOG2E, alloc_partials, choose_num_splits, split_reduce
from moeserve.kernels.pdl import launch_kwargs, pdl_enter


@triton.jit
def _mla_decode_kernel(
    Q, KV, BlockTables, SeqLens, Out, PartOut, PartLse,
    scale_log2, num_heads,
    stride_qt, stride_qh,
    stride_kb, stride_kt,
    stride_bt,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, num_splits, SPLIT_OUT: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    hb = tl.program_id(0)  # fastest-varying: head blocks of one request run together and share the tile in L2
    req = tl.program_id(1)
    split = tl.program_id(2)

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    offs_c = tl.arange(0, LORA)
    offs_r = LORA + tl.arange(0, ROPE)

    seq_len = tl.load(SeqLens + req)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    q_rows = Q + req * stride_qt + heads[:, None] * stride_qh
    q_c = tl.load(q_rows + offs_c[None, :], mask=h_ok[:, None], other=0.0)  # [BLOCK_H, LORA]
    q_r = tl.load(q_rows + offs_r[None, :], mask=h_ok[:, None], other=0.0)  # [BLOCK_H, ROPE]
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, LORA], tl.float32)
    table = BlockTables + req * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        page = tl.load(table + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        rows = KV + page * stride_kb + (offs_n % PAGE) * stride_kt
        kv_c = tl.load(rows[:, None] + offs_c[None, :], mask=n_ok[:, None], other=0.0).to(q_c.dtype)
        kv_r = tl.load(rows[:, None] + offs_r[None, :], mask=n_ok[:, None], other=0.0).to(q_c.dtype)
        s = tl.dot(q_c, tl.trans(kv_c))
        s = tl.dot(q_r, tl.trans(kv_r), s) * scale_log2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv_c.dtype), kv_c)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if not SPLIT_OUT:
        tl.store(Out + req * stride_ot + heads[:, None] * stride_oh + offs_c[None, :],
                 out.to(Out.dtype.element_ty), mask=h_ok[:, None])
    else:
        part = PartOut + req * stride_pt + heads[:, None] * stride_ph + split * stride_ps
        tl.store(part + offs_c[None, :], out, mask=h_ok[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(PartLse + (req * stride_pt + heads * stride_ph) // stride_ps + split, lse, mask=h_ok)


def mla_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    max_seq_len: int,
    num_splits: int | None = None,
    block_n: int = 64,
    block_h: int = 64,
    num_warps: int = 8,
    num_stages: int = 2,
) -> torch.Tensor:
    """Absorbed-MLA decode: one query per request over its paged latent context.

    q:            [num_reqs, num_heads, kv_lora_rank + rope_dim], fp16/bf16/fp32
    kv_cache:     [num_blocks, block_size, 1, kv_lora_rank + rope_dim] (last dim contiguous)
    block_tables: [num_reqs, max_blocks], int32; seq_lens: [num_reqs], int32 (>= 1)
    kv_lora_rank and rope_dim must be powers of two (512 and 64 in DeepSeek-V2/V3).
    Returns [num_reqs, num_heads, kv_lora_rank] in q's dtype.
    """
    num_reqs, num_heads, dk = q.shape
    _, page, kv_heads, dk_cache = kv_cache.shape
    rope = dk - kv_lora_rank
    assert kv_heads == 1 and dk_cache == dk, "MLA cache holds one latent head of the query's width"
    assert triton.next_power_of_2(kv_lora_rank) == kv_lora_rank and triton.next_power_of_2(rope) == rope
    assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1
    block_h = max(16, min(block_h, triton.next_power_of_2(num_heads)))
    head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        # One 8-warp program fills a multiprocessor (registers and shared memory), and each split adds a
        # [H, 512] fp32 partial write + read: split only when the batch leaves multiprocessors idle.
        num_splits = choose_num_splits(
            num_reqs * head_blocks, max_seq_len, block_n, q.device, programs_per_sm=0.9
        )
    out = q.new_empty(num_reqs, num_heads, kv_lora_rank)
    if num_splits > 1:
        part_out, part_lse = alloc_partials(num_reqs, num_heads, num_splits, kv_lora_rank, q.device)
    else:
        part_out = part_lse = out
    _mla_decode_kernel[(head_blocks, num_reqs, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale * LOG2E, num_heads,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2) if num_splits > 1 else 1,
        LORA=kv_lora_rank, ROPE=rope, BLOCK_H=block_h,
        PAGE=page, BLOCK_N=block_n, num_splits=num_splits, SPLIT_OUT=num_splits > 1,
        num_warps=num_warps, num_stages=num_stages, **launch_kwargs(q.device),
    )
    if num_splits > 1:
        split_reduce(part_out, part_lse, out)
    return out
