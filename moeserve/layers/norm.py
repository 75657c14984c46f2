"""RMSNorm, computed in float32 whatever the activation dtype (as every supported family does).

On CUDA (when Triton imports) the norm, and the residual add before it, run as one Triton kernel
(`moeserve.kernels.norm`) with the same rounding steps; elsewhere the torch code below runs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.backend_choice import fused_kernels_available


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)); normalises over the last dim.

    x: [..., dim] in any float dtype; the normalisation runs in float32 and is cast back before the weight
    multiplies it (the order the HF implementations use, so bf16 results match them bit for bit).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_kernels_available(x) and x.stride(-1) == 1:
            from moeserve.kernels.norm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        return self._torch_norm(x)

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-norm block step: r = x + residual (in x's dtype), returns (norm(r), r).

        x, residual: [num_tokens, dim]; residual None means x is the stream itself (first layer): (norm(x), x).
        """
        if residual is None:
            return self(x), x
        if fused_kernels_available(x) and x.stride(-1) == 1 and residual.is_contiguous():
            from moeserve.kernels.norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual=residual)
        r = x + residual
        return self._torch_norm(r), r

    def _torch_norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
