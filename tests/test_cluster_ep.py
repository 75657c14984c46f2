"""DP attention + EP MoE on CPU Ray ranks (gloo): greedy outputs equal the single-process engine's, with and
without two-batch overlap, with redundant experts, and when every request sits on one rank."""

from __future__ import annotations

import functools
import random
import time

import pytest

ray = pytest.importorskip("ray")

from moeserve import LLM, SamplingParams  # noqa: E402

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def prompts_for(vocab: int, n: int = 32, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))] for _ in range(n)]


@functools.cache
def reference(path: str, **options) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, their greedy tokens) from the one-process engine with options; once per checkpoint and options
    (the cases of one architecture share it)."""
    single = LLM(path, **options)
    try:
        prompts = prompts_for(single.engine.vocab_size)
        return prompts, [o.token_ids for o in single.generate(prompts, PARAMS)]
    finally:
        single.shutdown()


def assert_all_on_rank0_match(llm, prompts: list[list[int]], expected: list[list[int]]) -> None:
    """Every request on rank 0: the other ranks step idle batches (or replay padding-only graphs) and still
    enter every collective; the tokens are the reference's."""
    jobs = [[(f"one-{i}", p, PARAMS)] for i, p in enumerate(prompts)]
    finals = llm.backend.run(jobs, ranks=[0] * len(jobs))
    assert [finals[f"one-{i}"].token_ids for i in range(len(prompts))] == expected


def settled_stats(llm, timeout_s: float = 10.0) -> list[dict]:
    """Per-rank stats once every rank's snapshot has caught up with the last lockstep step."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = llm.backend.stats()
        if len({s["num_steps"] for s in stats}) == 1 or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


@pytest.mark.parametrize(
    "arch,ranks,redundant,tbo,async_scheduling,dispatcher",
    [
        ("qwen3_moe", 2, 0, False, False, "auto"),
        ("qwen3_moe", 4, 0, True, False, "auto"),
        ("deepseek_v3", 2, 4, True, True, "auto"),
        ("deepseek_v3", 4, 4, False, False, "auto"),
        ("deepseek_v3", 3, 2, True, True, "all_gather"),
        ("qwen3_moe", 2, 2, True, True, "by_mode"),
    ],
)
def test_ep_matches_single_process(
    ray_cluster, tiny_checkpoint, arch, ranks, redundant, tbo, async_scheduling, dispatcher
):
    path = str(tiny_checkpoint(arch))
    prompts, expected = reference(path, device="cpu")

    llm = LLM(
        path,
        device="cpu",
        data_parallel_size=ranks,
        expert_parallel_size=ranks,
        num_redundant_experts=redundant,
        enable_tbo=tbo,
        async_scheduling=async_scheduling,  # lockstep steps launched one ahead of their results
        moe_dispatcher=dispatcher,
    )
    try:
        assert [o.token_ids for o in llm.generate(prompts, PARAMS)] == expected
        assert_all_on_rank0_match(llm, prompts, expected)
        stats = settled_stats(llm)
        assert stats[0]["num_steps"] > 0 and all(s["num_steps"] == stats[0]["num_steps"] for s in stats)
        assert all((s["num_tbo_steps"] > 0) == tbo for s in stats)
        assert all(s["async_scheduling"] == async_scheduling for s in stats)
    finally:
        llm.shutdown()


@pytest.mark.multigpu
@pytest.mark.parametrize("arch,redundant,tbo,async_scheduling,dispatcher",
                         [("qwen3_moe", 0, False, True, "auto"), ("deepseek_v3", 1, True, True, "auto"),
                          ("deepseek_v3", 1, True, True, "all_gather"), ("qwen3_moe", 1, False, True, "all_gather"),
                          ("qwen3_moe", 0, False, True, "all_to_all")])
def test_ep_on_gpus_matches_one_gpu(ray_cluster, tiny_checkpoint, gpu_ep_ranks, arch, redundant, tbo,
                                    async_scheduling, dispatcher):  # redundant: extra expert slots per rank
    """DP = EP over the visible GPUs (NCCL between them) gives the one-GPU engine's greedy tokens. With the
    all-gather dispatcher (or by_mode, auto's choice without DeepEP), decode steps replay CUDA graphs holding the
    NCCL collectives, also on ranks without requests."""
    ranks = gpu_ep_ranks
    path = str(tiny_checkpoint(arch))
    # A fixed KV size: the one-GPU engine in this process shares GPU 0 with rank 0.
    prompts, expected = reference(path, device="cuda", dtype="float32", num_kv_blocks=1024)

    llm = LLM(path, device="cuda", dtype="float32", num_kv_blocks=1024, data_parallel_size=ranks,
              expert_parallel_size=ranks, num_redundant_experts=redundant * ranks, enable_tbo=tbo,
              async_scheduling=async_scheduling, moe_dispatcher=dispatcher)
    try:
        assert [o.token_ids for o in llm.generate(prompts, PARAMS)] == expected
        # The all-gather's decode steps replay graphs (auto without deep_ep: by_mode, whose decode is the
        # all-gather), with TBO on too: only prefill steps split.
        names = {s["moe_dispatcher"] for s in llm.backend.stats()}
        graphs = bool(names & {"all_gather", "by_mode"})
        if graphs:
            assert_all_on_rank0_match(llm, prompts, expected)
        stats = settled_stats(llm)
        assert all((s["num_tbo_steps"] > 0) == tbo for s in stats)
        assert all((s["num_graph_steps"] > 0) == graphs for s in stats)
    finally:
        llm.shutdown()
