"""The whole serving path on CPU: real Ray, real Serve, real HTTP on 127.0.0.1, the official `openai` client.

Two apps on one local Ray (one after the other, to keep the 2-core CI box calm):
- "ep2": DP = EP = 2 (experts spread over two ranks, all-to-all over gloo): OpenAI API results equal the
  offline engine's greedy output, bad input is refused field by field without hurting the workers, 200
  concurrent streams, /metrics, /health, `moeserve status`.
- "dp4": DP = 4, EP = 1 (four independent ranks; routing is the subject, EP adds nothing to it) behind two
  ingress replicas: requests that share a long prefix land on one rank and hit its prefix cache; a burst of
  one hot prefix spreads so that no rank holds more than twice its share.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402

from moeserve.cluster.config import parse_deploy_config  # noqa: E402
from moeserve.cluster.launch import delete_app, deploy  # noqa: E402
from moeserve.sampling_params import SamplingParams  # noqa: E402
from tests.net import free_port  # noqa: E402

MAX_MODEL_LEN = 512
HIT_RATE = "moeserve_prefix_cache_hit_rate "  # the all-ranks gauge (per-rank ones carry a label)
PROMPTS = ["Hello, my name is", "The capital of France", "1, 2, 3, 4,", "def add(a, b):", "Once upon a time"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    # A long context, so the routing test's requests cannot finish while they are being counted.
    return str(tiny_checkpoint("qwen3_moe", max_position_embeddings=4096))


@pytest.fixture(scope="module")
def offline(model):
    from moeserve import LLM

    return LLM(model, device="cpu")


@pytest.fixture(scope="module")
def port():
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield free_port()
    serve.shutdown()
    ray.shutdown()


class App:
    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.controller = serve.get_deployment_handle("Controller", app_name=name)

    def status(self) -> dict:
        return self.controller.status.remote().result(timeout_s=60)


def async_client(app: App):
    return openai.AsyncOpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=300)


def start_app(model: str, port: int, name: str, **settings) -> App:
    config = parse_deploy_config(
        {"app_name": name, "model": model, "served_model_name": "tiny", "device": "cpu",
         "http.port": port, "engine.num_kv_blocks": 2048, **settings}
    )
    return App(name, deploy(config, timeout_s=600))


@pytest.fixture(scope="class")
def ep2(port, model):
    settings = {"parallel.dp": 2, "parallel.ep": 2, "engine.max_model_len": MAX_MODEL_LEN}
    app = start_app(model, port, "ep2", **settings)
    yield app
    delete_app(app.name)


def greedy(offline, prompt, **params) -> list:
    """The offline engine's outputs (one per sample) for a prompt (text or token ids)."""
    n = params.pop("n", 1)
    out = offline.generate(prompt, SamplingParams(temperature=0.0, n=n, **params))
    return out[0].outputs


def chat_prompt_ids(offline, messages) -> list[int]:
    tok = offline.tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


