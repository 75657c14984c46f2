"""Linear and embedding layers whose weights start uninitialised: every weight comes from a checkpoint, so
random initialisation would only cost time (minutes for large expert-parallel shards)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _skinny():
    """moeserve.kernels.skinny_gemm, or None when Triton does not import."""
    try:
        from moeserve.kernels import skinny_gemm
    except ImportError:
        return None
    return skinny_gemm


class Linear(nn.Linear):
    """nn.Linear (y = x @ weight.T + bias; weight: [out, in]) without initialisation.

    On CUDA, decode-size inputs (at most 16 rows of 16-bit floats) run through the one-launch Triton kernel
    `moeserve.kernels.skinny_gemm` instead of cuBLAS (faster at these sizes, and it takes part in programmatic
    dependent launch); everything else, and every CPU run, is plain F.linear.
    """

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" and x.dim() == 2 and x.shape[0] <= 16:
            skinny = _skinny()
            if skinny is not None and skinny.skinny_ok(x, self.weight):
                return skinny.skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding (weight: [vocab, hidden]) without initialisation."""

    def reset_parameters(self) -> None:
        pass
