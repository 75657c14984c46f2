"""The OpenAI HTTP layer over real HTTP (uvicorn on 127.0.0.1), queried with the `openai` client and httpx.

The engine is a small deterministic fake that echoes the prompt back one token per chunk, so every response
is known in advance; this tests the HTTP layer only (the real engine is wired elsewhere).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from moeserve.cluster.engine_client import EngineOverloaded, EngineUnavailable  # noqa: E402
from moeserve.cluster.metrics import ServingMetrics  # noqa: E402
from moeserve.cluster.openai_app import build_openai_app  # noqa: E402
from moeserve.outputs import StreamChunk  # noqa: E402
from moeserve.scheduler.output import TokenLogprobs  # noqa: E402
from moeserve.testing.byte_tokenizer import write_byte_tokenizer  # noqa: E402
from moeserve.tokenizer import Tokenizer  # noqa: E402
from tests.net import serving  # noqa: E402

API_KEY = "test-key"
MODEL = "tiny-echo"
MAX_MODEL_LEN = 128
CACHED = 3  # the fake reports this many prompt tokens as cached


class EchoEngine:
    """Echoes the prompt's tokens back one per chunk (then stops, like an EOS).

    Magic prompts steer failures: "FAIL503", "FAIL429", "FAIL500" refuse the request, "MIDFAIL" fails
    after two chunks, "HANG" sends one chunk then waits until aborted.
    """

    model_name = MODEL
    max_model_len = MAX_MODEL_LEN

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls: dict[str, tuple[list[int], object]] = {}
        self.aborted: list[str] = []
        self._abort_events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.hanging = threading.Event()
        self.stats_ok = True

    async def generate(self, request_id, prompt_token_ids, params):
        self.calls[request_id] = (list(prompt_token_ids), params)
        prompt_text = self.tokenizer.decode(prompt_token_ids, skip_special_tokens=False)
        if "FAIL503" in prompt_text:
            raise EngineUnavailable("workers restarting")
        if "FAIL429" in prompt_text:
            raise EngineOverloaded("queue full")
        if "FAIL500" in prompt_text:
            raise KeyError("a bug in the engine")
        out = 0
        for i, token in enumerate(prompt_token_ids):
            rest = self.tokenizer.decode(prompt_token_ids[i:], skip_special_tokens=False)
            stop = next((s for s in params.stop if rest.startswith(s)), None)
            if stop is not None:
                yield self._chunk(request_id, [], prompt_token_ids, out, "stop", stop, params)
                return
            out += 1
            finish = (
                "length" if out == params.max_tokens else ("stop" if i == len(prompt_token_ids) - 1 else None)
            )
            yield self._chunk(request_id, [token], prompt_token_ids, out, finish, None, params)
            if finish is not None:
                return
            if "MIDFAIL" in prompt_text and out == 2:
                raise EngineUnavailable("a worker died")
            if "HANG" in prompt_text:
                self.hanging.set()
                await asyncio.Event().wait()  # until the request is cancelled
            await asyncio.sleep(0)

    def _chunk(self, rid, ids, prompt, out, finish, stop_reason, params) -> StreamChunk:
        logprobs = None
        if params.logprobs is not None:
            logprobs = [
                TokenLogprobs(
                    t, -0.25 * out, [((t + k) % 256, -0.25 * out - k) for k in range(params.logprobs)]
                )
                for t in ids
            ]
        text = self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
        return StreamChunk(rid, text, list(ids), logprobs, finish, stop_reason, len(prompt), CACHED, out)

    def _abort_event(self, request_id: str) -> threading.Event:
        with self._lock:
            return self._abort_events.setdefault(request_id, threading.Event())

    def wait_aborted(self, request_id: str) -> bool:
        """Block the test thread until `request_id` is aborted (False after a generous timeout)."""
        return self._abort_event(request_id).wait(timeout=30)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._abort_event(request_id).set()

    async def stats(self) -> dict:
        if not self.stats_ok:
            raise RuntimeError("engine down")
        rank = {
            "rank": 0,
            "num_running": 2,
            "num_waiting": 1,
            "kv_usage": 0.5,
            "prefix_cache_hit_rate": 0.25,
            "prefix_cache_hit_tokens": 10,
            "prefix_cache_query_tokens": 40,
            "num_preemptions": 0,
        }
        return {"ranks": [rank], "balancedness": 0.9}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(path)
    return Tokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def engine(tokenizer) -> EchoEngine:
    return EchoEngine(tokenizer)


@pytest.fixture(scope="module")
def base_url(engine):
    with serving(build_openai_app(engine, api_key=API_KEY, metrics=ServingMetrics())) as url:
        yield url


@pytest.fixture()
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture()
def http(base_url):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        yield c


def _echo(tokenizer: Tokenizer, text: str, max_tokens: int, chat: bool = False) -> str:
    """What the fake engine answers: the prompt's first max_tokens tokens."""
    if chat:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]), False)
    else:
        ids = tokenizer.encode(text)
    return tokenizer.decode(ids[:max_tokens])


