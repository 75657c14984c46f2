"""Two-batch overlap: the split, the stage scheduler, and TBO on == TBO off for a stack of EP MoE layers."""

from __future__ import annotations

from collections.abc import Callable, Generator

import pytest
import torch
import torch.distributed as dist
from test_ep_dispatch import spawn_ranks
from test_ep_graphs import GREEDY, ep_runner

from moeserve.engine.dp_sync import StepSync, plan_step
from moeserve.forward_batch import ForwardMode
from moeserve.moe.all_gather import AllGatherDispatcher
from moeserve.moe.all_to_all import TorchAllToAllDispatcher
from moeserve.moe.dispatcher import Dispatcher, DispatchOutput
from moeserve.moe.experts import torch_experts
from moeserve.moe.placement import ExpertPlacement
from moeserve.moe.tbo import run_overlapped, run_sequential, split_for_tbo, tbo_cut


def moe_stages(  # the staged MoE layer of MoELayer.forward_stages, without a model
    dispatcher: Dispatcher,
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    mode: ForwardMode,
    experts: Callable[[DispatchOutput], torch.Tensor],
) -> Generator[None, None, torch.Tensor]:
    """One MoE layer as stages: dispatch send | yield | receive, experts, combine send | yield | receive.

    hidden: [T, H]; topk_ids: [T, k] int32 physical ids; topk_weights: [T, k] float32;
    experts(received) -> [num_recv, H]. Returns (via StopIteration) the combined output [T, H].
    Use with `yield from` inside a micro-batch's layer loop."""
    pending = dispatcher.dispatch_begin(hidden, topk_ids, topk_weights, mode)
    yield
    received = dispatcher.dispatch_end(pending)
    pending_combine = dispatcher.combine_begin(experts(received), received.handle)
    yield
    return dispatcher.combine_end(pending_combine)


def brute_force_split(counts: list[int]) -> int:
    total = sum(counts)
    return min(range(1, len(counts)), key=lambda i: (abs(2 * sum(counts[:i]) - total), i))


@pytest.mark.parametrize(
    "counts", [[5, 5], [1, 1, 1, 1, 1], [100, 30, 30, 40], [7, 1, 3, 9, 2, 2], [1, 2], [3, 3, 3]]
)
def test_split_for_tbo_balances_tokens(counts):
    assert split_for_tbo(counts) == brute_force_split(counts)


def test_step_plan_gives_each_micro_batch_its_largest_size():
    """The plan pads micro-batch k to the most tokens any rank puts into its k-th micro-batch; a rank with
    no useful split (one request, or a lopsided one) puts everything into the first."""
    ranks = [[3, 4, 5, 2], [9], [100, 1, 1], []]
    rows = []
    for counts in ranks:
        first = sum(counts[: tbo_cut(counts)])
        rows.append((sum(counts), False, len(counts) >= 2, 0, first))
    assert [r[4] for r in rows] == [7, 9, 102, 0]
    assert plan_step(rows, enable_tbo=False).micro_batch_tokens == (0, 0)
    assert plan_step(rows, enable_tbo=True).use_tbo is False  # ranks with < 2 requests cannot split
    rows = [(14, True, True, 0, 7), (40, False, True, 0, 22), (6, False, True, 0, 6)]
    plan = plan_step(rows, enable_tbo=True)
    assert plan.use_tbo and plan.micro_batch_tokens == (22, 18) and plan.tokens_per_rank == (14, 40, 6)
    decode = plan_step([(n, False, split, 0, first) for n, _, split, _, first in rows], enable_tbo=True)
    assert decode.mode == ForwardMode.DECODE and not decode.use_tbo  # decode steps never split


def agreed_stop(rank: int, world_size: int, groups) -> None:
    """Ranks ask to stop at different steps (rank r before its step 3 + 2r); all must stop at the first
    agreement after the earliest request, and agree() stays None afterwards without a collective."""
    sync = StepSync(groups.cpu_group, world_size)
    steps = 0
    while True:
        if steps == 3 + 2 * rank:
            sync.stop_requested = True
        plan = sync.agree(1, False, False, 0, 1)
        if sync.stopped:
            assert plan is None
            break
        assert plan is not None and plan.tokens_per_rank == (1,) * world_size
        steps += 1
    assert steps == 3, f"rank {rank} stopped after {steps} steps"
    assert sync.agree(1, False, False, 0, 1) is None  # no collective: the other ranks may be gone
    dist.barrier(groups.cpu_group)


def test_ranks_stop_at_one_agreed_step():
    spawn_ranks(agreed_stop, 3)


def test_split_for_tbo_refuses_useless_splits():
    assert split_for_tbo([]) is None
    assert split_for_tbo([64]) is None
    assert split_for_tbo([100, 1, 1]) is None  # best split is 100 | 2
    assert split_for_tbo([100, 1, 1], min_fraction=0.0) == 1


def test_run_overlapped_alternates_stages_and_returns_results():
    log: list[str] = []

    def micro_batch(tag: str, stages: int):
        for s in range(stages):
            log.append(f"{tag}{s}")
            yield
        log.append(f"{tag}-done")
        return tag * 2

    assert run_overlapped([micro_batch("a", 2), micro_batch("b", 3)]) == ["aa", "bb"]
    assert log == ["a0", "b0", "a1", "b1", "a-done", "b2", "b-done"]
    log.clear()
    assert run_sequential([micro_batch("a", 1), micro_batch("b", 1)]) == ["aa", "bb"]
    assert log == ["a0", "a-done", "b0", "b-done"]


