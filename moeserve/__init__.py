"""moeserve: serve Mixture-of-Experts LLMs with expert parallelism, on Ray.

`import moeserve` never imports ray; the Ray pieces live in `moeserve.cluster`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig", "__version__"]

if TYPE_CHECKING:
    from moeserve.config import EngineConfig
    from moeserve.engine.llm import LLM
    from moeserve.sampling_params import SamplingParams


def __getattr__(name: str):
    # Lazy, so that `import moeserve` stays cheap and light.
    if name == "LLM":
        from moeserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from moeserve.sampling_params import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from moeserve.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'moeserve' has no attribute {name!r}")
