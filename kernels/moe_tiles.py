"""Pieces shared by the fused-MoE kernel modules (`fused_moe`: aligned GEMMs by pointer loads;
`fused_moe_tma`: aligned GEMMs with tiles by TMA; `fused_moe_pairs`: the small-M per-pair path): the launch
order of (block, N tile) programs and the per-block choice of tile height (`each_block`), the pointer-load gate/up
and down k loops, the epilogues (gate/up's with
optional FP8 quantisation of act), act allocation, the choice between quantising act in gate/up's epilogue or
by its own launch, and the launch constants. Kept apart so the kernel modules import them without importing
each other."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# per_token_group_quant_fp8 is looked up on its module at each call, so a test can count the launches.
from . import fp8 as fp8_quant
from .fp8 import FP8_DTYPE, GROUP, GROUP_C, quant_act_tile
from .moe_configs import GemmConfig, MoEConfig
from .pdl import launch_kwargs

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def gemm_meta(cfg: GemmConfig, block_m: int, fp8: bool, device: torch.device, pdl: bool = True) -> dict:
    """Launch constants every grouped-GEMM kernel takes, aligned or pairs (each module adds its own); pdl=False
    launches it without programmatic dependent launch (after the kernel before has ended)."""
    return dict(FP8=fp8, QBLOCK=GROUP, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **(launch_kwargs(device) if pdl else dict(USE_PDL=False)))


def act_quant_meta(act_scale: torch.Tensor | None, round_dtype: torch.dtype) -> dict:
    """gate/up's epilogue constants for `store_act`: QUANT_ACT when act_scale is given (act fp8), ROUND_DTYPE
    the dtype act is rounded to before quantising (hidden's, as the unquantised route stores act)."""
    if act_scale is None:
        return dict(QUANT_ACT=False, ROUND_DTYPE=tl.float32)  # ROUND_DTYPE unused
    return dict(QUANT_ACT=True, ROUND_DTYPE=_TL_DTYPES[round_dtype])


def ptr_gemm_meta(cfg: GemmConfig, block_m: int, n: int, k: int, fp8: bool, device: torch.device,
                  pdl: bool = True) -> dict:
    """`gemm_meta` plus the pointer-load kernels' EVEN_K / EVEN_N: K and N (the GEMM's reduction and output
    widths) are whole tiles, so loads and stores need no mask."""
    return dict(gemm_meta(cfg, block_m, fp8, device, pdl), EVEN_K=k % cfg.block_k == 0,
                EVEN_N=n % cfg.block_n == 0)


def aligned_ptr_meta(cfg: GemmConfig) -> dict:
    """The aligned pointer-load kernels' program order, tile heights and MMA orientation: GROUP_M, SHORT_M,
    MID_M, TAIL_M and SWAP (`GemmConfig.group_m`, `.short_m`, `.mid_m`, `.tail_m`, `.swap_ab`)."""
    return dict(GROUP_M=cfg.group_m, SHORT_M=cfg.short_m, MID_M=cfg.mid_m, TAIL_M=cfg.tail_m, SWAP=cfg.swap_ab)


def act_quant_fusable(cfg: MoEConfig) -> bool:
    """Whether gate/up (fp8 weights) quantises act in its epilogue: cfg.fuse_act_quant and its N tiles cover
    whole 128-channel groups (a ragged last group is handled). Otherwise act takes a separate quantisation
    launch."""
    return cfg.fuse_act_quant and cfg.gate_up.block_n % GROUP == 0


def down_reads_gate_ups_act(cfg: MoEConfig, fp8: bool) -> bool:
    """Whether down reads act as gate/up's launch writes it: not where fp8 act takes its own quantisation
    launch between them (`act_quant_fusable`). Only then can down overlap gate/up or share its launch."""
    return not fp8 or act_quant_fusable(cfg)


def overlap_applies(cfg: MoEConfig, fp8: bool) -> bool:
    """Whether down overlaps gate/up for cfg (`MoEConfig.overlap`): only where it is gate/up's very next launch
    (`down_reads_gate_ups_act`)."""
    return cfg.overlap and down_reads_gate_ups_act(cfg, fp8)


def fp8_act(run_gate_up, rows: int, inter: int, cfg: MoEConfig,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(act [rows, I] float8_e4m3fn, act_scale [rows, ceil(I/128)] float32) from run_gate_up(act_scale=...)
    (`fused_moe.gate_up` or `fused_moe_pairs.gate_up_pairs` with the other arguments bound): quantised in its
    epilogue where `act_quant_fusable(cfg)`, else returned in hidden's dtype and quantised by a separate
    launch. Same bits either way."""
    if act_quant_fusable(cfg):
        act_scale = new_act_scale(rows, inter, device)
        return run_gate_up(act_scale=act_scale), act_scale
    return fp8_quant.per_token_group_quant_fp8(run_gate_up(act_scale=None))


def operand_scales(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor | None,
                   w_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_scale, w_scale) for a GEMM launch, or (a, w) when not FP8: tensors the kernel never reads, so every
    pointer argument is a tensor."""
    return (a_scale, w_scale) if a_scale is not None else (a, w)


def gate_up_scales(x: torch.Tensor, w13: torch.Tensor, act: torch.Tensor, x_scale: torch.Tensor | None,
                   w13_scale: torch.Tensor | None,
                   act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_scale, w13_scale, act_scale) for a gate/up launch (`operand_scales`; act stands in for act_scale
    when gate/up does not quantise act)."""
    return *operand_scales(x, w13, x_scale, w13_scale), act if act_scale is None else act_scale


def new_act_scale(rows: int, inter: int, device: torch.device) -> torch.Tensor:
    """act's scales when gate/up's epilogue quantises it: [rows, ceil(I/128)] float32."""
    return torch.empty(rows, triton.cdiv(inter, GROUP), dtype=torch.float32, device=device)


def new_act(rows: int, inter: int, out_dtype: torch.dtype, act_scale: torch.Tensor | None,
            device: torch.device) -> torch.Tensor:
    """act [rows, I] out_dtype, or float8_e4m3fn when gate/up's epilogue quantises it (act_scale given), its
    scales going to act_scale [rows, ceil(I/128)] float32 (the caller checked `act_quant_fusable`)."""
    if act_scale is None:
        return torch.empty(rows, inter, dtype=out_dtype, device=device)
    want = (rows, triton.cdiv(inter, GROUP))
    assert tuple(act_scale.shape) == want and act_scale.dtype == torch.float32 and act_scale.stride(1) == 1, \
        f"act_scale must be float32 {want} with unit column stride, got {tuple(act_scale.shape)} {act_scale.dtype}"
    return torch.empty(rows, inter, dtype=FP8_DTYPE, device=device)


@triton.jit
def block_of(block_expert_ptr, num_m, num_n, GROUP_M: tl.constexpr):
    """(block, N tile, expert) of this program in grouped order: GROUP_M consecutive blocks (mostly one expert)
    share each weight tile while it is in L2. expert < 0: the block holds no pairs."""
    pid = tl.program_id(0)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    return pid_m, (pid % width) // size_m, tl.load(block_expert_ptr + pid_m)


@triton.jit
def each_block(block_fn: tl.constexpr, args, block_expert_ptr, block_rows_ptr, num_m, num_n,
               BLOCK_M: tl.constexpr, SHORT_M: tl.constexpr, MID_M: tl.constexpr, TAIL_M: tl.constexpr,
               GROUP_M: tl.constexpr):
    """The aligned GEMM kernels' program: block_fn((pid_m, pid_n, expert), *args, ROWS, ROWS2) for this
    program's block and N tile (`block_of`), nothing for a block without pairs. The tile covers ROWS + ROWS2
    slots from the block's first on, in one MMA row tile of ROWS rows and, when ROWS2 > 0, a second of ROWS2
    rows sharing each weight tile. It is the smallest height that holds the block's valid rows: SHORT_M, 2 * SHORT_M
    while below BLOCK_M, with MID_M 3 * SHORT_M (as 2 * SHORT_M + SHORT_M), else BLOCK_M (`GemmConfig.short_m`,
    `GemmConfig.mid_m`). With TAIL_M a full block whose expert's next block holds at most SHORT_M rows runs
    BLOCK_M + SHORT_M: the second tile is the next block's first slots, and the next block's own program does
    nothing (`GemmConfig.tail_m`). SHORT_M = 0 is a compile-time False: only the BLOCK_M tile is built, and the
    row count is not read. (The block's indices travel as their own tuple: Triton 3.6 cannot concatenate a tuple
    holding constexprs.)"""
    tl.static_assert(not MID_M or 4 * SHORT_M == BLOCK_M, "mid tiles need SHORT_M = BLOCK_M / 4")
    tl.static_assert(not TAIL_M or SHORT_M > 0, "tail tiles need SHORT_M")
    pid_m, pid_n, expert = block_of(block_expert_ptr, num_m, num_n, GROUP_M)
    if expert >= 0:
        block = (pid_m, pid_n, expert)
        rows = BLOCK_M
        if SHORT_M:
            rows = tl.load(block_rows_ptr + pid_m)
        if TAIL_M and _is_tail(block_expert_ptr, block_rows_ptr, pid_m, num_m, SHORT_M):
            pass  # the expert's previous block runs this one's rows as its second tile
        elif SHORT_M and rows <= SHORT_M:
            block_fn(block, *args, SHORT_M, 0)
        elif SHORT_M and 2 * SHORT_M < BLOCK_M and rows <= 2 * SHORT_M:
            block_fn(block, *args, 2 * SHORT_M, 0)
        elif MID_M and rows <= 3 * SHORT_M:
            block_fn(block, *args, 2 * SHORT_M, SHORT_M)
        elif TAIL_M and _is_tail(block_expert_ptr, block_rows_ptr, pid_m + 1, num_m, SHORT_M):
            block_fn(block, *args, BLOCK_M, SHORT_M)
        else:
            block_fn(block, *args, BLOCK_M, 0)


@triton.jit
def _is_tail(block_expert_ptr, block_rows_ptr, b, num_m, SHORT_M: tl.constexpr):
    """Whether block b is a tail (`GemmConfig.tail_m`): it holds at most SHORT_M rows and the block before it
    belongs to the same expert (only an expert's last block is partial, so that one is whole). Callers pass a
    block b or b - 1 of which has an expert, so two unused blocks never match."""
    ok = (b > 0) & (b < num_m)
    prev = tl.load(block_expert_ptr + b - 1, mask=ok, other=-1)
    short = tl.load(block_rows_ptr + b, mask=ok, other=SHORT_M + 1) <= SHORT_M
    return ok & short & (tl.load(block_expert_ptr + b, mask=ok, other=-2) == prev)


@triton.jit
def block_pairs(sorted_ptr, block_rows_ptr, pid_m, BLOCK_M: tl.constexpr, FIRST: tl.constexpr, ROWS: tl.constexpr):
    """(pair, row_ok) of ROWS slots from slot pid_m * BLOCK_M + FIRST on (FIRST >= BLOCK_M: in the blocks that
    follow, as a tail tile's): the flat pair index m*top_k+j of each valid slot (0 for padding slots, so they
    read token 0: finite values whose results are never stored) and which are valid."""
    block = pid_m + FIRST // BLOCK_M
    offs_r = FIRST % BLOCK_M + tl.arange(0, ROWS)
    row_ok = offs_r < tl.load(block_rows_ptr + block)
    return tl.load(sorted_ptr + block * BLOCK_M + offs_r, mask=row_ok, other=0), row_ok


@triton.jit
def mark_ready(ready_ptr, pid_m, NEXT: tl.constexpr):
    """gate/up's last step in a program when down overlaps it (`MoEConfig.overlap`, and the pairs path's one
    launch, where pid_m is a pair): count this program's N tile of block pid_m's act (and of block pid_m + 1's,
    NEXT: a tail tile's rows) as written. The barrier orders every thread's stores before the atomic's
    (single-thread) release, as in `counters.last_to_arrive`."""
    tl.debug_barrier()
    for b in tl.static_range(1 + NEXT):
        tl.atomic_add(ready_ptr + pid_m + b, 1, sem="release")


@triton.jit
def wait_ready(ready_ptr, pid_m, count, NEXT: tl.constexpr):
    """down's first step in a program when it overlaps gate/up (`MoEConfig.overlap`, and the pairs path's one
    launch, where pid_m is a pair): spin until all count N tiles of block pid_m's act (and block pid_m + 1's,
    NEXT) are written. The acquire, then the barrier, order every thread's later loads of act after gate/up's
    stores; the loads still bypass L1 (`down_acc`'s ACT_CACHE), which is not coherent. Between reads the program
    sleeps a little, so a multiprocessor of waiting programs does not flood L2 with reads of one counter.
    Why the spin cannot deadlock: with overlap, under programmatic dependent launch down's programs start only
    once every gate/up program has let them (a program that runs a tile does so once its block tables chose
    it) or ended, so the programs being waited on hold their multiprocessors and finish; without PDL down
    starts after gate/up ends and the counts are already whole. In the one launch a program waits only on
    lower tickets (`fused_moe_pairs._pairs_one_kernel`)."""
    for b in tl.static_range(1 + NEXT):
        while tl.atomic_add(ready_ptr + pid_m + b, 0, sem="acquire") < count:
            _nap()
    tl.debug_barrier()


@triton.jit
def _nap():
    """Sleep about half a microsecond (PTX nanosleep, sm_70 and newer). The interpreter cannot run it: there
    gate/up has ended before down starts, so a wait whose count is whole never calls it, and one that is not
    raises (which a test uses to check what down waits for)."""
    tl.inline_asm_elementwise("nanosleep.u32 500; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def store_act(act_ptr, as_ptr, act, rows, row_ok, pid_n, offs_n, stride_am, stride_asm, INTER,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, QUANT_ACT: tl.constexpr,
              ROUND_DTYPE: tl.constexpr):
    """Row rows[i] of act_ptr ([*, INTER]) gets act[i] where row_ok[i]; act: [BLOCK_M, BLOCK_N] fp32 (silu(gate)
    * up) at columns offs_n, those past INTER dropped. The aligned kernels store every row: their all-true
    row_ok folds away (the generated code is that of an unmasked store).

    QUANT_ACT (BLOCK_N a multiple of GROUP): act_ptr is float8_e4m3fn and as_ptr its [*, ceil(INTER/GROUP)]
    float32 scales, the bits `per_token_group_quant_fp8` would give for act stored in ROUND_DTYPE."""
    if QUANT_ACT:
        act, scale = quant_act_tile(act, offs_n, INTER, ROUND_DTYPE, BLOCK_M, BLOCK_N, EVEN_N)
        store_group_scales(as_ptr, scale, rows, row_ok, pid_n, stride_asm, INTER, BLOCK_N, EVEN_N)
    out_ptrs = act_ptr + rows[:, None].to(tl.int64) * stride_am + offs_n[None, :]
    if EVEN_N:
        tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < INTER))


@triton.jit
def store_group_scales(as_ptr, scale, rows, row_ok, pid_n, stride_asm, INTER, BLOCK_N: tl.constexpr,
                       EVEN_N: tl.constexpr):
    """as[rows[i], pid_n * G + g] = scale[i, g] (scale: [len(rows), G = BLOCK_N // GROUP]) where row_ok[i],
    for the groups that start below INTER."""
    groups = pid_n * (BLOCK_N // GROUP_C) + tl.arange(0, BLOCK_N // GROUP_C)
    ptrs = as_ptr + rows[:, None].to(tl.int64) * stride_asm + groups[None, :]
    if EVEN_N:
        tl.store(ptrs, scale, mask=row_ok[:, None])
    else:
        tl.store(ptrs, scale, mask=row_ok[:, None] & (groups[None, :] * GROUP_C < INTER))


@triton.jit
def store_down(y_ptr, acc, topk_w_ptr, pair, row_ok, offs_n, stride_ym, N):
    """y[pair, n] = topk_weight[pair] * acc for the block's valid rows (padding rows write nothing)."""
    acc *= tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + pair[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def gate_up_acc(x_ptr, w_ptr, xs_ptr, ws_ptr, token, token2, expert, offs_nw, K, INTER,
                stride_xm, stride_we, stride_wn, stride_xsm, stride_wse, stride_wsn,
                FP8: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ROWS2: tl.constexpr, SWAP: tl.constexpr):
    """(x[token] . w13[e, n], x[token] . w13[e, INTER + n]) in fp32, [BLOCK_M, BLOCK_N] each, then the same two
    for the rows token2 [ROWS2] of a second MMA row tile that shares each weight tile (ROWS2 = 0: none; the last
    two results are then the first two's initial zeros, unused). SWAP: the MMAs run transposed, weight rows on
    the MMA's M side and tokens on its N side, whose granularity is 8 rather than 64. FP8: each k step's MMA
    result is scaled by its token-group and weight-block scales into the accumulator (`_scaled_mma`)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_nw[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + INTER * stride_wn
    acc_g = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
    acc_u = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
    acc_g2, acc_u2 = acc_g, acc_u
    if ROWS2:
        a2_ptrs = x_ptr + token2[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        acc_g2 = _acc_zeros(ROWS2, BLOCK_N, SWAP)
        acc_u2 = _acc_zeros(ROWS2, BLOCK_N, SWAP)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kk * BLOCK_K
        a = _load_k_step(a_ptrs, k_ok, EVEN_K, 1, "")
        g = _load_k_step(g_ptrs, k_ok, EVEN_K, 0, "")
        u = _load_k_step(u_ptrs, k_ok, EVEN_K, 0, "")
        if ROWS2:
            a2 = _load_k_step(a2_ptrs, k_ok, EVEN_K, 1, "")
        if FP8:
            # BLOCK_K divides QBLOCK, so one scale group covers the whole k step.
            grp = kk * BLOCK_K // QBLOCK
            a_s = tl.load(xs_ptr + token * stride_xsm + grp)
            ws_base = ws_ptr + expert * stride_wse + grp
            g_s = tl.load(ws_base + (offs_nw // QBLOCK) * stride_wsn)
            u_s = tl.load(ws_base + ((offs_nw + INTER) // QBLOCK) * stride_wsn)
            acc_g = _scaled_mma(a, g, acc_g, a_s, g_s, SWAP)
            acc_u = _scaled_mma(a, u, acc_u, a_s, u_s, SWAP)
            if ROWS2:
                a2_s = tl.load(xs_ptr + token2 * stride_xsm + grp)
                acc_g2 = _scaled_mma(a2, g, acc_g2, a2_s, g_s, SWAP)
                acc_u2 = _scaled_mma(a2, u, acc_u2, a2_s, u_s, SWAP)
        else:
            acc_g = _mma(a, g, acc_g, SWAP)
            acc_u = _mma(a, u, acc_u, SWAP)
            if ROWS2:
                acc_g2 = _mma(a2, g, acc_g2, SWAP)
                acc_u2 = _mma(a2, u, acc_u2, SWAP)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
        if ROWS2:
            a2_ptrs += BLOCK_K
    return _unswap(acc_g, SWAP), _unswap(acc_u, SWAP), _unswap(acc_g2, SWAP), _unswap(acc_u2, SWAP)


@triton.jit
def _load_k_step(ptrs, k_ok, EVEN_K: tl.constexpr, K_AXIS: tl.constexpr, CACHE: tl.constexpr):
    """One k step's tile at ptrs: token rows [ROWS, BLOCK_K] (K_AXIS 1) or weight columns [BLOCK_K, BLOCK_N]
    (K_AXIS 0). Unmasked where K is whole tiles (EVEN_K), else zeros where k_ok [BLOCK_K] is False. CACHE: the
    load's cache modifier (".cg": from L2, past the multiprocessor's L1)."""
    if EVEN_K:
        tile = tl.load(ptrs, cache_modifier=CACHE)
    elif K_AXIS == 1:
        tile = tl.load(ptrs, mask=k_ok[None, :], other=0.0, cache_modifier=CACHE)
    else:
        tile = tl.load(ptrs, mask=k_ok[:, None], other=0.0, cache_modifier=CACHE)
    return tile


@triton.jit
def _acc_zeros(ROWS: tl.constexpr, COLS: tl.constexpr, SWAP: tl.constexpr):
    """An fp32 accumulator for a [ROWS, COLS] result: [COLS, ROWS] when SWAP (see `_mma`)."""
    if SWAP:
        acc = tl.zeros((COLS, ROWS), dtype=tl.float32)
    else:
        acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    return acc


@triton.jit
def _mma(a, b, acc, SWAP: tl.constexpr):
    """acc + a . b (a: [ROWS, K] tokens, b: [K, COLS] weights); SWAP: acc + (a . b)^T, the MMA run as b^T . a^T."""
    if SWAP:
        acc = tl.dot(tl.trans(b), tl.trans(a), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _scaled_mma(a, b, acc, a_s, b_s, SWAP: tl.constexpr):
    """acc + (a . b) * a_s[:, None] * b_s[None, :] (a: [ROWS, K] fp8 tokens with scales a_s [ROWS], b: [K, COLS]
    fp8 weights with scales b_s [COLS]: one k step of a block-scaled GEMM); SWAP: transposed as in `_mma`, acc
    [COLS, ROWS], so the weight scales run along its rows and the token scales along its columns."""
    if SWAP:
        acc += tl.dot(tl.trans(b), tl.trans(a)) * (b_s[:, None] * a_s[None, :])
    else:
        acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])
    return acc


@triton.jit
def _unswap(acc, SWAP: tl.constexpr):
    """`_mma`'s accumulator as [ROWS, COLS]."""
    if SWAP:
        acc = tl.trans(acc)
    return acc


@triton.jit
def down_acc(act_ptr, w_ptr, as_ptr, ws_ptr, rows, rows2, expert, offs_nw, K, k_steps,
             stride_am, stride_we, stride_wn, stride_asm, stride_wse, stride_wsn,
             FP8: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ROWS2: tl.constexpr, SWAP: tl.constexpr,
             ACT_CACHE: tl.constexpr):
    """act[rows] . w2[expert, offs_nw] over the first k_steps BLOCK_K steps of K, fp32 [BLOCK_M, BLOCK_N], then
    the same for the rows rows2 [ROWS2] of a second MMA row tile that shares each weight tile (ROWS2 = 0: none;
    the second result is then the first's initial zeros, unused). SWAP and FP8: as in `gate_up_acc`.
    ACT_CACHE: the cache modifier of the loads of act and its scales. ".cg" (from L2, past the multiprocessor's
    L1, which is not coherent) where gate/up may still have been writing them when this program started
    (`wait_ready`). Triton honours it for the pipelined act tiles only where each asynchronous copy moves 16
    bytes (so it does at the tables' tiles); the acquire in `wait_ready` is what orders the loads after
    gate/up's stores either way. Elsewhere "": an fp8 act scale (4 bytes a row) loaded ".cg" is not pipelined,
    which cost small-M fp8 calls up to a fifth of their time (benchmarks/RESULTS.md, session 17). Each k step
    asks for the next step's act scales before its MMA, so a ".cg" round trip overlaps it."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_nw[None, :] * stride_wn + offs_k[:, None]
    acc = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
    acc2 = acc
    if ROWS2:
        a2_ptrs = act_ptr + rows2[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        acc2 = _acc_zeros(ROWS2, BLOCK_N, SWAP)
    if FP8:  # act scales one k step ahead: a ".cg" load's L2 round trip then overlaps a step's MMA
        last_grp = tl.cdiv(K, QBLOCK) - 1
        a_s = tl.load(as_ptr + rows * stride_asm, cache_modifier=ACT_CACHE)
        a2_s = a_s
        if ROWS2:
            a2_s = tl.load(as_ptr + rows2 * stride_asm, cache_modifier=ACT_CACHE)
    for kk in range(0, k_steps):
        k_ok = offs_k < K - kk * BLOCK_K
        a = _load_k_step(a_ptrs, k_ok, EVEN_K, 1, ACT_CACHE)
        b = _load_k_step(b_ptrs, k_ok, EVEN_K, 0, "")
        if ROWS2:
            a2 = _load_k_step(a2_ptrs, k_ok, EVEN_K, 1, ACT_CACHE)
        if FP8:
            grp = kk * BLOCK_K // QBLOCK
            nxt = tl.minimum((kk + 1) * BLOCK_K // QBLOCK, last_grp)
            a_s_next = tl.load(as_ptr + rows * stride_asm + nxt, cache_modifier=ACT_CACHE)
            b_s = tl.load(ws_ptr + expert * stride_wse + (offs_nw // QBLOCK) * stride_wsn + grp)
            acc = _scaled_mma(a, b, acc, a_s, b_s, SWAP)
            a_s = a_s_next
            if ROWS2:
                a2_s_next = tl.load(as_ptr + rows2 * stride_asm + nxt, cache_modifier=ACT_CACHE)
                acc2 = _scaled_mma(a2, b, acc2, a2_s, b_s, SWAP)
                a2_s = a2_s_next
        else:
            acc = _mma(a, b, acc, SWAP)
            if ROWS2:
                acc2 = _mma(a2, b, acc2, SWAP)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        if ROWS2:
            a2_ptrs += BLOCK_K
    return _unswap(acc, SWAP), _unswap(acc2, SWAP)
