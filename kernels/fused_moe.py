"""Fused MoE for routed experts: align -> grouped GEMM gate/up (+SiLU*mul) -> grouped GEMM down (x routed
weight) -> top-k sum. bf16/fp16/fp32 weights, or float8_e4m3fn weights with 128x128 block scales.
Small M (config.pairs) skips the align and the top-k sum: `fused_moe_pairs.fused_moe_pairs` runs its two
per-pair launches, or both GEMMs in one (after this module's input checks; `MoEConfig.fuse_act_quant` governs
both paths).

Design (H100 targets, see benchmarks/RESULTS.md):
- Small M is memory-bound on the weights of the experts that received tokens. Only blocks that own pairs run
  (the rest exit on their first load), each weight tile is read once per block, and block sizes come from
  configs that keep several hundred CTAs streaming (narrow N tiles at decode rather than split-K, which would
  break the SiLU fusion and add a reduction pass).
- Large M is compute-bound: 64-128 row blocks, wide N tiles, 3-4 pipeline stages, 8 warps.
- Between them (Mixtral at 60-110 pairs per expert) a 128-row tile costs its MMA height: there the MMAs run
  transposed, tokens on the tensor cores' N side (8-row granularity instead of 64), with 96-row tiles of 64 + 32
  rows (`GemmConfig.swap_ab`, `mid_m`). fp8 tiles of 16-32 rows run transposed too: untransposed, Triton
  runs them as fp16 MMAs after converting the fp8 operands; transposed, they take fp8 MMAs. Where experts get a
  little over a block of pairs (Mixtral at M = 512: 128 +- 11), a full block takes its expert's short last
  block along as a second MMA tile (`GemmConfig.tail_m`), so that block does not stream the weights again.
- Aligned path: the top-k sum is a separate small kernel over [M*k, H] rather than float atomics in the down
  epilogue: deterministic, fp32 accumulation, no zero-filled output.
- Where a table entry says so (`MoEConfig.overlap`), down starts before gate/up has ended: each of its programs
  waits only until the act of its own block is counted as written, so down fills the multiprocessors gate/up's
  last, partial wave leaves idle.
- FP8: where gate/up's N tiles cover whole 128-channel groups, its epilogue quantises act itself (fp8 act
  plus per-group scales, the bits the separate quantisation launch would give), so act never goes to memory
  in 16 bits and the quantisation launch goes away.
- Every buffer size depends only on shapes, never on routing: the whole call is CUDA-graph capturable. The
  pairs path also takes completion counters from a shared buffer that can only grow outside capture, so a
  shape needs one eager call before capture (as CudaGraphRunner makes).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# per_token_group_quant_fp8 is looked up on its module at each call, so a test can count the launches.
from . import fp8 as fp8_quant
from . import fused_moe_tma, moe_gemm_gluon
from .fp8 import FP8_DTYPE, GROUP
from .fused_moe_pairs import fused_moe_pairs, gate_up_pairs_pdl
from .moe_align import AlignedRouting, align_plan, moe_align
from .moe_configs import GemmConfig, MoEConfig, get_config, lookup_tokens
from .moe_tiles import (
    act_quant_meta,
    aligned_ptr_meta,
    block_pairs,
    down_acc,
    each_block,
    fp8_act,
    gate_up_acc,
    gate_up_scales,
    mark_ready,
    new_act,
    operand_scales,
    overlap_applies,
    ptr_gemm_meta,
    store_act,
    store_down,
    wait_ready,
)
from .pdl import launch_kwargs, pdl_enter, pdl_steps


@triton.jit(do_not_specialize=["max_blocks"])
def _gate_up_kernel(x_ptr, w_ptr, act_ptr, as_ptr, xs_ptr, ws_ptr, sorted_ptr, block_expert_ptr,
                    block_rows_ptr, ready_ptr, max_blocks, K, INTER, top_k,
                    stride_xm, stride_we, stride_wn, stride_am, stride_asm, stride_xsm, stride_wse, stride_wsn,
                    FP8: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SHORT_M: tl.constexpr,
                    MID_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, QUANT_ACT: tl.constexpr,
                    ROUND_DTYPE: tl.constexpr, SWAP: tl.constexpr, MARK_READY: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """act[slot, n] = silu(x[tok] . w13[e, n]) * (x[tok] . w13[e, INTER + n]) for the slots of one block
    (QUANT_ACT: fp8 with scales in as, see `store_act`). SHORT_M, MID_M, TAIL_M, SWAP: `GemmConfig.short_m`,
    `.mid_m`, `.tail_m`, `.swap_ab`. MARK_READY: count each written N tile in ready (`mark_ready`); the next
    launch, down, then may start only once every program has chosen its tile or ended: a program that runs a
    tile lets it launch once its block's tables chose it (`_gate_up_block`); its later reads come before its
    count, which down waits for, so no program touches memory when down ends."""
    pdl_steps(USE_PDL, True, not MARK_READY)
    each_block(_gate_up_block, (x_ptr, w_ptr, act_ptr, as_ptr, xs_ptr, ws_ptr, sorted_ptr, block_rows_ptr, ready_ptr,
                                K, INTER, top_k, stride_xm, stride_we, stride_wn, stride_am, stride_asm, stride_xsm,
                                stride_wse, stride_wsn, FP8, QBLOCK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N,
                                QUANT_ACT, ROUND_DTYPE, SWAP, MARK_READY, USE_PDL),
               block_expert_ptr, block_rows_ptr, max_blocks, tl.cdiv(INTER, BLOCK_N), BLOCK_M, SHORT_M, MID_M,
               TAIL_M, GROUP_M)


@triton.jit
def _gate_up_block(block, x_ptr, w_ptr, act_ptr, as_ptr, xs_ptr, ws_ptr, sorted_ptr, block_rows_ptr, ready_ptr, K,
                   INTER, top_k, stride_xm, stride_we, stride_wn, stride_am, stride_asm, stride_xsm,
                   stride_wse, stride_wsn, FP8: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                   QUANT_ACT: tl.constexpr, ROUND_DTYPE: tl.constexpr, SWAP: tl.constexpr, MARK_READY: tl.constexpr,
                   USE_PDL: tl.constexpr, ROWS: tl.constexpr, ROWS2: tl.constexpr):
    """`_gate_up_kernel`'s tile over ROWS + ROWS2 slots from block pid_m's first on (ROWS = BLOCK_M: all of its
    slots, and a tail tile's ROWS2 then the next block's first), as one or two MMA row tiles; block = (pid_m,
    pid_n, expert) from `each_block`."""
    if MARK_READY:
        pdl_steps(USE_PDL, False, True)  # reached only once the block tables chose this tile
    pid_m, pid_n, expert = block
    pair, _ = block_pairs(sorted_ptr, block_rows_ptr, pid_m, BLOCK_M, 0, ROWS)
    token = pair // top_k
    token2 = token
    if ROWS2:
        pair2, _ = block_pairs(sorted_ptr, block_rows_ptr, pid_m, BLOCK_M, ROWS, ROWS2)
        token2 = pair2 // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        offs_nw = offs_n
    else:
        offs_nw = offs_n % INTER  # in-bounds weight rows; the extra columns are never stored
    acc_g, acc_u, acc_g2, acc_u2 = gate_up_acc(x_ptr, w_ptr, xs_ptr, ws_ptr, token, token2, expert, offs_nw, K,
                                               INTER, stride_xm, stride_we, stride_wn, stride_xsm, stride_wse,
                                               stride_wsn, FP8, QBLOCK, ROWS, BLOCK_N, BLOCK_K, EVEN_K, ROWS2, SWAP)
    # All rows, padding too (an unmasked store): padding rows of act are never stored by down.
    store_act(act_ptr, as_ptr, acc_g * tl.sigmoid(acc_g) * acc_u, pid_m * BLOCK_M + tl.arange(0, ROWS),
              tl.full([ROWS], True, tl.int1), pid_n, offs_n, stride_am, stride_asm, INTER, ROWS, BLOCK_N, EVEN_N,
              QUANT_ACT, ROUND_DTYPE)
    if ROWS2:
        store_act(act_ptr, as_ptr, acc_g2 * tl.sigmoid(acc_g2) * acc_u2, pid_m * BLOCK_M + ROWS + tl.arange(0, ROWS2),
                  tl.full([ROWS2], True, tl.int1), pid_n, offs_n, stride_am, stride_asm, INTER, ROWS2, BLOCK_N,
                  EVEN_N, QUANT_ACT, ROUND_DTYPE)
    if MARK_READY:
        mark_ready(ready_ptr, pid_m, ROWS + ROWS2 > BLOCK_M)


@triton.jit(do_not_specialize=["max_blocks"])
def _down_kernel(act_ptr, w_ptr, y_ptr, as_ptr, ws_ptr, topk_w_ptr, sorted_ptr, block_expert_ptr,
                 block_rows_ptr, ready_ptr, ready_count, max_blocks, N, K,
                 stride_am, stride_we, stride_wn, stride_ym, stride_asm, stride_wse, stride_wsn,
                 FP8: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, SHORT_M: tl.constexpr,
                 MID_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, SWAP: tl.constexpr,
                 WAIT_READY: tl.constexpr, USE_PDL: tl.constexpr):
    """y[pair, n] = topk_weight[pair] * (act[slot] . w2[e, n]) for the valid slots of one block.
    SHORT_M, MID_M, TAIL_M, SWAP: `GemmConfig.short_m`, `.mid_m`, `.tail_m`, `.swap_ab`. WAIT_READY: overlap
    gate/up (`MoEConfig.overlap`): no wait for the launch before, but for ready_count N tiles of each block's
    act (`wait_ready`). When down ends, every gate/up program that runs a tile has counted it (its last step),
    and the others had ended before down started (`_gate_up_kernel`): gate/up has stopped touching memory."""
    pdl_steps(USE_PDL, not WAIT_READY, True)
    each_block(_down_block, (act_ptr, w_ptr, y_ptr, as_ptr, ws_ptr, topk_w_ptr, sorted_ptr, block_rows_ptr, ready_ptr,
                             ready_count, N, K, stride_am, stride_we, stride_wn, stride_ym, stride_asm, stride_wse,
                             stride_wsn, FP8, QBLOCK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, SWAP, WAIT_READY),
               block_expert_ptr, block_rows_ptr, max_blocks, tl.cdiv(N, BLOCK_N), BLOCK_M, SHORT_M, MID_M, TAIL_M,
               GROUP_M)


@triton.jit
def _down_block(block, act_ptr, w_ptr, y_ptr, as_ptr, ws_ptr, topk_w_ptr, sorted_ptr, block_rows_ptr, ready_ptr,
                ready_count, N, K, stride_am, stride_we, stride_wn, stride_ym, stride_asm, stride_wse, stride_wsn,
                FP8: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, SWAP: tl.constexpr,
                WAIT_READY: tl.constexpr, ROWS: tl.constexpr, ROWS2: tl.constexpr):
    """`_down_kernel`'s tile over ROWS + ROWS2 slots from block pid_m's first on (ROWS = BLOCK_M: all of its
    slots, and a tail tile's ROWS2 then the next block's first), as one or two MMA row tiles; block = (pid_m,
    pid_n, expert) from `each_block`."""
    pid_m, pid_n, expert = block
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        offs_nw = offs_n
    else:
        offs_nw = offs_n % N
    pair, row_ok = block_pairs(sorted_ptr, block_rows_ptr, pid_m, BLOCK_M, 0, ROWS)
    slots = pid_m * BLOCK_M + tl.arange(0, ROWS)
    pair2, row_ok2, slots2 = pair, row_ok, slots
    if ROWS2:
        pair2, row_ok2 = block_pairs(sorted_ptr, block_rows_ptr, pid_m, BLOCK_M, ROWS, ROWS2)
        slots2 = pid_m * BLOCK_M + ROWS + tl.arange(0, ROWS2)
    if WAIT_READY:
        wait_ready(ready_ptr, pid_m, ready_count, ROWS + ROWS2 > BLOCK_M)
    acc, acc2 = down_acc(act_ptr, w_ptr, as_ptr, ws_ptr, slots, slots2, expert, offs_nw, K, tl.cdiv(K, BLOCK_K),
                         stride_am, stride_we, stride_wn, stride_asm, stride_wse, stride_wsn,
                         FP8, QBLOCK, ROWS, BLOCK_N, BLOCK_K, EVEN_K, ROWS2, SWAP, ".cg" if WAIT_READY else "")
    store_down(y_ptr, acc, topk_w_ptr, pair, row_ok, offs_n, stride_ym, N)
    if ROWS2:
        store_down(y_ptr, acc2, topk_w_ptr, pair2, row_ok2, offs_n, stride_ym, N)


@triton.jit
def _topk_sum_kernel(y_ptr, ids_ptr, slot_ptr, out_ptr, N, num_experts, stride_ym, stride_om,
                     TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BY_SLOT: tl.constexpr, USE_PDL: tl.constexpr):
    """out[m, n] = sum over valid choices j of y[row, n], accumulated in fp32, where row is the pair m*TOP_K + j,
    or with BY_SLOT its slot, slot_ptr[m*TOP_K + j]."""
    pdl_enter(USE_PDL)
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = m * TOP_K + j
        # The expert id is splat to a vector before the compare: a scalar bool & vector bool mask trips
        # the Triton interpreter.
        expert = tl.load(ids_ptr + pair)
        e = tl.zeros((BLOCK_N,), dtype=tl.int32) + expert
        ok = n_ok & (e >= 0) & (e < num_experts)
        row = pair
        if BY_SLOT:  # only valid pairs have a slot
            row = tl.load(slot_ptr + pair, mask=(expert >= 0) & (expert < num_experts), other=0)
        acc += tl.load(y_ptr + row.to(tl.int64) * stride_ym + offs_n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def gate_up(x: torch.Tensor, w13: torch.Tensor, routing: AlignedRouting, top_k: int, cfg: GemmConfig,
            out_dtype: torch.dtype, x_scale: torch.Tensor | None = None, w13_scale: torch.Tensor | None = None,
            act_scale: torch.Tensor | None = None, mark_ready: bool = False) -> torch.Tensor:
    """x: [M, H] (fp8 with x_scale [M, H/128] when w13 is fp8); w13: [E, 2I, H].
    Returns act: [max_blocks * block_m, I] out_dtype, one row per slot (padding slots hold junk).
    act_scale (fp8 only, cfg.block_n % 128 == 0): a [slots, ceil(I/128)] float32 buffer; act then comes back
    as float8_e4m3fn with its scales there, the bits `per_token_group_quant_fp8` gives for the out_dtype act.
    mark_ready (pointer loads only): count each block's written N tiles in routing.block_ready, for a down
    launch that overlaps this one (`down`'s after_gate_up)."""
    num_experts, two_i, hidden_size = w13.shape
    inter = two_i // 2
    fp8 = x_scale is not None
    act = new_act(routing.sorted_ids.shape[0], inter, out_dtype, act_scale, x.device)
    if _gluon_runs(cfg, w13, inter, hidden_size, routing, 2, act.dtype):
        assert not mark_ready, "gate_up: mark_ready needs pointer loads"
        x_slots = fused_moe_tma.gather_slots(x, routing, top_k)
        moe_gemm_gluon.gate_up_gluon(x_slots, w13, act, routing, cfg.block_n, cfg.block_k, cfg.num_stages,
                                     cfg.group_m, top_k, x_scale, w13_scale, act_scale, out_dtype, cfg.dynamic_tiles)
        return act
    if fused_moe_tma.tma_ok(cfg, inter, hidden_size, routing.block_m, x.device):
        assert not mark_ready, "gate_up: mark_ready needs pointer loads"
        fused_moe_tma.gate_up_tma(x, w13, act, routing, top_k, cfg, out_dtype, x_scale, w13_scale, act_scale)
        return act
    xs, ws, as_ = gate_up_scales(x, w13, act, x_scale, w13_scale, act_scale)
    grid = (routing.max_blocks * triton.cdiv(inter, cfg.block_n),)
    _gate_up_kernel[grid](x, w13, act, as_, xs, ws, routing.sorted_ids, routing.block_expert,
                          routing.block_rows, routing.block_ready, routing.max_blocks, hidden_size, inter, top_k,
                          x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), as_.stride(0),
                          xs.stride(0), ws.stride(0), ws.stride(1), **act_quant_meta(act_scale, out_dtype),
                          **aligned_ptr_meta(cfg), MARK_READY=mark_ready,
                          **ptr_gemm_meta(cfg, routing.block_m, inter, hidden_size, fp8, x.device))
    return act


