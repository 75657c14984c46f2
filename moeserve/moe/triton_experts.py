"""Expert kernel backed by the Triton fused MoE (`moeserve.kernels.fused_moe`), for CUDA devices."""

from __future__ import annotations

import torch

from moeserve.kernels import fused_moe
from moeserve.kernels.device import num_sms
from moeserve.kernels.fp8 import FP8_DTYPE
from moeserve.kernels.fused_moe import warmup_token_counts
from moeserve.moe.experts import ExpertKernel


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
        the block sizes are then looked up for it (`fused_moe`'s num_pairs), else for M.
        Routing tensors are brought to float32 / int32 contiguous here (no copy when they already are)."""
        topk_weights = topk_weights.to(torch.float32).contiguous()
        topk_ids = topk_ids.to(torch.int32).contiguous()
        return fused_moe(hidden.contiguous(), w13, w2, topk_weights, topk_ids, w13_scale=w13_scale,
                         w2_scale=w2_scale, global_experts=self.global_experts, num_pairs=num_pairs)

    def warmup_token_counts(self, w13: torch.Tensor, max_tokens: int, top_k: int) -> list[int]:
        """Counts that reach every table entry and align variant of calls of 1..max_tokens rows
        (`moeserve.kernels.fused_moe.warmup_token_counts`)."""
        num_experts, two_i, hidden = w13.shape
        return warmup_token_counts(max_tokens, num_experts, hidden, two_i // 2, top_k, w13.dtype == FP8_DTYPE,
                                   num_sms(w13.device), global_experts=self.global_experts)
