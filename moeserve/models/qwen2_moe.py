"""Qwen2-MoE: GQA with q/k/v bias; softmax top-k routing; a shared expert scaled by a sigmoid gate."""

from __future__ import annotations

from moeserve.layers.mlp import GatedMLP
from moeserve.models.base import CausalLM
from moeserve.moe.layer import MoELayer


class Qwen2MoeForCausalLM(CausalLM):
    def build_moe(self, i: int, moe_ordinal: int) -> MoELayer:
        c = self.config
        shared = (
            GatedMLP(c.hidden_size, c.shared_expert_intermediate_size)
            if c.shared_expert_intermediate_size
            else None
        )
        return self._moe_layer(
            moe_ordinal, shared_mlp=shared, shared_name="shared_expert", shared_gate=shared is not None
        )
