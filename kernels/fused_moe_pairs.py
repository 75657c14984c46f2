"""The small-M ("pairs") path of `fused_moe.fused_moe` (MoEConfig.pairs): no align and no top-k sum launch.
gate/up runs per (token, choice) pair, then down per pair, the last of a token's programs on an N tile summing
its k rows in a fixed order: two launches ("pair"), or one ("one": `_pairs_one_kernel` hands its programs
gate/up tiles first, then down tiles that wait for their pair's act), deterministic and the same bits either way.

- One program per (pair, N tile). The two launches run them in N-tile-major order, so an expert picked by
  several tokens is mostly read from L2; the one launch runs them pair-major, so pairs' act becomes whole
  early (which loses those L2 reads: the tables take it where no expert repeats, benchmarks/RESULTS.md,
  session 17). A dropped choice's gate/up program exits at once and its down program stores zeros.
- The down program that arrives last on a (token, N tile) (a self-resetting counter of
  `counters.completion_counters`) sums the token's k fp32 rows in a fixed order, so it needs no third launch.
- Routing weight: unquantised act carries it from gate/up; with fp8 (act quantised per 128 channels), down
  multiplies its output by topk_weights[pair] after the k loop instead.
- Every MMA row of a program holds its pair's one token. `GemmConfig.swap_ab` transposes the MMAs so the
  weights take the tensor cores' M side and those rows the N side (16 instead of 64 MMA rows); it pays for some
  shapes and not others (benchmarks/RESULTS.md, session 14), so the tables choose.
`fused_moe_pairs` drives the launches (and the fp8 quantisation of hidden and act) once
`fused_moe.fused_moe` has checked the inputs; the k loops, the gate/up epilogue, act allocation and the choice
of act quantisation route it shares with the aligned path live in `moe_tiles`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# per_token_group_quant_fp8 is looked up on its module at each call, so a test can count the launches.
from . import fp8 as fp8_quant
from .counters import completion_counters, last_to_arrive
from .device import num_sms
from .fp8 import FP8_DTYPE, GROUP
from .moe_configs import GemmConfig, MoEConfig
from .moe_tiles import (
    act_quant_meta,
    down_acc,
    down_reads_gate_ups_act,
    fp8_act,
    gate_up_acc,
    gate_up_scales,
    mark_ready,
    new_act,
    new_act_scale,
    operand_scales,
    ptr_gemm_meta,
    store_act,
    wait_ready,
)
from .pdl import launch_kwargs, pdl_enter


@triton.jit
def _gate_up_pair_tile(pair, pid_n, expert, x_ptr, w_ptr, act_ptr, as_ptr, xs_ptr, ws_ptr, topk_w_ptr, K, INTER,
                       top_k, stride_xm, stride_we, stride_wn, stride_am, stride_asm, stride_xsm, stride_wse,
                       stride_wsn, FP8: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                       QUANT_ACT: tl.constexpr, ROUND_DTYPE: tl.constexpr, SWAP: tl.constexpr):
    """act[pair, n] = w[pair] * silu(x[tok] . w13[e, n]) * (x[tok] . w13[e, INTER + n]) for N tile pid_n of a
    pair whose expert e is here; w = topk_weights[pair], or 1 when FP8 (down multiplies its output by it).
    QUANT_ACT: act is fp8 with scales in as (see `moe_tiles.store_act`). SWAP: transposed MMAs
    (`GemmConfig.swap_ab`)."""
    # All BLOCK_M MMA rows read the pair's token (the MMA needs >= 16 rows); only row 0 is stored.
    token = tl.zeros([BLOCK_M], dtype=tl.int32) + pair // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        offs_nw = offs_n
    else:
        offs_nw = offs_n % INTER
    acc_g, acc_u, _, _ = gate_up_acc(x_ptr, w_ptr, xs_ptr, ws_ptr, token, token, expert, offs_nw, K, INTER,
                                     stride_xm, stride_we, stride_wn, stride_xsm, stride_wse, stride_wsn,
                                     FP8, QBLOCK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, 0, SWAP)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    if not FP8:
        act = act * tl.load(topk_w_ptr + pair)
    # Every MMA row holds the pair's values; only row 0 is stored, in act row pair.
    store_act(act_ptr, as_ptr, act, tl.zeros([BLOCK_M], dtype=tl.int32) + pair, tl.arange(0, BLOCK_M) == 0,
              pid_n, offs_n, stride_am, stride_asm, INTER, BLOCK_M, BLOCK_N, EVEN_N, QUANT_ACT, ROUND_DTYPE)


@triton.jit
def _down_pair_tile(pair, pid_n, expert, valid, act_ptr, w_ptr, y_ptr, out_ptr, as_ptr, ws_ptr, topk_w_ptr,
                    count_ptr, N, K, stride_am, stride_we, stride_wn, stride_ym, stride_om, stride_asm, stride_wse,
                    stride_wsn, FP8: tl.constexpr, QBLOCK: tl.constexpr, TOP_K: tl.constexpr,
                    K_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SWAP: tl.constexpr, ACT_CACHE: tl.constexpr):
    """y[pair, n] = act[pair] . w2[e, n] (x topk_weight when FP8; bf16 act carries it; 0 for a dropped pair,
    valid False) for N tile pid_n; the last of a token's TOP_K programs on the tile (a self-resetting counter
    per (token, N tile) tells) writes out[tok, n] = sum over j of y[tok*TOP_K + j, n] in a fixed order:
    deterministic, with no launch of its own. SWAP: transposed MMAs (`GemmConfig.swap_ab`). ACT_CACHE: as in
    `moe_tiles.down_acc` (".cg" where gate/up may still be writing act)."""
    token = pair // TOP_K
    expert = tl.where(valid, expert, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nw = offs_n % N
    offs_r = tl.arange(0, BLOCK_M)
    # All MMA rows read the pair's row; a dropped pair runs no k step and stores zeros.
    pair_rows = tl.zeros([BLOCK_M], dtype=tl.int32) + pair
    acc, _ = down_acc(act_ptr, w_ptr, as_ptr, ws_ptr, pair_rows, pair_rows, expert, offs_nw, K,
                      tl.cdiv(K, BLOCK_K) * valid.to(tl.int32), stride_am, stride_we, stride_wn, stride_asm,
                      stride_wse, stride_wsn, FP8, QBLOCK, BLOCK_M, BLOCK_N, BLOCK_K, False, 0, SWAP, ACT_CACHE)
    if FP8:
        acc *= tl.load(topk_w_ptr + pair)
    n_ok = offs_n < N
    y_ptrs = y_ptr + pair.to(tl.int64) * stride_ym + offs_n[None, :] + offs_r[:, None] * 0
    tl.store(y_ptrs, acc, mask=(offs_r[:, None] == 0) & n_ok[None, :])
    if last_to_arrive(count_ptr + token * tl.cdiv(N, BLOCK_N) + pid_n, TOP_K):
        offs_j = tl.arange(0, K_POW2)
        rows = token * TOP_K + offs_j
        # .cg: the other programs' rows are read past L1 (not coherent across SMs).
        y = tl.load(y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
                    mask=(offs_j[:, None] < TOP_K) & n_ok[None, :], other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + token.to(tl.int64) * stride_om + offs_n, tl.sum(y, axis=0).to(out_ptr.dtype.element_ty),
                 mask=n_ok)


@triton.jit
def _expert_of(ids_ptr, pair, num_experts):
    """(expert, whether it is on this rank) of a pair: ids outside [0, num_experts) are dropped choices."""
    expert = tl.load(ids_ptr + pair)
    return expert, (expert >= 0) & (expert < num_experts)


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_pairs_kernel(x_ptr, w_ptr, act_ptr, as_ptr, xs_ptr, ws_ptr, ids_ptr, topk_w_ptr,
                          num_pairs, num_experts, K, INTER, top_k,
                          stride_xm, stride_we, stride_wn, stride_am, stride_asm, stride_xsm, stride_wse,
                          stride_wsn, FP8: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                          EVEN_N: tl.constexpr, QUANT_ACT: tl.constexpr, ROUND_DTYPE: tl.constexpr,
                          SWAP: tl.constexpr, USE_PDL: tl.constexpr):
    """`_gate_up_pair_tile` for one (pair, N tile); rows of dropped pairs are left unwritten."""
    pdl_enter(USE_PDL)
    # N-tile-major order: programs of the same weight tile run together, so an expert picked by several
    # tokens is mostly served from L2.
    pair = tl.program_id(0) % num_pairs
    pid_n = tl.program_id(0) // num_pairs
    expert, valid = _expert_of(ids_ptr, pair, num_experts)
    if valid:
        _gate_up_pair_tile(pair, pid_n, expert, x_ptr, w_ptr, act_ptr, as_ptr, xs_ptr, ws_ptr, topk_w_ptr, K,
                           INTER, top_k, stride_xm, stride_we, stride_wn, stride_am, stride_asm, stride_xsm,
                           stride_wse, stride_wsn, FP8, QBLOCK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N,
                           QUANT_ACT, ROUND_DTYPE, SWAP)


@triton.jit(do_not_specialize=["num_pairs"])
def _down_pairs_kernel(act_ptr, w_ptr, y_ptr, out_ptr, as_ptr, ws_ptr, ids_ptr, topk_w_ptr, count_ptr,
                       num_pairs, num_experts, N, K,
                       stride_am, stride_we, stride_wn, stride_ym, stride_om, stride_asm, stride_wse, stride_wsn,
                       FP8: tl.constexpr, QBLOCK: tl.constexpr, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
                       USE_PDL: tl.constexpr):
    """`_down_pair_tile` for one (pair, N tile), in the launch after gate/up's."""
    pdl_enter(USE_PDL)
    pair = tl.program_id(0) % num_pairs
    pid_n = tl.program_id(0) // num_pairs
    expert, valid = _expert_of(ids_ptr, pair, num_experts)
    _down_pair_tile(pair, pid_n, expert, valid, act_ptr, w_ptr, y_ptr, out_ptr, as_ptr, ws_ptr, topk_w_ptr,
                    count_ptr, N, K, stride_am, stride_we, stride_wn, stride_ym, stride_om, stride_asm, stride_wse,
                    stride_wsn, FP8, QBLOCK, TOP_K, K_POW2, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, "")