def _sse_events(response: httpx.Response) -> list:
    events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---------------------------------------------------------------------------------------------- happy paths


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model"


def test_completion_non_stream(client, tokenizer, engine):
    out = client.completions.create(model=MODEL, prompt="hello world", max_tokens=5)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == "hello" and out.choices[0].finish_reason == "length"
    prompt_len = len(tokenizer.encode("hello world"))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        prompt_len,
        5,
        prompt_len + 5,
    )
    assert out.usage.prompt_tokens_details.cached_tokens == CACHED
    ids, params = engine.calls[f"{out.id.removeprefix('cmpl-')}-0"]
    assert ids == tokenizer.encode("hello world") and params.max_tokens == 5 and params.n == 1


def test_completion_stream_matches_non_stream(client, tokenizer):
    stream = client.completions.create(
        model=MODEL,
        prompt="streaming text",
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].text for c in chunks[:-1])
    assert text == _echo(tokenizer, "streaming text", 8)
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert len({c.id for c in chunks}) == 1


def test_chat_non_stream_and_stream(client, tokenizer, engine):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    expected_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    ids, _ = engine.calls[f"{out.id.removeprefix('chatcmpl-')}-0"]
    assert ids == expected_ids
    assert out.choices[0].message.content == tokenizer.decode(expected_ids[:20])
    assert out.usage.prompt_tokens == len(expected_ids) and out.usage.completion_tokens == 20

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_chat_content_parts_and_default_max_tokens(client, tokenizer):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}])
    # No max_tokens: the rest of the context; the echo ends with the prompt (finish "stop").
    assert out.choices[0].message.content == _echo(tokenizer, "a\nb", MAX_MODEL_LEN, chat=True)
    assert out.choices[0].finish_reason == "stop"


def test_n2_fans_out_with_seeds(client, engine, http, tokenizer):
    out = client.completions.create(model=MODEL, prompt="abcdef", max_tokens=4, n=2, seed=7)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.text == "abcd" for c in out.choices)
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 8
    rid = out.id.removeprefix("cmpl-")
    assert [engine.calls[f"{rid}-{i}"][1].seed for i in range(2)] == [7, 8]
    assert all(engine.calls[f"{rid}-{i}"][1].n == 1 for i in range(2))

    r = http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "n": 2,
            "max_tokens": 3,
            "stream": True,
            "messages": [{"role": "user", "content": "xyz"}],
        },
    )
    texts = {0: "", 1: ""}
    for event in _sse_events(r):
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts[0] == texts[1] == _echo(tokenizer, "xyz", 3, chat=True) == "us"  # <|im_start|> is skipped


def test_batched_prompts_order(client):
    out = client.completions.create(model=MODEL, prompt=["aaaa", "bbbb"], max_tokens=2, n=2)
    assert [(c.index, c.text) for c in out.choices] == [(0, "aa"), (1, "aa"), (2, "bb"), (3, "bb")]
    token_prompt = client.completions.create(model=MODEL, prompt=[[104, 105, 106]], max_tokens=2)
    assert token_prompt.choices[0].text == "hi"


def test_stop_passes_through(client, engine):
    out = client.completions.create(model=MODEL, prompt="hello world", max_tokens=10, stop=["lo", "zz"])
    assert out.choices[0].text == "hel" and out.choices[0].finish_reason == "stop"
    _, params = engine.calls[f"{out.id.removeprefix('cmpl-')}-0"]
    assert tuple(params.stop) == ("lo", "zz")


