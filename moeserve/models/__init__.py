"""Model definitions: ModelConfig (from HF config.json), the CausalLM base, one short file per family.

Imports are lazy so that `moeserve.layers` can use `moeserve.models.config` without import cycles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moeserve.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "KVCacheSpec",
    "ModelConfig",
    "ModelContext",
    "UnsupportedModelError",
    "create_model",
    "get_model_class",
]

if TYPE_CHECKING:
    from moeserve.models.base import CausalLM, KVCacheSpec, ModelContext
    from moeserve.models.registry import create_model, get_model_class

_LAZY = {
    "CausalLM": "moeserve.models.base",
    "KVCacheSpec": "moeserve.models.base",
    "ModelContext": "moeserve.models.base",
    "create_model": "moeserve.models.registry",
    "get_model_class": "moeserve.models.registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moeserve.models' has no attribute {name!r}")
