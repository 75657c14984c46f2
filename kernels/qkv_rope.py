"""The GQA qkv projection at decode sizes with q/k RMSNorm, rotary and the KV-cache store in its epilogue.

At decode batch sizes `skinny_linear` streams the qkv weight in one launch, and `rope.apply_rope` then normalises
and rotates q and k and stores k and v in the paged cache in a second one: ~3 µs of a batch-1 decode layer on the
H100, for a few KB of work. Here each program of the projection stores its 64-column tile of qkv; the last of a
head's tiles to arrive (`counters.last_to_arrive`, one counter per head) then finishes that head for every row:
a q head is normalised and rotated in place, a k head too and stored in the k cache at the row's slot, a v head
stored in the v cache. It runs the same device functions on the same rounded values as the two launches, so its
results are bit-identical to `skinny_linear` followed by `apply_rope(..., inplace=True, kv_write=...)`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.counters import completion_counters, last_to_arrive
from moeserve.kernels.device import num_sms
from moeserve.kernels.pdl import launch_kwargs
from moeserve.kernels.rope import copy_vectors, cos_sin, paged_cache_views, rope_vectors
from moeserve.kernels.skinny_gemm import MAX_ROWS, SkinnyConfig, default_config, skinny_tile


# M is specialised when 1 (the batch-1 step: 1% slower without, benchmarks/RESULTS.md session 21) but not on
# multiples of 16: BLOCK_R follows M (the next power of two), and that class crossed with it left 9-15 rows
# (BLOCK_R 16, M not a multiple of 16) to a variant the decode graphs' sizes do not compile at start-up.
@triton.jit(do_not_specialize_on_alignment=["M"])
def _qkv_rope_kernel(
    X, W, Bias, Y, Count, Positions, InvFreq, QW, KW, KCache, VCache, Slots,
    M, N, K, stride_xm, stride_wn, stride_ym, stride_kcs, stride_vcs,
    num_q_heads, num_kv_heads, factor, eps,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, STORE: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, HAS_REST: tl.constexpr, BLOCK_D: tl.constexpr,
    TILES_PER_HEAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    acc = skinny_tile(X, W, M, N, 0, K, stride_xm, stride_wn, pid_n, BLOCK_M, BLOCK_N, BLOCK_K, USE_PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(Y + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(Y.dtype.element_ty),
             mask=n_ok[:, None] & (offs_m < M)[None, :])
    head = pid_n // TILES_PER_HEAD
    # The head's other tiles were stored by other programs: the last to arrive reads them back. Its own loads
    # of qkv come only after that (no stale L1 line), so plain loads see them. It finishes the head for every
    # row at once.
    if last_to_arrive(Count + head, TILES_PER_HEAD):
        rows = tl.arange(0, BLOCK_R).to(tl.int64)  # BLOCK_R >= M, a power of two: no wider than needed
        ok = rows < M
        y_off = rows * stride_ym + head * HEAD_DIM
        kv_head = head - num_q_heads
        if STORE:
            slots = tl.load(Slots + rows, mask=ok, other=0).to(tl.int64)
        else:
            slots = rows  # unused
        if head < num_q_heads + num_kv_heads:
            offs = tl.arange(0, BLOCK_HALF)
            inv_freq = tl.load(InvFreq + offs, mask=offs < HALF, other=0.0)
            angle = tl.load(Positions + rows, mask=ok, other=0).to(tl.float32)[:, None] * inv_freq[None, :]
            cos, sin = cos_sin(angle)
            cos, sin = cos * factor, sin * factor
            if head < num_q_heads:
                rope_vectors(Y, Y, QW, y_off, y_off, ok, cos, sin, eps, Y, y_off,
                             HEAD_DIM, HALF, BLOCK_HALF, BLOCK_REST, False, NORM, HAS_REST, False)
            else:
                rope_vectors(Y, Y, KW, y_off, y_off, ok, cos, sin, eps, KCache, slots * stride_kcs + kv_head * HEAD_DIM,
                             HEAD_DIM, HALF, BLOCK_HALF, BLOCK_REST, False, NORM, HAS_REST, STORE)
        elif STORE:
            copy_vectors(Y, VCache, y_off, slots * stride_vcs + (kv_head - num_kv_heads) * HEAD_DIM, ok, HEAD_DIM,
                         BLOCK_D)


KVCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (k_cache, v_cache, slot_mapping)


def qkv_rope_fits(x: torch.Tensor, weight: torch.Tensor, num_q_heads: int, num_kv_heads: int, interleaved: bool,
                  kv_cache: KVCache | None = None) -> bool:
    """Whether `qkv_rope` can run this projection: 1 to MAX_ROWS rows of x, x and weight in one dtype with
    contiguous rows, the split-K-free `skinny_linear` tiling (its column tiles alone fill the multiprocessors),
    whole heads of whole column tiles, a rotation that is not interleaved (its in-place write order is safe
    only for the half-split layout), and caches (if given) it can store into (`rope.paged_cache_views`). Where
    to take it rather than cuBLAS is `skinny_ok`'s rule."""
    return _plan(x, weight, num_q_heads, num_kv_heads, interleaved, kv_cache) is not None


