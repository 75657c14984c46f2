"""SamplingParams: how one request's tokens are chosen, validated when built (the edge users reach)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

MAX_N = 128
MAX_LOGPROBS = 20
# torch.Generator.manual_seed accepts this range; the sampler derives per-token seeds from it.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


@dataclass(slots=True)
class SamplingParams:
    """Sampling options of one request (OpenAI / vLLM names and meanings).

    n: sequences to generate for the prompt (1..128); the engine fans them out into separate requests.
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_p: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]; 1 = off.
    top_k: keep the k most likely tokens; 0 or -1 = off (-1 is stored as 0).
    min_p: drop tokens whose probability is below min_p times the top token's, in [0, 1]; 0 = off.
    seed: makes a sampled (non-greedy) request reproducible regardless of batching; None = engine's stream.
    max_tokens: most tokens to generate (>= 1).
    stop: strings that end generation when they appear in the text (str or list -> tuple, not in the output).
    stop_token_ids: token ids that end generation (kept in token_ids; stop_reason is the id).
    ignore_eos: keep generating past the model's end-of-sequence tokens.
    logprobs: None, or the number of most likely alternatives (0..20) reported with each sampled token's
        log-probability.
    skip_special_tokens: leave special tokens out of the detokenized text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: str | list[str] | tuple[str, ...] | None = ()
    stop_token_ids: list[int] | tuple[int, ...] | None = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1, MAX_N, f"an integer in [1, {MAX_N}]")
        self.temperature = _check_number("temperature", self.temperature, "a finite number >= 0")
        if self.temperature < 0:
            _fail("temperature", self.temperature, "a finite number >= 0")
        self.top_p = _check_number("top_p", self.top_p, "a number in (0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            _fail("top_p", self.top_p, "a number in (0, 1]")
        _check_int("top_k", self.top_k, -1, None, "0 or -1 (off) or an integer >= 1")
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _check_number("min_p", self.min_p, "a number in [0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            _fail("min_p", self.min_p, "a number in [0, 1]")
        if self.seed is not None:
            allowed = f"None or an integer in [{_SEED_MIN}, {_SEED_MAX}]"
            _check_int("seed", self.seed, _SEED_MIN, _SEED_MAX, allowed)
        _check_int("max_tokens", self.max_tokens, 1, None, "an integer >= 1")
        self.stop = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_stop_token_ids(self.stop_token_ids)
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        if self.logprobs is not None:
            allowed = f"None or an integer in [0, {MAX_LOGPROBS}]"
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS, allowed)

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax (temperature 0)."""
        return self.temperature == 0.0

    def with_seed(self, seed: int | None) -> SamplingParams:
        """A copy with another seed (e.g. seed + i for the i-th of n sequences)."""
        return dataclasses.replace(self, seed=seed)


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_number(name: str, value: object, allowed: str) -> float:
    # bool is an int subclass; True as a temperature is almost certainly a bug in the caller.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, allowed)
    if not math.isfinite(value):
        _fail(name, value, allowed)
    return float(value)


def _check_int(name: str, value: object, low: int, high: int | None, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, allowed)
    if value < low or (high is not None and value > high):
        _fail(name, value, allowed)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def _normalize_stop(stop: object) -> tuple[str, ...]:
    allowed = "None, a non-empty string or a list of non-empty strings"
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        _fail("stop", stop, allowed)
    return tuple(stop)


def _normalize_stop_token_ids(ids: object) -> tuple[int, ...]:
    allowed = "None or a list of non-negative integer token ids"
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)):
        _fail("stop_token_ids", ids, allowed)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            _fail("stop_token_ids", ids, allowed)
    return tuple(ids)
