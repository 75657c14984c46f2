"""The offline engine end to end: greedy parity with transformers, batching invariance, prefix caching,
preemption, chunked prefill, and clear errors for bad input."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.testing.tiny_checkpoints import ARCHITECTURES

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def hf_greedy(path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own generate(do_sample=False), eos disabled, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, eos included
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            outs.append(out[0, len(p) :].tolist())
    return outs


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=4)
    prompts = random_prompts(4, llm.engine.vocab_size, 3, 40, seed=1)
    prompts[0] = prompts[0][:1]  # a one-token prompt too
    ours = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert ours == hf_greedy(path, prompts, 32)


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return str(tiny_checkpoint("qwen3_moe"))


def run_alone(path: str, prompts, params, **options) -> list[list[int]]:
    llm = LLM(path, device="cpu", **options)
    return [llm.generate([p], params)[0].token_ids for p in prompts]


def test_batching_invariance_together_and_staggered(qwen):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(qwen, device="cpu", max_num_batched_tokens=256, block_size=8)
    prompts = random_prompts(64, llm.engine.vocab_size, 1, 60, seed=2)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert together == alone

    # Staggered: new requests join while others are mid-prefill or decoding.
    engine = llm.engine
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    rng = random.Random(3)
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 4)):
            if pending:
                i, p = pending.pop(0)
                engine.add_request(p, params, f"s{i}")
                outputs[f"s{i}"] = []
        for chunk in engine.step():
            outputs[chunk.request_id].extend(chunk.token_ids)
    assert [outputs[f"s{i}"] for i in range(len(prompts))] == alone


def test_seeded_sampling_is_batch_invariant(qwen):
    llm = LLM(qwen, device="cpu")
    prompts = random_prompts(6, llm.engine.vocab_size, 2, 30, seed=4)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=100 + i, max_tokens=10, ignore_eos=True)
        for i in range(len(prompts))
    ]
    together = [o.token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert together == alone
    assert len({tuple(t) for t in together}) > 1


def test_prefix_cache_reuse_gives_identical_output(qwen):
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = LLM(qwen, device="cpu", block_size=16)
    shared = random_prompts(1, llm.engine.vocab_size, 200, 200, seed=5)[0]
    first, second = shared + [7, 8, 9], shared + [10, 11]
    llm.generate([first], params)
    before = llm.engine.stats()["prefix_cache_hit_tokens"]
    out = llm.generate([second], params)[0]
    assert out.num_cached_tokens >= 192  # 12 full blocks of the 200-token prefix
    assert llm.engine.stats()["prefix_cache_hit_tokens"] - before >= 192
    cold = LLM(qwen, device="cpu", block_size=16, enable_prefix_caching=False)
    assert out.token_ids == cold.generate([second], params)[0].token_ids


def test_reset_prefix_cache_forgets_idle_prefixes(qwen):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm = LLM(qwen, device="cpu", block_size=16)
    prompt = random_prompts(1, llm.engine.vocab_size, 100, 100, seed=8)[0]
    first = llm.generate([prompt], params)[0]
    assert llm.engine.stats()["prefix_cache_blocks"] == 6
    assert llm.engine.reset_prefix_cache() == 6 and llm.engine.stats()["prefix_cache_blocks"] == 0
    again = llm.generate([prompt], params)[0]
    assert again.num_cached_tokens == 0 and again.token_ids == first.token_ids


def test_tiny_kv_budget_preempts_and_evicts_without_changing_outputs(qwen):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = LLM(qwen, device="cpu", block_size=4)
    prompts = random_prompts(16, roomy.engine.vocab_size, 10, 40, seed=6)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    tight = LLM(qwen, device="cpu", block_size=4, num_kv_blocks=40)
    got = [o.token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.stats()["num_preemptions"] > 0
    assert got == expected


def test_prompt_longer_than_step_budget_is_chunked(qwen):
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    whole = LLM(qwen, device="cpu")
    prompt = random_prompts(1, whole.engine.vocab_size, 150, 150, seed=7)[0]
    expected = whole.generate([prompt], params)[0].token_ids
    chunked = LLM(qwen, device="cpu", max_num_batched_tokens=32)
    assert chunked.generate([prompt], params)[0].token_ids == expected


def test_text_prompts_stop_strings_and_logprobs(qwen):
    llm = LLM(qwen, device="cpu")
    base = llm.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    assert base.text == llm.tokenizer.decode(base.token_ids)
    if len(base.text) > 4:
        stop = base.text[2:4]
        cut = llm.generate(
            ["Hello world"], SamplingParams(temperature=0.0, max_tokens=20, stop=[stop], ignore_eos=True)
        )[0]
        assert cut.finish_reason == "stop" and cut.text == base.text[: base.text.index(stop)]
    lp = llm.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3))[0]
    assert len(lp.logprobs) == len(lp.token_ids)
    for tok, entry in zip(lp.token_ids, lp.logprobs):
        assert entry.token_id == tok and len(entry.top) == 3
        assert entry.top[0][0] == tok  # greedy picks the most likely token
        assert entry.logprob <= 0.0


def test_n_samples(qwen):
    llm = LLM(qwen, device="cpu")
    out = llm.generate("Hi", SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True))[0]
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 8 for o in out.outputs)


def test_bad_input_is_refused_clearly(qwen, tmp_path):
    llm = LLM(qwen, device="cpu", max_model_len=64)
    with pytest.raises(ValueError, match="context limit is 64"):
        llm.generate([[5] * 64], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, "):
        llm.generate([[10**9]], SamplingParams())
    for bad in (
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(max_tokens=0),
        dict(n=0),
        dict(temperature=float("nan")),
    ):
        field = next(iter(bad))
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)
    # a good request still works after the bad ones
    assert len(llm.generate(["ok"], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3
    with pytest.raises(ValueError, match="not a checkpoint"):
        LLM(str(tmp_path), device="cpu")
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM(qwen, devise="cpu")


def test_import_moeserve_does_not_import_ray():
    code = (
        "import sys, moeserve; from moeserve import LLM, SamplingParams; import moeserve.engine.engine; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
