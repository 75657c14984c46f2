"""The only contract between scheduler and runner: plain data, no tensors, no devices."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeserve.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledRequest:
    """One request's work in one step.

    token_ids:      tokens computed this step (a prompt chunk, or the last sampled token when decoding).
    start_position: tokens of this request already in the KV cache (the position of token_ids[0]).
    block_ids:      the request's whole block table, covering start_position + len(token_ids) tokens.
    sample:         True when this step ends at the request's newest token, so a token is sampled.
    num_output_tokens: tokens generated so far (the sampler's seeded stream uses it as its offset).
    """

    request_id: str
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    sample: bool
    sampling_params: SamplingParams
    num_output_tokens: int = 0


@dataclass(slots=True)
class SchedulerOutput:
    step: int
    requests: list[ScheduledRequest]
    # Requests that left the running set since the last step (finished, aborted, preempted): the runner
    # drops any per-request state it keeps for them.
    dropped_request_ids: list[str] = field(default_factory=list)
    # The scheduler's own Request objects, one per entry of `requests` (the scheduler's, not the runner's:
    # `update` applies results only to the very request scheduled, even if its id was reused meanwhile).
    scheduled: list = field(default_factory=list, repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probability of the sampled token and the `top_logprobs` most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class ModelOutput:
    """What the runner hands back after a step: sampled tokens of each request that sampled.

    A list per request, so speculative decoding can accept several tokens per step.
    """

    sampled: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
