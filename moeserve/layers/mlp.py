"""The SiLU-gated MLP every supported family uses for dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.forward_batch import ForwardBatch
from moeserve.layers.linear import Linear


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); parameter names follow the HF checkpoints."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden]. `batch` is unused (same call as MoELayer)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
