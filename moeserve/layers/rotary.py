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

from moeserve.backend_choice import fused_kernels_available
from moeserve.models.config import RopeScaling, yarn_mscale

# (k_cache, v_cache, slot_mapping): where an attention layer's backend stores the step's k and v
# (`moeserve.kernels.qkv_rope.KVCache`, without importing Triton).
KVCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# (v, k_cache, v_cache, slot_mapping): v and where it and k go (`RopeCache.apply_qk`'s store;
# `moeserve.kernels.kv_store.KVWrite`'s fields, without importing Triton).
KVStore = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


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
    """What rotating one batch needs. positions: [num_tokens] int64; inv_freq: [rotary_dim // 2] float32.

    cos, sin: [num_tokens, rotary_dim // 2] float32 (attention factor included) on the torch path; None on
    the fused path, whose Triton kernel computes them from positions and inv_freq itself, so a step builds
    no cos/sin tensors at all (fewer launches in a captured decode graph).
    """

    positions: torch.Tensor
    inv_freq: torch.Tensor
    attention_factor: float
    interleaved: bool
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    @property
    def fused(self) -> bool:
        return self.cos is None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, heads, rotary_dim] -> same shape and dtype, rotated (in float32)."""
        if self.fused and x.stride(-1) == 1:
            from moeserve.kernels.rope import apply_rope

            return apply_rope(
                x, None, self.positions, self.inv_freq, self.attention_factor, interleaved=self.interleaved
            )[0]
        cos, sin = self._cos_sin()
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
        else:
            x1, x2 = xf.chunk(2, dim=-1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def apply_qk(
        self, q: torch.Tensor, k: torch.Tensor, q_norm: nn.Module | None, k_norm: nn.Module | None,
        store: KVStore | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """q: [T, Hq, head_dim], k: [T, Hk, head_dim] -> (q, k, stored): both per-head RMS-normalised (when
        q_norm / k_norm, `RMSNorm` modules, are given) and rotated. The fused path runs one kernel and writes
        into q and k (callers pass fresh projection outputs); the torch path returns new tensors.
        store: (v, k_cache, v_cache, slot_mapping), where the caller's attention backend stores k and v next
        (`AttentionBackend.write_kv`). The fused kernel stores them there itself where the layouts allow, and
        stored says whether it did (the caller then skips its own write)."""
        if self._fusable(q, k, q_norm, k_norm):
            from moeserve.kernels.kv_store import KVWrite
            from moeserve.kernels.rope import apply_rope, kv_write_fits

            kv_write = KVWrite(*store) if store is not None else None
            if kv_write is not None and not kv_write_fits(k, kv_write):
                kv_write = None
            q, k = apply_rope(
                q, k, self.positions, self.inv_freq, self.attention_factor,
                interleaved=self.interleaved,
                q_norm_weight=q_norm.weight if q_norm is not None else None,
                k_norm_weight=k_norm.weight if k_norm is not None else None,
                eps=q_norm.eps if q_norm is not None else 1e-6,
                inplace=True,
                kv_write=kv_write,
            )
            return q, k, kv_write is not None
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return self.apply(q), self.apply(k), False

    def fused_qk(self, q_norm: nn.Module | None, k_norm: nn.Module | None, dtype: torch.dtype) -> bool:
        """Whether the Triton kernels normalise and rotate q and k of this dtype with these norms (`apply_qk`'s
        fused path, `kernels/qkv_rope.py`)."""
        if not self.fused:
            return False
        if q_norm is None:
            return k_norm is None
        # One eps per launch, and weights in the activation dtype (else torch would promote the output).
        return k_norm is not None and q_norm.eps == k_norm.eps and q_norm.weight.dtype == dtype == k_norm.weight.dtype

    def _fusable(self, q: torch.Tensor, k: torch.Tensor, q_norm: nn.Module | None, k_norm: nn.Module | None) -> bool:
        return q.stride(-1) == 1 and k.stride(-1) == 1 and k.dtype == q.dtype and self.fused_qk(q_norm, k_norm, q.dtype)

    def _cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is not None:
            return self.cos, self.sin
        return rope_cos_sin(self.positions, self.inv_freq, self.attention_factor)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] int64, inv_freq: [R // 2] float32 -> cos, sin: [T, R // 2] float32 (times the factor)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


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
        """positions: [num_tokens] int64 -> RopeCache (cos/sin include YaRN's attention factor).

        On CUDA with Triton this launches nothing: the rotary kernel derives cos/sin from the positions."""
        inv_freq = self.inv_freq.to(device=positions.device, dtype=torch.float32)
        if positions.dim() == 1 and positions.stride(0) != 1:
            positions = positions.contiguous()
        rope = RopeCache(positions, inv_freq, self.attention_factor, self.interleaved)
        if not fused_kernels_available(positions):
            rope.cos, rope.sin = rope_cos_sin(positions, inv_freq, self.attention_factor)
        return rope
