"""The serving benchmark (benchmarks/serving.py): its metrics math against numpy, workload generation, the SSE
parser, and whole runs against real HTTP servers on 127.0.0.1 (a tiny deterministic OpenAI-style app, and
moeserve's own OpenAI app over a fake engine)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
fastapi = pytest.importorskip("fastapi")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serving  # noqa: E402
import serving_lib as lib  # noqa: E402

from tests.net import serving as serving_app  # noqa: E402

# ---- metrics math ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_and_describe_match_numpy(n):
    rng = np.random.default_rng(n)
    values = rng.lognormal(-3.0, 1.0, size=n).tolist()
    for q in [0, 1, 25, 50, 90, 99, 99.9, 100]:
        assert lib.percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-15)
    d = lib.describe(values)
    assert d["mean"] == pytest.approx(np.mean(values), rel=1e-12)
    assert d["p99"] == pytest.approx(np.percentile(values, 99), rel=1e-12)
    assert d["max"] == max(values) and d["count"] == n
    assert lib.describe([])["mean"] is None
    with pytest.raises(ValueError):
        lib.percentile([], 50)


def test_attribute_tokens_exact_for_bytes_and_proportional_otherwise():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        byte_lens = [rng.randint(0, 9) for _ in range(n)]
        total = rng.randint(n, 4 * n + 20)
        counts = lib.attribute_tokens(total, byte_lens)
        assert sum(counts) == total and min(counts) >= 1
        weights = [max(b - 1, 0) for b in byte_lens]
        weights = weights if sum(weights) else [1] * n
        for c, w in zip(counts, weights):  # largest remainder: within one of the exact share
            assert abs((c - 1) - (total - n) * w / sum(weights)) < 1
        # One byte per token (a byte-level tokenizer on ASCII): the attribution is exact.
        exact = [rng.randint(1, 5) for _ in range(n)]
        assert lib.attribute_tokens(sum(exact), exact) == exact
    assert lib.attribute_tokens(3, [4, 4, 4]) == [1, 1, 1]
    assert lib.attribute_tokens(0, []) == []


def test_itl_samples_split_gaps_over_tokens():
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.exponential(0.02, size=30)).tolist()
    counts = rng.integers(1, 4, size=30).tolist()
    gaps = np.diff(times)
    expected = np.repeat(gaps / np.array(counts[1:]), counts[1:])
    np.testing.assert_allclose(lib.itl_samples(times, counts), expected, rtol=1e-12)
    assert len(lib.itl_samples(times, counts)) == sum(counts) - counts[0]


def test_summarize_matches_numpy_on_random_records():
    rng = np.random.default_rng(2)
    records = []
    for i in range(50):
        ok = bool(rng.random() > 0.2)
        out = int(rng.integers(1, 40))
        ttft = float(rng.exponential(0.1))
        rec = lib.RequestRecord(i, int(rng.integers(5, 100)), out, ok=ok, error=None if ok else "boom",
                                ttft=ttft, e2e=ttft + float(rng.exponential(0.5)), output_tokens=out,
                                num_chunks=out, itl=rng.exponential(0.01, size=out - 1).tolist())
        records.append(rec)
    duration = 7.5
    s = lib.summarize(records, duration)
    ok = [r for r in records if r.ok]
    assert s["completed"] == len(ok) and s["failed"] == 50 - len(ok) and s["errors"] == {"boom": 50 - len(ok)}
    assert s["output_throughput"] == pytest.approx(sum(r.output_tokens for r in ok) / duration)
    assert s["input_throughput"] == pytest.approx(sum(r.prompt_tokens for r in ok) / duration)
    assert s["request_throughput"] == pytest.approx(len(ok) / duration)
    assert s["ttft_s"]["p99"] == pytest.approx(np.percentile([r.ttft for r in ok], 99))
    itl = np.concatenate([r.itl for r in ok])
    assert s["itl_s"]["mean"] == pytest.approx(itl.mean()) and s["itl_s"]["count"] == len(itl)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    assert s["tpot_s"]["p50"] == pytest.approx(np.percentile(tpot, 50))
    assert s["e2e_s"]["mean"] == pytest.approx(np.mean([r.e2e for r in ok]))
    assert s["mean_concurrency"] == pytest.approx(sum(r.e2e for r in ok) / duration)
    assert "TTFT" in lib.format_table("t", s)


# ---- workload ----------------------------------------------------------------------------------------------


def test_workload_lengths_prefix_vocab_and_determinism():
    spec = lib.WorkloadSpec(num_prompts=200, input_len=40, output_len=20, range_ratio=0.5,
                            shared_prefix_len=7, vocab=50, seed=3)
    reqs = lib.make_workload(spec)
    prefix = reqs[0].prompt[:7]
    assert len(reqs) == 200
    for r in reqs:
        assert r.prompt[:7] == prefix
        assert 20 <= len(r.prompt) - 7 <= 40 and 10 <= r.max_tokens <= 20
        assert all(3 <= t < 50 for t in r.prompt)
    # Uniform over the whole range: both ends occur.
    assert {len(r.prompt) - 7 for r in reqs} >= {20, 40} and {r.max_tokens for r in reqs} >= {10, 20}
    assert lib.make_workload(spec) == reqs
    other = lib.make_workload(lib.WorkloadSpec(200, 40, 20, 0.5, 7, 50, seed=4))
    assert [r.prompt for r in other] != [r.prompt for r in reqs]
    fixed = lib.make_workload(lib.WorkloadSpec(10, 16, 5, seed=1))
    assert {len(r.prompt) for r in fixed} == {16} and {r.max_tokens for r in fixed} == {5}
    with pytest.raises(ValueError, match="range_ratio"):
        lib.make_workload(lib.WorkloadSpec(1, 16, 5, range_ratio=1.5))


def test_arrival_offsets():
    assert lib.arrival_offsets(5, math.inf, 0) == [0.0] * 5
    offsets = lib.arrival_offsets(20000, 50.0, 0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.05)  # fixed seed: a deterministic check
    assert lib.arrival_offsets(10, 5.0, 1) == lib.arrival_offsets(10, 5.0, 1)
    with pytest.raises(ValueError, match="request_rate"):
        lib.arrival_offsets(3, 0.0, 0)


# ---- SSE ---------------------------------------------------------------------------------------------------

SAMPLE = (
    ": keep-alive\n\n"
    'data: {"choices": [{"index": 0, "text": "ab", "finish_reason": null}]}\n\n'
    "event: message\r\ndata: {\"choices\": [{\"index\": 0,\r\ndata:  \"text\": \"c\"}]}\r\n\r\n"
    ":ping\r\r"
    'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}}\n\n'
    "data: [DONE]\n\n"
)


def test_sse_decoder_any_split_gives_the_same_events():
    whole = lib.SSEDecoder().feed(SAMPLE)
    assert [e.data for e in whole][-1] == "[DONE]" and len(whole) == 4
    # Multi-line data joins with newlines; one space after the colon is stripped.
    assert whole[1].data == '{"choices": [{"index": 0,\n "text": "c"}]}'
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(SAMPLE)), 12))
        dec = lib.SSEDecoder()
        events = []
        for a, b in zip([0, *cuts], [*cuts, len(SAMPLE)]):
            events += dec.feed(SAMPLE[a:b])
        events += dec.close()
        assert [(e.data, e.event) for e in events] == [(e.data, e.event) for e in whole]
    dec = lib.SSEDecoder()
    one_by_one = [e for ch in SAMPLE for e in dec.feed(ch)] + dec.close()
    assert [e.data for e in one_by_one] == [e.data for e in whole]


def test_stream_state_reads_chunks_usage_and_errors():
    state = lib.StreamState()
    for t, event in enumerate(lib.SSEDecoder().feed(SAMPLE)):
        state.on_event(event, float(t))
    assert state.done and state.error is None and "".join(state.text) == "abc"
    assert state.chunk_times == [0.0, 1.0] and state.output_tokens() == (3, "usage")
    assert state.tokens_per_chunk() == [2, 1]
    # Logprob tokens give exact counts even for chunks without text.
    lp = lib.StreamState()
    lp.on_event(lib.SSEEvent('{"choices": [{"text": "", "logprobs": {"tokens": ["x", "y"]}}]}'), 0.5)
    lp.on_event(lib.SSEEvent('{"choices": [{"text": "z", "logprobs": {"tokens": ["z"]}}]}'), 0.9)
    assert lp.tokens_per_chunk() == [2, 1] and lp.output_tokens() == (3, "logprobs")
    err = lib.StreamState()
    for event in lib.SSEDecoder().feed('data: {"error": {"message": "engine restarting", "code": 503}}\n\n'
                                       "data: [DONE]\n\n"):
        err.on_event(event, 0.0)
    assert err.error == "engine restarting" and err.done


# ---- whole runs over HTTP ----------------------------------------------------------------------------------

API_KEY = "bench-key"


def fake_text(prompt: list[int], j: int) -> str:
    return chr(97 + (prompt[-1] + j) % 26)


def fake_app(seen: list[dict]) -> fastapi.FastAPI:
    """OpenAI-style streaming completions, deterministic: token j of a prompt is one letter; chunks carry
    1, 2, 3, 1, 2, 3... tokens. Prompts of length % 3 == 0 fail mid-stream with an error event; other prompts
    of length % 7 == 0 get a 429."""
    from fastapi.responses import JSONResponse, StreamingResponse

    app = fastapi.FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        seen.append(body)
        prompt, n = body["prompt"], body["max_tokens"]
        if len(prompt) % 7 == 0 and len(prompt) % 3 != 0:
            return JSONResponse({"error": {"message": "queue full"}}, status_code=429)

        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            yield ": keep-alive\n\n"
            j, size = 0, 1
            while j < n:
                k = min(size, n - j)
                text = "".join(fake_text(prompt, j + i) for i in range(k))
                j += k
                yield sse({"object": "text_completion", "choices": [
                    {"index": 0, "text": text, "finish_reason": "length" if j == n else None}]})
                size = size % 3 + 1
                if len(prompt) % 3 == 0:
                    yield sse({"error": {"message": "worker died", "type": "server_error"}})
                    break
            else:
                yield sse({"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": n,
                                                    "total_tokens": len(prompt) + n}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
def fake_server():
    seen: list[dict] = []
    with serving_app(fake_app(seen)) as url:
        yield url, seen


def test_benchmark_against_fake_server(fake_server, tmp_path):
    url, seen = fake_server
    out = tmp_path / "serving.json"
    argv = ["--base-url", url, "--api-key", API_KEY, "--num-prompts", "8", "--input-len", "16",
            "--output-len", "9", "--range-ratio", "0.5", "--seed", "5", "--warmup-requests", "0",
            "--max-concurrency", "3", "--out", str(out), "--include-text"]
    report = asyncio.run(serving.run(serving.parse_args(argv)))
    reqs = lib.make_workload(lib.WorkloadSpec(8, 16, 9, 0.5, 0, 256, 5))
    fails = {r.index for r in reqs if len(r.prompt) % 3 == 0 or len(r.prompt) % 7 == 0}
    assert 0 < len(fails) < 8, "seed 5 should give both outcomes"
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    s = report["summary"]
    assert report["model"] == "fake-model" and s["completed"] == 8 - len(fails) and s["failed"] == len(fails)
    assert s["total_output_tokens"] == sum(r.max_tokens for r in reqs if r.index not in fails)
    assert s["total_input_tokens"] == sum(len(r.prompt) for r in reqs if r.index not in fails)
    assert len(seen) == 8
    assert all(b["ignore_eos"] is True and b["temperature"] == 0 and b["stream"] for b in seen)
    assert all(b["stream_options"] == {"include_usage": True} and b["model"] == "fake-model" for b in seen)
    assert sorted(b["prompt"] for b in seen) == sorted(r.prompt for r in reqs)
    for rec, req in zip(report["requests"], reqs):
        assert rec["index"] == req.index and rec["ok"] == (req.index not in fails)
        if rec["ok"]:
            assert rec["output_tokens"] == req.max_tokens and rec["output_tokens_source"] == "usage"
            assert rec["text"] == "".join(fake_text(req.prompt, j) for j in range(req.max_tokens))
            assert len(rec["itl"]) == req.max_tokens - 1  # the first chunk carries one token
            assert 0 <= rec["ttft"] <= rec["e2e"]
        else:
            assert ("worker died" if len(req.prompt) % 3 == 0 else "HTTP 429: queue full") in rec["error"]
    assert s["itl_s"]["count"] == sum(r.max_tokens - 1 for r in reqs if r.index not in fails)
    assert s["multi_token_chunks"] == s["completed"] and s["short_outputs"] == 0  # counts were estimated


def test_script_imports_neither_ray_nor_the_engine():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import serving; "
            "print(sorted(m for m in ('ray', 'moeserve', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_benchmark_reports_a_down_server(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    args = serving.parse_args(["--base-url", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="is the server up"):
        asyncio.run(serving.run(args))


class TinyEngine:
    """An EngineClient for moeserve's real OpenAI app: emits letters, 1 then 2 tokens per chunk, max_tokens of
    them; logprobs when asked."""

    model_name = "tiny-engine"
    max_model_len = 512

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    async def generate(self, request_id, prompt_token_ids, params):
        from moeserve.outputs import StreamChunk
        from moeserve.scheduler.output import TokenLogprobs

        done = 0
        while done < params.max_tokens:
            ids = [97 + (done + i) % 26 for i in range(min(1 + done % 2, params.max_tokens - done))]
            done += len(ids)
            lps = None if params.logprobs is None else [TokenLogprobs(t, -1.0, []) for t in ids]
            finish = "length" if done == params.max_tokens else None
            yield StreamChunk(request_id, self.tokenizer.decode(ids), ids, lps, finish, None,
                              len(prompt_token_ids), 0, done)
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        pass

    async def stats(self) -> dict:
        return {"ranks": [], "balancedness": None}


@pytest.mark.parametrize("token_counts", ["usage", "logprobs"])
def test_benchmark_against_moeserve_openai_app(tmp_path, token_counts):
    openai_app = pytest.importorskip("moeserve.cluster.openai_app")
    from moeserve.testing.byte_tokenizer import write_byte_tokenizer
    from moeserve.tokenizer import Tokenizer

    write_byte_tokenizer(tmp_path / "tok")
    engine = TinyEngine(Tokenizer.from_pretrained(tmp_path / "tok"))
    app = openai_app.build_openai_app(engine, api_key=API_KEY)
    with serving_app(app) as url:
        argv = ["--base-url", url, "--api-key", API_KEY, "--num-prompts", "8", "--input-len", "12",
                "--output-len", "6", "--range-ratio", "0.5", "--shared-prefix-len", "4",
                "--request-rate", "1000", "--token-counts", token_counts, "--out", str(tmp_path / "r.json")]
        report = asyncio.run(serving.run(serving.parse_args(argv)))
    reqs = lib.make_workload(lib.WorkloadSpec(8, 12, 6, 0.5, 4, 256, 0))
    s = report["summary"]
    assert report["model"] == "tiny-engine" and s["completed"] == 8 and s["failed"] == 0
    assert s["total_output_tokens"] == sum(r.max_tokens for r in reqs)
    assert s["total_input_tokens"] == sum(len(r.prompt) for r in reqs)
    for rec, req in zip(report["requests"], reqs):
        # Chunks of 1, 2, 1, 2... tokens: every token after the first gets one ITL sample.
        assert len(rec["itl"]) == req.max_tokens - 1 and rec["output_tokens"] == req.max_tokens
        assert rec["chunk_counts_exact"] == (token_counts == "logprobs")


# ---- the offline replay ------------------------------------------------------------------------------------


class FakeOfflineEngine:
    """LLMEngine's add_request/step surface: each step gives every running request one token."""

    def __init__(self) -> None:
        self.running: dict[str, list] = {}
        self.max_running = 0

    def add_request(self, prompt, params, request_id):
        self.running[request_id] = [prompt, params, 0]
        self.max_running = max(self.max_running, len(self.running))
        return request_id

    def step(self):
        from moeserve.outputs import StreamChunk

        chunks = []
        for rid, state in list(self.running.items()):
            state[2] += 1
            finish = "length" if state[2] == state[1].max_tokens else None
            chunks.append(StreamChunk(rid, "x", [7], None, finish, None, len(state[0]), 0, state[2]))
            if finish:
                del self.running[rid]
        return chunks


def test_offline_replay_respects_concurrency_and_counts_tokens():
    llm = type("FakeLLM", (), {})()
    llm.engine = FakeOfflineEngine()
    reqs = lib.make_workload(lib.WorkloadSpec(10, 8, 6, 0.5, 0, 256, 2))
    args = serving.parse_args(["--max-concurrency", "3"])
    records, wall = serving.run_offline(llm, reqs, [0.0] * 10, args)
    assert llm.engine.max_running == 3 and wall >= 0
    for rec, req in zip(records, reqs):
        assert rec.ok and rec.output_tokens == req.max_tokens and rec.text == "x" * req.max_tokens
        assert len(rec.itl) == req.max_tokens - 1 and rec.ttft <= rec.e2e
    http = lib.summarize(records, 2.0)
    off = lib.summarize(records, 1.0)
    c = serving.comparison(http, off)
    assert c["overhead_per_request_s"] == 0.0 and c["wall_overhead_s"] == 1.0
    assert "mean HTTP E2E" in c["definition"]
