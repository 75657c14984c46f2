"""The aligned fused-MoE GEMMs with their tiles loaded by TMA (Hopper tensor descriptors).

Same contracts as `fused_moe.gate_up` / `fused_moe.down`; `GemmConfig.loads` selects them. Pointer loads
leave address arithmetic and the load pipeline to every thread; TMA moves a whole tile per instruction
through the copy engine, and with `warp_specialize` Triton gives the loads to a producer warp while the
other warps run the MMAs. Measured on an H100 (benchmarks/RESULTS.md, "tiles through TMA"): 3-9% faster
for the compute-bound calls the tables now use it for (Qwen3 and DeepSeek at M=8192, Mixtral at M=2048),
slower at Qwen3 M=512; warp specialisation moves times by about 2% and compiles only with 8 warps.

- Weights: descriptors over w13 viewed as [E * 2I, H] and w2 as [E * H, I]; the tile of expert e starts at
  row e * 2I + n (gate), e * 2I + I + n (up), e * H + n (down). A tile must not cross into the next expert,
  so N must be a multiple of BLOCK_N (`tma_ok`).
- down's activations are already in slot order: a descriptor over act [slots, I].
- gate/up's token rows are gathered (slot -> token = sorted_ids[slot] // top_k), which TMA cannot do on Hopper:
  loads="tma" reads them by pointer, loads="tma_gathered" first copies them into slot order (one extra pass
  over slots x H, then TMA).
Descriptors are built in the kernel (`tl.make_tensor_descriptor`); Triton takes their 128-byte scratch from
the allocator set here (torch's caching allocator, so CUDA-graph capture works).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .device import compute_capability
from .moe_configs import GemmConfig
from .moe_tiles import (
    act_quant_meta,
    block_pairs,
    each_block,
    gate_up_scales,
    gemm_meta,
    operand_scales,
    store_act,
    store_down,
)
from .pdl import launch_kwargs, pdl_enter

# Columns per program of the row gather (`gather_slots`): a block's 128 rows x 256 bf16 columns are 64 KB, 256
# values a thread at 4 warps. At 512 columns (512 values a thread) the copy ran at 0.58 TB/s, 116 us at Mixtral
# M=2048 (4096 rows of 4096); at 64-256 columns it runs at 2.8-2.95 TB/s, 23 us (benchmarks/RESULTS.md, session 22).
GATHER_BLOCK_H = 256
# In-kernel tensor descriptors and the scratch allocator arrived in Triton 3.4 (the extra allows >= 3.1).
HAVE_TMA = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


@functools.cache
def _scratch_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _alloc(size: int, _alignment: int, _stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device=_scratch_device())


def _set_allocator() -> None:
    """Triton's scratch for in-kernel tensor descriptors comes from torch's caching allocator. Triton keeps the
    allocator in a context variable, which a new thread starts without: set on every launch (a cheap
    assignment), so a kernel launched from any thread (the engine's step loop, a graph capture) finds it."""
    triton.set_allocator(_alloc)


def tma_ok(cfg: GemmConfig, n: int, k: int, block_m: int, device: torch.device) -> bool:
    """Whether a grouped GEMM with output width n and depth k can take cfg's TMA loads: Triton >= 3.4 on a
    Hopper or newer GPU (or the CPU interpreter), tiles that do not cross experts (n % BLOCK_N == 0), a k loop
    without a tail (k % BLOCK_K == 0) and boxes at most 256 wide. Otherwise the pointer kernel runs the same
    config."""
    if not HAVE_TMA or cfg.loads == "ptr" or n % cfg.block_n or k % cfg.block_k:
        return False
    if max(cfg.block_n, cfg.block_k, block_m) > 256:
        return False
    return device.type != "cuda" or compute_capability(device)[0] >= 9


@triton.jit
def _gather_rows_kernel(x_ptr, out_ptr, sorted_ptr, block_expert_ptr, block_rows_ptr, H, top_k,
                        stride_xm, stride_om, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                        USE_PDL: tl.constexpr):
    """out[slot] = x[sorted_ids[slot] // top_k] for the slots of used blocks (padding rows: token 0)."""
    pdl_enter(USE_PDL)
    pid_m = tl.program_id(0)
    if tl.load(block_expert_ptr + pid_m) < 0:
        return
    pair, _ = block_pairs(sorted_ptr, block_rows_ptr, pid_m, BLOCK_M, 0, BLOCK_M)
    token = pair // top_k
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h[None, :] < H
    v = tl.load(x_ptr + token[:, None].to(tl.int64) * stride_xm + offs_h[None, :], mask=h_ok)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(out_ptr + slots[:, None].to(tl.int64) * stride_om + offs_h[None, :], v, mask=h_ok)


@triton.jit(do_not_specialize=["max_blocks", "num_slots", "num_experts"])
def _gate_up_tma_kernel(x_ptr, w_ptr, act_ptr, as_ptr, xs_ptr, ws_ptr, sorted_ptr, block_expert_ptr,
                        block_rows_ptr, max_blocks, num_slots, num_experts, K, INTER, top_k,
                        stride_xm, stride_am, stride_asm, stride_xsm, stride_wse, stride_wsn,
                        GATHERED: tl.constexpr, FP8: tl.constexpr, QBLOCK: tl.constexpr,
                        BLOCK_M: tl.constexpr, SHORT_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, WS: tl.constexpr, QUANT_ACT: tl.constexpr,
                        ROUND_DTYPE: tl.constexpr, USE_PDL: tl.constexpr):
    """As `fused_moe._gate_up_kernel`; x is [num_slots, K] in slot order when GATHERED, else [M, K]."""
    pdl_enter(USE_PDL)
    each_block(_gate_up_tma_block, (x_ptr, w_ptr, act_ptr, as_ptr, xs_ptr, ws_ptr, sorted_ptr, block_rows_ptr,
                                    num_slots, num_experts, K, INTER, top_k, stride_xm, stride_am, stride_asm,
                                    stride_xsm, stride_wse, stride_wsn, GATHERED, FP8, QBLOCK, BLOCK_M, BLOCK_N,
                                    BLOCK_K, WS, QUANT_ACT, ROUND_DTYPE),
               block_expert_ptr, block_rows_ptr, max_blocks, tl.cdiv(INTER, BLOCK_N), BLOCK_M, SHORT_M, False, False,
               GROUP_M)


@triton.jit
def _gate_up_tma_block(block, x_ptr, w_ptr, act_ptr, as_ptr, xs_ptr, ws_ptr, sorted_ptr, block_rows_ptr,
                       num_slots, num_experts, K, INTER, top_k, stride_xm, stride_am, stride_asm,
                       stride_xsm, stride_wse, stride_wsn, GATHERED: tl.constexpr, FP8: tl.constexpr,
                       QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       WS: tl.constexpr, QUANT_ACT: tl.constexpr, ROUND_DTYPE: tl.constexpr, ROWS: tl.constexpr,
                       ROWS2: tl.constexpr):
    """`_gate_up_tma_kernel`'s tile over the first ROWS slots of block pid_m (ROWS = BLOCK_M: all of them);
    block = (pid_m, pid_n, expert) from `each_block`. ROWS2 is 0: TMA tiles take no second row tile."""
    pid_m, pid_n, expert = block
    pair, _ = block_pairs(sorted_ptr, block_rows_ptr, pid_m, BLOCK_M, 0, ROWS)
    token = pair // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts * 2 * INTER, K], strides=[K, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    if GATHERED:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[num_slots, K], strides=[stride_xm, 1],
                                           block_shape=[ROWS, BLOCK_K])
    else:
        a_ptrs = x_ptr + token[:, None].to(tl.int64) * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    g_row = expert * 2 * INTER + pid_n * BLOCK_N
    acc_g = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for kk in tl.range(0, K // BLOCK_K, warp_specialize=WS):
        k0 = kk * BLOCK_K
        if GATHERED:
            a = x_desc.load([pid_m * BLOCK_M, k0])
        else:
            a = tl.load(a_ptrs + k0)
        g = w_desc.load([g_row, k0])
        u = w_desc.load([g_row + INTER, k0])
        if FP8:
            grp = k0 // QBLOCK
            a_s = tl.load(xs_ptr + token * stride_xsm + grp)
            ws_base = ws_ptr + expert * stride_wse + grp
            g_s = tl.load(ws_base + (offs_n // QBLOCK) * stride_wsn)
            u_s = tl.load(ws_base + ((offs_n + INTER) // QBLOCK) * stride_wsn)
            acc_g += tl.dot(a, g.T) * (a_s[:, None] * g_s[None, :])
            acc_u += tl.dot(a, u.T) * (a_s[:, None] * u_s[None, :])
        else:
            acc_g = tl.dot(a, g.T, acc_g)
            acc_u = tl.dot(a, u.T, acc_u)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    # All ROWS rows, padding too (an unmasked store): padding rows of act are never stored by down.
    slots = pid_m * BLOCK_M + tl.arange(0, ROWS)
    store_act(act_ptr, as_ptr, act, slots, tl.full([ROWS], True, tl.int1), pid_n, offs_n, stride_am,
              stride_asm, INTER, ROWS, BLOCK_N, True, QUANT_ACT, ROUND_DTYPE)


@triton.jit(do_not_specialize=["max_blocks", "num_slots", "num_experts"])
def _down_tma_kernel(act_ptr, w_ptr, y_ptr, as_ptr, ws_ptr, topk_w_ptr, sorted_ptr, block_expert_ptr,
                     block_rows_ptr, max_blocks, num_slots, num_experts, N, K,
                     stride_am, stride_ym, stride_asm, stride_wse, stride_wsn,
                     FP8: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SHORT_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, WS: tl.constexpr,
                     USE_PDL: tl.constexpr):
    """As `fused_moe._down_kernel`, both operands by TMA."""
    pdl_enter(USE_PDL)
    each_block(_down_tma_block, (act_ptr, w_ptr, y_ptr, as_ptr, ws_ptr, topk_w_ptr, sorted_ptr, block_rows_ptr,
                                 num_slots, num_experts, N, K, stride_am, stride_ym, stride_asm, stride_wse,
                                 stride_wsn, FP8, QBLOCK, BLOCK_M, BLOCK_N, BLOCK_K, WS),
               block_expert_ptr, block_rows_ptr, max_blocks, tl.cdiv(N, BLOCK_N), BLOCK_M, SHORT_M, False, False,
               GROUP_M)


@triton.jit
def _down_tma_block(block, act_ptr, w_ptr, y_ptr, as_ptr, ws_ptr, topk_w_ptr, sorted_ptr, block_rows_ptr, num_slots,
                    num_experts, N, K, stride_am, stride_ym, stride_asm, stride_wse, stride_wsn,
                    FP8: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, WS: tl.constexpr, ROWS: tl.constexpr, ROWS2: tl.constexpr):
    """`_down_tma_kernel`'s tile over the first ROWS slots of block pid_m (ROWS = BLOCK_M: all of them);
    block = (pid_m, pid_n, expert) from `each_block`. ROWS2 is 0: TMA tiles take no second row tile."""
    pid_m, pid_n, expert = block
    pair, row_ok = block_pairs(sorted_ptr, block_rows_ptr, pid_m, BLOCK_M, 0, ROWS)
    slots = pid_m * BLOCK_M + tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_desc = tl.make_tensor_descriptor(act_ptr, shape=[num_slots, K], strides=[stride_am, 1],
                                       block_shape=[ROWS, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts * N, K], strides=[K, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for kk in tl.range(0, K // BLOCK_K, warp_specialize=WS):
        k0 = kk * BLOCK_K
        a = a_desc.load([pid_m * BLOCK_M, k0])
        b = w_desc.load([expert * N + pid_n * BLOCK_N, k0])
        if FP8:
            grp = k0 // QBLOCK
            a_s = tl.load(as_ptr + slots * stride_asm + grp)
            b_s = tl.load(ws_ptr + expert * stride_wse + (offs_n // QBLOCK) * stride_wsn + grp)
            acc += tl.dot(a, b.T) * (a_s[:, None] * b_s[None, :])
        else:
            acc = tl.dot(a, b.T, acc)
    store_down(y_ptr, acc, topk_w_ptr, pair, row_ok, offs_n, stride_ym, N)


def gather_slots(x: torch.Tensor, routing, top_k: int) -> torch.Tensor:
    """x: [M, H] -> [slots, H], row s = x[sorted_ids[s] // top_k] for slots of used blocks (others unset)."""
    out = torch.empty(routing.sorted_ids.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    grid = (routing.max_blocks, triton.cdiv(x.shape[1], GATHER_BLOCK_H))
    _gather_rows_kernel[grid](x, out, routing.sorted_ids, routing.block_expert, routing.block_rows,
                              x.shape[1], top_k, x.stride(0), out.stride(0), BLOCK_M=routing.block_m,
                              BLOCK_H=GATHER_BLOCK_H, num_warps=4, **launch_kwargs(x.device))
    return out


def gate_up_tma(x, w13, act, routing, top_k: int, cfg: GemmConfig, round_dtype: torch.dtype, x_scale=None,
                w13_scale=None, act_scale=None) -> None:
    """Fills act [slots, I] (and act_scale, when given: act is then fp8, quantised from act rounded to
    round_dtype) as `fused_moe.gate_up` does with out_dtype round_dtype (the caller allocates them and checked
    `tma_ok`)."""
    _set_allocator()
    num_experts, two_i, hidden_size = w13.shape
    fp8 = x_scale is not None
    gathered = cfg.loads == "tma_gathered"
    xin = gather_slots(x, routing, top_k) if gathered else x
    xs, ws, as_ = gate_up_scales(x, w13, act, x_scale, w13_scale, act_scale)
    grid = (routing.max_blocks * triton.cdiv(two_i // 2, cfg.block_n),)
    _gate_up_tma_kernel[grid](xin, w13, act, as_, xs, ws, routing.sorted_ids, routing.block_expert,
                              routing.block_rows, routing.max_blocks, xin.shape[0], num_experts, hidden_size,
                              two_i // 2, top_k, xin.stride(0), act.stride(0), as_.stride(0), xs.stride(0),
                              ws.stride(0), ws.stride(1), GATHERED=gathered, WS=cfg.warp_specialize,
                              GROUP_M=cfg.group_m, SHORT_M=cfg.short_m, **act_quant_meta(act_scale, round_dtype),
                              **gemm_meta(cfg, routing.block_m, fp8, x.device))


def down_tma(act, w2, y, topk_weights, routing, cfg: GemmConfig, act_scale=None, w2_scale=None) -> None:
    """Fills y [M*k, H] as `fused_moe.down` does (the caller allocates it and checked `tma_ok`)."""
    _set_allocator()
    num_experts, hidden_size, inter = w2.shape
    fp8 = act_scale is not None
    as_, ws = operand_scales(act, w2, act_scale, w2_scale)
    grid = (routing.max_blocks * triton.cdiv(hidden_size, cfg.block_n),)
    _down_tma_kernel[grid](act, w2, y, as_, ws, topk_weights, routing.sorted_ids, routing.block_expert,
                           routing.block_rows, routing.max_blocks, act.shape[0], num_experts, hidden_size,
                           inter, act.stride(0), y.stride(0), as_.stride(0), ws.stride(0), ws.stride(1),
                           WS=cfg.warp_specialize, GROUP_M=cfg.group_m, SHORT_M=cfg.short_m,
                           **gemm_meta(cfg, routing.block_m, fp8, act.device))
