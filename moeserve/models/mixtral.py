"""Mixtral: GQA, softmax top-2 routing renormalised; experts named w1 (gate), w3 (up), w2 (down)."""

from __future__ import annotations

from moeserve.models.base import CausalLM
from moeserve.moe.layer import MoELayer


class MixtralForCausalLM(CausalLM):
    mlp_name = "block_sparse_moe"

    def build_moe(self, i: int, moe_ordinal: int) -> MoELayer:
        return self._moe_layer(moe_ordinal, expert_proj_names=("w1", "w3", "w2"))