@triton.jit(do_not_specialize=["num_pairs"])
def _pairs_one_kernel(x_ptr, w13_ptr, w2_ptr, act_ptr, y_ptr, out_ptr, xs_ptr, w13s_ptr, as_ptr, w2s_ptr, ids_ptr,
                      topk_w_ptr, count_ptr, ticket_ptr, ready_ptr, num_pairs, num_experts, H, INTER,
                      stride_xm, stride_w13e, stride_w13n, stride_am, stride_asm, stride_xsm, stride_w13se,
                      stride_w13sn, stride_w2e, stride_w2n, stride_ym, stride_om, stride_w2se, stride_w2sn,
                      FP8: tl.constexpr, QBLOCK: tl.constexpr, TOP_K: tl.constexpr, K_POW2: tl.constexpr,
                      BLOCK_M: tl.constexpr, GU_BLOCK_N: tl.constexpr, GU_BLOCK_K: tl.constexpr,
                      GU_EVEN_K: tl.constexpr, GU_EVEN_N: tl.constexpr, GU_SWAP: tl.constexpr,
                      QUANT_ACT: tl.constexpr, ROUND_DTYPE: tl.constexpr, D_BLOCK_N: tl.constexpr,
                      D_BLOCK_K: tl.constexpr, D_SWAP: tl.constexpr, USE_PDL: tl.constexpr):
    """Both GEMMs of the pairs path in one launch (MoEConfig.pairs = "one"). Each program takes a ticket, in
    the order programs start: tickets below num_pairs * gate/up's N tiles are gate/up tiles, pair-major, and
    count themselves in their pair's ready counter; the rest are down tiles, pair-major, which first wait until
    every gate/up tile of their pair is counted (`moe_tiles.wait_ready`). A waiting program only waits on
    tickets handed out before its own, to programs already running that wait on nothing, so it cannot
    deadlock, whatever order the hardware starts programs in. So down tiles run on multiprocessors as soon as
    gate/up tiles leave them, where the two launches wait for the whole of gate/up.

    count_ptr, ticket_ptr (the ticket, then the done count), ready_ptr (one count per pair): completion counters,
    all 0, where `one_launch_counters` places them. The program with the last ticket zeroes the ticket; the last
    down tile to finish zeroes the ready counts and the done count."""
    pdl_enter(USE_PDL)
    gu_tiles = tl.cdiv(INTER, GU_BLOCK_N)
    d_tiles = tl.cdiv(H, D_BLOCK_N)
    num_gu = num_pairs * gu_tiles
    num_down = num_pairs * d_tiles
    ticket = tl.atomic_add(ticket_ptr, 1, sem="relaxed")
    if ticket == num_gu + num_down - 1:
        tl.store(ticket_ptr, 0)
    if ticket < num_gu:
        pair, pid_n = ticket // gu_tiles, ticket % gu_tiles
        expert, valid = _expert_of(ids_ptr, pair, num_experts)
        if valid:
            _gate_up_pair_tile(pair, pid_n, expert, x_ptr, w13_ptr, act_ptr, as_ptr, xs_ptr,
                               w13s_ptr, topk_w_ptr, H, INTER, TOP_K, stride_xm, stride_w13e, stride_w13n,
                               stride_am, stride_asm, stride_xsm, stride_w13se, stride_w13sn, FP8, QBLOCK,
                               BLOCK_M, GU_BLOCK_N, GU_BLOCK_K, GU_EVEN_K, GU_EVEN_N, QUANT_ACT, ROUND_DTYPE,
                               GU_SWAP)
            mark_ready(ready_ptr, pair, False)
    else:
        pair, pid_n = (ticket - num_gu) // d_tiles, (ticket - num_gu) % d_tiles
        expert, valid = _expert_of(ids_ptr, pair, num_experts)
        if valid:
            wait_ready(ready_ptr, pair, gu_tiles, False)
        _down_pair_tile(pair, pid_n, expert, valid, act_ptr, w2_ptr, y_ptr, out_ptr, as_ptr,
                        w2s_ptr, topk_w_ptr, count_ptr, H, INTER, stride_am, stride_w2e, stride_w2n, stride_ym,
                        stride_om, stride_asm, stride_w2se, stride_w2sn, FP8, QBLOCK, TOP_K, K_POW2, BLOCK_M,
                        D_BLOCK_N, D_BLOCK_K, D_SWAP, ".cg")
        if last_to_arrive(ticket_ptr + 1, num_down):  # every down tile has passed its wait: no count is read again
            offs = tl.arange(0, 128)
            for p0 in range(0, num_pairs, 128):
                tl.store(ready_ptr + p0 + offs, 0, mask=p0 + offs < num_pairs)


