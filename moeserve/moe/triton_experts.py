"""Expert kernel backed by the Triton fused MoE (`moeserve.kernels.fused_moe`), for CUDA devices."""

from __future__ import annotations

import torch

from moeserve.kernels import fused_moe
from moeserve.moe.experts import ExpertKernel


def lookup_tokens(num_pairs: int, top_k: int, local_experts: int, global_experts: int | None) -> int:
    """The token count whose tuned table entry fits num_pairs choices over local_experts experts (of
    global_experts in the model; None = these are all): the tables are tuned on M tokens routed top-k
    uniformly over the model's experts, i.e. M*k/E choices per expert. Rows that an all-to-all sent here only
    because they have a choice here carry more choices per row, so their row count under-counts the work
    (measured on an H100, benchmarks/RESULTS.md: keying on it picked tiles 0.8-3% slower at EP 4 and 8 for
    256-512 tokens; near 1024 tokens, between two table entries, the two keys were within 3.4% either way)."""
    return max(1, round(num_pairs * (global_experts or local_experts) / (top_k * local_experts)))


class TritonExperts(ExpertKernel):
    """Same contract as `TorchExperts`; bf16/fp16 weights, or float8_e4m3fn weights with 128x128 block scales
    passed as w13_scale / w2_scale (see `fused_moe`)."""

    name = "triton"

    def __init__(self, global_experts: int | None = None) -> None:
        """global_experts: the model's routed (logical) expert count, for the block-size lookup when w13 holds
        only this rank's share (`moeserve.kernels.moe_configs.get_config`); None = w13 holds them all."""
        self.global_experts = global_experts

    def __call__(
        self,
        hidden: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        w13_scale: torch.Tensor | None = None,
        w2_scale: torch.Tensor | None = None,
        *,
        num_pairs: int | None = None,
    ) -> torch.Tensor:
        """hidden: [M, H]; w13: [E, 2I, H]; w2: [E, H, I]; topk_weights: [M, k]; topk_ids: [M, k], -1 = skip.
        num_pairs: the valid choices in topk_ids when the caller knows the count (`DispatchOutput.num_pairs`);
        the block sizes are then looked up for it (`lookup_tokens`), else for M.
        Routing tensors are brought to float32 / int32 contiguous here (no copy when they already are)."""
        topk_weights = topk_weights.to(torch.float32).contiguous()
        topk_ids = topk_ids.to(torch.int32).contiguous()
        key = None if num_pairs is None else lookup_tokens(num_pairs, topk_ids.shape[1], w13.shape[0],
                                                           self.global_experts)
        return fused_moe(hidden.contiguous(), w13, w2, topk_weights, topk_ids, w13_scale=w13_scale,
                         w2_scale=w2_scale, global_experts=self.global_experts, lookup_tokens=key)
