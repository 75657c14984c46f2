"""Expert selection: router logits -> (top-k weights, top-k logical expert ids), as each family defines it.

Mixtral            softmax, top-k, renormalise.
Qwen2/Qwen3-MoE    softmax, top-k, renormalise iff norm_topk_prob.
DeepSeek-V2        softmax; "greedy" top-k, or "group_limited_greedy" (groups ranked by their best expert,
                   top-k among the best topk_group groups); weights x routed_scaling_factor.
DeepSeek-V3        sigmoid; "noaux_tc": choose with scores + correction bias, groups ranked by the sum
                   of their two best biased scores; weights are the unbiased scores of the chosen
                   experts, renormalised, x routed_scaling_factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.backend_choice import fused_kernels_available
from moeserve.models.config import ModelConfig


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """The routing options of one model (see `select_experts`)."""

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> RoutingConfig:
        return cls(
            top_k=cfg.top_k,
            scoring=cfg.scoring_func,
            renormalize=cfg.norm_topk_prob,
            topk_method=cfg.topk_method,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )


def select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = False,
    topk_method: str = "greedy",
    n_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    num_real_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E], float32 or the model dtype (upcast to float32 first); correction_bias: [E]
    float32 or None (used for choosing only).

    num_real_tokens: optional [1] int32 on the device; rows at and beyond it are padding and choose no expert
    (ids -1, weights 0), so padded decode graphs read no expert weights for them.

    Returns (topk_weights [T, k] float32, topk_ids [T, k] int32 logical expert ids). The order of the k
    choices within a row is unspecified. On CUDA, softmax + greedy without a bias runs as one Triton kernel
    (and at decode sizes `MoELayer.route` fuses the router GEMM into it: see `fused_router_applies`).
    """
    if _topk_softmax_covers(
        router_logits, router_logits.shape[-1], top_k,
        scoring=scoring, topk_method=topk_method, correction_bias=correction_bias,
    ):
        from moeserve.kernels.topk_softmax import topk_softmax

        return topk_softmax(
            router_logits, top_k, renormalize=renormalize, scaling_factor=routed_scaling_factor,
            num_real_tokens=num_real_tokens,
        )
    logits = router_logits.float()
    if scoring == "softmax":
        scores = logits.softmax(dim=-1)
    elif scoring == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"scoring={scoring!r}; allowed: 'softmax', 'sigmoid'")
    choice = scores if correction_bias is None else scores + correction_bias.float()[None, :]
    if topk_method == "greedy":
        pass
    elif topk_method in ("group_limited_greedy", "noaux_tc"):
        if not n_group or not topk_group:
            raise ValueError(f"topk_method={topk_method!r} needs n_group and topk_group")
        choice = _mask_to_best_groups(choice, n_group, topk_group, by_top2_sum=topk_method == "noaux_tc")
    else:
        raise ValueError(
            f"topk_method={topk_method!r}; allowed: 'greedy', 'group_limited_greedy', 'noaux_tc'"
        )
    topk_ids = choice.topk(top_k, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    if routed_scaling_factor != 1.0:
        topk_weights = topk_weights * routed_scaling_factor
    topk_ids = topk_ids.to(torch.int32)
    if num_real_tokens is not None:
        pad = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None] >= num_real_tokens
        topk_ids, topk_weights = topk_ids.masked_fill(pad, -1), topk_weights.masked_fill(pad, 0.0)
    return topk_weights, topk_ids


def _topk_softmax_covers(
    x: torch.Tensor,
    num_experts: int,
    top_k: int,
    *,
    scoring: str,
    topk_method: str,
    correction_bias: torch.Tensor | None,
) -> bool:
    """Whether `moeserve.kernels.topk_softmax` computes `select_experts`' choice: softmax scoring, greedy,
    no correction bias, on CUDA with Triton, x 2-D with contiguous rows, 0 < top_k <= num_experts <=
    its MAX_EXPERTS.

    x: the kernel's input rows, [T, E] router logits (or [T, H] router input for `fused_router_applies`).
    """
    if scoring != "softmax" or topk_method != "greedy" or correction_bias is not None:
        return False
    if not fused_kernels_available(x):
        return False
    from moeserve.kernels.topk_softmax import MAX_EXPERTS

    return x.dim() == 2 and x.stride(-1) == 1 and 0 < top_k <= num_experts <= MAX_EXPERTS


def fused_router_applies(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    *,
    scoring: str,
    topk_method: str,
    correction_bias: torch.Tensor | None,
) -> bool:
    """Whether `moeserve.kernels.router_topk.router_topk` may compute the logits ``x @ router_weight.T`` and
    `select_experts`' choice in one launch: for what `topk_softmax` covers (`_topk_softmax_covers`), at most
    router_topk's MAX_EXPERTS experts, shapes where it is the faster path (`fused_router_pays`:
    decode-sized batches, small rows x experts x top_k) and x's dtype or fp32 weights.
    The caller also checks that nothing else reads the logits (they are never materialised).

    x: [T, H]; router_weight: [E, H].
    """
    if router_weight.dim() != 2:
        return False
    num_experts = router_weight.shape[0]
    covered = _topk_softmax_covers(
        x, num_experts, top_k, scoring=scoring, topk_method=topk_method, correction_bias=correction_bias
    )
    if not covered:
        return False
    from moeserve.kernels.router_topk import MAX_EXPERTS, fused_router_pays

    return (
        num_experts <= MAX_EXPERTS
        and fused_router_pays(x.shape[0], num_experts, top_k)
        and router_weight.is_contiguous()
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and router_weight.dtype in (x.dtype, torch.float32)
    )


def _mask_to_best_groups(
    choice: torch.Tensor, n_group: int, topk_group: int, by_top2_sum: bool
) -> torch.Tensor:
    """choice: [T, E] -> [T, E] with experts outside each token's topk_group best groups set to -inf.

    A group's rank is its best score (DeepSeek-V2) or the sum of its two best scores (DeepSeek-V3).
    """
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)
    if by_top2_sum:
        group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    best = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [T, n_group]
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(t, e)
