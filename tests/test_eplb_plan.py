"""Move plans: executing the ops on old weights yields exactly the new placement, deterministically."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.eplb import (
    MoveKind,
    experts_moved,
    plan_moves,
    rebalance_experts,
    rebalance_experts_movement_aware,
)

FAST = settings(max_examples=50, deadline=None)


@st.composite
def placement_pairs(draw):
    """(old [L, R], new [L, R], num_gpus, gpus_per_node): two valid placements of the same experts."""
    gpus_per_node = draw(st.sampled_from([1, 2, 4]))
    gpus = gpus_per_node * draw(st.sampled_from([1, 2, 3]))
    experts = draw(st.integers(2, 12))
    slots = draw(st.integers(-(-experts // gpus), -(-experts // gpus) + 3))
    layers = draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))

    def placement():
        rows = []
        for _ in range(layers):
            extra = torch.randint(experts, (slots * gpus - experts,), generator=gen)
            row = torch.cat([torch.arange(experts), extra])
            rows.append(row[torch.randperm(slots * gpus, generator=gen)])
        return torch.stack(rows)

    old = placement()
    # Half the time the new placement is a perturbation of the old one, so local copies and kept slots occur.
    new = placement() if draw(st.booleans()) else old.clone()
    swaps = draw(st.integers(0, 4))
    for _ in range(swaps):
        i, j = torch.randint(slots * gpus, (2,), generator=gen).tolist()
        new[:, [i, j]] = new[:, [j, i]]
    return old, new, gpus, gpus_per_node


def execute(plan, old: torch.Tensor) -> torch.Tensor:
    """Run the ops as an executor would: staging from OLD weights, free riders after receives, then flip.
    A slot's 'weights' are the logical id it holds."""
    slots = plan.slots_per_gpu
    staging: dict[tuple[int, int], int] = {}
    for op in plan.ops:
        if op.kind == MoveKind.FREE_RIDER:
            continue
        assert op.src_slot // slots == op.src_rank  # reads a slot of the source GPU
        if op.kind == MoveKind.LOCAL_COPY:
            assert op.src_rank == op.dst_rank
        staging[op.layer, op.dst_slot] = int(old[op.layer, op.src_slot])
    for op in plan.ops:
        if op.kind == MoveKind.FREE_RIDER:
            assert op.src_rank == op.dst_rank and op.src_slot // slots == op.dst_rank
            staging[op.layer, op.dst_slot] = staging[op.layer, op.src_slot]
    out = old.clone()
    for (layer, slot), expert in staging.items():
        out[layer, slot] = expert
    return out


@FAST
@given(placement_pairs())
def test_executing_the_plan_yields_the_new_placement(case):
    old, new, gpus, per_node = case
    plan = plan_moves(old, new, gpus, per_node)
    assert torch.equal(execute(plan, old), new)
    assert [(op.layer, op.dst_slot) for op in plan.ops] == sorted((op.layer, op.dst_slot) for op in plan.ops)
    assert {(op.layer, op.dst_slot) for op in plan.ops} == {tuple(x) for x in (old != new).nonzero().tolist()}
    assert plan.num_transfers == int(experts_moved(old, new, gpus).sum())
    again = plan_moves(old.clone(), new.clone(), gpus, per_node)
    assert again.ops == plan.ops


@FAST
@given(placement_pairs())
def test_op_kinds_and_sources(case):
    old, new, gpus, per_node = case
    plan = plan_moves(old, new, gpus, per_node)
    slots = plan.slots_per_gpu
    for op in plan.ops:
        on_dst_gpu = old[op.layer, op.dst_rank * slots : (op.dst_rank + 1) * slots].tolist()
        assert int(new[op.layer, op.dst_slot]) == op.expert
        if op.kind == MoveKind.LOCAL_COPY:
            assert int(old[op.layer, op.src_slot]) == op.expert
        else:
            assert op.expert not in on_dst_gpu
        if op.kind == MoveKind.RECV:
            assert int(old[op.layer, op.src_slot]) == op.expert  # the source holds it in the OLD placement
            holders = {p // slots for p in (old[op.layer] == op.expert).nonzero().flatten().tolist()}
            near = {g for g in holders if g // per_node == op.dst_rank // per_node}
            assert op.src_rank in (near or holders)  # same node whenever possible
        if op.kind == MoveKind.FREE_RIDER:
            first = [o for o in plan.ops if o.layer == op.layer and o.dst_slot == op.src_slot]
            assert first and first[0].kind == MoveKind.RECV and first[0].expert == op.expert


def test_sends_spread_evenly_on_a_uniform_swap():
    # GPUs 0-3 hold experts 0-7, GPUs 4-7 hold 8-15; the new placement swaps the halves: every receive has
    # four equal candidates, so 8 senders share 64 sends per layer evenly.
    layers, gpus = 3, 8
    first, second = torch.arange(8).repeat(4), torch.arange(8, 16).repeat(4)
    old = torch.cat([first, second]).repeat(layers, 1)
    new = torch.cat([second, first]).repeat(layers, 1)
    plan = plan_moves(old, new, gpus, gpus_per_node=8)
    sends = plan.sends_per_rank()
    assert sum(sends) == layers * 64 and max(sends) - min(sends) <= 1
    assert all(len(plan.sends_for(r)) == sends[r] for r in range(gpus))
    assert all(len(plan.recvs_for(r)) == layers * 8 for r in range(gpus))
    assert plan.bytes_moved(10) == layers * 64 * 10 and plan.cross_node_bytes(10) == 0


def test_layer_chunks_partition_the_plan():
    gen = torch.Generator().manual_seed(0)
    weight = torch.rand(7, 16, generator=gen)
    old, _, _ = rebalance_experts(weight, 24, 4, 2, 4)
    new, _, _ = rebalance_experts_movement_aware(torch.rand(7, 16, generator=gen) ** 4, old, 4, 2, 4)
    plan = plan_moves(old, new, 4, 2)
    chunks = plan.layer_chunks(3)
    assert [(c.first_layer, c.end_layer) for c in chunks] == [(0, 3), (3, 6), (6, 7)]
    assert [op for c in chunks for op in c.ops] == plan.ops
    assert all(
        lo <= op.layer < hi for c in chunks for op in c.ops for lo, hi in [(c.first_layer, c.end_layer)]
    )


def test_plan_rejects_an_expert_nobody_holds():
    old = torch.tensor([[0, 0, 1, 1]])
    new = torch.tensor([[0, 2, 1, 1]])
    with pytest.raises(ValueError, match="expert 2 is not held"):
        plan_moves(old, new, 2, 1)
