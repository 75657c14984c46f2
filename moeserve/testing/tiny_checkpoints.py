"""Tiny random checkpoints in HF layout, written by transformers' own config and model classes.

Tests load them with moeserve and with transformers and compare; the demo model (`moeserve serve` without a
model) is one of them, a little bigger. Weights are random but not flat: initializer_range is large, norms and
biases are perturbed away from their 1/0 initial values, and DeepSeek-V3's correction bias is random, so a
weight loaded into the wrong place changes the logits and greedy tokens are well separated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from moeserve.testing.byte_tokenizer import BYTE_VOCAB_SIZE

ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "deepseek_v2")
# Exactly the byte tokenizer's vocabulary, so every token the model can produce decodes to text.
VOCAB_SIZE = BYTE_VOCAB_SIZE
DEMO_NAME = "demo-v2"

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=512,
    initializer_range=0.15,
    tie_word_embeddings=False,
)
_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128, rope_theta=10000.0)

# Per architecture: transformers config class name and its tiny shape (HF config field names).
_TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=2,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            rope_parameters=dict(_YARN, factor=2.0, original_max_position_embeddings=256),
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=2,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=None,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=1.0),
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=4,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            routed_scaling_factor=1.0,
            topk_method="greedy",
            norm_topk_prob=False,
            rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=1.0),
        ),
    ),
}

# The demo model: Qwen3-MoE, a little bigger than the test models.
_DEMO: dict[str, Any] = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=4096,
    initializer_range=0.1,
)


def build_tiny_checkpoint(
    arch: str,
    path: str | Path,
    *,
    seed: int = 0,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str | None = None,
    **overrides: Any,
) -> Path:
    """Write a random `arch` checkpoint (config.json, safetensors, tokenizer, generation_config.json) to path.

    overrides: HF config fields replacing the tiny defaults (e.g. topk_method="group_limited_greedy").
    max_shard_size: e.g. "20KB" for several shards plus model.safetensors.index.json.
    """
    import transformers

    if arch not in _TINY:
        raise ValueError(f"unknown tiny architecture {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config_cls, shape = _TINY[arch]
    fields = {**_COMMON, **shape, **_special_token_ids(), **overrides}
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    config = getattr(transformers, config_cls)(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _perturb(model, seed)
    model.to(dtype).save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    _write_tokenizer_files(out)
    return out


def demo_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """The demo model's directory, built on first use and reused afterwards.

    Lives in ``<cache_dir>/demo-v2``; cache_dir defaults to $MOESERVE_CACHE, else ~/.cache/moeserve. Built in
    a temporary sibling directory and renamed into place, so a reader never sees a half-written checkpoint and
    concurrent first uses do not clash.
    """
    base = Path(
        cache_dir or os.environ.get("MOESERVE_CACHE") or Path.home() / ".cache" / "moeserve"
    ).expanduser()
    target = base / DEMO_NAME
    if (target / "config.json").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=base))
    try:
        build_tiny_checkpoint("qwen3_moe", tmp, seed=1234, **_DEMO)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _special_token_ids() -> dict[str, int]:
    try:
        from moeserve.testing import byte_tokenizer as bt
    except ImportError:
        return {}
    return dict(bos_token_id=bt.BOS_TOKEN_ID, eos_token_id=bt.EOS_TOKEN_ID, pad_token_id=bt.PAD_TOKEN_ID)


def _write_tokenizer_files(out: Path) -> None:
    """Byte tokenizer + generation_config.json (generation stops at <|eos|> or <|im_end|>)."""
    try:
        from moeserve.testing import byte_tokenizer as bt
    except ImportError:
        return
    bt.write_byte_tokenizer(out)
    generation = {
        "bos_token_id": bt.BOS_TOKEN_ID,
        "eos_token_id": [bt.EOS_TOKEN_ID, bt.IM_END_TOKEN_ID],
        "pad_token_id": bt.PAD_TOKEN_ID,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move norms off 1, biases off 0 and DeepSeek-V3's correction bias off 0, deterministically."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