def _plan(x: torch.Tensor, weight: torch.Tensor, num_q_heads: int, num_kv_heads: int, interleaved: bool,
          kv_cache: KVCache | None) -> tuple[SkinnyConfig, int, tuple[torch.Tensor, torch.Tensor] | None] | None:
    """(tiling, head dim, the caches' [slots, Hk * D] views or None) where `qkv_rope_fits`, else None."""
    n, k = weight.shape
    heads = num_q_heads + 2 * num_kv_heads
    if (interleaved or x.dim() != 2 or not 0 < x.shape[0] <= MAX_ROWS or x.shape[1] != k or n % heads
            or x.dtype != weight.dtype or x.stride(1) != 1 or weight.stride(1) != 1):
        return None
    d = n // heads
    cfg = default_config(n, k, num_sms(x.device))
    if cfg.split_k != 1 or d % cfg.block_n:
        return None
    if kv_cache is None:
        return cfg, d, None
    views = paged_cache_views(*kv_cache, x.shape[0], num_kv_heads, d, d)
    return None if views is None else (cfg, d, views)


def qkv_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_q_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float = 1.0,
    *,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    kv_cache: KVCache | None = None,
) -> torch.Tensor:
    """qkv = x @ weight.T (+ bias) as [T, Hq + 2 Hk, D], with its q and k heads RMS-normalised (when norm weights
    are given) and rotated in place, and (with kv_cache) its k and v heads stored in the caches at the slots.
    `qkv_rope_fits` must hold; weight rows are the q | k | v heads of D = N / (Hq + 2 Hk) rows each;
    positions [T] int64/int32, inv_freq [R // 2] float32 (R <= D), norm weights [D] in x's dtype."""
    t, n = x.shape[0], weight.shape[0]
    heads = num_q_heads + 2 * num_kv_heads
    plan = _plan(x, weight, num_q_heads, num_kv_heads, False, kv_cache)
    if plan is None:
        raise ValueError(f"qkv_rope: x {tuple(x.shape)}, weight {tuple(weight.shape)} with {num_q_heads} + 2 x "
                         f"{num_kv_heads} heads and the caches given do not fit (qkv_rope_fits)")
    cfg, d, views = plan
    if positions.shape != (t,) or positions.stride(0) != 1:
        raise ValueError(f"qkv_rope: positions must be a contiguous [{t}], got {tuple(positions.shape)}")
    half = inv_freq.numel()
    if not 0 < 2 * half <= d or inv_freq.dtype != torch.float32 or not inv_freq.is_contiguous():
        raise ValueError(f"qkv_rope: inv_freq must be a contiguous float32 [R // 2] with 0 < R <= {d}")
    norm = q_norm_weight is not None
    if norm and (k_norm_weight is None or any(w.shape != (d,) or w.dtype != x.dtype
                                              for w in (q_norm_weight, k_norm_weight))):
        raise ValueError(f"qkv_rope: q and k norm weights must both be [{d}] in {x.dtype}")
    y = torch.empty(t, heads, d, dtype=x.dtype, device=x.device)
    kc, vc = views if views is not None else (y, y)
    rest = d - 2 * half
    _qkv_rope_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, bias if bias is not None else y, y, completion_counters(x.device, heads), positions, inv_freq,
        q_norm_weight if norm else y, k_norm_weight if norm else y, kc, vc,
        kv_cache[2] if kv_cache is not None else positions,
        t, n, x.shape[1], x.stride(0), weight.stride(0), y.stride(0), kc.stride(0), vc.stride(0),
        num_q_heads, num_kv_heads, float(attention_factor), float(eps),
        HAS_BIAS=bias is not None, NORM=norm, STORE=kv_cache is not None, HEAD_DIM=d, HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_REST=triton.next_power_of_2(rest) if rest else 1,
        HAS_REST=rest > 0, BLOCK_D=triton.next_power_of_2(d), TILES_PER_HEAD=d // cfg.block_n,
        BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=triton.next_power_of_2(t),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(x.device),
    )
    return y
