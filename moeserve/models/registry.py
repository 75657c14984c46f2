"""Architecture name (config.json "architectures"[0]) -> model class, and model construction."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from moeserve.models.base import CausalLM, ModelContext
from moeserve.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError

_MODELS = {
    "Qwen3MoeForCausalLM": ("moeserve.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": ("moeserve.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "MixtralForCausalLM": ("moeserve.models.mixtral", "MixtralForCausalLM"),
    "DeepseekV2ForCausalLM": ("moeserve.models.deepseek_v2", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("moeserve.models.deepseek_v2", "DeepseekV3ForCausalLM"),
}
assert set(_MODELS) == set(SUPPORTED_ARCHITECTURES)


def get_model_class(architecture: str) -> type[CausalLM]:
    if architecture not in _MODELS:
        raise UnsupportedModelError(
            f"architecture {architecture} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)


def create_model(config: ModelConfig, ctx: ModelContext) -> CausalLM:
    """Build the model with uninitialised weights on ctx.device in ctx.dtype (the router stays float32 where
    the family keeps it so), in eval mode with gradients off. Load weights afterwards."""
    cls = get_model_class(config.architecture)
    with torch.device(ctx.device), _default_dtype(ctx.dtype):
        model = cls(config, ctx)
    return model.eval().requires_grad_(False)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
