"""Prefill / extend attention over the paged cache: new queries attend causally over cached + new keys.

The new tokens' K/V are already in the cache, so one gather path serves the cached prefix and the new part.
Each program owns ``BLOCK_M`` consecutive new queries of one request and one query head. Its keys split in
two phases: positions before its first query (every query sees all of them, no mask) and the diagonal stretch
up to its last query (causal mask). The key dimension may be split into a main part and a power-of-two tail
("rope" part: 512 + 64 for absorbed MLA, 128 + 64 for DeepSeek's non-absorbed heads) so no block is padded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.attention_decode import LOG2E


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q1, q2, K, V, table, n0, n_end, q_pos, kvh, scale_log2,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    DK1: tl.constexpr, BLOCK_DK1: tl.constexpr, ROPE: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
):
    """One online-softmax step over keys [n0, min(n0 + BLOCK_N, n_end))."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    page = tl.load(table + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
    slot = offs_n % PAGE
    k_rows = K + page * stride_kb + slot * stride_kt + kvh * stride_kh
    v_rows = V + page * stride_vb + slot * stride_vt + kvh * stride_vh
    offs_d1 = tl.arange(0, BLOCK_DK1)
    k1 = tl.load(k_rows[:, None] + offs_d1[None, :], mask=n_ok[:, None] & (offs_d1 < DK1)[None, :], other=0.0)
    s = tl.dot(q1, tl.trans(k1.to(q1.dtype)))
    if ROPE > 0:
        offs_d2 = DK1 + tl.arange(0, ROPE)
        k2 = tl.load(k_rows[:, None] + offs_d2[None, :], mask=n_ok[:, None], other=0.0)
        s = tl.dot(q2, tl.trans(k2.to(q1.dtype)), s)
    s = s * scale_log2
    if CAUSAL:
        s = tl.where(n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
    else:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEAD_DV
    v = tl.load(v_rows[:, None] + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q1.dtype), v.to(q1.dtype))
    return acc, m_new, l_i


# stride_bt is the batch's block-table width, which changes with its longest request: specialised (Triton
# compiles apart for values of 1 and multiples of 16), each width class would compile the kernel again on a
# first request of that shape (benchmarks/RESULTS.md, session 20).
@triton.jit(do_not_specialize=["stride_bt"])
def _extend_kernel(
    Q, K, V, QueryStartLoc, SeqLens, BlockTables, Out,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr,
    DK1: tl.constexpr, BLOCK_DK1: tl.constexpr, ROPE: tl.constexpr,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    mb = tl.program_id(0)
    head = tl.program_id(1)
    req = tl.program_id(2)
    q_start = tl.load(QueryStartLoc + req)
    q_len = tl.load(QueryStartLoc + req + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    kvh = head // GROUP
    seq_len = tl.load(SeqLens + req)
    prefix = seq_len - q_len  # tokens cached before this step

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < q_len
    q_pos = prefix + offs_m
    q_rows = Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh
    offs_d1 = tl.arange(0, BLOCK_DK1)
    q1 = tl.load(q_rows + offs_d1[None, :], mask=m_ok[:, None] & (offs_d1 < DK1)[None, :], other=0.0)
    if ROPE > 0:
        q2 = tl.load(q_rows + DK1 + tl.arange(0, ROPE)[None, :], mask=m_ok[:, None], other=0.0)
    else:
        q2 = q1  # unused

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    table = BlockTables + req * stride_bt
    diag = prefix + mb * BLOCK_M  # first query position of this block: all earlier keys are visible to all
    for n0 in range(0, diag, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q1, q2, K, V, table, n0, diag, q_pos, kvh, scale_log2,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            DK1, BLOCK_DK1, ROPE, HEAD_DV, BLOCK_DV, PAGE, BLOCK_N, False,
        )
    diag_end = tl.minimum(seq_len, diag + BLOCK_M)
    for n0 in range(diag, diag_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q1, q2, K, V, table, n0, diag_end, q_pos, kvh, scale_log2,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            DK1, BLOCK_DK1, ROPE, HEAD_DV, BLOCK_DV, PAGE, BLOCK_N, True,
        )
    out = acc / l_i[:, None]  # every row sees at least its own key, so l_i > 0
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(
        Out + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_dv[None, :],
        out.to(Out.dtype.element_ty), mask=m_ok[:, None] & (offs_dv < HEAD_DV)[None, :],
    )


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(main, tail): main + tail == head_dim with tail a power of two (or 0), so blocks need no padding
    when head_dim is a sum of two powers of two (576 = 512 + 64, 192 = 128 + 64)."""
    if triton.next_power_of_2(head_dim) == head_dim:
        return head_dim, 0
    main = triton.next_power_of_2(head_dim) // 2
    tail = head_dim - main
    if tail >= 16 and triton.next_power_of_2(tail) == tail:
        return main, tail
    return head_dim, 0  # padded and masked


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_query_len: int,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """Causal attention of each request's new queries over its cached prefix and themselves.

    q:               [num_tokens, num_q_heads, head_dim_k], fp16/bf16/fp32, requests concatenated
    k_cache:         [num_blocks, block_size, num_kv_heads, head_dim_k] (last dim contiguous)
    v_cache:         [num_blocks, block_size, num_kv_heads, head_dim_v] (may be a view of k_cache)
    query_start_loc: [num_reqs + 1], int32; seq_lens: [num_reqs], int32 (cached + new, >= query length)
    block_tables:    [num_reqs, max_blocks], int32
    max_query_len:   host-side max of the query lengths (sizes the grid without a device sync)
    Returns [num_tokens, num_q_heads, head_dim_v] in q's dtype.
    """
    num_tokens, num_heads, dk = q.shape
    _, page, kv_heads, _ = k_cache.shape
    dv = v_cache.shape[-1]
    assert num_heads % kv_heads == 0 and q.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    dk1, rope = split_head_dim(dk)
    wide = max(dk, dv) > 256
    # Defaults from the H100 sweep in benchmarks/RESULTS.md.
    block_m = block_m or (64 if wide else 128)
    block_n = block_n or 32
    num_warps = num_warps or (8 if wide else 4)
    out = q.new_empty(num_tokens, num_heads, dv)
    num_reqs = seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_reqs)
    _extend_kernel[grid](
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, out,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // kv_heads,
        DK1=dk1, BLOCK_DK1=triton.next_power_of_2(dk1), ROPE=rope,
        HEAD_DV=dv, BLOCK_DV=triton.next_power_of_2(dv),
        PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