# ---- TBO on == off across gloo ranks -------------------------------------------------------------------
NUM_LAYERS, NUM_EXPERTS, HIDDEN, INTER, TOP_K = 3, 6, 16, 20, 2


def model_weights():
    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(NUM_LAYERS, NUM_EXPERTS, HIDDEN, generator=gen)
    w13 = torch.randn(NUM_LAYERS, NUM_EXPERTS, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(NUM_LAYERS, NUM_EXPERTS, HIDDEN, INTER, generator=gen) / INTER**0.5
    return gate, w13, w2


def micro_batch(h, dispatcher, placement, weights):
    """A stack of residual MoE layers as one micro-batch pipeline: h [T, H] -> [T, H]."""
    gate, w13, w2 = weights
    for layer in range(NUM_LAYERS):
        probs = (h @ gate[layer].t()).softmax(dim=1)
        topk_weights, topk_ids = probs.topk(TOP_K, dim=1)
        held = torch.tensor(placement.local_logical_experts(layer))

        def experts(received, w13_l=w13[layer][held], w2_l=w2[layer][held]):
            return torch_experts(received.hidden, w13_l, w2_l, received.topk_weights, received.topk_ids)

        phys = placement.to_physical(layer, topk_ids)
        y = yield from moe_stages(dispatcher, h, phys, topk_weights, ForwardMode.EXTEND, experts)
        h = h + y
    return h


def run_tbo_on_and_off(rank: int, world_size: int, groups) -> None:
    weights = model_weights()
    # Replicated experts so that routing depends on token positions (the split changes them).
    num_redundant = -NUM_EXPERTS % world_size + world_size
    placement = ExpertPlacement.default(NUM_LAYERS, NUM_EXPERTS, num_redundant, rank, world_size)
    gen = torch.Generator().manual_seed(rank)
    # Rank 1: a single request (cannot split); last rank: no requests at all.
    num_reqs = {1: 1, world_size - 1: 0}.get(rank, 5)
    counts = torch.randint(1, 6, (num_reqs,), generator=gen).tolist()
    h = torch.randn(sum(counts), HIDDEN, generator=gen)
    # The step plan as the engine makes it: each rank announces its first micro-batch's tokens (`tbo_cut`).
    split_at = sum(counts[: tbo_cut(counts)])
    plan = StepSync(groups.cpu_group, world_size, enable_tbo=True).agree(h.shape[0], True, True, 0, split_at)
    if rank == 0:
        assert split_for_tbo(counts) is not None and 0 < split_at < h.shape[0]
    for dispatcher in (TorchAllToAllDispatcher(groups.ep_group, placement.num_local_slots),
                       AllGatherDispatcher(groups.ep_group, placement.num_local_slots)):
        # As the runner does: the whole step through one instance, or micro-batch k through the k-th
        # instance sized for that micro-batch's largest on any rank.
        dispatcher.begin_step(ForwardMode.EXTEND, max(plan.tokens_per_rank))
        (off,) = run_sequential([micro_batch(h, dispatcher, placement, weights)])
        pair = (dispatcher, dispatcher.sibling())
        for d, size in zip(pair, plan.micro_batch_tokens):
            d.begin_step(ForwardMode.EXTEND, size)
        first = micro_batch(h[:split_at], pair[0], placement, weights)
        second = micro_batch(h[split_at:], pair[1], placement, weights)
        on_a, on_b = run_overlapped([first, second])
        where = f"{dispatcher.name} on rank {rank}"
        torch.testing.assert_close(torch.cat([on_a, on_b]), off, atol=1e-5, rtol=1e-5, msg=where)
    dist.barrier(groups.cpu_group)


def test_tbo_on_equals_tbo_off_on_gloo_ranks():
    spawn_ranks(run_tbo_on_and_off, 3)


def tbo_step_with_chunks(rank: int, world_size: int, groups, path: str) -> None:
    """One rank's runner: a TBO prefill step equals the same step unsplit, for every cut (an empty second
    micro-batch included), with a chunk that samples nothing among the requests."""
    from moeserve.scheduler.output import ScheduledRequest, SchedulerOutput

    runner = ep_runner(rank, world_size, groups, path, tbo=True, num_kv_blocks=32)
    gen = torch.Generator().manual_seed(5)
    reqs = [ScheduledRequest("chunk", torch.randint(3, 90, (5,), generator=gen).tolist(), 0, [0, 1], False, GREEDY),
            ScheduledRequest("whole", torch.randint(3, 90, (7,), generator=gen).tolist(), 0, [2, 3], True, GREEDY),
            ScheduledRequest("short", torch.randint(3, 90, (2,), generator=gen).tolist(), 0, [4], True, GREEDY)]
    tokens = sum(len(r.token_ids) for r in reqs)
    plain = runner.execute(SchedulerOutput(0, reqs), plan_step([(tokens, True, False, 0, tokens)], False)).sampled
    assert set(plain) == {"whole", "short"}
    for cut in (1, 2, 3):
        first_tokens = sum(len(r.token_ids) for r in reqs[:cut])
        plan = plan_step([(tokens, True, True, 0, first_tokens)], enable_tbo=True)
        assert plan.use_tbo
        split = runner.launch(SchedulerOutput(0, reqs), plan, tbo_cut=cut).resolve().sampled
        assert split == plain, cut
    assert runner.num_tbo_steps == 3


def test_tbo_step_equals_the_unsplit_step_for_every_cut(tiny_checkpoint):
    spawn_ranks(tbo_step_with_chunks, 1, str(tiny_checkpoint("qwen3_moe")))
