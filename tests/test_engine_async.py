"""The engine with asynchronous scheduling (step N+1 launched before step N's tokens are read) gives exactly
the outputs of the synchronous engine: greedy, seeded sampling, logprobs, stop strings, preemption, aborts.

On CPU the forward runs at launch, so nothing overlaps here; what is checked is the bookkeeping (placeholders
fed from the previous launch's sampled tokens on the device, results applied one step later)."""

from __future__ import annotations

import pytest

from moeserve import LLM, SamplingParams
from tests.test_engine_offline import random_prompts


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def arch_path(request, tiny_checkpoint):
    return str(tiny_checkpoint(request.param))


def _outputs(llm: LLM, prompts, params):
    """Tokens, text, finish reason and logprobs (rounded: batches differ by a step, so do float sums)."""
    out = []
    for o in llm.generate(prompts, params):
        logprobs = [
            (lp.token_id, round(lp.logprob, 4), [(t, round(v, 4)) for t, v in lp.top])
            for lp in o.outputs[0].logprobs or []
        ]
        out.append((o.token_ids, o.text, o.finish_reason, logprobs))
    return out


def test_async_engine_equals_sync_engine(arch_path):
    sync = LLM(arch_path, device="cpu", block_size=4, async_scheduling=False)
    fast = LLM(arch_path, device="cpu", block_size=4, async_scheduling=True)
    assert fast.engine.async_scheduling and not sync.engine.async_scheduling
    vocab = sync.engine.vocab_size
    prompts = random_prompts(12, vocab, 1, 30, seed=21)
    params = [
        SamplingParams(temperature=0.0, max_tokens=1 + 3 * i, ignore_eos=True) if i % 3 == 0 else
        SamplingParams(temperature=0.9, top_k=30, seed=7 + i, max_tokens=14, logprobs=2, ignore_eos=i % 2 == 0)
        for i in range(len(prompts))
    ]
    assert _outputs(fast, prompts, params) == _outputs(sync, prompts, params)


def test_async_engine_stop_strings_preemption_and_abort(tiny_checkpoint):
    path = str(tiny_checkpoint("qwen3_moe"))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = LLM(path, device="cpu", block_size=4, async_scheduling=False)
    prompts = random_prompts(16, roomy.engine.vocab_size, 10, 40, seed=6)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    tight = LLM(path, device="cpu", block_size=4, num_kv_blocks=40, async_scheduling=True)
    assert [o.token_ids for o in tight.generate(prompts, params)] == expected
    assert tight.engine.stats()["num_preemptions"] > 0

    # A stop string found one step late still cuts the text at the string; the token in flight is dropped.
    base = roomy.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    stop = SamplingParams(temperature=0.0, max_tokens=20, stop=[base.text[3:5]], ignore_eos=True)
    assert _outputs(tight, ["Hello world"], stop) == _outputs(roomy, ["Hello world"], stop)

    # Abort while a step is in flight, then reuse the id: the old request's token never reaches the new one.
    engine = tight.engine
    engine.add_request(prompts[0], params, "x")
    engine.step()
    engine.step()
    assert engine.abort("x").finish_reason == "abort"
    engine.add_request(prompts[1], params, "x")
    tokens = []
    while engine.has_unfinished():
        for chunk in engine.step():
            tokens += chunk.token_ids
    assert tokens == expected[1]


def test_step_loop_streams_async_engine_output(tiny_checkpoint):
    """The serving loop (a thread driving engine.step) delivers every chunk of an async engine, ends every
    request exactly once, and an abort from another thread stops only its own request."""
    import threading

    from moeserve.engine.step_loop import StepLoop

    path = str(tiny_checkpoint("qwen3_moe"))
    sync = LLM(path, device="cpu", async_scheduling=False)
    prompts = random_prompts(6, sync.engine.vocab_size, 2, 20, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    expected = [o.token_ids for o in sync.generate(prompts, params)]

    engine = LLM(path, device="cpu", async_scheduling=True).engine
    got: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    done = threading.Event()

    def on_chunks(chunks):
        for c in chunks:
            got.setdefault(c.request_id, []).extend(c.token_ids)
            if c.finish_reason is not None:
                assert c.request_id not in finished, "a request finished twice"
                finished[c.request_id] = c.finish_reason
        if len(finished) == len(prompts) + 1:
            done.set()

    loop = StepLoop(engine, on_chunks)
    loop.start()
    try:
        long = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
        loop.submit("endless", prompts[0], long)
        for i, p in enumerate(prompts):
            loop.submit(f"r{i}", p, params)
        loop.abort("endless")
        assert done.wait(60), f"finished only {sorted(finished)}"
    finally:
        loop.stop()
    assert loop.error is None
    assert [got[f"r{i}"] for i in range(len(prompts))] == expected
    assert finished["endless"] == "abort" and all(finished[f"r{i}"] == "length" for i in range(len(prompts)))
    assert not engine.has_unfinished()


@pytest.fixture
def decode_graphs_on_cpu(monkeypatch):
    """Engines built under this fixture run their decode steps through the decode graphs' static batches, run
    eagerly (the CPU has no graphs): the step's inputs go through the graphs' staging and first-kernel reference,
    placeholders are resolved there, and all-greedy steps take the graphs' own argmax."""
    from moeserve.runner import cuda_graphs, model_runner

    monkeypatch.setattr(model_runner, "graph_unsupported_reason", lambda *args: None)
    graph_runner = model_runner.ModelRunner.graph_runner
    monkeypatch.setattr(model_runner.ModelRunner, "graph_runner",
                        lambda self, scratch_block, use_graphs=True: graph_runner(self, scratch_block, False))
    monkeypatch.setattr(cuda_graphs.CudaGraphRunner, "capture", lambda self: None)


def test_async_engine_through_decode_graphs_equals_sync_engine(tiny_checkpoint, decode_graphs_on_cpu):
    """Decode steps through the graphs' static batches, launched ahead of their inputs, with greedy and seeded
    rows, logprobs, preemption (a small KV pool) and batches that shrink as requests end: the synchronous
    engine's tokens, and its logprobs within float rounding (the static batches are padded)."""
    path = str(tiny_checkpoint("qwen3_moe"))
    graphs = LLM(path, device="cpu", block_size=4, num_kv_blocks=40, async_scheduling=True,
                 cuda_graph_max_batch=8)
    assert graphs.engine.runner.graphs is not None
    sync = LLM(path, device="cpu", block_size=4, async_scheduling=False, enable_cuda_graphs=False)
    prompts = random_prompts(12, sync.engine.vocab_size, 5, 30, seed=8)
    params = [
        SamplingParams(temperature=0.0, max_tokens=4 + 2 * i, ignore_eos=True, logprobs=1 if i == 3 else None)
        if i % 3 else SamplingParams(temperature=0.9, top_k=30, seed=3 + i, max_tokens=10, logprobs=2, ignore_eos=True)
        for i in range(len(prompts))
    ]
    got, want = _outputs(graphs, prompts, params), _outputs(sync, prompts, params)
    assert graphs.engine.runner.num_graph_steps > 10 and graphs.engine.stats()["num_preemptions"] > 0
    assert [g[:3] for g in got] == [w[:3] for w in want]
    for g, w in zip(got, want):
        for (gt, glp, gtop), (wt, wlp, wtop) in zip(g[3], w[3], strict=True):
            assert gt == wt and [t for t, _ in gtop] == [t for t, _ in wtop]
            assert abs(glp - wlp) < 2e-3 and all(abs(a - b) < 2e-3 for (_, a), (_, b) in zip(gtop, wtop))
