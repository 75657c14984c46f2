"""Build a model from an HF checkpoint directory: config -> model on the device -> this rank's weights."""

from __future__ import annotations

from pathlib import Path

import torch

from moeserve.loader.checkpoint import CheckpointError, iter_safetensors, read_hf_config
from moeserve.models.base import CausalLM, ModelContext, WeightLoadError
from moeserve.models.config import ModelConfig
from moeserve.models.registry import create_model

_MAX_LISTED = 10


def load_model(path: str | Path, ctx: ModelContext) -> tuple[CausalLM, ModelConfig]:
    """Read ``path/config.json``, build the model on ctx.device in ctx.dtype and load its weights.

    Only tensors this rank needs are read (`model.wants_weight`): the dense weights and the experts of its
    local slots. Routers kept in float32 are read in float32. Raises CheckpointError when a tensor has the
    wrong shape or required tensors are missing, UnsupportedModelError for an unknown architecture.
    """
    config = ModelConfig.from_hf(read_hf_config(path))
    model = create_model(config, ctx)
    loaded: set[str] = set()
    # Two passes over the (lazily opened) files so that float32-kept tensors are never rounded to ctx.dtype.
    passes = [(ctx.dtype, lambda n: model.wants_weight(n) and not model.keeps_fp32(n))]
    if ctx.dtype != torch.float32:
        passes.append((torch.float32, lambda n: model.wants_weight(n) and model.keeps_fp32(n)))
    try:
        for dtype, wants in passes:
            loaded |= model.load_weights(iter_safetensors(path, wants=wants, dtype=dtype))
    except WeightLoadError as e:
        raise CheckpointError(f"{path}: {e}") from None
    missing = sorted(model.required_weight_names() - loaded)
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED]) + (
            f", ... ({len(missing)} in all)" if len(missing) > _MAX_LISTED else ""
        )
        raise CheckpointError(
            f"{path} is missing {len(missing)} tensor(s) {config.architecture} needs: {shown}"
        )
    return model, config
