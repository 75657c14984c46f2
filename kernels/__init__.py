"""Triton kernels, each with a pure-torch reference. Imports torch and triton only."""

from .fp8 import per_token_group_quant_fp8, quant_weight_block_fp8
from .fused_moe import fused_moe
from .moe_configs import GemmConfig, MoEConfig
from .moe_reference import moe_reference

__all__ = [
    "GemmConfig",
    "MoEConfig",
    "fused_moe",
    "moe_reference",
    "per_token_group_quant_fp8",
    "quant_weight_block_fp8",
]
