"""Expert kernels: the grouped expert MLP (gate/up -> SiLU*mul -> down), weighted and summed over top-k.

All kernels share one call signature, the same as `moeserve.kernels.fused_moe`, so they can be swapped
and compared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F


class ExpertKernel(ABC):
    name: str = "base"

    @abstractmethod
    def __call__(
        self,
        hidden: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        num_pairs: int | None = None,
    ) -> torch.Tensor:
        """hidden: [M, H]; w13: [E, 2*I, H] (gate rows first, then up); w2: [E, H, I];
        topk_weights: [M, k] float32; topk_ids: [M, k] int32, -1 = skip this choice. num_pairs: the valid
        choices, when the caller knows the count on the host (a hint for kernels that size their tiles by the
        work: only block sizes depend on it, so results agree up to float rounding).
        Returns [M, H] in hidden's dtype: sum_j topk_weights[m, j] * expert_{topk_ids[m, j]}(hidden[m]); a row
        whose choices are all -1 gets exact zeros (dispatchers add such rows into real tokens)."""

    def warmup_token_counts(self, w13: torch.Tensor, max_tokens: int, top_k: int) -> list[int]:
        """Token counts to call this kernel at once each, at start-up, so that calls of up to max_tokens rows
        and top_k choices on these weights compile nothing later (`MoELayer.warm_up`). Kernels that compile
        nothing: none."""
        return []


def torch_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Reference: loop over experts that received tokens; accumulate in float32."""
    num_tokens, top_k = topk_ids.shape
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    if num_tokens == 0:
        return out.to(hidden.dtype)
    flat_ids = topk_ids.reshape(-1).long()
    inter = w2.shape[2]
    for e in torch.unique(flat_ids).tolist():
        if e < 0:
            continue
        rows = (flat_ids == e).nonzero(as_tuple=True)[0]
        tok = rows // top_k
        x = hidden[tok]
        gate_up = x @ w13[e].t()
        act = F.silu(gate_up[:, :inter].float()) * gate_up[:, inter:].float()
        y = act.to(hidden.dtype) @ w2[e].t()
        out.index_add_(0, tok, y.float() * topk_weights.reshape(-1)[rows, None].float())
    return out.to(hidden.dtype)


class TorchExperts(ExpertKernel):
    name = "torch"

    def __call__(self, hidden, w13, w2, topk_weights, topk_ids, *, num_pairs=None):
        return torch_experts(hidden, w13, w2, topk_weights, topk_ids)


def create_expert_kernel(name: str = "auto", device: torch.device | str = "cpu",
                         num_experts: int | None = None) -> ExpertKernel:
    """"torch" (reference), "triton" (CUDA fused MoE), "auto" (triton on CUDA when importable, else torch).

    num_experts: the model's routed (logical) expert count; the Triton kernel picks block sizes from the
    unsharded model's tuned table when a rank holds only a share of the experts and its own count has none.
    The torch kernel ignores it."""
    from moeserve.backend_choice import choose_backend

    def make_triton() -> ExpertKernel:
        from moeserve.moe.triton_experts import TritonExperts

        return TritonExperts(global_experts=num_experts)

    return choose_backend("expert kernel", name, device, TorchExperts, make_triton)
