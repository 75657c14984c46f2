"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm decoder block.

Same numerics as `moeserve.layers.norm.RMSNorm`: the residual sum is rounded to the activation dtype (as a
torch add is), the normalisation runs in float32 and is cast back to the activation dtype, and only then
multiplied by the weight (rounded to the output dtype). One program normalises one row, so the launch grid
depends on the number of rows only (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.pdl import launch_kwargs, pdl_enter


@triton.jit
def _rms_norm_kernel(
    X, Res, W, Out, ResOut,
    stride_x, stride_r,
    dim, eps,
    BLOCK_D: tl.constexpr, HAS_RES: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < dim
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    act_dtype = x.dtype
    if HAS_RES:
        r = tl.load(Res + row * stride_r + offs, mask=mask, other=0.0)
        # torch adds in float32 and rounds once to the activation dtype; do exactly that.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(act_dtype)
        tl.store(ResOut + row * dim + offs, x, mask=mask)
    normed = rms_normed(x, dim, eps)
    w = tl.load(W + offs, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(Out + row * dim + offs, y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def rms_normed(x, dim, eps):
    """One row's RMSNorm before its weight, with this module's numerics: x (the row in the activation dtype, 0
    past dim) normalised in float32 and rounded back to its dtype. The weight multiplies it in float32."""
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / dim
    return (xf * tl.rsqrt(mean_sq + eps)).to(x.dtype)


def _rows(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """t as [rows, dim] without a copy when it is row-strided (contiguous, or 2-D with a contiguous last dim);
    returns the view and its row stride."""
    if t.dim() == 2 and t.stride(-1) == 1:
        return t, t.stride(0)
    if t.is_contiguous():
        return t.view(-1, dim), dim
    t = t.contiguous()
    return t.view(-1, dim), dim


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, with an optional residual added first.

    x:        [..., D] (e.g. [T, D] or [T, heads, D]), float16 / bfloat16 / float32, last dim contiguous.
    weight:   [D], any float dtype; the output dtype is torch's promotion of (weight, x), as in the module.
    residual: None, or the same shape and dtype as x.
    Returns normed [..., D] (contiguous) when residual is None; otherwise (normed, r) where
    r = x + residual in x's dtype (contiguous) is the new residual stream.
    """
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the last dim {dim} of x")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
        )
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    x2, stride_x = _rows(x, dim)
    num_rows = x2.shape[0]
    if num_rows and dim:
        r2, stride_r = _rows(residual, dim) if residual is not None else (x2, stride_x)
        block = triton.next_power_of_2(dim)
        _rms_norm_kernel[(num_rows,)](
            x2, r2, weight, out, res_out if res_out is not None else out,
            stride_x, stride_r, dim, eps,
            BLOCK_D=block, HAS_RES=residual is not None,
            num_warps=8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1,
            **launch_kwargs(x.device),
        )
    return out if residual is None else (out, res_out)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The torch definition `rms_norm` must match (same signature and results up to float32 rounding)."""
    r = x if residual is None else x + residual
    rf = r.float()
    normed = weight * (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps)).to(r.dtype)
    return normed if residual is None else (normed, r)
