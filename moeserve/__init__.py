"""moeserve: serve Mixture-of-Experts LLMs with expert parallelism, on Ray.

`import moeserve` never imports ray; the Ray pieces live in `moeserve.cluster`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# In a source tree (e.g. a Ray job's --working-dir), cluster/, eplb/ and kernels/ sit beside this folder:
# import them from that same tree as moeserve.cluster / .eplb / .kernels, as the installed package maps them.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
if (_SOURCE_ROOT / "cluster" / "launch.py").is_file():
    __path__.append(str(_SOURCE_ROOT))
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
