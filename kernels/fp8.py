"""FP8 (e4m3) helpers for block-scaled MoE: per-token-group activation quantisation and 128x128 weight blocks.

Convention (as DeepSeek-V3 checkpoints ship it): a quantised tensor q with scale s stands for q * s, where s
is one float32 per group (activations: per token per 128 channels; weights: per 128x128 block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import launch_kwargs, pdl_enter

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
GROUP = 128  # channels per activation scale, and the weight block edge
MIN_AMAX = 1e-10  # keeps an all-zero group's scale finite
# The same three for use inside @triton.jit functions (globals there must be constexpr); GROUP_C is public
# because moe_tiles' epilogue uses it too.
_FP8_MAX_C = tl.constexpr(FP8_MAX)
GROUP_C = tl.constexpr(GROUP)
_MIN_AMAX_C = tl.constexpr(MIN_AMAX)


@triton.jit
def _round_to_e4m3(v):
    """Round v (|v| <= 448) to the nearest e4m3 value in fp32, ties to even on the normal range, so the
    final cast is exact everywhere (the Triton interpreter's own fp8 cast does not carry rounding)."""
    bits = v.to(tl.int32, bitcast=True)
    # Keep 3 of fp32's 23 mantissa bits: add just under half an ulp plus the lowest kept bit, then truncate.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    subnormal = tl.floor(v * 512.0 + 0.5) / 512.0  # below 2^-6 e4m3 is evenly spaced by 2^-9
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def quant_groups_e4m3(x):
    """x: [R, G] fp32, one quantisation group per row -> (q: [R, G] fp32 holding e4m3 values, scale: [R] fp32)
    with x ~= q * scale. The one code path for every activation quantisation (the quant kernel below and the
    fused-MoE gate/up epilogue), so both give the same bits."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), _MIN_AMAX_C)
    scale = amax / _FP8_MAX_C
    q = _round_to_e4m3(tl.clamp(x / scale[:, None], -_FP8_MAX_C, _FP8_MAX_C))
    return q, scale


@triton.jit
def quant_act_tile(act, offs_n, N, ROUND_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   EVEN_N: tl.constexpr):
    """act: [BLOCK_M, BLOCK_N] fp32 at columns offs_n of an [*, N] matrix, the tile starting on a GROUP boundary
    and BLOCK_N a multiple of GROUP. Returns (q: [BLOCK_M, BLOCK_N] fp32 holding e4m3 values, scale:
    [BLOCK_M, BLOCK_N // GROUP] fp32), bit for bit what `per_token_group_quant_fp8` gives for act stored in
    ROUND_DTYPE: rounded first, columns >= N counted as 0 (EVEN_N: the tile has none)."""
    x = act.to(ROUND_DTYPE).to(tl.float32)
    if not EVEN_N:
        x = tl.where(offs_n[None, :] < N, x, 0.0)
    # Row-major [BLOCK_M, G * GROUP] -> [BLOCK_M * G, GROUP]: row m * G + g is group g of row m.
    q, scale = quant_groups_e4m3(tl.reshape(x, [BLOCK_M * (BLOCK_N // GROUP_C), GROUP_C]))
    return tl.reshape(q, [BLOCK_M, BLOCK_N]), tl.reshape(scale, [BLOCK_M, BLOCK_N // GROUP_C])


@triton.jit(do_not_specialize=["num_rows"])
def _token_group_quant_kernel(x_ptr, q_ptr, s_ptr, num_rows, K, stride_xm, stride_qm, stride_sm,
                              GROUP_SIZE: tl.constexpr, ROWS: tl.constexpr, USE_PDL: tl.constexpr):
    # One program quantises ROWS rows of one GROUP_SIZE-channel group.
    pdl_enter(USE_PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    group = tl.program_id(1)
    cols = group * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, scale = quant_groups_e4m3(x)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * stride_sm + group, scale, mask=rows < num_rows)


def per_token_group_quant_fp8(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] float (row stride free, unit column stride). Returns (q: [M, K] float8_e4m3fn contiguous,
    scale: [M, ceil(K/group)] float32) with x[m, c] ~= q[m, c] * scale[m, c // group]."""
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be 2-D, unit column stride; got {tuple(x.stride())}"
    num_rows, k = x.shape
    q = torch.empty(num_rows, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(num_rows, triton.cdiv(k, group), dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return q, scale
    rows = 8
    grid = (triton.cdiv(num_rows, rows), scale.shape[1])
    _token_group_quant_kernel[grid](x, q, scale, num_rows, k, x.stride(0), q.stride(0), scale.stride(0),
                                    GROUP_SIZE=group, ROWS=rows, num_warps=4, **launch_kwargs(x.device))
    return q, scale


def per_token_group_quant_fp8_reference(x: torch.Tensor,
                                        group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch twin of `per_token_group_quant_fp8` (same shapes, dtypes and rounding rule)."""
    num_rows, k = x.shape
    groups = triton.cdiv(k, group)
    padded = torch.zeros(num_rows, groups * group, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    g = padded.view(num_rows, groups, group)
    scale = g.abs().amax(dim=2).clamp_min(MIN_AMAX) / FP8_MAX
    q = (g / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(num_rows, groups * group)[:, :k].contiguous(), scale


def dequant_token_group_fp8(q: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """q: [M, K] fp8, scale: [M, ceil(K/group)] float32 -> [M, K] float32."""
    return q.float() * scale.repeat_interleave(group, dim=1)[:, : q.shape[1]]


def quant_weight_block_fp8(w: torch.Tensor, block: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [..., N, K] float. Returns (q: [..., N, K] float8_e4m3fn, scale: [..., ceil(N/block), ceil(K/block)]
    float32) with one scale per block x block tile (pure torch; for checkpoints, tests and benchmarks)."""
    *lead, n, k = w.shape
    nb, kb = triton.cdiv(n, block), triton.cdiv(k, block)
    padded = torch.zeros(*lead, nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[..., :n, :k] = w.float()
    tiles = padded.view(*lead, nb, block, kb, block)
    scale = tiles.abs().amax(dim=(-3, -1)).clamp_min(MIN_AMAX) / FP8_MAX
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(*lead, nb * block, kb * block)[..., :n, :k].contiguous(), scale


def dequant_weight_block_fp8(q: torch.Tensor, scale: torch.Tensor, block: int = GROUP) -> torch.Tensor:
    """q: [..., N, K] fp8, scale: [..., ceil(N/block), ceil(K/block)] -> [..., N, K] float32."""
    n, k = q.shape[-2:]
    full = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return q.float() * full[..., :n, :k]
