"""Rotary position embedding for queries and keys in one launch, cos/sin computed in the kernel.

Layouts follow `moeserve.layers.rotary`: "neox" rotates the pairs (x[i], x[i + R/2]); "interleaved" rotates
(x[2i], x[2i+1]) and writes the result de-interleaved, [rotated evens | rotated odds]. Only the first
R = 2 * len(inv_freq) dims of each head rotate; dims [R, D) pass through unchanged.

Optionally each head is RMS-normalised first (Qwen3's q_norm / k_norm), with `RMSNorm`'s rounding: float32
normalisation cast to the activation dtype, times the weight, rounded again; the rotation then runs in
float32 and is rounded once more, exactly as the torch modules chained would.

cos/sin: angle = float32(position) * inv_freq in float32 (the same rounded product torch forms), reduced
modulo 2*pi in three parts (exact for |angle| < 2^16 * 2*pi) before tl.cos / tl.sin, so that the hardware's
fast sin/cos, accurate near zero only, agree with torch's to float32 rounding at any context length.
One program handles one token and up to BLOCK_H heads of q or of k; the grid depends on shapes only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.kv_store import KVWrite, flat_cache
from moeserve.kernels.pdl import launch_kwargs, pdl_enter


@triton.jit
def cos_sin(angle):
    """cos and sin of float32 angles, reduced modulo 2*pi first (see the module docstring)."""
    # 2*pi = 6.28125 + 0.00193023681640625 + 5.0703634e-06: the first two parts have 8 significant bits, so
    # n * part is exact for n < 2^16 and the reduced angle keeps float32 accuracy.
    n = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = angle - n * 6.28125
    r = r - n * 0.00193023681640625
    r = r - n * 5.070363386039389e-06
    return tl.cos(r), tl.sin(r)


@triton.jit
def rope_vectors(
    X, Out, W, x_off, out_off, ok, cos, sin, eps, Cache, cache_off,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
    INTERLEAVED: tl.constexpr, NORM: tl.constexpr, HAS_REST: tl.constexpr, STORE: tl.constexpr,
):
    """Head vectors of HEAD_DIM elements at X + x_off (a vector of element offsets, one per head vector; ok
    masks them): RMS-normalised with W (NORM), rotated by cos / sin ([len(x_off) or 1, BLOCK_HALF]) and stored at
    Out + out_off; STORE: also at Cache + cache_off, in the cache's dtype. A program of `_rope_kernel` passes the
    heads of one token, `qkv_rope` the rows of one head."""
    offs = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        offs1 = 2 * offs
        offs2 = 2 * offs + 1
    else:
        offs1 = offs
        offs2 = offs + HALF
    mask = ok[:, None] & (offs < HALF)[None, :]
    row = X + x_off[:, None]
    x1 = tl.load(row + offs1[None, :], mask=mask, other=0.0)
    act_dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = tl.load(row + offs2[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_REST:
        offs_r = 2 * HALF + tl.arange(0, BLOCK_REST)
        mask_r = ok[:, None] & (offs_r < HEAD_DIM)[None, :]
        xr = tl.load(row + offs_r[None, :], mask=mask_r, other=0.0).to(tl.float32)
    if NORM:
        sum_sq = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        if HAS_REST:
            sum_sq += tl.sum(xr * xr, axis=1)
        rstd = tl.rsqrt(sum_sq / HEAD_DIM + eps)[:, None]
        w1 = tl.load(W + offs1, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(W + offs2, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * rstd).to(act_dtype).to(tl.float32)).to(act_dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(act_dtype).to(tl.float32)).to(act_dtype).to(tl.float32)
        if HAS_REST:
            wr = tl.load(W + offs_r, mask=offs_r < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
            xr = (wr * (xr * rstd).to(act_dtype).to(tl.float32)).to(act_dtype).to(tl.float32)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    orow = Out + out_off[:, None]
    tl.store(orow + offs[None, :], out1.to(act_dtype), mask=mask)
    tl.store(orow + HALF + offs[None, :], out2.to(act_dtype), mask=mask)
    if HAS_REST:
        tl.store(orow + offs_r[None, :], xr.to(act_dtype), mask=mask_r)
    if STORE:
        # The cache takes the values rounded to the activation dtype, as a store of Out would.
        crow = Cache + cache_off[:, None]
        cache_dtype = Cache.dtype.element_ty
        tl.store(crow + offs[None, :], out1.to(act_dtype).to(cache_dtype), mask=mask)
        tl.store(crow + HALF + offs[None, :], out2.to(act_dtype).to(cache_dtype), mask=mask)
        if HAS_REST:
            tl.store(crow + offs_r[None, :], xr.to(act_dtype).to(cache_dtype), mask=mask_r)


@triton.jit
def copy_vectors(V, VCache, v_off, cache_off, ok, V_DIM: tl.constexpr, BLOCK_V: tl.constexpr):
    """Vectors of V_DIM elements at V + v_off (one offset per vector; ok masks them) into VCache + cache_off."""
    offs = tl.arange(0, BLOCK_V)
    mask = ok[:, None] & (offs < V_DIM)[None, :]
    v = tl.load(V + v_off[:, None] + offs[None, :], mask=mask)
    tl.store(VCache + cache_off[:, None] + offs[None, :], v.to(VCache.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QOut, KOut, QW, KW, Positions, InvFreq, V, KCache, VCache, Slots,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_vt, stride_vh, stride_kcs, stride_vcs,
    num_q_heads, num_k_heads, num_q_blocks,
    factor, eps,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
    BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, NORM: tl.constexpr, HAS_REST: tl.constexpr,
    STORE: tl.constexpr, V_DIM: tl.constexpr, BLOCK_V: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One program: up to BLOCK_H heads of one token's q, or of its k. STORE: a k program also writes its heads
    of k (rotated) and of v into the paged caches at the token's slot (`store_kv`'s job, without its launch)."""
    pdl_enter(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(InvFreq + offs, mask=offs < HALF, other=0.0)
    angle = tl.load(Positions + token).to(tl.float32) * inv_freq
    cos, sin = cos_sin(angle)
    cos = (cos * factor)[None, :]
    sin = (sin * factor)[None, :]
    if block < num_q_blocks:
        heads = block * BLOCK_H + tl.arange(0, BLOCK_H)
        rope_vectors(
            Q, QOut, QW, token * stride_qt + heads * stride_qh, token * stride_qot + heads * stride_qoh,
            heads < num_q_heads, cos, sin, eps, QOut, heads,
            HEAD_DIM, HALF, BLOCK_HALF, BLOCK_REST, INTERLEAVED, NORM, HAS_REST, False,
        )
    else:
        heads = (block - num_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        ok = heads < num_k_heads
        if STORE:
            slot = tl.load(Slots + token).to(tl.int64)
            copy_vectors(V, VCache, token * stride_vt + heads * stride_vh, slot * stride_vcs + heads * V_DIM, ok,
                         V_DIM, BLOCK_V)
            cache_off = slot * stride_kcs + heads * HEAD_DIM
        else:
            cache_off = heads  # unused
        rope_vectors(
            K, KOut, KW, token * stride_kt + heads * stride_kh, token * stride_kot + heads * stride_koh, ok,
            cos, sin, eps, KCache, cache_off,
            HEAD_DIM, HALF, BLOCK_HALF, BLOCK_REST, INTERLEAVED, NORM, HAS_REST, STORE,
        )


def _check(name: str, x: torch.Tensor, num_tokens: int, head_dim: int, dtype: torch.dtype) -> None:
    if x.dim() != 3 or x.shape[0] != num_tokens or x.shape[2] != head_dim or x.stride(-1) != 1:
        raise ValueError(
            f"{name} must be [{num_tokens}, heads, {head_dim}] with a contiguous last dim, got "
            f"{tuple(x.shape)} strides {x.stride()}"
        )
    if x.dtype != dtype:
        raise ValueError(f"{name} dtype {x.dtype} differs from q's {dtype}")


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor | None,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float = 1.0,
    *,
    interleaved: bool = False,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    inplace: bool = False,
    kv_write: KVWrite | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q and k (and RMS-normalise each head first when norm weights are given).

    q: [T, Hq, D], k: [T, Hk, D] or None — float16 / bfloat16 / float32, last dim contiguous, any token and
       head strides (e.g. views into a fused qkv projection or into MLA's [nope | rope] heads).
    positions: [T] int64 (or int32), contiguous; inv_freq: [R // 2] float32 with R <= D (dims [R, D) pass through).
    q_norm_weight / k_norm_weight: [D] in q's dtype, both or neither.
    inplace: write into q and k (returned as they are); otherwise return new contiguous tensors.
    kv_write: also store the rotated k and kv_write.v into the paged caches at kv_write.slot_mapping, cast to the
       caches' dtype, as `AttentionBackend.write_kv` would after this call, in the same launch
       (`kv_write_fits` must hold).
    """
    t, hq, d = q.shape if q.dim() == 3 else (-1, -1, -1)
    _check("q", q, t, d, q.dtype)
    if k is not None:
        _check("k", k, t, d, q.dtype)
    half = inv_freq.numel()
    if 2 * half > d or half == 0:
        raise ValueError(f"rotary dim {2 * half} must be in (0, head dim {d}]")
    if positions.shape != (t,) or positions.stride(0) != 1:
        raise ValueError(f"positions must be a contiguous [{t}], got {tuple(positions.shape)}")
    if inv_freq.dtype != torch.float32 or not inv_freq.is_contiguous():
        raise ValueError("inv_freq must be a contiguous float32 [R // 2]")
    norm = q_norm_weight is not None
    if k is not None and norm != (k_norm_weight is not None):
        raise ValueError("pass both q_norm_weight and k_norm_weight, or neither")
    for w in (q_norm_weight, k_norm_weight) if norm else ():
        if w is not None and (w.shape != (d,) or w.dtype != q.dtype):
            raise ValueError(f"norm weights must be [{d}] in {q.dtype}, got {tuple(w.shape)} {w.dtype}")
    q_out = q if inplace else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = k if (inplace or k is None) else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    hk = k.shape[1] if k is not None else 0
    caches = _kv_write_caches(k, kv_write) if kv_write is not None else None
    if kv_write is not None and caches is None:
        raise ValueError("kv_write needs k, v [T, kv_heads, dv] and caches [blocks, block_size, kv_heads, dk|dv] "
                         "with each slot's entries contiguous, and slot_mapping [T] (see kv_write_fits)")
    if t == 0:
        return q_out, k_out
    block_h = min(triton.next_power_of_2(max(hq, hk, 1)), max(1, 1024 // triton.next_power_of_2(d)))
    num_q_blocks = triton.cdiv(hq, block_h)
    grid = (t, num_q_blocks + triton.cdiv(hk, block_h))
    k_, k_out_ = (k, k_out) if k is not None else (q, q_out)  # unused when there is no k
    qw = q_norm_weight if norm else q
    kw = (k_norm_weight if k is not None else q_norm_weight) if norm else q
    rest = d - 2 * half
    if kv_write is not None:
        v, (kc, vc), slots = kv_write.v, caches, kv_write.slot_mapping
    else:
        v, kc, vc, slots = q, q, q, positions  # unused without STORE
    dv = v.shape[-1]
    _rope_kernel[grid](
        q, k_, q_out, k_out_, qw, kw, positions, inv_freq, v, kc, vc, slots,
        q.stride(0), q.stride(1), k_.stride(0), k_.stride(1),
        q_out.stride(0), q_out.stride(1), k_out_.stride(0), k_out_.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), vc.stride(0),
        hq, hk, num_q_blocks,
        float(attention_factor), float(eps),
        HEAD_DIM=d, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 1,
        BLOCK_H=block_h, INTERLEAVED=interleaved, NORM=norm, HAS_REST=rest > 0,
        STORE=kv_write is not None, V_DIM=dv, BLOCK_V=triton.next_power_of_2(dv),
        num_warps=4 if block_h * d >= 2048 else 2 if block_h * d >= 512 else 1, **launch_kwargs(q.device),
    )
    return q_out, k_out


def kv_write_fits(k: torch.Tensor | None, w: KVWrite) -> bool:
    """Whether `apply_rope` can store k and w.v into w's caches itself: k [T, Hk, dk] and v [T, Hk, dv] with a
    unit last stride, caches [blocks, block_size, Hk, dk|dv] with each slot's entries contiguous
    (`kv_store.flat_cache`), and slot_mapping a contiguous [T] of int32 or int64."""
    return _kv_write_caches(k, w) is not None


def _kv_write_caches(k: torch.Tensor | None, w: KVWrite) -> tuple[torch.Tensor, torch.Tensor] | None:
    """w's caches as [slots, Hk * d] views (`kv_store.flat_cache`) where `kv_write_fits`, else None."""
    if k is None or w.v.dim() != 3 or w.v.shape[:2] != k.shape[:2] or w.v.stride(-1) != 1:
        return None
    return paged_cache_views(w.k_cache, w.v_cache, w.slot_mapping, *k.shape, w.v.shape[2])


def paged_cache_views(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_tokens: int,
                      kv_heads: int, dk: int, dv: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """k_cache and v_cache as [slots, kv_heads * dk|dv] views, where they are [blocks, block_size, kv_heads,
    dk|dv] with each slot's entries contiguous (`kv_store.flat_cache`) and slot_mapping is a contiguous
    [num_tokens] of int32 or int64; else None."""
    caches = (k_cache, v_cache)
    if any(c.dim() != 4 or c.shape[:3] != k_cache.shape[:2] + (kv_heads,) for c in caches):
        return None
    slots_ok = (slot_mapping.shape == (num_tokens,) and slot_mapping.stride(0) == 1
                and slot_mapping.dtype in (torch.int32, torch.int64))
    if not slots_ok or k_cache.shape[3] != dk or v_cache.shape[3] != dv:
        return None
    kc, vc = flat_cache(k_cache), flat_cache(v_cache)
    return None if kc is None or vc is None else (kc, vc)


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor | None,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float = 1.0,
    *,
    interleaved: bool = False,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch definition `apply_rope` must match (out of place): RMSNorm per head, then rotation of the
    first R dims in float32 with cos/sin of float32(position) * inv_freq, times attention_factor."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos = (freqs.cos() * attention_factor)[:, None, :]
    sin = (freqs.sin() * attention_factor)[:, None, :]
    rot = 2 * inv_freq.numel()

    def one(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        if w is not None:
            xf = x.float()
            x = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        xf = x[..., :rot].float()
        x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleaved else xf.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        return torch.cat((rotated, x[..., rot:]), dim=-1)

    return one(q, q_norm_weight), (one(k, k_norm_weight) if k is not None else None)
