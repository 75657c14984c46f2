"""Linear layers at decode batch sizes: y = x @ W.T (+ bias) for a few rows of x, in one launch.

At 1–16 rows a projection is a pass over its weight: the floor is weight bytes over HBM bandwidth. cuBLAS
reaches 58–75% of that on the decode projections of a Qwen3-30B-A3B layer (o_proj 16.8 MB in 10 µs through
a split-K GEMM plus a separate reduce kernel; qkv 21 MB in 9.6 µs; benchmarks/RESULTS.md). This kernel
streams the weight with many programs in flight and reduces its K splits inside the same launch: each
program stores an fp32 partial, and the last of a column tile's splits to arrive (an int32 counter, reset by
that program; `moeserve.kernels.counters`) sums the partials in split order, so results are deterministic and
the launch is graph-safe.

The MMA computes yᵀ = W xᵀ so the weight tile is the wide operand and the few rows of x the narrow one.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.kernels.counters import completion_counters, last_to_arrive
from moeserve.kernels.device import num_sms
from moeserve.kernels.pdl import launch_kwargs

MAX_ROWS = 16  # one MMA tile of rows; larger batches use cuBLAS


@triton.jit
def skinny_tile(X, W, M, N, k_lo, k_hi, stride_xm, stride_wn, pid_n,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """Column tile pid_n of (x @ W.T).T over k in [k_lo, k_hi): [BLOCK_N, BLOCK_M] fp32 (yᵀ = W xᵀ, the weight
    tile as the wide MMA operand). Waits for the kernel before (PDL) only before its first load of x, and lets
    the next launch once its loads are issued."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    x_ptrs = X + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = offs_k < k_hi - k0
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    return acc


@triton.jit
def _skinny_kernel(
    X, W, Bias, Y, Part, Count,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    k_lo = split * k_per_split
    acc = skinny_tile(X, W, M, N, k_lo, tl.minimum(k_lo + k_per_split, K), stride_xm, stride_wn, pid_n,
                      BLOCK_M, BLOCK_N, BLOCK_K, USE_PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    out_mask = n_ok[:, None] & m_ok[None, :]
    y_ptrs = Y + offs_m[None, :] * stride_ym + offs_n[:, None]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=out_mask)
    else:
        # Part: [SPLIT_K, BLOCK_M, N] fp32; the last split of the column tile to arrive sums them.
        part_ptrs = Part + offs_m[None, :] * N + offs_n[:, None]
        tl.store(part_ptrs + split * BLOCK_M * N, acc, mask=out_mask)
        if last_to_arrive(Count + pid_n, SPLIT_K):
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(SPLIT_K):  # fixed order: deterministic whatever the arrival order
                total += tl.load(part_ptrs + s * BLOCK_M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True, slots=True)
class SkinnyConfig:
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


def default_config(n: int, k: int, sms: int = 132) -> SkinnyConfig:
    """64-column tiles; split K (halving it down to 512) while the grid still fits one wave of programs.

    Chosen from the sweeps in benchmarks/kernels_skinny.py on an H100: Qwen3 qkv (5120 x 2048) is fastest
    unsplit with 128-deep tiles and 5 stages (80 programs, 8.6 µs, 82% of the floor), Qwen3 o_proj
    (2048 x 4096) split 4 ways with 256-deep tiles and 3 stages (128 programs, 8.0 µs, 70%). A weight wider
    than one wave of tiles streams unsplit, 256 deep with 4 stages: the Qwen3 LM head (151936 x 2048) at one row
    in 198.8 µs against cuBLAS's 216.7 (1.05 times the copy rate; benchmarks/RESULTS.md, session 32).
    """
    tiles = triton.cdiv(n, 64)
    if tiles > sms:
        return SkinnyConfig(block_n=64, block_k=256, split_k=1, num_stages=4)
    split = 1
    while tiles * split * 2 <= sms and k // (split * 2) >= 512:
        split *= 2
    if split == 1:
        return SkinnyConfig(block_n=64, block_k=128, split_k=1, num_stages=5)
    return SkinnyConfig(block_n=64, block_k=256, split_k=split, num_stages=3)


def skinny_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `skinny_linear` should run x @ weight.T: CUDA, at most MAX_ROWS rows of x and 16-bit floats
    (`default_config` for the weight's width). MOESERVE_SKINNY_GEMM=0 turns it off (A/B timing)."""
    return (
        x.device.type == "cuda"
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and _enabled()
    )


@functools.cache
def _enabled() -> bool:
    """MOESERVE_SKINNY_GEMM=0 turns the kernel off; read once per process, like MOESERVE_PDL."""
    return os.environ.get("MOESERVE_SKINNY_GEMM", "1") != "0"


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: SkinnyConfig | None = None
) -> torch.Tensor:
    """y = x @ weight.T (+ bias) for at most MAX_ROWS rows, accumulated in fp32.

    x: [M, K] with M <= MAX_ROWS and a contiguous last dim; weight: [N, K] with a contiguous last dim (an
    nn.Linear weight); bias: [N] or None; all one float dtype. Returns [M, N] contiguous in x's dtype.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"need x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {m}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need a contiguous last dim")
    if x.dtype != weight.dtype or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"x {x.dtype}, weight {weight.dtype}, bias {None if bias is None else bias.shape}: "
                         f"need one dtype and bias [{n}]")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    cfg = config or default_config(n, k, num_sms(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    if split > 1:  # fp32 partials [split, MAX_ROWS, n] and the column tiles' counters
        part = torch.empty(split, MAX_ROWS, n, dtype=torch.float32, device=x.device)
        count = completion_counters(x.device, triton.cdiv(n, cfg.block_n))
    else:
        part = count = y  # unused by the unsplit kernel
    _skinny_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, weight, bias if bias is not None else y, y, part, count,
        m, n, k, k_per_split,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(x.device),
    )
    return y
