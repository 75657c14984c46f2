"""OpenAI request parsing, conversion to SamplingParams, and logprob formatting (no HTTP)."""

from __future__ import annotations

import json
import math
import random

import pytest

from moeserve.cluster.openai_format import chat_logprobs, completion_logprobs
from moeserve.cluster.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
    per_choice_params,
    resolve_max_tokens,
    to_sampling_params,
)
from moeserve.scheduler.output import TokenLogprobs
from moeserve.testing.byte_tokenizer import write_byte_tokenizer
from moeserve.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(path)
    return Tokenizer.from_pretrained(path)


def _completion(**fields) -> CompletionRequest:
    return parse_request(CompletionRequest, json.dumps({"model": "m", "prompt": "hi", **fields}).encode())


def _chat(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(ChatCompletionRequest, json.dumps(body).encode())


def _error(fn, **fields) -> APIError:
    with pytest.raises(APIError) as info:
        fn(**fields)
    assert info.value.status_code == 400
    return info.value


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_prompt_forms(prompt):
    assert _completion(prompt=prompt).prompt == prompt


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "5"),  # strict: no string -> int coercion
        ("n", True),
        ("n", 2.0),
        ("temperature", "0.5"),
        ("stream", "yes"),
        ("prompt", [1, "a"]),
        ("prompt", [-1]),
        ("stop", [""]),
        ("top_k", -2),
        ("min_p", 1.5),
        ("logprobs", -1),
        ("seed", 2**64),
    ],
)
def test_wrong_types_and_ranges_name_the_field(field, value):
    err = _error(_completion, **{field: value})
    assert err.info.param == field and err.info.type == "invalid_request_error"
    assert field in err.info.message


def test_chat_message_errors_name_messages():
    for messages in ([], [{"role": "user"}], [{"content": "x"}], [{"role": "user", "content": 3}]):
        assert _error(_chat, messages=messages).info.param == "messages"
    err = _error(
        _chat, messages=[{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "x"}]}]
    )
    assert "messages[1]" in err.info.message and "only text" in err.info.message


def test_assistant_tool_call_without_content_is_fine():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    req = _chat(
        messages=[
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ]
    )
    rendered = [m.for_template() for m in req.messages]
    assert rendered[1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert rendered[2]["tool_call_id"] == "c1"
    parts = _chat(
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]
    )
    assert parts.messages[0].for_template() == {"role": "system", "content": "a\nb"}


def test_invalid_json_and_non_object():
    assert _error(parse_request, model=CompletionRequest, body=b"{oops").info.param is None
    assert "JSON object" in _error(parse_request, model=CompletionRequest, body=b"[]").info.message
    assert "empty" in _error(parse_request, model=CompletionRequest, body=b"  ").info.message


def test_completion_to_sampling_params():
    req = _completion(
        max_tokens=9,
        temperature=0.3,
        top_p=0.9,
        top_k=-1,
        min_p=0.1,
        seed=5,
        stop="end",
        n=3,
        logprobs=2,
        ignore_eos=True,
        stop_token_ids=[7],
        skip_special_tokens=False,
    )
    p = to_sampling_params(req)
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (
        3,
        9,
        0.3,
        0.9,
        0,
        0.1,
        5,
    )
    assert tuple(p.stop) == ("end",) and tuple(p.stop_token_ids) == (7,)
    assert (p.logprobs, p.ignore_eos, p.skip_special_tokens) == (2, True, False)
    defaults = to_sampling_params(_completion())
    assert (defaults.max_tokens, defaults.temperature, defaults.logprobs) == (16, 1.0, None)
    assert to_sampling_params(req, max_tokens=4).max_tokens == 4


def test_chat_to_sampling_params():
    assert to_sampling_params(_chat(max_tokens=5, max_completion_tokens=7)).max_tokens == 7
    assert to_sampling_params(_chat(max_tokens=5)).max_tokens == 5
    assert to_sampling_params(_chat(logprobs=True)).logprobs == 0
    assert to_sampling_params(_chat(logprobs=True, top_logprobs=4)).logprobs == 4
    assert to_sampling_params(_chat()).logprobs is None


def test_per_choice_params_offsets_seed():
    params = to_sampling_params(_completion(n=3, seed=10))
    assert [(per_choice_params(params, i).seed, per_choice_params(params, i).n) for i in range(3)] == [
        (10, 1),
        (11, 1),
        (12, 1),
    ]
    unseeded = to_sampling_params(_completion(n=2))
    assert per_choice_params(unseeded, 1).seed is None


def test_resolve_max_tokens():
    assert resolve_max_tokens(None, 10, 32, "prompt") == 22
    assert resolve_max_tokens(22, 10, 32, "prompt") == 22
    assert (
        _error(
            resolve_max_tokens, requested=23, prompt_len=10, max_model_len=32, prompt_param="prompt"
        ).info.param
        == "max_tokens"
    )
    assert (
        _error(
            resolve_max_tokens, requested=None, prompt_len=32, max_model_len=32, prompt_param="messages"
        ).info.param
        == "messages"
    )


def _random_logprobs(rng: random.Random, num: int, num_top: int) -> list[TokenLogprobs]:
    out = []
    for _ in range(num):
        top = [(rng.randrange(256), -rng.random() * 5) for _ in range(num_top)]
        out.append(TokenLogprobs(rng.randrange(32, 127), -rng.random() * 5, top))
    return out


def test_completion_logprobs_match_reference(tokenizer):
    rng = random.Random(0)
    entries = _random_logprobs(rng, 12, 4)
    entries[3].logprob = -math.inf
    lp = completion_logprobs(tokenizer, entries, 3, text_offset=5)
    tokens = [tokenizer.decode([e.token_id], skip_special_tokens=False) for e in entries]
    assert lp.tokens == tokens
    assert lp.token_logprobs[3] == -9999.0
    assert lp.token_logprobs[:3] == [e.logprob for e in entries[:3]]
    offsets = [5]
    for t in tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    for e, token, top in zip(entries, tokens, lp.top_logprobs):
        expected = {tokenizer.decode([t], skip_special_tokens=False): max(v, -9999.0) for t, v in e.top[:3]}
        expected.setdefault(token, max(e.logprob, -9999.0))
        assert top == expected
    json.dumps(lp.model_dump())  # finite numbers only: valid JSON


def test_chat_logprobs_match_reference(tokenizer):
    entries = _random_logprobs(random.Random(1), 6, 5)
    out = chat_logprobs(tokenizer, entries, 2)
    for e, entry in zip(entries, out):
        token = tokenizer.decode([e.token_id], skip_special_tokens=False)
        assert (entry.token, entry.logprob, entry.bytes) == (token, e.logprob, list(token.encode()))
        assert [(t.token, t.logprob) for t in entry.top_logprobs] == [
            (tokenizer.decode([t], skip_special_tokens=False), v) for t, v in e.top[:2]
        ]


def test_chat_logprob_bytes_of_partial_characters(tokenizer):
    """Tokens holding part of a UTF-8 character report their exact bytes, so clients can rebuild the text."""
    text = "né€😀"
    ids = tokenizer.encode(text, add_special_tokens=False)  # byte-level: one token per byte
    entries = [TokenLogprobs(t, -1.0, []) for t in ids]
    out = chat_logprobs(tokenizer, entries, 0)
    assert bytes(b for e in out for b in e.bytes).decode("utf-8") == text
    assert any(e.token == "\ufffd" for e in out)  # the token strings alone could not say
