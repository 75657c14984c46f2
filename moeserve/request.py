"""Request: one sequence as the scheduler sees it (tokens, progress in the KV cache, blocks, finish)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from moeserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from moeserve.scheduler.output import TokenLogprobs

# "stop": an end-of-sequence token, a stop token id or a stop string; "length": max_tokens or the context
# limit; "abort": the client went away or the engine cancelled it.
FinishReason = Literal["stop", "length", "abort"]


# Stands for a sampled token whose value is still on the device (see Request.num_placeholders).
PLACEHOLDER = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, never ran
    RUNNING = "running"  # holds KV blocks, scheduled each step while budget allows
    PREEMPTED = "preempted"  # lost its blocks; waits at the queue front and recomputes its whole context
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """One sequence. Invariants the scheduler keeps:

    - 0 <= num_computed_tokens <= num_tokens while unfinished; num_computed_tokens counts tokens scheduled
      for computation (advanced when a step is scheduled, so a step in flight counts as computed).
    - block_ids cover at least num_computed_tokens tokens (block i holds positions [i*B, (i+1)*B)).
    - all_token_ids == prompt_token_ids + output_token_ids + [PLACEHOLDER] * num_placeholders: a step that
      samples appends a placeholder when it is scheduled, and the sampled token replaces it when the step's
      results come back. With asynchronous scheduling the next step is scheduled before that, and feeds
      the placeholder in as its input (the runner takes the real token from the device).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None
    # Set by the scheduler when the request is added; orders the running set and picks preemption victims.
    arrival_index: int = -1
    output_token_ids: list[int] = field(default_factory=list)
    # One entry per output token when sampling_params.logprobs is not None.
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    # The stop token id or stop string that ended the request (None for eos, length and abort).
    stop_reason: int | str | None = None
    num_computed_tokens: int = 0
    # Prompt tokens found in the prefix cache when the request was first admitted (for stats and usage).
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Tokens sampled by steps whose results have not come back yet (the tail of all_token_ids).
    num_placeholders: int = 0
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.eos_token_ids = frozenset(self.eos_token_ids)
        # Kept alongside output_token_ids so that reading the whole sequence costs nothing per step.
        self._all_token_ids = self.prompt_token_ids + list(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens. Read-only: use append_output_token to extend."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus generated tokens whose values are known (placeholders excluded)."""
        return len(self._all_token_ids) - self.num_placeholders

    def add_placeholder(self) -> None:
        """A step that will sample this request's next token has been scheduled."""
        self._all_token_ids.append(PLACEHOLDER)
        self.num_placeholders += 1

    def drop_placeholders(self) -> None:
        """Forget tokens still in flight (the request finished; they will never be used)."""
        if self.num_placeholders:
            del self._all_token_ids[-self.num_placeholders :]
            self.num_placeholders = 0

    def append_output_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record a sampled token: it fills the oldest placeholder, if any, else extends the sequence."""
        self.output_token_ids.append(token_id)
        if self.num_placeholders:
            self._all_token_ids[len(self._all_token_ids) - self.num_placeholders] = token_id
            self.num_placeholders -= 1
        else:
            self._all_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