def gate_up_pairs(x: torch.Tensor, w13: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  cfg: GemmConfig, block_m: int, out_dtype: torch.dtype, x_scale: torch.Tensor | None = None,
                  w13_scale: torch.Tensor | None = None, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, H] (fp8 with x_scale [M, H/128] when w13 is fp8); w13: [E, 2I, H]; topk_*: [M, k].
    Returns act: [M*k, I] out_dtype, row m*k+j for choice j of token m, already times topk_weights[m, j]
    unless fp8; rows of dropped choices are unwritten. act_scale: as in `gate_up` ([M*k, ceil(I/128)]).

    A grid of at most one wave (one program per multiprocessor) launches without programmatic dependent
    launch, after the kernel before (the router) has ended. In the engine on the H100 (Qwen3-30B-A3B, 8
    layers; M=1 is 96 programs), launching it early under PDL made the batch-1 decode graph 0.788-0.793 ms
    against 0.762-0.765 (3 µs a layer). Moving gate/up's trigger for down to its end did not take that back,
    and no other decode kernel gained from leaving PDL. Larger grids keep PDL: at batch 2 (384 programs) the
    engine was even without it, and back-to-back calls 2-3% slower (benchmarks/RESULTS.md, session 19)."""
    num_experts, two_i, hidden_size = w13.shape
    inter = two_i // 2
    num_pairs = topk_ids.numel()
    fp8 = x_scale is not None
    act = new_act(num_pairs, inter, out_dtype, act_scale, x.device)
    xs, ws, as_ = gate_up_scales(x, w13, act, x_scale, w13_scale, act_scale)
    grid = (num_pairs * triton.cdiv(inter, cfg.block_n),)
    _gate_up_pairs_kernel[grid](x, w13, act, as_, xs, ws, topk_ids, topk_weights, num_pairs, num_experts,
                                hidden_size, inter, topk_ids.shape[1],
                                x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), as_.stride(0),
                                xs.stride(0), ws.stride(0), ws.stride(1), **act_quant_meta(act_scale, out_dtype),
                                SWAP=cfg.swap_ab, **ptr_gemm_meta(cfg, block_m, inter, hidden_size, fp8, x.device,
                                                                  pdl=gate_up_pairs_pdl(num_pairs, inter, cfg,
                                                                                        num_sms(x.device))))
    return act


def gate_up_pairs_pdl(num_pairs: int, inter: int, cfg: GemmConfig, sms: int) -> bool:
    """Whether `gate_up_pairs` launches under programmatic dependent launch on a device of `sms`
    multiprocessors: where its grid is more than one wave (see there)."""
    return num_pairs * triton.cdiv(inter, cfg.block_n) > sms


def down_pairs(act: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
               cfg: GemmConfig, block_m: int, out: torch.Tensor, act_scale: torch.Tensor | None = None,
               w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """act: [M*k, I] from `gate_up_pairs` (fp8 with act_scale [M*k, I/128]); w2: [E, H, I]; out: [M, H], filled
    with the weighted sum over each token's valid choices. Uses M * ceil(H / cfg.block_n) completion counters
    (a count that depends on the shape only, so CUDA-graph capture reuses the eager call's buffer)."""
    num_experts, hidden_size, inter = w2.shape
    num_tokens, top_k = topk_ids.shape
    fp8 = act_scale is not None
    y = torch.empty(topk_ids.numel(), hidden_size, dtype=torch.float32, device=act.device)
    counts = completion_counters(act.device, num_tokens * triton.cdiv(hidden_size, cfg.block_n))
    as_, ws = operand_scales(act, w2, act_scale, w2_scale)
    grid = (topk_ids.numel() * triton.cdiv(hidden_size, cfg.block_n),)
    _down_pairs_kernel[grid](act, w2, y, out, as_, ws, topk_ids, topk_weights, counts, topk_ids.numel(),
                             num_experts, hidden_size, inter, act.stride(0), w2.stride(0), w2.stride(1),
                             y.stride(0), out.stride(0), as_.stride(0), ws.stride(0), ws.stride(1), FP8=fp8,
                             QBLOCK=GROUP, TOP_K=top_k, K_POW2=_pow2_at_least_2(top_k),
                             BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SWAP=cfg.swap_ab,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_kwargs(act.device))
    return out


def one_launch_counters(num_tokens: int, hidden_size: int, down_block_n: int,
                        num_pairs: int) -> tuple[int, int, int]:
    """(index of the ticket, index of pair 0's ready count, counters used) of `_pairs_one_kernel` in the completion
    counters: down's per-(token, N tile) sum counters first, then the ticket, the down tiles' done count and one
    ready count per pair."""
    ticket = num_tokens * triton.cdiv(hidden_size, down_block_n)
    return ticket, ticket + 2, ticket + 2 + num_pairs


def pairs_one_launch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, cfg: MoEConfig, out: torch.Tensor, act_dtype: torch.dtype,
                     x_scale: torch.Tensor | None = None, w13_scale: torch.Tensor | None = None,
                     w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`gate_up_pairs` then `down_pairs` in one launch (`_pairs_one_kernel`), the same values bit for bit.
    x: [M, H] (fp8 with x_scale [M, H/128] when w13 is fp8); w13: [E, 2I, H]; w2: [E, H, I] (w13_scale, w2_scale:
    their 128x128 block scales with fp8, act then quantised in gate/up's epilogue, which cfg must allow:
    `down_reads_gate_ups_act`); topk_*: [M, k]; out: [M, H], filled and returned; act_dtype: act's (hidden's) dtype,
    or the one it is rounded to before quantising. gate/up's warps and stages are the launch's (cfg checks
    that down's equal them)."""
    num_experts, two_i, hidden_size = w13.shape
    inter = two_i // 2
    num_tokens, top_k = topk_ids.shape
    num_pairs = topk_ids.numel()
    fp8 = x_scale is not None
    assert down_reads_gate_ups_act(cfg, fp8), "one launch needs act quantised in gate/up's epilogue"
    gu, dn = cfg.gate_up, cfg.down
    act_scale = new_act_scale(num_pairs, inter, x.device) if fp8 else None
    act = new_act(num_pairs, inter, act_dtype, act_scale, x.device)
    y = torch.empty(num_pairs, hidden_size, dtype=torch.float32, device=x.device)
    ticket, ready, used = one_launch_counters(num_tokens, hidden_size, dn.block_n, num_pairs)
    counts = completion_counters(x.device, used)
    xs, w13s, as_ = gate_up_scales(x, w13, act, x_scale, w13_scale, act_scale)
    _, w2s = operand_scales(act, w2, act_scale, w2_scale)
    grid = (num_pairs * (triton.cdiv(inter, gu.block_n) + triton.cdiv(hidden_size, dn.block_n)),)
    _pairs_one_kernel[grid](x, w13, w2, act, y, out, xs, w13s, as_, w2s, topk_ids, topk_weights, counts,
                            counts[ticket:], counts[ready:], num_pairs, num_experts, hidden_size, inter,
                            x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), as_.stride(0), xs.stride(0),
                            w13s.stride(0), w13s.stride(1),
                            w2.stride(0), w2.stride(1), y.stride(0), out.stride(0), w2s.stride(0), w2s.stride(1),
                            FP8=fp8, QBLOCK=GROUP, TOP_K=top_k, K_POW2=_pow2_at_least_2(top_k),
                            BLOCK_M=cfg.block_m, GU_BLOCK_N=gu.block_n, GU_BLOCK_K=gu.block_k,
                            GU_EVEN_K=hidden_size % gu.block_k == 0, GU_EVEN_N=inter % gu.block_n == 0,
                            GU_SWAP=gu.swap_ab, **act_quant_meta(act_scale, act_dtype), D_BLOCK_N=dn.block_n,
                            D_BLOCK_K=dn.block_k, D_SWAP=dn.swap_ab, num_warps=gu.num_warps,
                            num_stages=gu.num_stages, **launch_kwargs(x.device))
    return out


