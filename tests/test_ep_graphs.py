"""EP decode steps through the decode graphs' static batches: every rank pads to the size the step plan gives (an
idle rank replays padding rows only), and each rank samples the same tokens and records the same expert load as
the eager step. On CPU gloo ranks the static batches run eagerly (`CudaGraphRunner(use_graphs=False)`); the real
graphs with NCCL collectives inside run in `pytest -m multigpu` (tests/test_cluster_ep.py)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from test_ep_dispatch import spawn_ranks

from moeserve.config import EngineConfig
from moeserve.engine.dp_sync import StepPlan
from moeserve.forward_batch import ForwardMode
from moeserve.loader.checkpoint import read_hf_config
from moeserve.models.config import ModelConfig
from moeserve.moe.all_gather import AllGatherDispatcher
from moeserve.moe.placement import ExpertPlacement
from moeserve.runner.model_runner import ModelRunner, RankSetup
from moeserve.sampling_params import SamplingParams
from moeserve.scheduler.output import ScheduledRequest, SchedulerOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def rank_prompts(rank: int, count: int, vocab: int) -> list[list[int]]:
    """Every process derives every rank's prompts, so each can write the step plans without a collective."""
    rng = random.Random(100 + rank)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 9))] for _ in range(count)]


def ep_runner(rank: int, world: int, groups, path: str, tbo: bool = False, **config):
    """A CPU runner on an all-gather EP rank (with the dispatcher's TBO sibling when tbo), fp32, blocks of 4,
    contexts up to 64; config: more `EngineConfig` fields. (Its dispatcher is `runner.ctx.dispatcher`.)"""
    mc = ModelConfig.from_hf(read_hf_config(path))
    placement = ExpertPlacement.default(mc.num_moe_layers, mc.num_experts, 0, rank, world, dynamic=True)
    dispatcher = AllGatherDispatcher(groups.ep_group, placement.num_local_slots)
    engine_config = EngineConfig(model=path, device="cpu", dtype="float32", block_size=4, max_model_len=64, **config)
    setup = RankSetup(placement=placement, dispatcher=dispatcher, tbo_dispatcher=dispatcher.sibling() if tbo else None)
    return ModelRunner(engine_config, path, setup)


def prefilled_runner(rank: int, world: int, groups, path: str, counts: tuple[int, ...]):
    """A runner on an all-gather EP rank with EPLB's load buffer, its requests prefilled (one eager lockstep
    step); returns (runner, each request's first decode step)."""
    runner = ep_runner(rank, world, groups, path, num_kv_blocks=48, cuda_graph_max_batch=8)
    placement = runner.ctx.placement
    runner.expert_load = torch.zeros(placement.num_layers, placement.num_physical, dtype=torch.int64)  # EPLB's
    prompts = {r: rank_prompts(r, counts[r], runner.model_config.vocab_size) for r in range(world)}
    mine = prompts[rank]
    blocks = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(len(mine))]
    prefill = [ScheduledRequest(f"r{i}", p, 0, b, True, GREEDY) for i, (p, b) in enumerate(zip(mine, blocks))]
    extend = StepPlan(ForwardMode.EXTEND, tuple(sum(map(len, prompts[r])) for r in range(world)), False)
    first = runner.execute(SchedulerOutput(0, prefill), extend).sampled
    decode = [ScheduledRequest(f"r{i}", first[f"r{i}"], len(p), b, True, GREEDY, 1)
              for i, (p, b) in enumerate(zip(mine, blocks))]
    return runner, decode


def scratch_graph_runner(runner: ModelRunner):
    """The decode-graph runner, run eagerly; the last KV block plays its scratch block (requests use lower ones)."""
    return runner.graph_runner(runner.num_blocks - 1, use_graphs=False)


def ep_decode_step(rank: int, world: int, groups, path: str, counts: tuple[int, ...], size: int | None) -> None:
    runner, decode = prefilled_runner(rank, world, groups, path, counts)
    plan = StepPlan(ForwardMode.DECODE, counts, False)
    eager = runner.execute(SchedulerOutput(1, decode), plan).sampled  # no graph runner: the plain eager step
    eager_load = runner.expert_load.clone()
    runner.graphs = scratch_graph_runner(runner)
    runner.expert_load.fill_(-7)  # the step must overwrite it with its own counts
    stepped = runner.execute(SchedulerOutput(1, decode), plan).sampled

    assert runner.num_graph_steps == (size is not None), "graph path taken (or not) against the plan"
    assert runner.ctx.dispatcher.capacity == (size or max(counts)), "every rank dispatches with the same capacity"
    assert stepped == eager and len(stepped) == counts[rank]
    assert torch.equal(runner.expert_load, eager_load)
    # Padding rows choose no expert: each layer counts exactly this rank's real tokens' choices.
    assert (runner.expert_load.sum(dim=1) == counts[rank] * runner.model_config.top_k).all()


@pytest.mark.parametrize("counts,size", [((3, 1), 4), ((3, 0), 4), ((0, 5), 8), ((9, 2), None)])
def test_ep_decode_graph_batches_match_eager(tiny_checkpoint, counts, size):
    """counts: decode requests per rank; size: the graph every rank replays (the smallest captured size that
    holds the largest rank's requests; sizes 1, 2, 4, 8), None: more than the largest graph, all eager."""
    path = str(tiny_checkpoint("qwen3_moe"))
    spawn_ranks(ep_decode_step, len(counts), path, counts, size)


def decode_plan_with_a_chunk(rank: int, world: int, groups, path: str) -> None:
    runner, decode = prefilled_runner(rank, world, groups, path, (2,))
    runner.graphs = scratch_graph_runner(runner)
    chunk = dataclasses.replace(decode[1], sample=False)  # a one-token prompt chunk short of the prompt's end
    with pytest.raises(RuntimeError, match="cannot replay a graph"):
        runner.launch(SchedulerOutput(1, [decode[0], chunk]), StepPlan(ForwardMode.DECODE, (2,), False))


def test_ep_graph_step_refuses_a_decode_plan_with_a_prompt_chunk(tiny_checkpoint):
    """The engine plans a step with a non-sampling chunk as extend; a decode plan holding one anyway fails loudly
    rather than leaving this rank eager while its peers replay graphs."""
    spawn_ranks(decode_plan_with_a_chunk, 1, str(tiny_checkpoint("qwen3_moe")))


class RecordingSync:
    """Stands in for `StepSync`: records what the engine tells the other ranks, and plans nothing."""

    enable_tbo = False

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def agree(self, *row) -> None:
        self.rows.append(row)


def test_a_one_token_chunk_that_samples_nothing_plans_as_extend(tiny_checkpoint):
    """Decode plans mean one sampling token per request on every rank (the EP graphs rely on it): a one-token
    prompt chunk short of the prompt's end is announced as extend."""
    from moeserve.engine.engine import LLMEngine

    path = str(tiny_checkpoint("qwen3_moe"))
    sync = RecordingSync()
    engine = LLMEngine(EngineConfig(model=path, device="cpu", dtype="float32", num_kv_blocks=16), sync=sync)
    decode = ScheduledRequest("d", [5], 3, [0], True, GREEDY, 1)
    for reqs, extend in (([decode], False), ([decode, dataclasses.replace(decode, request_id="c", sample=False)],
                                             True), ([dataclasses.replace(decode, token_ids=[5, 6])], True)):
        assert engine._launch(SchedulerOutput(0, reqs)) is None  # the stand-in plans nothing
        assert sync.rows[-1][1] is extend, reqs