def test_completion_logprobs_shape(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt="logprob", max_tokens=4, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.tokens == list("logp")
    assert lp.token_logprobs == [-0.25, -0.5, -0.75, -1.0]
    assert lp.text_offset == [0, 1, 2, 3]
    for token, top, logprob in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs):
        assert top[token] == logprob and len(top) == 2  # the sampled token is one of the 2 alternatives
    streamed = list(
        client.completions.create(model=MODEL, prompt="logprob", max_tokens=4, logprobs=2, stream=True)
    )
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in streamed for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_chat_logprobs_shape(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "q"}], max_tokens=3, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "q"}], max_tokens=2
    )
    assert plain.choices[0].logprobs is None


# ---------------------------------------------------------------------------------------------- bad input

GOOD_COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = "x" * MAX_MODEL_LEN

# (endpoint, body (dict merged into the good request, or raw bytes), status, param, code)
BAD_INPUTS = [
    ("completions", b"{not json", 400, None, None),
    ("completions", b"[1, 2]", 400, None, None),
    ("completions", b"", 400, None, None),
    ("completions", {"model": "gpt-4"}, 404, "model", "model_not_found"),
    ("chat/completions", {"model": "gpt-4"}, 404, "model", "model_not_found"),
    ("completions", {"model": None}, 400, "model", None),
    ("completions", {"temperature": -1}, 400, "temperature", None),
    ("completions", b'{"model": "tiny-echo", "prompt": "hi", "temperature": NaN}', 400, "temperature", None),
    ("completions", {"temperature": "hot"}, 400, "temperature", None),
    ("chat/completions", {"top_p": 1.5}, 400, "top_p", None),
    ("completions", {"n": 0}, 400, "n", None),
    ("completions", {"max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"max_tokens": "ten"}, 400, "max_tokens", None),
    ("chat/completions", {"max_completion_tokens": -3}, 400, "max_completion_tokens", None),
    ("completions", {"prompt": ""}, 400, "prompt", None),
    ("completions", {"prompt": []}, 400, "prompt", None),
    ("completions", {"prompt": 5}, 400, "prompt", None),
    ("completions", {"prompt": LONG}, 400, "prompt", None),
    ("completions", {"max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", None),
    ("chat/completions", {"max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", None),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages", None),
    ("chat/completions", {"messages": []}, 400, "messages", None),
    ("chat/completions", {"messages": None}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", None),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages",
        None,
    ),
    ("completions", {"echo": True}, 400, "echo", None),
    ("completions", {"best_of": 3}, 400, "best_of", None),
    ("completions", {"suffix": "tail"}, 400, "suffix", None),
    ("completions", {"stop": ""}, 400, "stop", None),
    ("completions", {"logprobs": 50}, 400, "logprobs", None),
    ("chat/completions", {"top_logprobs": 2}, 400, "top_logprobs", None),
    ("chat/completions", {"seed": 1.5}, 400, "seed", None),
    ("completions", {"prompt": [[1, 300_000]]}, 400, "prompt", None),  # beyond the vocabulary
    ("completions", {"prompt": ["a", "b", "c"], "n": 100}, 400, "n", None),  # 300 completions in one call
]


@pytest.mark.parametrize(("endpoint", "body", "status", "param", "code"), BAD_INPUTS)
def test_bad_input_is_an_openai_error(http, endpoint, body, status, param, code):
    if isinstance(body, dict):
        base = GOOD_CHAT if endpoint.startswith("chat") else GOOD_COMPLETION
        body = json.dumps({k: v for k, v in {**base, **body}.items() if v is not None}).encode()
    r = http.post(f"/v1/{endpoint}", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_unknown_fields_are_ignored(http):
    body = {
        **GOOD_COMPLETION,
        "presence_penalty": 0.5,
        "some_vendor_extra": {"x": 1},
        "best_of": 1,
        "echo": False,
    }
    assert http.post("/v1/completions", json=body).status_code == 200


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert info.value.body["param"] == "messages"


def test_unknown_route_is_an_openai_error(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


# ---------------------------------------------------------------------------------------------- auth, ids


def test_api_key_required(base_url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{base_url}/v1/completions", json=GOOD_COMPLETION, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{base_url}/health").status_code == 200  # probes need no key


def test_request_id_is_honoured_and_generated(http, engine):
    r = http.post("/v1/completions", json=GOOD_COMPLETION, headers={"x-request-id": "my-id-123"})
    assert r.headers["x-request-id"] == "my-id-123"
    assert r.json()["id"] == "cmpl-my-id-123" and "my-id-123-0" in engine.calls
    generated = http.post("/v1/completions", json=GOOD_COMPLETION).headers["x-request-id"]
    assert (
        len(generated) == 32
        and generated != http.post("/v1/completions", json=GOOD_COMPLETION).headers["x-request-id"]
    )
    error = http.post("/v1/completions", json={**GOOD_COMPLETION, "n": 0}, headers={"x-request-id": "bad-1"})
    assert error.headers["x-request-id"] == "bad-1"


# ---------------------------------------------------------------------------------------------- failures


def test_disconnect_mid_stream_aborts(base_url, engine):
    body = {**GOOD_COMPLETION, "prompt": "HANG please", "max_tokens": 8, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}", "x-request-id": "gone-stream"}
    with (
        httpx.Client(base_url=base_url, timeout=30) as c,
        c.stream("POST", "/v1/completions", json=body, headers=headers) as r,
    ):
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    # The connection is closed; the server must abort the engine request.
    assert engine.wait_aborted("gone-stream-0")


def test_disconnect_while_waiting_aborts(base_url, engine):
    engine.hanging.clear()
    host, port = base_url.removeprefix("http://").split(":")
    body = json.dumps({**GOOD_COMPLETION, "prompt": "HANG now", "max_tokens": 8, "n": 2}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nx-request-id: gone-wait\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head.encode() + body)
        assert engine.hanging.wait(timeout=30)
    assert engine.wait_aborted("gone-wait-0") and engine.wait_aborted("gone-wait-1")


@pytest.mark.parametrize(
    ("prompt", "status", "error"),
    [
        ("FAIL503", 503, openai.InternalServerError),
        ("FAIL429", 429, openai.RateLimitError),
        ("FAIL500", 500, openai.InternalServerError),  # an unexpected engine exception
    ],
)
def test_engine_refusals_map_to_status(client, http, prompt, status, error):
    r = http.post("/v1/completions", json={**GOOD_COMPLETION, "prompt": prompt})
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    if status != 500:  # retriable: tell the client when
        assert int(r.headers["Retry-After"]) > 0
    with pytest.raises(error):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    with pytest.raises(error):  # streaming requests fail with the status too, before any event
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, stream=True)
    assert (
        client.completions.create(model=MODEL, prompt="still alive", max_tokens=5).choices[0].text == "still"
    )


def test_error_inside_stream_is_an_event(http, engine):
    r = http.post(
        "/v1/completions",
        json={
            **GOOD_COMPLETION,
            "prompt": "MIDFAIL",
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200
    events = _sse_events(r)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "MI"
    assert events[-1]["error"]["type"] == "service_unavailable_error"
    assert http.post("/v1/completions", json=GOOD_COMPLETION).status_code == 200


# ---------------------------------------------------------------------------------------------- ops


def test_health_follows_engine_stats(http, engine):
    assert http.get("/health").status_code == 200
    engine.stats_ok = False
    try:
        assert http.get("/health").status_code == 503
    finally:
        engine.stats_ok = True


def _metric_values(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics_record_requests(http, tokenizer):
    before = _metric_values(http.get("/metrics").text)
    out = http.post(
        "/v1/completions", json={**GOOD_COMPLETION, "prompt": "metrics!", "max_tokens": 5, "n": 2}
    )
    assert out.status_code == 200
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = _metric_values(r.text)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("moeserve_prompt_tokens_total") == 2 * len(tokenizer.encode("metrics!"))
    assert delta("moeserve_generation_tokens_total") == 10
    assert delta('moeserve_requests_total{finish_reason="length"}') == 2
    assert delta("moeserve_time_to_first_token_seconds_count") == 2
    assert delta("moeserve_inter_token_latency_seconds_count") == 8
    assert delta("moeserve_e2e_request_latency_seconds_count") == 2
    assert after['moeserve_rank_num_requests_running{rank="0"}'] == 2
    assert after["moeserve_prefix_cache_hit_rate"] == 0.25 and after["moeserve_expert_balancedness"] == 0.9