def down(act: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, routing: AlignedRouting,
         cfg: GemmConfig, out_dtype: torch.dtype, act_scale: torch.Tensor | None = None,
         w2_scale: torch.Tensor | None = None,
         after_gate_up: GemmConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """act: [slots, I] (fp8 with act_scale [slots, I/128] when w2 is fp8); w2: [E, H, I];
    topk_weights: [M, k] float32. Returns (y, slot_of_pair) for `topk_sum`: y [M*k, H] out_dtype by pair, rows
    of dropped choices left unwritten, and None; or, from the Gluon kernel (cfg.loads == "gluon"), y [slots, H]
    by slot and slot_of_pair [M*k] int32, the row of each valid pair.
    after_gate_up (pointer loads only; `MoEConfig.overlap`): the tiles of the gate/up launch just before this
    one, which must have been made with mark_ready on the same routing (else the programs wait forever). Each
    program then waits only for the act it reads (its block's, and the next block's for a tail tile: all of
    that launch's N tiles counted in routing.block_ready) rather than for the whole launch to end."""
    num_experts, hidden_size, inter = w2.shape
    fp8 = act_scale is not None
    if _gluon_runs(cfg, w2, hidden_size, inter, routing, 1, out_dtype):
        assert after_gate_up is None, "down: after_gate_up needs pointer loads"
        return moe_gemm_gluon.down_gluon(act, w2, topk_weights, routing, cfg.block_n, cfg.block_k, cfg.num_stages,
                                         cfg.group_m, out_dtype, act_scale, w2_scale, cfg.dynamic_tiles)
    y = torch.empty(topk_weights.numel(), hidden_size, dtype=out_dtype, device=act.device)
    if fused_moe_tma.tma_ok(cfg, hidden_size, inter, routing.block_m, act.device):
        assert after_gate_up is None, "down: after_gate_up needs pointer loads"
        fused_moe_tma.down_tma(act, w2, y, topk_weights, routing, cfg, act_scale, w2_scale)
        return y, None
    as_, ws = operand_scales(act, w2, act_scale, w2_scale)
    grid = (routing.max_blocks * triton.cdiv(hidden_size, cfg.block_n),)
    ready_count = 0 if after_gate_up is None else triton.cdiv(inter, after_gate_up.block_n)
    _down_kernel[grid](act, w2, y, as_, ws, topk_weights, routing.sorted_ids, routing.block_expert,
                       routing.block_rows, routing.block_ready, ready_count, routing.max_blocks, hidden_size, inter,
                       act.stride(0), w2.stride(0), w2.stride(1), y.stride(0), as_.stride(0), ws.stride(0),
                       ws.stride(1), **aligned_ptr_meta(cfg), WAIT_READY=after_gate_up is not None,
                       **ptr_gemm_meta(cfg, routing.block_m, hidden_size, inter, fp8, act.device))
    return y, None


def _gluon_runs(cfg: GemmConfig, w: torch.Tensor, n: int, k: int, routing: AlignedRouting, weight_tiles: int,
                out_dtype: torch.dtype) -> bool:
    """Whether a GEMM with cfg.loads == "gluon" runs the Gluon kernel here (16-bit or fp8 weights in tiles that
    fit, a 16-bit or fp8 output, on a GPU it was written for): else it takes the TMA Triton kernel ("tma")."""
    if cfg.loads != "gluon":
        return False
    why = moe_gemm_gluon.gluon_gemm_unsupported(w, n, k, routing.block_m, cfg.block_n, cfg.block_k,
                                                cfg.num_stages, weight_tiles, out_dtype)
    return why is None


def topk_sum(y: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor,
             slot_of_pair: torch.Tensor | None = None) -> torch.Tensor:
    """y: [M*k, H] by pair, or by slot with slot_of_pair [M*k] (`down`'s two results); topk_ids: [M, k] int32;
    out: [M, H], filled with the sum over valid choices."""
    num_tokens, top_k = topk_ids.shape
    block_n = min(1024, triton.next_power_of_2(out.shape[1]))
    grid = (num_tokens, triton.cdiv(out.shape[1], block_n))
    by_slot = slot_of_pair is not None
    _topk_sum_kernel[grid](y, topk_ids, slot_of_pair if by_slot else topk_ids, out, out.shape[1], num_experts,
                           y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_N=block_n, BY_SLOT=by_slot, num_warps=4,
                           **launch_kwargs(y.device))
    return out


def _check_inputs(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"fused_moe: {msg}")

    need(hidden.dim() == 2 and w13.dim() == 3 and w2.dim() == 3,
         f"want hidden [M, H], w13 [E, 2I, H], w2 [E, H, I]; got {tuple(hidden.shape)}, "
         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, _ = w13.shape
    want_w2 = (num_experts, hidden_size, two_i // 2)
    need(two_i % 2 == 0 and w13.shape[2] == hidden_size and tuple(w2.shape) == want_w2,
         f"inconsistent shapes: hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)} (want [E, 2I, H]), "
         f"w2 {tuple(w2.shape)} (want [E, H, I])")
    need(topk_ids.dim() == 2 and topk_ids.shape[0] == num_tokens and topk_weights.shape == topk_ids.shape,
         f"want topk_ids and topk_weights [M={num_tokens}, k]; got {tuple(topk_ids.shape)}, "
         f"{tuple(topk_weights.shape)}")
    need(topk_ids.dtype == torch.int32 and topk_weights.dtype == torch.float32,
         f"want topk_ids int32 and topk_weights float32; got {topk_ids.dtype}, {topk_weights.dtype}")
    need(hidden.dtype in (torch.bfloat16, torch.float16, torch.float32),
         f"hidden must be bf16, fp16 or fp32, got {hidden.dtype}")
    tensors = (hidden, w13, w2, topk_weights, topk_ids)
    need(all(t.is_contiguous() for t in tensors),
         "hidden, w13, w2, topk_weights and topk_ids must be contiguous")
    need(all(t.device == hidden.device for t in tensors), "all inputs must be on hidden's device")
    if w13.dtype == FP8_DTYPE:
        need(w2.dtype == FP8_DTYPE and w13_scale is not None and w2_scale is not None,
             "fp8 w13 needs fp8 w2 and both w13_scale and w2_scale")
        inter = two_i // 2
        for name, s, want in (("w13_scale", w13_scale, (num_experts, triton.cdiv(two_i, GROUP),
                                                        triton.cdiv(hidden_size, GROUP))),
                              ("w2_scale", w2_scale, (num_experts, triton.cdiv(hidden_size, GROUP),
                                                      triton.cdiv(inter, GROUP)))):
            need(tuple(s.shape) == want and s.dtype == torch.float32 and s.is_contiguous(),
                 f"{name} must be contiguous float32 {want} (128x128 blocks), got {tuple(s.shape)} {s.dtype}")
    else:
        need(w13.dtype == hidden.dtype and w2.dtype == hidden.dtype,
             f"w13/w2 must be hidden's dtype {hidden.dtype} (or float8_e4m3fn); got {w13.dtype}, {w2.dtype}")
        need(w13_scale is None and w2_scale is None, "weight scales are only allowed with fp8 weights")


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, config: MoEConfig | None = None,
              global_experts: int | None = None, num_pairs: int | None = None) -> torch.Tensor:
    """Routed expert MLP, weighted and summed over top-k.

    hidden: [M, H] bf16/fp16/fp32; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]; both in hidden's
    dtype, or float8_e4m3fn with w13_scale [E, ceil(2I/128), ceil(H/128)] and w2_scale [E, ceil(H/128),
    ceil(I/128)] float32 (128x128 block scales, weight = q * scale; activations are then quantised per token
    per 128 channels inside); topk_weights: [M, k] float32; topk_ids: [M, k] int32, -1 = expert not here.
    config: block sizes (default: the tuned table for this shape, nearest M).
    global_experts: the model's routed-expert count when w13 holds only this rank's share; without a table for
    the local count the lookup then takes the one for this count (`get_config`). Unused with config.
    num_pairs: the valid choices in topk_ids, when the caller knows the count on the host; the table lookup
    then keys on the tokens they stand for (`lookup_tokens`) instead of M, for rows that carry more choices
    per row than the tables' routing (an all-to-all rank's). Unused with config.
    Returns [M, H] in hidden's dtype: sum_j topk_weights[m, j] * expert_{topk_ids[m, j]}(hidden[m])."""
    _check_inputs(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    out = torch.empty_like(hidden)
    if num_tokens == 0:
        return out
    fp8 = w13.dtype == FP8_DTYPE
    key = num_tokens if num_pairs is None else lookup_tokens(num_pairs, top_k, num_experts, global_experts)
    cfg = config or get_config(key, num_experts, hidden_size, two_i // 2, top_k, fp8, w13.element_size(),
                               global_experts=global_experts)
    if fp8 and (GROUP % cfg.gate_up.block_k or GROUP % cfg.down.block_k):
        raise ValueError(f"fused_moe: fp8 needs block_k dividing {GROUP}, got {cfg}")
    if cfg.pairs:
        return fused_moe_pairs(hidden, w13, w2, topk_weights, topk_ids, cfg, out, w13_scale, w2_scale)
    routing = moe_align(topk_ids, num_experts, cfg.block_m)
    overlap = overlap_applies(cfg, fp8)
    after = cfg.gate_up if overlap else None
    if fp8:
        xq, xs = fp8_quant.per_token_group_quant_fp8(hidden)
        run = functools.partial(gate_up, xq, w13, routing, top_k, cfg.gate_up, hidden.dtype, xs, w13_scale,
                                mark_ready=overlap)
        aq, act_s = fp8_act(run, routing.sorted_ids.shape[0], two_i // 2, cfg, hidden.device)
        y, slot_of_pair = down(aq, w2, topk_weights, routing, cfg.down, hidden.dtype, act_s, w2_scale,
                               after_gate_up=after)
    else:
        act = gate_up(hidden, w13, routing, top_k, cfg.gate_up, hidden.dtype, mark_ready=overlap)
        y, slot_of_pair = down(act, w2, topk_weights, routing, cfg.down, hidden.dtype, after_gate_up=after)
    return topk_sum(y, topk_ids, num_experts, out, slot_of_pair)


def warmup_token_counts(max_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int, fp8: bool,
                        sms: int, global_experts: int | None = None) -> list[int]:
    """Token counts whose `fused_moe` calls, run once each, compile every kernel that a call of 1..max_tokens
    rows takes on weights of this shape, on a device of `sms` multiprocessors (Triton compiles on first use:
    1-3 s a table entry on a fresh machine).

    A call's kernels depend on its M only through its table entry (`get_config`) and, in the aligned path, its
    align's method and CHUNK (`moe_align.align_plan`, which change at powers of two of the M*top_k pairs), in
    the pairs path whether gate/up launches under PDL (`fused_moe_pairs.gate_up_pairs_pdl`). Sizes are not
    specialised into the kernels (`do_not_specialize`, and block tables aligned whatever their length). Walking
    M up from 1, the first M of each new combination."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    counts, seen = [], set()
    for m in range(1, max_tokens + 1):
        cfg = get_config(m, num_experts, hidden, inter, top_k, fp8, global_experts=global_experts)
        if cfg.pairs:
            variant = (cfg, gate_up_pairs_pdl(m * top_k, inter, cfg.gate_up, sms))
        else:
            variant = (cfg, align_plan(m * top_k))
        if variant not in seen:
            seen.add(variant)
            counts.append(m)
    return counts
