"""Qwen3-MoE: GQA with per-head q/k RMSNorm, softmax top-k routing (renormalised iff norm_topk_prob)."""

from __future__ import annotations

from moeserve.layers.attention import GQAAttention
from moeserve.models.base import CausalLM
from moeserve.moe.layer import MoELayer


class Qwen3MoeForCausalLM(CausalLM):
    def build_attention(self, i: int) -> GQAAttention:
        c = self.config
        return GQAAttention(
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            self.ctx.attention,
            qkv_bias=c.qkv_bias,
            o_bias=c.o_proj_bias,
            qk_norm_eps=c.rms_norm_eps,
        )

    def build_moe(self, i: int, moe_ordinal: int) -> MoELayer:
        return self._moe_layer(moe_ordinal)
