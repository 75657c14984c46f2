"""Write a step's new keys and values into the paged KV cache in one launch (torch needs one per cache).

Caches are `[num_blocks, block_size, kv_heads, dim]`; a token's slot is `block * block_size + offset`, so the
flat view `[num_blocks * block_size, kv_heads * dim]` is addressed by slot. One program copies one token's K row
and V row; the grid depends on the number of tokens only (CUDA-graph safe).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moeserve.kernels.pdl import launch_kwargs, pdl_enter


@triton.jit
def _store_kv_kernel(
    K, V, KCache, VCache, Slots,
    stride_k, stride_v, stride_kc, stride_vc,
    k_width, v_width,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    k = tl.load(K + token * stride_k + offs, mask=offs < k_width)
    tl.store(KCache + slot * stride_kc + offs, k.to(KCache.dtype.element_ty), mask=offs < k_width)
    offs = tl.arange(0, BLOCK_V)
    v = tl.load(V + token * stride_v + offs, mask=offs < v_width)
    tl.store(VCache + slot * stride_vc + offs, v.to(VCache.dtype.element_ty), mask=offs < v_width)


def _flat(t: torch.Tensor, rows: int) -> torch.Tensor | None:
    """t as [rows, width] with a unit last stride, without a copy; None when its layout does not allow it."""
    try:
        flat = t.view(rows, -1)
    except RuntimeError:
        return None
    return flat if flat.stride(-1) == 1 else None


class KVWrite(NamedTuple):
    """A step's values and where its keys and values go: v [T, kv_heads, dv] and the layer's paged caches
    [num_blocks, block_size, kv_heads, dk|dv] at slot_mapping [T] (what `AttentionBackend.write_kv` stores).
    A kernel that produces the keys takes it to store them itself (`moeserve.kernels.rope.apply_rope`)."""

    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor


def flat_cache(cache: torch.Tensor) -> torch.Tensor | None:
    """A paged cache [num_blocks, block_size, kv_heads, dim] as [slots, kv_heads * dim], one row per slot with a unit
    last stride, without a copy; None when its layout does not allow it."""
    return _flat(cache, cache.shape[0] * cache.shape[1])


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> bool:
    """k: [T, kv_heads, dk], v: [T, kv_heads, dv] (any float dtype, cast to the caches'); caches
    [num_blocks, block_size, kv_heads, dk|dv] with each slot's entries contiguous; slot_mapping: [T] int.

    Returns False, writing nothing, when a layout does not fit this kernel (the caller falls back to torch)."""
    flats = [_flat(k, k.shape[0]), _flat(v, v.shape[0]), flat_cache(k_cache), flat_cache(v_cache)]
    if any(f is None for f in flats) or k.shape[0] == 0:
        return k.shape[0] == 0
    k2, v2, kc, vc = flats
    _store_kv_kernel[(k.shape[0],)](
        k2, v2, kc, vc, slot_mapping,
        k2.stride(0), v2.stride(0), kc.stride(0), vc.stride(0),
        k2.shape[1], v2.shape[1],
        BLOCK_K=triton.next_power_of_2(k2.shape[1]), BLOCK_V=triton.next_power_of_2(v2.shape[1]),
        **launch_kwargs(k.device),
    )
    return True


def store_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """What `store_kv` does, in torch (the attention backends' default write)."""
    nb, bs = k_cache.shape[0], k_cache.shape[1]
    k_cache.view(nb * bs, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
