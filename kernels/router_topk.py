"""The MoE router for decode batches in one launch: logits = x @ W.T, then softmax top-k (`topk_softmax`).

At decode sizes the router GEMM reads E x H weights (0.5 MB for Qwen3-30B-A3B) for a handful of rows: the
cost is launch latency, not arithmetic, and cuBLAS plus the top-k kernel pay it twice. Here programs split the
work over (row block of 16, expert block of 16, slice of the hidden dim), so the weight read is spread over
the whole chip; each writes its fp32 partial logits to a small scratch [k_splits, T, E'], then increments its
row block's completion counter (`moeserve.kernels.counters`). The program that finishes last sums the
partials in slice order (deterministic), rounds the logits to the dtype the unfused GEMM would produce, and
runs softmax + top-k for the row block exactly as `topk_softmax` does (choice on the logits, ties to the
lowest id, padding rows id -1 weight 0).

The grid depends on (T, E, H) only; the counters reset themselves, so the kernel replays inside CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moeserve.kernels.counters import completion_counters, last_to_arrive
from moeserve.kernels.device import num_sms
from moeserve.kernels.pdl import launch_kwargs, pdl_enter
from moeserve.kernels.topk_softmax import topk_softmax_reference

# Above this many rows the unfused path (cuBLAS GEMM + `topk_softmax`) stays: every 16-row block re-reads the
# weights (from L2) and multiplies 16x16 tensor-core tiles, while cuBLAS reads x and W once with large tiles,
# so past a few hundred rows the GEMM stops being launch-bound and the two launches no longer dominate.
MAX_FUSED_TOKENS = 256
MAX_EXPERTS = 512  # the finishing program holds [16, E] logits (and int64 keys) in registers
# The choice runs in one program per 16-row block, one pick after another, where `topk_softmax` gives every
# row its own program: the fused kernel pays only while rows x padded experts x top_k stays small. Measured on
# the H100 (CUDA-graph replay, bf16, old = cuBLAS + topk_softmax): 1 x 128 x 8 = 1024 (Qwen3-30B-A3B, T=1):
# 4.5 vs 6.8 us; 16 x 16 x 2 = 512 (Mixtral, T=16..256): 4.3-4.6 vs 6.5-7.0 us; 16 x 128 x 8 = 16384
# (Qwen3, T=16..256): 7.4-14 vs 7.4-7.7 us, a loss. Nothing measured between 1024 and 16384.
MAX_SELECT_WORK = 2048

_BLOCK_T = 16  # rows per program (tl.dot needs M >= 16)
_BLOCK_E = 16  # experts per program of the GEMM part
_MIN_K_SLICE = 64  # hidden columns per program, at least
_REDUCE_BYTES = 32 * 1024  # fp32 partial logits the finishing program of a row block reads back at once
_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


_PICKED = tl.constexpr(-(2**63))  # the key of an expert already chosen: below every logit's


@triton.jit
def _softmax_topk_rows(
    Partial, Weights, Ids, NumReal, row0, num_tokens, num_experts, scale,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_EALL: tl.constexpr,
    K_SPLITS: tl.constexpr, ROUND: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_NUM_REAL: tl.constexpr,
):
    """Rows [row0, row0 + BLOCK_R): sum the partial logits over the hidden slices, softmax, top-k.
    Partial: [K_SPLITS, num_tokens, BLOCK_EALL] fp32 (rows padded to a power of two: aligned vector loads,
    and a layout that keeps each row inside one warp, so the reductions below need no shared memory)."""
    rows = row0 + tl.arange(0, BLOCK_R)
    row_ok = rows < num_tokens
    offs_e = tl.arange(0, BLOCK_EALL)
    e_ok = offs_e < num_experts
    real = row_ok
    if HAS_NUM_REAL:  # padding rows need no logits: they choose no expert
        real = row_ok & (rows < tl.load(NumReal))
    ptrs = Partial + rows[:, None] * BLOCK_EALL + offs_e[None, :]
    mask = real[:, None] & (offs_e < BLOCK_EALL)[None, :]  # whole rows: columns >= E are dropped below
    logits = tl.zeros([BLOCK_R, BLOCK_EALL], dtype=tl.float32)
    # Unrolled, so that every slice's load is in flight at once; summed in slice order (deterministic).
    # ".cg": other programs wrote these partials (see `last_to_arrive`).
    for s in tl.static_range(K_SPLITS):
        logits += tl.load(ptrs + s * (num_tokens * BLOCK_EALL), mask=mask, other=0.0, cache_modifier=".cg")
    if ROUND == 1:  # the unfused GEMM returns logits in the model dtype
        logits = logits.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        logits = logits.to(tl.bfloat16).to(tl.float32)
    logits = tl.where(e_ok[None, :], logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    denom = tl.sum(tl.exp(logits - mx[:, None]), axis=1)  # exp(-inf) = 0 for the padding experts

    # One max-reduction per choice: key = (the logit as an order-preserving int32) << 32 | (BLOCK_EALL-1-id),
    # so the largest key is the largest logit, ties going to the lowest id (`topk_softmax`'s rule; -0.0 is
    # made +0.0 first, as the comparison of floats has them equal). The weight is recomputed from the exact
    # logit the key holds: the same operations as softmax's, hence the same value.
    bits = tl.where(logits == 0.0, 0.0, logits).to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (BLOCK_EALL - 1 - offs_e).to(tl.int64)[None, :]
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(key, axis=1)
        idx = (BLOCK_EALL - 1 - (best & 0xFFFF)).to(tl.int32)
        hi = (best >> 32).to(tl.int32)
        value = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        w_j = tl.exp(value - mx) / denom
        top_w = tl.where(slots[None, :] == j, w_j[:, None], top_w)
        top_i = tl.where(slots[None, :] == j, idx[:, None], top_i)
        key = tl.where(offs_e[None, :] == idx[:, None], _PICKED, key)
    if RENORMALIZE:
        top_w = top_w / (tl.sum(top_w, axis=1)[:, None] + 1e-20)
    top_w = top_w * scale
    top_i = tl.where(real[:, None], top_i, -1)
    top_w = tl.where(real[:, None], top_w, 0.0)
    out = rows[:, None] * TOP_K + slots[None, :]
    out_mask = row_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(Weights + out, top_w, mask=out_mask)
    tl.store(Ids + out, top_i, mask=out_mask)


@triton.jit
def _router_topk_kernel(
    X, W, Partial, Counters, Weights, Ids, NumReal,
    num_tokens, hidden, num_experts, k_slice, scale,
    stride_xt, stride_we,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_EALL: tl.constexpr, K_SPLITS: tl.constexpr,
    FP32_DOT: tl.constexpr, ROUND: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_NUM_REAL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    num_e_blocks = tl.cdiv(num_experts, BLOCK_E)
    eb = tl.program_id(0) % num_e_blocks
    ks = tl.program_id(0) // num_e_blocks
    rb = tl.program_id(1)
    rows = rb * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    experts = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = experts < num_experts
    k_lo = ks * k_slice
    k_hi = tl.minimum(k_lo + k_slice, hidden)

    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        k_ok = offs_k < k_hi
        x = tl.load(X + rows[:, None] * stride_xt + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(W + experts[:, None] * stride_we + offs_k[None, :], mask=e_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if FP32_DOT:  # an fp32 router (or fp32 model): full fp32 products, as torch's fp32 GEMM
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    tl.store(Partial + ks * (num_tokens * BLOCK_EALL) + rows[:, None] * BLOCK_EALL + experts[None, :], acc,
             mask=row_ok[:, None] & e_ok[None, :])

    # The last program of this row block (every expert block and hidden slice) to arrive selects for it.
    if last_to_arrive(Counters + rb, tl.num_programs(0)):
        _softmax_topk_rows(  # BLOCK_R = BLOCK_T, or fewer when the whole batch is fewer rows
            Partial, Weights, Ids, NumReal, rb * BLOCK_T, num_tokens, num_experts, scale,
            TOP_K, BLOCK_K, BLOCK_R, BLOCK_EALL, K_SPLITS, ROUND, RENORMALIZE, HAS_NUM_REAL,
        )


def _select_tile(num_tokens: int, num_experts: int) -> tuple[int, int]:
    """(rows, experts) of the tile the finishing program of a row block selects from."""
    return min(_BLOCK_T, triton.next_power_of_2(num_tokens)), max(_BLOCK_E, triton.next_power_of_2(num_experts))


def fused_router_pays(num_tokens: int, num_experts: int, top_k: int) -> bool:
    """Whether `router_topk` beats cuBLAS + `topk_softmax` for this shape (see MAX_SELECT_WORK)."""
    rows, experts = _select_tile(num_tokens, num_experts)
    work = rows * experts * top_k
    return 0 < num_tokens <= MAX_FUSED_TOKENS and work <= MAX_SELECT_WORK


def split_plan(num_tokens: int, num_experts: int, hidden: int, sms: int) -> tuple[int, int]:
    """(k_splits, k_slice): hidden slices per (row block, expert block) and their width (a multiple of 64), on
    a device of `sms` multiprocessors.

    About one program per multiprocessor spreads the weight read (measured on the H100: twice as many was
    slower), no slice narrower than 64 columns, and no more partials per row block than the finishing
    program reads back at once (32 KB: 64 KB made Mixtral at T=16 5.7 us instead of 4.3).
    """
    row_blocks = triton.cdiv(num_tokens, _BLOCK_T)
    splits = triton.cdiv(sms, row_blocks * triton.cdiv(num_experts, _BLOCK_E))
    block_r, block_eall = _select_tile(num_tokens, num_experts)
    reduce_cap = _REDUCE_BYTES // (block_r * block_eall * 4)
    return _slices(hidden, min(splits, hidden // _MIN_K_SLICE, reduce_cap))


def warmup_token_counts(max_tokens: int, num_experts: int, hidden: int, top_k: int, sms: int) -> list[int]:
    """Token counts whose `router_topk` calls, run once each, compile every variant of its kernel that a call
    of 1..max_tokens rows takes where it pays (`fused_router_pays`), on a device of `sms` multiprocessors.

    A call's kernel depends on its T through the selection tile's rows, the hidden slices (`split_plan`) and
    Triton's specialisation of num_tokens (apart for 1 and for multiples of 16). Walking T up from 1, the
    first T of each new combination."""
    counts, seen = [], set()
    for t in range(1, min(max_tokens, MAX_FUSED_TOKENS) + 1):
        if not fused_router_pays(t, num_experts, top_k):
            continue
        variant = (t == 1, t % 16 == 0, _select_tile(t, num_experts), split_plan(t, num_experts, hidden, sms))
        if variant not in seen:
            seen.add(variant)
            counts.append(t)
    return counts


def _slices(hidden: int, splits: int) -> tuple[int, int]:
    """About ``splits`` slices of the hidden dim, each a multiple of 64 wide: (count, width)."""
    k_slice = triton.cdiv(triton.cdiv(hidden, max(1, splits)), _MIN_K_SLICE) * _MIN_K_SLICE
    return triton.cdiv(hidden, k_slice), k_slice


def router_topk(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = False,
    scaling_factor: float = 1.0,
    num_real_tokens: torch.Tensor | None = None,
    k_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router GEMM + softmax top-k in one launch (decode sizes: T <= MAX_FUSED_TOKENS).

    x:             [T, H], bf16/fp16/fp32, last dim contiguous
    router_weight: [E, H], x's dtype or float32 (an fp32 router: logits in float32 from upcast x), contiguous
    num_real_tokens: optional [1] int32 on the device; rows at and beyond it get ids -1 and weights 0.
    k_splits: slices of the hidden dim (None: `split_plan`; tests and benchmarks force others).
    Returns (topk_weights [T, k] float32, topk_ids [T, k] int32), as
    ``topk_softmax(F.linear(x, W), ...)`` in the promoted dtype of (x, W): the logits are summed in float32,
    rounded to that dtype, then chosen and weighted as `topk_softmax` does.
    """
    if x.dim() != 2 or router_weight.dim() != 2 or x.shape[1] != router_weight.shape[1]:
        raise ValueError(f"need x [T, H] and router_weight [E, H], got {tuple(x.shape)}, {tuple(router_weight.shape)}")
    if x.stride(-1) != 1 or not router_weight.is_contiguous():
        raise ValueError("x needs a contiguous last dim and router_weight must be contiguous")
    if router_weight.dtype not in (x.dtype, torch.float32) or x.dtype not in _ROUND:
        raise ValueError(f"dtypes x {x.dtype}, router_weight {router_weight.dtype}: allowed are a float dtype "
                         "for both, or float32 weights with any float x")
    t, h = x.shape
    e = router_weight.shape[0]
    if not 0 < top_k <= e <= MAX_EXPERTS or t > MAX_FUSED_TOKENS:
        raise ValueError(f"need 0 < top_k={top_k} <= num_experts={e} <= {MAX_EXPERTS} "
                         f"and num_tokens={t} <= {MAX_FUSED_TOKENS}")
    weights = torch.empty(t, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=x.device)
    if t == 0:
        return weights, ids
    splits, k_slice = split_plan(t, e, h, num_sms(x.device)) if k_splits is None else _slices(h, k_splits)
    row_blocks = triton.cdiv(t, _BLOCK_T)
    counters = completion_counters(x.device, row_blocks)
    logit_dtype = torch.promote_types(x.dtype, router_weight.dtype)
    block_r, block_eall = _select_tile(t, e)
    partial = torch.empty(splits, t, block_eall, dtype=torch.float32, device=x.device)
    has_num_real = num_real_tokens is not None
    _router_topk_kernel[(triton.cdiv(e, _BLOCK_E) * splits, row_blocks)](
        x, router_weight, partial, counters, weights, ids, num_real_tokens if has_num_real else ids,
        t, h, e, k_slice, float(scaling_factor),
        x.stride(0), router_weight.stride(0),
        TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_T=_BLOCK_T, BLOCK_R=block_r, BLOCK_E=_BLOCK_E,
        BLOCK_H=min(256, triton.next_power_of_2(k_slice)), BLOCK_EALL=block_eall, K_SPLITS=splits,
        FP32_DOT=logit_dtype == torch.float32, ROUND=_ROUND[logit_dtype], RENORMALIZE=renormalize,
        HAS_NUM_REAL=has_num_real,
        # The finishing program's reductions run along rows; with a row per warp they need no shared
        # memory, so the warp count follows the selection tile (a 1-row batch: one warp).
        num_warps=max(1, min(8, block_r * block_eall // 512)), **launch_kwargs(x.device),
    )
    return weights, ids


def router_topk_reference(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = False,
    scaling_factor: float = 1.0,
    num_real_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused definition: logits ``F.linear`` in the promoted dtype, then `topk_softmax_reference`;
    rows at and beyond num_real_tokens choose id -1 with weight 0."""
    dtype = torch.promote_types(x.dtype, router_weight.dtype)
    logits = F.linear(x.to(dtype), router_weight.to(dtype))
    weights, ids = topk_softmax_reference(logits, top_k, renormalize=renormalize, scaling_factor=scaling_factor)
    if num_real_tokens is not None:
        weights[num_real_tokens:] = 0.0
        ids[num_real_tokens:] = -1
    return weights, ids
