"""Pieces shared by the aligned fused-MoE GEMM kernels (`fused_moe`: pointer loads; `fused_moe_tma`: tiles by
TMA): the launch order of (block, N tile) programs, the two epilogues and the launch constants. Kept apart so
both kernel modules import them without importing each other."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import GROUP
from .moe_configs import GemmConfig
from .pdl import launch_kwargs


def gemm_meta(cfg: GemmConfig, block_m: int, fp8: bool, device: torch.device) -> dict:
    """Launch constants every grouped-GEMM kernel takes (each module adds its own)."""
    return dict(FP8=fp8, QBLOCK=GROUP, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(device))


@triton.jit
def tile_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(block, N tile) of program pid in grouped order: GROUP_M consecutive blocks (mostly one expert) share
    each weight tile while it is in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def store_act(act_ptr, acc_g, acc_u, pid_m, offs_n, stride_am, INTER,
              BLOCK_M: tl.constexpr, EVEN_N: tl.constexpr):
    """act[slot, n] = silu(gate) * up for the BLOCK_M slots of block pid_m; columns past INTER are dropped."""
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_ptrs = act_ptr + slots[:, None].to(tl.int64) * stride_am + offs_n[None, :]
    if EVEN_N:
        tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty))
    else:
        tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=offs_n[None, :] < INTER)


@triton.jit
def store_down(y_ptr, acc, topk_w_ptr, pair, row_ok, offs_n, stride_ym, N):
    """y[pair, n] = topk_weight[pair] * acc for the block's valid rows (padding rows write nothing)."""
    acc *= tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))
