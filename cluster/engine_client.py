"""What the HTTP layer needs from an engine: the only contract between `openai_app` and the workers.

The Ray Serve wiring implements it on top of the worker group (routing each request to a DP rank); tests
implement it with a tiny deterministic fake. Nothing here imports ray or FastAPI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from moeserve.outputs import StreamChunk
    from moeserve.sampling_params import SamplingParams
    from moeserve.tokenizer import Tokenizer


class EngineUnavailable(RuntimeError):
    """The worker group is (re)starting; the request did not run and may be retried (HTTP 503)."""


class EngineOverloaded(RuntimeError):
    """The engine's queue is full; the request was refused (HTTP 429)."""


class EngineClient(Protocol):
    """An engine as the OpenAI HTTP layer sees it.

    model_name:    the id `/v1/models` lists; requests must name exactly this model.
    max_model_len: longest context (prompt + generated tokens) one request may use.
    tokenizer:     used by the HTTP layer for chat templates, prompt encoding and logprob token strings.
    """

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[StreamChunk]:
        """Run one request (params.n == 1) and yield its output as deltas until a chunk has a finish_reason.

        Implement as an async generator (`async def ...: yield ...`). May raise EngineUnavailable or
        EngineOverloaded, before the first chunk or (EngineUnavailable) mid-stream when the workers restart.
        request_id is unique among in-flight requests; the consumer closing the iterator early means the
        request is no longer wanted (the HTTP layer also calls `abort`).
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its resources; a no-op for unknown or finished ids."""
        ...

    async def stats(self) -> dict:
        """Engine statistics for /metrics and /health; raises if the engine does not answer.

        Shape: {"ranks": [{"rank": int, "num_running": int, "num_waiting": int, "kv_usage": float in [0, 1],
        "prefix_cache_hit_rate": float, "prefix_cache_hit_tokens": int, "prefix_cache_query_tokens": int,
        "num_preemptions": int}, ...], "balancedness": float | None}. Token and preemption counts are
        cumulative since the engine started.
        """
        ...
