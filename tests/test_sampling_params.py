"""SamplingParams: input is normalised; bad values fail at construction naming field, value and rule."""

from __future__ import annotations

import math

import pytest

from moeserve.sampling_params import SamplingParams


def test_defaults_are_valid_and_sampled():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1.0, 1.0, 0, 0.0, 16)
    assert p.stop == () and p.stop_token_ids == () and p.logprobs is None and p.seed is None
    assert not p.greedy and SamplingParams(temperature=0).greedy


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=[5, 7], top_k=-1, temperature=1)
    assert p.stop == ("###",) and p.stop_token_ids == (5, 7) and p.top_k == 0
    assert isinstance(p.temperature, float)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None, stop_token_ids=None).stop == ()


def test_with_seed_copies():
    p = SamplingParams(temperature=0.7, top_k=5, seed=1, stop=["x"])
    q = p.with_seed(42)
    assert q.seed == 42 and p.seed == 1
    assert (q.temperature, q.top_k, q.stop) == (0.7, 5, ("x",))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature must be a finite number >= 0, got -1.0"),
        ({"temperature": math.nan}, "temperature must be a finite number >= 0, got nan"),
        ({"temperature": math.inf}, "temperature must be a finite number >= 0"),
        ({"temperature": "0.5"}, "temperature must be a finite number >= 0, got '0.5'"),
        ({"temperature": True}, "temperature must be a finite number >= 0, got True"),
        ({"top_p": 0.0}, "top_p must be a number in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be a number in (0, 1], got 1.5"),
        ({"top_k": -2}, "top_k must be 0 or -1 (off) or an integer >= 1, got -2"),
        ({"top_k": 2.0}, "top_k must be 0 or -1 (off) or an integer >= 1, got 2.0"),
        ({"min_p": -0.1}, "min_p must be a number in [0, 1], got -0.1"),
        ({"min_p": 1.01}, "min_p must be a number in [0, 1]"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
        ({"max_tokens": True}, "max_tokens must be an integer >= 1, got True"),
        ({"n": 0}, "n must be an integer in [1, 128], got 0"),
        ({"n": 129}, "n must be an integer in [1, 128], got 129"),
        ({"logprobs": 21}, "logprobs must be None or an integer in [0, 20], got 21"),
        ({"logprobs": -1}, "logprobs must be None or an integer in [0, 20], got -1"),
        ({"seed": 1.5}, "seed must be None or an integer"),
        ({"seed": 2**64}, "seed must be None or an integer"),
        ({"stop": [""]}, "stop must be None, a non-empty string or a list of non-empty strings"),
        ({"stop": [1]}, "stop must be None, a non-empty string"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be None or a list of non-negative integer token ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids must be"),
        ({"ignore_eos": 1}, "ignore_eos must be True or False, got 1"),
        ({"skip_special_tokens": None}, "skip_special_tokens must be True or False"),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0},
        {"temperature": 2.5, "top_p": 1e-6, "top_k": 1, "min_p": 1.0},
        {"n": 128, "logprobs": 0},
        {"logprobs": 20, "seed": -(2**63)},
        {"seed": 2**64 - 1, "max_tokens": 1},
    ],
)
def test_boundaries_are_allowed(kwargs):
    p = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(p, name) == value
