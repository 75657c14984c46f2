"""Router top-k for softmax scoring with greedy choice (Qwen2/3-MoE, Mixtral, DeepSeek-V2 "greedy").

softmax over the experts, the k largest, optionally renormalised to sum to one, times a scaling factor —
`moeserve.moe.routing.select_experts` with scoring="softmax", topk_method="greedy" and no correction bias,
in one launch instead of five or six. One program per token; the grid depends on the token count only.

Choice runs on the logits: softmax is monotonic, so the chosen set equals torch.topk's on the softmax scores
whenever those are distinct. Ties pick the lowest expert id first. Choices come out in descending order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.pdl import launch_kwargs, pdl_enter


@triton.jit
def _topk_softmax_kernel(
    Logits, Weights, Ids, NumReal,
    stride_l, num_experts, scale,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_NUM_REAL: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < num_experts
    logits = tl.load(Logits + token * stride_l + offs, mask=valid, other=float("-inf")).to(tl.float32)
    e = tl.where(valid, tl.exp(logits - tl.max(logits, axis=0)), 0.0)
    probs = e / tl.sum(e, axis=0)

    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_K], dtype=tl.int32)
    remaining = logits
    for j in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=0)
        idx = tl.min(tl.where(remaining == best, offs, BLOCK_E), axis=0)
        hit = offs == idx
        top_w = tl.where(slots == j, tl.sum(tl.where(hit, probs, 0.0), axis=0), top_w)
        top_i = tl.where(slots == j, idx, top_i)
        remaining = tl.where(hit, float("-inf"), remaining)
    if RENORMALIZE:
        top_w = top_w / (tl.sum(top_w, axis=0) + 1e-20)
    top_w = top_w * scale
    if HAS_NUM_REAL:  # a padding row chooses no expert (id -1, weight 0)
        pad = token >= tl.load(NumReal).to(tl.int64)
        top_i = tl.where(pad, -1, top_i)
        top_w = tl.where(pad, 0.0, top_w)
    out_mask = slots < TOP_K
    tl.store(Weights + token * TOP_K + slots, top_w, mask=out_mask)
    tl.store(Ids + token * TOP_K + slots, top_i, mask=out_mask)


MAX_EXPERTS = 4096  # one row must fit one program's registers


def topk_softmax(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = False,
    scaling_factor: float = 1.0,
    num_real_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] float32 (or bf16/fp16, upcast in the kernel), last dim contiguous.
    num_real_tokens: optional [1] int32 on the device; rows at and beyond it get ids -1 and weights 0.

    Returns (topk_weights [T, k] float32, topk_ids [T, k] int32): softmax probabilities of the k best
    experts, divided by their sum (+1e-20) when renormalize, times scaling_factor.
    """
    if router_logits.dim() != 2 or router_logits.stride(-1) != 1:
        raise ValueError(f"router_logits must be [T, E] with a contiguous last dim, got {router_logits.shape}")
    t, e = router_logits.shape
    if not 0 < top_k <= e or e > MAX_EXPERTS:
        raise ValueError(f"need 0 < top_k={top_k} <= num_experts={e} <= {MAX_EXPERTS}")
    weights = torch.empty(t, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=router_logits.device)
    if t:
        block_e = triton.next_power_of_2(e)
        has_num_real = num_real_tokens is not None
        _topk_softmax_kernel[(t,)](
            router_logits, weights, ids, num_real_tokens if has_num_real else ids,
            router_logits.stride(0), e, float(scaling_factor),
            TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_E=block_e, RENORMALIZE=renormalize,
            HAS_NUM_REAL=has_num_real,
            num_warps=4 if block_e >= 1024 else 2 if block_e >= 256 else 1, **launch_kwargs(router_logits.device),
        )
    return weights, ids


def topk_softmax_reference(
    router_logits: torch.Tensor, top_k: int, *, renormalize: bool = False, scaling_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch definition `topk_softmax` must match (ids as a set per row, weights in the same order)."""
    scores = router_logits.float().softmax(dim=-1)
    weights, ids = scores.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids.to(torch.int32)