def _pow2_at_least_2(n: int) -> int:
    """The power of two the kernels' sum over a token's k rows loads them in (tl.arange needs >= 2)."""
    return max(2, triton.next_power_of_2(n))


def fused_moe_pairs(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, cfg: MoEConfig, out: torch.Tensor, w13_scale: torch.Tensor | None = None,
                    w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The small-M path of `fused_moe.fused_moe` (cfg.pairs set), on inputs it has checked:
    hidden: [M, H]; w13: [E, 2I, H] and w2: [E, H, I] in hidden's dtype, or float8_e4m3fn with w13_scale and
    w2_scale (128x128 block scales; hidden and act are then quantised per token per 128 channels);
    topk_weights: [M, k] float32; topk_ids: [M, k] int32. Fills and returns out: [M, H] in hidden's dtype.
    Two launches ("pair"), or one ("one"; with fp8 weights where gate/up's epilogue quantises act), after the
    quantisation of hidden with fp8."""
    fp8 = w13.dtype == FP8_DTYPE
    x, xs = fp8_quant.per_token_group_quant_fp8(hidden) if fp8 else (hidden, None)
    if cfg.pairs == "one" and down_reads_gate_ups_act(cfg, fp8):
        return pairs_one_launch(x, w13, w2, topk_weights, topk_ids, cfg, out, hidden.dtype, xs, w13_scale, w2_scale)
    if not fp8:
        act = gate_up_pairs(hidden, w13, topk_weights, topk_ids, cfg.gate_up, cfg.block_m, hidden.dtype)
        return down_pairs(act, w2, topk_weights, topk_ids, cfg.down, cfg.block_m, out)
    run = functools.partial(gate_up_pairs, x, w13, topk_weights, topk_ids, cfg.gate_up, cfg.block_m, hidden.dtype,
                            xs, w13_scale)
    act, act_s = fp8_act(run, topk_ids.numel(), w2.shape[2], cfg, hidden.device)
    return down_pairs(act, w2, topk_weights, topk_ids, cfg.down, cfg.block_m, out, act_s, w2_scale)
