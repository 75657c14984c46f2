"""Qwen3-MoE: GQA with per-head q/k RMSNorm, softmax top-k routing (renormalised iff norm_topk_prob)."""

from __future__ import annotations

from moeserve.models.base import CausalLM
from moeserve.moe.layer import MoELayer


class Qwen3MoeForCausalLM(CausalLM):
    def build_moe(self, i: int, moe_ordinal: int) -> MoELayer:
        return self._moe_layer(moe_ordinal)
