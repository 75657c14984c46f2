"""MLA decode on the latent cache: absorbed queries attend over one shared latent per token.

Cache: ``kv_cache [num_blocks, block_size, 1, kv_lora_rank + rope_dim]``; the value of a token is the first
``kv_lora_rank`` entries of its key. Each program loads a tile of latents once and uses it both as K (all
``lora + rope`` columns) and as V (the ``lora`` prefix), for ``BLOCK_H`` query heads at a time; all heads
share the single latent head, so larger ``BLOCK_H`` means fewer re-reads of the cache (the rest come from L2,
since head blocks of one request are adjacent in launch order).

`mla_decode_attention(..., kernel="tma")` is the same computation with the cache tiles loaded through TMA descriptors
and the [BLOCK_H, 512] accumulator held as two 256-wide halves (one per TMA box). On the H100 with 64-key
tiles (page 64) and 128 heads it takes 279 µs where the pointer kernel takes 346 µs (B64, context 4096;
benchmarks/RESULTS.md); with 16-key tiles (page 16) it is 1.8x slower, so `use_mla_tma` picks it only for
64-key tiles and at least 64 heads. Triton's warp specialisation of its key loop compiled but gave nothing.

`mla_decode_attention(..., kernel="gluon")` runs the warp-specialised Gluon kernel (`mla_decode_gluon`), which the
backend takes on Hopper for DeepSeek's latent (`use_mla_gluon`): 144 µs at page 64 and 148 µs at page 16 for
the shape above, as CUDA-graph replays.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from moeserve.kernels.attention_decode import (
    LOG2E,
    alloc_partials,
    choose_num_splits,
    split_out_rows,
    split_range,
    split_reduce,
    store_split_lse,
)
from moeserve.kernels.device import compute_capability
from moeserve.kernels.pdl import launch_kwargs, pdl_enter

try:  # Triton >= 3.4: host-side TMA descriptors (also run by the interpreter)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the TMA path reports itself unavailable
    TensorDescriptor = None

MLA_KERNELS = ("ptr", "tma", "gluon", "auto")  # `mla_decode_attention`'s kernel choices


@triton.jit
def _program_heads(num_heads, BLOCK_H: tl.constexpr):
    """(req, split, heads [BLOCK_H], h_ok [BLOCK_H]) of this program in `_launch`'s grid
    (head blocks, requests, splits): head blocks vary fastest, so those of one request run together and share
    each cache tile in L2."""
    hb = tl.program_id(0)
    req = tl.program_id(1)
    split = tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    return req, split, heads, heads < num_heads


@triton.jit
def _mla_decode_kernel(
    Q, KV, stride_kb, stride_kt, BlockTables, SeqLens, Out, PartOut, PartLse,
    scale_log2, num_heads,
    stride_qt, stride_qh,
    stride_bt,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, num_splits, SPLIT_OUT: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    req, split, heads, h_ok = _program_heads(num_heads, BLOCK_H)
    offs_c = tl.arange(0, LORA)
    offs_r = LORA + tl.arange(0, ROPE)

    start, end = split_range(SeqLens, req, split, num_splits, BLOCK_N)

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
    dst = split_out_rows(Out, PartOut, req, heads, split, stride_ot, stride_oh, stride_pt, stride_ph, stride_ps,
                         SPLIT_OUT)
    tl.store(dst + offs_c[None, :], out.to(dst.dtype.element_ty), mask=h_ok[:, None])
    if SPLIT_OUT:
        store_split_lse(PartLse, req * stride_pt + heads * stride_ph, stride_ps, split, m_i, l_i, h_ok)


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
    kernel: str = "ptr",
) -> torch.Tensor:
    """Absorbed-MLA decode: one query per request over its paged latent context.

    q:            [num_reqs, num_heads, kv_lora_rank + rope_dim], fp16/bf16/fp32
    kv_cache:     [num_blocks, block_size, 1, kv_lora_rank + rope_dim] (last dim contiguous)
    block_tables: [num_reqs, max_blocks], int32; seq_lens: [num_reqs], int32 (>= 1)
    kv_lora_rank and rope_dim must be powers of two (512 and 64 in DeepSeek-V2/V3).
    kernel: which kernel runs; all give the same result (up to rounding). Graph-safe each: the grid depends on
    shapes only, and TMA descriptors are rebuilt on the host each call from the cache's (stable) address.
      "ptr"   the Triton kernel with pointer loads (any inputs);
      "tma"   the Triton kernel with the cache tiles loaded through TMA descriptors (`mla_tma_ok` says which
              inputs allow it; ValueError otherwise);
      "gluon" the warp-specialised Gluon kernel (`mla_decode_gluon`; ValueError where `mla_gluon_unsupported`
              gives a reason); block_n, block_h, num_warps and num_stages do not apply;
      "auto"  the attention backend's choice: "gluon" where `use_mla_gluon` picks it, else "tma" where
              `use_mla_tma` does (with block_n 64), else "ptr". The inputs are checked once, by those picks.
    Returns [num_reqs, num_heads, kv_lora_rank] in q's dtype.
    """
    if kernel not in MLA_KERNELS:
        raise ValueError(f"mla_decode_attention: kernel must be one of {MLA_KERNELS}, got {kernel!r}")
    if kernel == "auto":  # use_mla_gluon and use_mla_tma checked the inputs
        kernel = "gluon" if use_mla_gluon(q, kv_cache, kv_lora_rank) else (
            "tma" if block_n == 64 and use_mla_tma(q, kv_cache) else "ptr")
    elif kernel in ("gluon", "tma"):
        reason = _unsupported(kernel, q, kv_cache, kv_lora_rank, block_n)
        if reason is not None:
            raise ValueError(f"mla_decode_attention(kernel={kernel!r}): {reason}")
    if kernel == "gluon":
        return _mla_decode_gluon(q, kv_cache, block_tables, seq_lens, scale, kv_lora_rank, max_seq_len, num_splits)
    page, dk = kv_cache.shape[1], q.shape[2]
    rope = dk - kv_lora_rank
    if kernel == "tma":
        if not _is_pow2_in(kv_lora_rank, 32, 512) or not _is_pow2_in(rope, 16, 256):
            raise ValueError(f"kv_lora_rank must be a power of two in [32, 512] and rope_dim one in [16, 256] "
                             f"(TMA boxes of at most 256 columns), got {kv_lora_rank} and {rope}")
        rows = kv_cache.view(kv_cache.shape[0] * page, dk)  # valid view: checked by mla_tma_unsupported
        triton_kernel = _mla_decode_tma_kernel
        cache_args = (TensorDescriptor.from_tensor(rows, [block_n, kv_lora_rank // 2]),
                      TensorDescriptor.from_tensor(rows, [block_n, rope]))
    else:
        assert kv_cache.shape[2] == 1 and kv_cache.shape[3] == dk, "MLA cache holds one latent head of q's width"
        assert triton.next_power_of_2(kv_lora_rank) == kv_lora_rank and triton.next_power_of_2(rope) == rope
        assert q.stride(-1) == 1 and kv_cache.stride(-1) == 1
        triton_kernel, cache_args = _mla_decode_kernel, (kv_cache, kv_cache.stride(0), kv_cache.stride(1))
    return _launch(triton_kernel, cache_args, q, block_tables, seq_lens, scale, kv_lora_rank, max_seq_len, page,
                   num_splits, block_n, block_h, num_warps, num_stages)


def _unsupported(kernel: str, q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int,
                 block_n: int) -> str | None:
    """Why the "gluon" or "tma" kernel of `mla_decode_attention` cannot take these inputs, or None."""
    if kernel == "tma":
        return mla_tma_unsupported(q, kv_cache, block_n)
    from moeserve.kernels.mla_decode_gluon import mla_gluon_unsupported

    return mla_gluon_unsupported(q, kv_cache, kv_lora_rank)


def _with_splits(q: torch.Tensor, kv_lora_rank: int, max_seq_len: int, num_splits: int | None, head_blocks: int,
                 block_n: int, run) -> torch.Tensor:
    """Split count, output and fp32 partials shared by the MLA kernels: run(out, part_out, part_lse, num_splits)
    launches one (with one split part_out and part_lse are out itself). Returns [num_reqs, num_heads,
    kv_lora_rank]."""
    num_reqs, num_heads, _ = q.shape
    if num_splits is None:
        # One program fills a multiprocessor (registers and shared memory), and each split adds a [H, 512] fp32
        # partial write + read: split only when the batch leaves multiprocessors idle.
        num_splits = choose_num_splits(num_reqs * head_blocks, max_seq_len, block_n, q.device, programs_per_sm=0.9)
    out = q.new_empty(num_reqs, num_heads, kv_lora_rank)
    if num_splits > 1:
        part_out, part_lse = alloc_partials(num_reqs, num_heads, num_splits, kv_lora_rank, q.device)
    else:
        part_out = part_lse = out
    run(out, part_out, part_lse, num_splits)
    if num_splits > 1:
        split_reduce(part_out, part_lse, out)
    return out


def _launch(kernel, cache_args: tuple, q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
            scale: float, kv_lora_rank: int, max_seq_len: int, page: int, num_splits: int | None, block_n: int,
            block_h: int, num_warps: int, num_stages: int) -> torch.Tensor:
    """Grid of both Triton MLA kernels; cache_args are the kernel's cache arguments (pointer and strides, or the
    two descriptors). Returns [num_reqs, num_heads, kv_lora_rank]."""
    num_reqs, num_heads, dk = q.shape
    block_h = max(16, min(block_h, triton.next_power_of_2(num_heads)))
    head_blocks = triton.cdiv(num_heads, block_h)

    def run(out: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor, splits: int) -> None:
        kernel[(head_blocks, num_reqs, splits)](
            q, *cache_args, block_tables, seq_lens, out, part_out, part_lse,
            scale * LOG2E, num_heads,
            q.stride(0), q.stride(1),
            block_tables.stride(0),
            out.stride(0), out.stride(1),
            part_out.stride(0), part_out.stride(1), part_out.stride(2) if splits > 1 else 1,
            LORA=kv_lora_rank, ROPE=dk - kv_lora_rank, BLOCK_H=block_h,
            PAGE=page, BLOCK_N=block_n, num_splits=splits, SPLIT_OUT=splits > 1,
            num_warps=num_warps, num_stages=num_stages, **launch_kwargs(q.device),
        )

    return _with_splits(q, kv_lora_rank, max_seq_len, num_splits, head_blocks, block_n, run)


def _mla_decode_gluon(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      scale: float, kv_lora_rank: int, max_seq_len: int, num_splits: int | None) -> torch.Tensor:
    """The Gluon kernel on inputs already checked: one 64-head program per multiprocessor (it takes all of its
    shared memory), the same splits and partials as the Triton kernels."""
    from moeserve.kernels import mla_decode_gluon as mg

    def run(out: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor, splits: int) -> None:
        mg.launch_mla_decode_gluon(q, kv_cache, block_tables, seq_lens, scale * LOG2E, out, part_out, part_lse,
                                   splits)

    return _with_splits(q, kv_lora_rank, max_seq_len, num_splits, triton.cdiv(q.shape[1], mg.BLOCK_H), mg.BLOCK_N,
                        run)


# ---------------------------------------------------------------- tiles through TMA descriptors


@triton.jit
def _mla_tma_tile(q0, q1, qr, c0, c1, r, m_i, l_i, acc0, acc1, scale_log2, n_ok, MASKED: tl.constexpr):
    """One key tile of online softmax. c0/c1: the latent halves [BLOCK_N, LORA/2] (K and V), r: the rope part
    [BLOCK_N, ROPE] (K only); acc0/acc1: the matching output halves [BLOCK_H, LORA/2], fp32."""
    s = tl.dot(q0, tl.trans(c0))
    s = tl.dot(q1, tl.trans(c1), s)
    s = tl.dot(qr, tl.trans(r), s) * scale_log2
    if MASKED:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(c0.dtype)
    acc0 = tl.dot(p, c0, acc0 * alpha[:, None])
    acc1 = tl.dot(p, c1, acc1 * alpha[:, None])
    return m_new, l_i, acc0, acc1


@triton.jit
def _tile_row(BlockTables, req, stride_bt, n0, PAGE: tl.constexpr):
    """Row of token n0 in the cache's 2-D view [num_blocks * PAGE, LORA + ROPE]."""
    return tl.load(BlockTables + req * stride_bt + n0 // PAGE) * PAGE + n0 % PAGE


@triton.jit
def _mla_decode_tma_kernel(
    Q, Latent, Rope, BlockTables, SeqLens, Out, PartOut, PartLse,
    scale_log2, num_heads,
    stride_qt, stride_qh,
    stride_bt,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    LORA: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, num_splits, SPLIT_OUT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Latent: descriptor over the cache as [num_blocks * PAGE, LORA + ROPE] rows, box [BLOCK_N, LORA // 2];
    # Rope: the same rows, box [BLOCK_N, ROPE]. PAGE % BLOCK_N == 0, so a tile never crosses a page and its
    # rows are contiguous in the 2-D view: row = block_table[n0 // PAGE] * PAGE + n0 % PAGE.
    pdl_enter(USE_PDL)
    HALF: tl.constexpr = LORA // 2
    req, split, heads, h_ok = _program_heads(num_heads, BLOCK_H)
    offs_c = tl.arange(0, HALF)
    offs_r = LORA + tl.arange(0, ROPE)

    start, end = split_range(SeqLens, req, split, num_splits, BLOCK_N)
    # Full tiles run in the loop without masks; the one partial tile of a request (only
    # the last split has one) runs after it with the rows past the context zeroed, since the tail rows of a
    # page may hold anything (a TMA load cannot be masked).
    full_end = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N

    q_rows = Q + req * stride_qt + heads[:, None] * stride_qh
    q0 = tl.load(q_rows + offs_c[None, :], mask=h_ok[:, None], other=0.0)  # [BLOCK_H, HALF]
    q1 = tl.load(q_rows + HALF + offs_c[None, :], mask=h_ok[:, None], other=0.0)  # [BLOCK_H, HALF]
    qr = tl.load(q_rows + offs_r[None, :], mask=h_ok[:, None], other=0.0)  # [BLOCK_H, ROPE]
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, HALF], tl.float32)
    acc1 = tl.zeros([BLOCK_H, HALF], tl.float32)
    all_keys = tl.full([BLOCK_N], 1, tl.int1)
    for n0 in range(start, full_end, BLOCK_N):
        row = _tile_row(BlockTables, req, stride_bt, n0, PAGE)
        c0 = Latent.load([row, 0])
        c1 = Latent.load([row, HALF])
        r = Rope.load([row, LORA])
        m_i, l_i, acc0, acc1 = _mla_tma_tile(q0, q1, qr, c0, c1, r, m_i, l_i, acc0, acc1, scale_log2,
                                             all_keys, False)
    if full_end < end:
        row = _tile_row(BlockTables, req, stride_bt, full_end, PAGE)
        n_ok = full_end + tl.arange(0, BLOCK_N) < end
        c0 = tl.where(n_ok[:, None], Latent.load([row, 0]), 0.0).to(q0.dtype)
        c1 = tl.where(n_ok[:, None], Latent.load([row, HALF]), 0.0).to(q0.dtype)
        r = tl.where(n_ok[:, None], Rope.load([row, LORA]), 0.0).to(q0.dtype)
        m_i, l_i, acc0, acc1 = _mla_tma_tile(q0, q1, qr, c0, c1, r, m_i, l_i, acc0, acc1, scale_log2,
                                             n_ok, True)

    has_keys = l_i > 0.0
    inv_l = 1.0 / tl.where(has_keys, l_i, 1.0)
    out0 = acc0 * inv_l[:, None]
    out1 = acc1 * inv_l[:, None]
    dst = split_out_rows(Out, PartOut, req, heads, split, stride_ot, stride_oh, stride_pt, stride_ph, stride_ps,
                         SPLIT_OUT)
    tl.store(dst + offs_c[None, :], out0.to(dst.dtype.element_ty), mask=h_ok[:, None])
    tl.store(dst + HALF + offs_c[None, :], out1.to(dst.dtype.element_ty), mask=h_ok[:, None])
    if SPLIT_OUT:
        store_split_lse(PartLse, req * stride_pt + heads * stride_ph, stride_ps, split, m_i, l_i, h_ok)


def _is_pow2_in(x: int, lo: int, hi: int) -> bool:
    return lo <= x <= hi and x & (x - 1) == 0


@functools.cache
def _interpreting() -> bool:
    """Whether kernels run under the Triton interpreter (TRITON_INTERPRET=1; read once per process)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def mla_tma_unsupported(q: torch.Tensor, kv_cache: torch.Tensor, block_n: int = 64) -> str | None:
    """Why `mla_decode_attention(..., kernel="tma")` cannot take these inputs, or None when it can (see
    `mla_tma_ok`)."""
    if TensorDescriptor is None:
        return "this Triton has no triton.tools.tensor_descriptor (needs >= 3.4)"
    if q.dtype not in (torch.float16, torch.bfloat16) or kv_cache.dtype != q.dtype:
        return f"q and kv_cache must share a 16-bit dtype (fp16/bf16), got {q.dtype} and {kv_cache.dtype}"
    if not _interpreting() and compute_capability(q.device)[0] < 9:
        return "TMA needs a CUDA device of compute capability >= 9.0 (Hopper)"
    if q.dim() != 3 or kv_cache.dim() != 4 or kv_cache.shape[2] != 1 or kv_cache.shape[3] != q.shape[2]:
        return f"want q [R, H, D] and kv_cache [NB, page, 1, D], got {tuple(q.shape)} and {tuple(kv_cache.shape)}"
    page = kv_cache.shape[1]
    if not _is_pow2_in(block_n, 16, 256) or page % block_n:
        return f"block_n must be a power of two in [16, 256] dividing the page size {page}, got {block_n}"
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1 or kv_cache.stride(0) != page * kv_cache.stride(1):
        return "q and kv_cache need a contiguous last dim, and the cache's token rows must be evenly spaced"
    if (kv_cache.stride(1) * kv_cache.element_size()) % 16 or kv_cache.data_ptr() % 16:
        return "the cache's rows must start at 16-byte aligned addresses (TMA)"
    return None


def mla_tma_ok(q: torch.Tensor, kv_cache: torch.Tensor, block_n: int = 64) -> bool:
    """Whether `mla_decode_attention(..., kernel="tma")` runs on these inputs: fp16/bf16 q and cache of the same
    dtype; a Hopper (or newer) CUDA device, or the Triton interpreter; ``block_n`` a power of two in [16, 256] that
    divides the page size (each TMA tile lies inside one page: page 16 -> block_n 16, page 64 -> 16/32/64);
    the cache's token rows evenly spaced and 16-byte aligned (any contiguous cache). kv_lora_rank and
    rope_dim are checked by the call (powers of two, lora in [32, 512], rope in [16, 256])."""
    return mla_tma_unsupported(q, kv_cache, block_n) is None


def use_mla_gluon(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int) -> bool:
    """Whether a decode step should run the warp-specialised Gluon kernel (`mla_decode_gluon`): wherever it
    runs (Hopper, Triton 3.6, DeepSeek's 512 + 64 latent, pages of 16, 32 or a multiple of 64 keys). On the
    H100 its kernel time measured below both Triton kernels' at every batch, context and head count tried
    (benchmarks/RESULTS.md). Its launch costs ~70 us more host time than theirs, which decode steps captured in
    CUDA graphs (the engine's default up to `cuda_graph_max_batch`) do not pay; an eager step of a small batch
    does. ``MOESERVE_MLA_GLUON=0`` turns it off (A/B timing, escape hatch)."""
    return mla_gluon_skipped_because(q, kv_cache, kv_lora_rank) is None


def mla_gluon_skipped_because(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int) -> str | None:
    """Why `use_mla_gluon` says no for these inputs, or None when it says yes."""
    if os.environ.get("MOESERVE_MLA_GLUON", "1") == "0":
        return "MOESERVE_MLA_GLUON=0"
    if q.device.type != "cuda":
        return f"q is on {q.device.type}, not a CUDA device"
    from moeserve.kernels.mla_decode_gluon import mla_gluon_unsupported

    return mla_gluon_unsupported(q, kv_cache, kv_lora_rank)


def use_mla_tma(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether a decode step should read the cache through TMA (`mla_decode_attention(..., kernel="tma")`): where
    it measured faster, i.e. 64-key tiles (a page size that is a multiple of 64) and at least 64 heads. The
    shape tests come first, so other steps skip the device checks."""
    return q.shape[1] >= 64 and kv_cache.shape[1] % 64 == 0 and mla_tma_ok(q, kv_cache, 64)