class TestDPEP2:
    def test_completions_equal_offline_greedy(self, ep2, offline):
        for prompt in PROMPTS[:3]:
            want = greedy(offline, prompt, max_tokens=12)[0]
            got = ep2.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            assert got.choices[0].text == want.text
            assert got.choices[0].finish_reason == want.finish_reason
            assert got.usage.completion_tokens == len(want.token_ids)
            stream = ep2.client.completions.create(
                model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True
            )
            assert "".join(c.choices[0].text for c in stream) == want.text

    def test_chat_streaming_and_not_equal_offline_greedy(self, ep2, offline):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
        want = greedy(offline, chat_prompt_ids(offline, messages), max_tokens=10)[0]
        got = ep2.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0
        )
        assert got.choices[0].message.content == want.text
        assert got.choices[0].message.role == "assistant"
        stream = ep2.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text

    def test_n_stop_and_logprobs_equal_offline(self, ep2, offline):
        prompt = PROMPTS[1]
        full = greedy(offline, prompt, max_tokens=16)[0].text
        # A string the greedy output is known to contain, a few characters in (and no undecodable byte).
        start = next(i for i in range(4, len(full) - 1) if "\ufffd" not in full[i : i + 2])
        stop = full[start : start + 2]
        want = greedy(offline, prompt, max_tokens=16, stop=[stop], n=2, logprobs=2)
        got = ep2.client.completions.create(
            model="tiny", prompt=prompt, max_tokens=16, temperature=0, n=2, stop=[stop], logprobs=2
        )
        assert sorted(c.index for c in got.choices) == [0, 1]
        for choice, ref in zip(sorted(got.choices, key=lambda c: c.index), want):
            assert choice.text == ref.text == full[: full.index(stop)]
            assert choice.finish_reason == "stop"
            want_logprobs = [lp.logprob for lp in ref.logprobs]
            assert choice.logprobs.token_logprobs == pytest.approx(want_logprobs, abs=1e-4)
            assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)

    BAD_REQUESTS = [
        ("completions", "{not json", "body"),
        ("completions", {"prompt": 5}, "prompt"),
        ("completions", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ("completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN + 10}, "max_tokens"),
        ("completions", {"prompt": "hi", "model": "no-such-model"}, "model"),
        ("completions", {"prompt": "x" * (MAX_MODEL_LEN + 20)}, "prompt"),
        ("chat/completions", {"messages": []}, "messages"),
        ("completions", '{"model": "tiny", "prompt": "hi", "temperature": NaN}', "temperature"),
        ("completions", {"prompt": "hi", "temperature": -0.5}, "temperature"),
        ("completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
        ("completions", {"prompt": "hi", "n": 0}, "n"),
    ]

    def test_bad_input_gets_a_4xx_naming_the_field_and_the_workers_keep_serving(self, ep2):
        before = ep2.status()
        for path, body, field in self.BAD_REQUESTS:
            if isinstance(body, dict):
                body = json.dumps({"model": "tiny", **body})
            r = httpx.post(f"{ep2.url}/v1/{path}", content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            error = r.json()["error"]
            assert error["message"] and error["type"], body
            if field != "body":
                assert error["param"] == field or field in error["message"], (body, error)
        after = ep2.status()
        assert (after["generation"], after["restarts"], after["state"]) == (before["generation"], 0, "up")
        got = ep2.client.completions.create(model="tiny", prompt="still", max_tokens=3, temperature=0)
        assert got.choices[0].finish_reason in ("length", "stop")

    def test_200_concurrent_streams_all_complete_with_offline_text(self, ep2, offline):
        wants = {p: greedy(offline, p, max_tokens=6)[0].text for p in PROMPTS}
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(200)]

        async def one(client, prompt):
            stream = await client.completions.create(
                model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in stream])

        async def run():
            client = async_client(ep2)
            async with client:
                return await asyncio.gather(*(one(client, p) for p in prompts))

        texts = asyncio.run(run())
        assert texts == [wants[p] for p in prompts]

    def test_health_metrics_and_status_command(self, ep2):
        assert httpx.get(f"{ep2.url}/health").status_code == 200
        metrics = httpx.get(f"{ep2.url}/metrics")
        assert metrics.status_code == 200
        assert 'moeserve_rank_load{rank="1"}' in metrics.text
        assert "moeserve_engine_up 1.0" in metrics.text
        assert "moeserve_generation_tokens_total" in metrics.text

        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        cmd = [sys.executable, "-m", "moeserve.cli", "status", "--app", "ep2"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "2 ranks (ep 2, cpu), state up" in out.stdout
        rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
        assert [r[0] for r in rows] == ["0", "1"]

        missing = subprocess.run([*cmd[:-1], "nope"], env=env, capture_output=True, text=True, timeout=120)
        assert missing.returncode == 1
        assert "no Serve app named 'nope'" in missing.stderr and "ep2" in missing.stderr
        # It says which cluster it looked at and how to pick another (two local clusters are easy to mix up).
        assert "on the Ray cluster at " in missing.stderr and "--address" in missing.stderr

    def test_rebalance_command_dry_run_then_apply(self, ep2, offline, tmp_path):
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        worker = ep2.controller.workers.remote().result(timeout_s=60)[1][0]

        def rebalance(*flags):
            cmd = [sys.executable, "-m", "moeserve.cli", "rebalance", "--app", "ep2", "--json", *flags]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout.splitlines()[0])

        for prompt in PROMPTS:  # some load for the plan
            ep2.client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
        before = ray.get(worker.expert_load.remote())["phy2log"]
        assert ep2.status()["balancedness"] is not None
        dry = rebalance("--dry-run")
        assert dry["dry_run"] and not dry["applied"] and len(dry["balancedness_before"]) == len(before)
        assert ray.get(worker.expert_load.remote())["phy2log"] == before  # nothing moved

        plot = tmp_path / "load.png"
        report = rebalance("--plot", str(plot))
        assert plot.stat().st_size > 0
        if report["experts_moved"]:
            assert report["applied"] and report["checksums_ok"]
            assert ray.get(worker.expert_load.remote())["phy2log"] != before
        # Serving goes on with the same greedy outputs, and status shows the balancedness of the new placement.
        prompt = "The capital of France is"
        got = ep2.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == greedy(offline, prompt, max_tokens=12)[0].text
        assert ep2.status()["balancedness"] is not None

        unknown = subprocess.run([sys.executable, "-m", "moeserve.cli", "rebalance", "--app", "nope"], env=env,
                                 capture_output=True, text=True, timeout=120)
        assert unknown.returncode != 0 and "no deployment named 'nope'" in unknown.stderr


# ---- cache-aware routing over four DP ranks and two ingress replicas ----------------------------------------
@pytest.fixture(scope="class")
def dp4(port, model):
    app = start_app(model, port, "dp4", **{"parallel.dp": 4, "parallel.ep": 1, "ingress.replicas": 2})
    yield app
    delete_app(app.name)


def text_of(num_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(num_chars))


def wait_until(condition, timeout_s: float) -> bool:
    """Poll an outside system (the ranks) until condition() holds; False after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def rank_counter(app: App, key: str) -> list[int]:
    return [s[key] for s in sorted(app.status()["ranks"], key=lambda s: s["rank"])]


class TestRoutingDP4:
    def test_rebalance_on_ep1_says_why(self, dp4):
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        cmd = [sys.executable, "-m", "moeserve.cli", "rebalance", "--app", "dp4", "--dry-run"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "EP = 1" in out.stderr

    def test_shared_prefix_lands_on_one_rank_and_hits_its_cache(self, dp4):
        hit_ranks = set()
        for group in range(4):
            prefix = text_of(300, seed=group)  # > 256 routing tokens (byte tokenizer: 1 token per char)
            before = rank_counter(dp4, "prefix_cache_query_tokens")
            for i in range(8):
                dp4.client.completions.create(model="tiny", prompt=f"{prefix} q{i:02d}", max_tokens=2)
            after = rank_counter(dp4, "prefix_cache_query_tokens")
            per_rank = [a - b for a, b in zip(after, before)]
            top = max(range(4), key=lambda r: per_rank[r])
            assert per_rank[top] >= 0.9 * sum(per_rank), per_rank
            hit_ranks.add(top)
        hits = rank_counter(dp4, "prefix_cache_hit_tokens")
        assert all(hits[r] > 0 for r in hit_ranks), hits
        metrics = httpx.get(f"{dp4.url}/metrics").text
        rate = next(line for line in metrics.splitlines() if line.startswith(HIT_RATE))
        assert float(rate.split()[1]) > 0.5

    def test_hot_prefix_burst_spreads_within_twice_the_fair_share(self, dp4):
        prefix = text_of(300, seed=99)
        num = 40

        async def hold(client, i):
            # Long generations: all of them are running when the ranks are counted, then the client leaves.
            stream = await client.completions.create(
                model="tiny", prompt=f"{prefix} hot{i:02d}", max_tokens=3000, stream=True,
                extra_body={"ignore_eos": True},
            )
            async for _ in stream:
                break
            return stream

        async def run():
            client = async_client(dp4)
            streams = await asyncio.gather(*(hold(client, i) for i in range(num)))
            # A rank's status is a snapshot its step loop takes at most every 50 ms: poll until every
            # request shows (or 30 s pass and the assertion below reports what was seen).
            deadline = time.monotonic() + 30
            while True:
                ranks = (await asyncio.to_thread(dp4.status))["ranks"]
                if sum(s["num_running"] + s["num_waiting"] for s in ranks) == num or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            for stream in streams:
                await stream.close()
            await client.close()
            return ranks

        loads = [s["num_running"] + s["num_waiting"] for s in asyncio.run(run())]
        assert sum(loads) == num, loads
        assert max(loads) <= 2 * num / 4, loads
        # The clients left: every request is aborted on its rank.
        assert wait_until(lambda: sum(rank_counter(dp4, "num_running")) == 0, timeout_s=60)
