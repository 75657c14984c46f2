"""What the engine hands to users: whole results (`RequestOutput`) and streaming deltas (`StreamChunk`)."""

from __future__ import annotations

from dataclasses import dataclass

from moeserve.scheduler.output import TokenLogprobs


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a request (index i of its n)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    logprobs: list[TokenLogprobs] | None = None


@dataclass(slots=True)
class RequestOutput:
    """A prompt and its n generated sequences. The properties read sequence 0, the usual n == 1 case."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs


@dataclass(slots=True)
class StreamChunk:
    """New output of one sequence since its previous chunk (the async engine and HTTP server stream these).

    text / token_ids / logprobs: the delta only. finish_reason is set on the last chunk of the sequence.
    num_*: running totals, so the last chunk carries the usage numbers.
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_chunks(chunks: list[StreamChunk]) -> StreamChunk:
    """Several consecutive chunks of one request as one."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    logprobs = None
    if any(c.logprobs for c in chunks):
        logprobs = [lp for c in chunks for lp in (c.logprobs or [])]
    return StreamChunk(
        request_id=last.request_id,
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        logprobs=logprobs,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        num_prompt_tokens=last.num_prompt_tokens,
        num_cached_tokens=last.num_cached_tokens,
        num_output_tokens=last.num_output_tokens,
    )
