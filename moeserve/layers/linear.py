"""Linear and embedding layers whose weights start uninitialised: every weight comes from a checkpoint, so
random initialisation would only cost time (minutes for large expert-parallel shards)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.backend_choice import fused_kernels_available


class Linear(nn.Linear):
    """nn.Linear (y = x @ weight.T + bias; weight: [out, in]) without initialisation.

    On CUDA, decode-size inputs (at most 16 rows of 16-bit floats) run through the one-launch Triton kernel
    `moeserve.kernels.skinny_gemm` instead of cuBLAS (faster at these sizes, and it takes part in programmatic
    dependent launch); everything else, and every CPU run, is plain F.linear.
    """

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_kernels_available(x):
            from moeserve.kernels.skinny_gemm import skinny_linear, skinny_ok

            if skinny_ok(x, self.weight):
                return skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding (weight: [vocab, hidden]) without initialisation."""

    def reset_parameters(self) -> None:
        pass
