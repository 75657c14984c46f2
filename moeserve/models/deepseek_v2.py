"""DeepSeek-V2 and -V3: MLA attention, first_k_dense_replace dense layers, shared experts, float32 router.

V2 routes softmax greedy / group-limited; V3 routes sigmoid + correction bias over groups ("noaux_tc").
Both are driven by ModelConfig's routing fields, so one class serves both. V3 checkpoints carry multi-token
prediction layers (model.layers.{num_layers}.*); they are not part of this model and are never read.
"""

from __future__ import annotations

from moeserve.layers.attention import MLAAttention
from moeserve.layers.mlp import GatedMLP
from moeserve.models.base import CausalLM
from moeserve.moe.layer import MoELayer


class DeepseekV2ForCausalLM(CausalLM):
    def build_attention(self, i: int) -> MLAAttention:
        c = self.config
        return MLAAttention(
            c.hidden_size,
            c.num_heads,
            c.q_lora_rank,
            c.kv_lora_rank,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            self.ctx.attention,
            scale=c.attention_scale,
            bias=c.qkv_bias,
        )

    def build_moe(self, i: int, moe_ordinal: int) -> MoELayer:
        c = self.config
        shared_width = c.num_shared_experts * c.moe_intermediate_size
        shared = GatedMLP(c.hidden_size, shared_width) if shared_width else None
        return self._moe_layer(
            moe_ordinal,
            gate_fp32=True,
            correction_bias=c.topk_method == "noaux_tc",
            shared_mlp=shared,
            shared_name="shared_experts",
        )


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    pass
