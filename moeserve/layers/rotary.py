"""Rotary position embeddings: default, linear and YaRN frequencies; neox and interleaved-pair layouts.

Layouts. "neox" rotates the pairs (x[i], x[i + d/2]). "interleaved" (DeepSeek) rotates the pairs (x[2i],
x[2i+1]) and returns the result de-interleaved, i.e. [rotated evens | rotated odds]. That is a fixed
permutation of the interleaved result, applied alike to queries and keys, so every q.k product is unchanged;
it lets both layouts share one rotation kernel. Consequence: cached keys are only meaningful against queries
rotated the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moeserve.models.config import RopeScaling, yarn_mscale


def rope_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim // 2] float32, and the factor that multiplies cos/sin (YaRN)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq, 1.0
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor, 1.0
    return _yarn_inv_freq(rotary_dim, theta, scaling, inv_freq)


def _yarn_inv_freq(
    dim: int, theta: float, s: RopeScaling, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """YaRN: keep high frequencies (extrapolate), divide low ones by factor (interpolate), ramp in between."""

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits num_rotations times into the original context.
        return (
            dim
            * math.log(s.original_max_position_embeddings / (num_rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate (frequency / factor)
    inv_freq = (inv_freq / s.factor) * (1 - keep) + inv_freq * keep
    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(s.factor)
    return inv_freq, attention_factor


@dataclass(slots=True)
class RopeCache:
    """cos/sin of one batch's positions. cos, sin: [num_tokens, rotary_dim // 2], float32."""

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, heads, rotary_dim] -> same shape and dtype, rotated (in float32)."""
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
        else:
            x1, x2 = xf.chunk(2, dim=-1)
        cos, sin = self.cos[:, None, :], self.sin[:, None, :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Computes a batch's `RopeCache` from its positions; one instance per model."""

    def __init__(
        self, rotary_dim: int, theta: float, scaling: RopeScaling | None, interleaved: bool = False
    ) -> None:
        super().__init__()
        if rotary_dim % 2:
            raise ValueError(f"rotary dim {rotary_dim} must be even")
        inv_freq, self.attention_factor = rope_inv_freq(rotary_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)
        self.interleaved = interleaved

    def forward(self, positions: torch.Tensor) -> RopeCache:
        """positions: [num_tokens] int64 -> RopeCache (cos/sin include YaRN's attention factor)."""
        inv_freq = self.inv_freq.to(device=positions.device, dtype=torch.float32)
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return RopeCache(cos, sin, self.interleaved)
