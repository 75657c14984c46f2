"""EPLB placement: the vectorised plans match a plain-Python reference and keep the invariants users need."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeserve.eplb import (
    balancedness,
    experts_moved,
    gpu_loads,
    rebalance_experts,
    rebalance_experts_movement_aware,
)

FAST = settings(max_examples=50, deadline=None)


# ---------------------------------------------------------------- slow reference (one layer, plain Python)


def ref_packing(weights: list[float], num_packs: int) -> list[tuple[int, int]]:
    """(pack, rank in pack) per item: heaviest first (ties: lower index) into the lightest non-full pack
    (ties: lower pack)."""
    per_pack = len(weights) // num_packs
    if per_pack == 1:
        return [(i, 0) for i in range(len(weights))]
    load, size = [0.0] * num_packs, [0] * num_packs
    out = [(-1, -1)] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        pack = min((p for p in range(num_packs) if size[p] < per_pack), key=lambda p: load[p])
        out[item] = (pack, size[pack])
        load[pack] += weights[item]
        size[pack] += 1
    return out


def ref_replicate(weights: list[float], num_physical: int) -> tuple[list[int], list[int]]:
    count = [1] * len(weights)
    phys = list(range(len(weights)))
    for _ in range(num_physical - len(weights)):
        per_replica = [w / c for w, c in zip(weights, count)]
        expert = per_replica.index(max(per_replica))
        phys.append(expert)
        count[expert] += 1
    return phys, count


def ref_rebalance_layer(w: list[float], num_replicas: int, groups: int, nodes: int, gpus: int) -> list[int]:
    if groups % nodes:
        groups, nodes = 1, 1
    size, per_node = len(w) // groups, len(w) // nodes
    group_pack = ref_packing([sum(w[g * size : (g + 1) * size]) for g in range(groups)], nodes)
    node_experts = [[] for _ in range(nodes)]
    for group, _ in sorted(enumerate(group_pack), key=lambda item: item[1]):
        node_experts[group_pack[group][0]] += range(group * size, (group + 1) * size)
    assert all(len(e) == per_node for e in node_experts)
    out = []
    for experts in node_experts:
        phys, count = ref_replicate([w[e] for e in experts], num_replicas // nodes)
        packing = ref_packing([w[experts[i]] / count[i] for i in phys], gpus // nodes)
        slots = sorted(range(len(phys)), key=lambda i: packing[i])
        out += [experts[phys[i]] for i in slots]
    return out


# ---------------------------------------------------------------- inputs


@st.composite
def problems(draw, integer: bool = True):
    """(weight [L, E], num_replicas, num_groups, num_nodes, num_gpus), small and valid."""
    nodes = draw(st.sampled_from([1, 2, 4]))
    gpus = nodes * draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 4, 3]))
    experts = groups * nodes * draw(st.integers(1, 3))
    slots = draw(st.integers(-(-experts // gpus), -(-experts // gpus) + 3))
    layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(layers, experts, generator=gen) ** 3 * 100
    weight = weight.round() + 1 if integer else weight + 0.01
    return weight, slots * gpus, groups, nodes, gpus


def check_tables(phy2log, log2phy, logcnt, num_logical):
    layers, num_physical = phy2log.shape
    for layer in range(layers):
        for e in range(num_logical):
            replicas = (phy2log[layer] == e).nonzero().flatten().tolist()
            assert len(replicas) == logcnt[layer, e] >= 1
            assert log2phy[layer, e, : len(replicas)].tolist() == replicas
            assert (log2phy[layer, e, len(replicas) :] == -1).all()


# ---------------------------------------------------------------- plain plan


@FAST
@given(problems())
def test_plan_matches_reference(problem):
    weight, replicas, groups, nodes, gpus = problem
    phy2log, _, _ = rebalance_experts(weight, replicas, groups, nodes, gpus)
    for layer in range(weight.shape[0]):
        expected = ref_rebalance_layer(weight[layer].double().tolist(), replicas, groups, nodes, gpus)
        assert phy2log[layer].tolist() == expected


@FAST
@given(problems(integer=False))
def test_plan_is_a_valid_placement(problem):
    weight, replicas, groups, nodes, gpus = problem
    phy2log, log2phy, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus)
    assert phy2log.shape == (weight.shape[0], replicas) and phy2log.dtype == torch.int64
    check_tables(phy2log, log2phy, logcnt, weight.shape[1])
    assert (logcnt.sum(-1) == replicas).all()
    again = rebalance_experts(weight.clone(), replicas, groups, nodes, gpus)
    assert all(torch.equal(a, b) for a, b in zip((phy2log, log2phy, logcnt), again))
    if groups % nodes == 0:  # hierarchical: every replica of a group sits on the group's node
        per_node = replicas // nodes
        node_of_slot = torch.arange(replicas) // per_node
        group_of_slot = phy2log // (weight.shape[1] // groups)
        for layer in range(weight.shape[0]):
            for g in range(groups):
                assert node_of_slot[group_of_slot[layer] == g].unique().numel() == 1


def test_plain_plan_beats_trivial_placement_on_skewed_loads():
    """On Zipf-like loads the plan never loses to experts-in-order (the greedy is not optimal on adversarial
    inputs, so this is checked on realistic ones; the movement-aware variant guarantees it for any input)."""
    gen = torch.Generator().manual_seed(1)
    layers, experts = 6, 64
    ranks = torch.stack([torch.randperm(experts, generator=gen) for _ in range(layers)])
    weight = 1000.0 / (ranks + 1.0) ** 0.8
    trivial = torch.arange(experts).expand(layers, experts)
    for gpus, nodes, groups, extra in [
        (8, 1, 4, 0),
        (8, 2, 4, 8),
        (16, 2, 4, 16),
        (16, 4, 2, 16),
        (4, 1, 1, 4),
    ]:
        phy2log, _, _ = rebalance_experts(weight, experts + extra, groups, nodes, gpus)
        before = gpu_loads(weight, gpus, trivial).amax(-1)
        after = gpu_loads(weight, gpus, phy2log).amax(-1)
        assert (after <= before + 1e-9).all()
        assert (
            balancedness(gpu_loads(weight, gpus, phy2log)) > balancedness(gpu_loads(weight, gpus, trivial))
        ).all()


def test_replication_helps_a_hot_expert():
    weight = torch.tensor([[100.0, 1, 1, 1, 1, 1, 1, 1]])
    phy2log, _, logcnt = rebalance_experts(weight, 16, 1, 1, 4)
    assert logcnt[0, 0] >= 4 and (logcnt[0, 1:] == 1).all()
    trivial = torch.arange(8).view(1, 8)
    assert balancedness(gpu_loads(weight, 4, trivial)).item() < 0.3
    assert balancedness(gpu_loads(weight, 4, phy2log)).item() > 0.75


@pytest.mark.parametrize(
    "args, message",
    [
        ((10, 1, 1, 4), "multiple of num_gpus"),
        ((4, 1, 1, 4), ">= the 8 logical"),
        ((8, 1, 3, 4), "multiple of num_nodes"),
        ((8, 3, 1, 4), "num_groups=3"),
    ],
)
def test_bad_arguments_say_what_is_allowed(args, message):
    with pytest.raises(ValueError, match=message):
        rebalance_experts(torch.rand(2, 8), *args)
    with pytest.raises(ValueError, match="non-negative"):
        rebalance_experts(-torch.rand(2, 8), 8, 1, 1, 4)


# ---------------------------------------------------------------- movement-aware plan


@st.composite
def current_placements(draw):
    weight, replicas, groups, nodes, gpus = draw(problems(integer=False))
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    layers, experts = weight.shape
    rows = []
    for _ in range(layers):  # every expert once, the rest random, shuffled over slots
        row = torch.cat([torch.arange(experts), torch.randint(experts, (replicas - experts,), generator=gen)])
        rows.append(row[torch.randperm(replicas, generator=gen)])
    return weight, torch.stack(rows), groups, nodes, gpus


@FAST
@given(current_placements())
def test_movement_aware_balances_like_plain_and_moves_less(problem):
    weight, current, groups, nodes, gpus = problem
    plain, _, _ = rebalance_experts(weight, current.shape[1], groups, nodes, gpus)
    phy2log, log2phy, logcnt = rebalance_experts_movement_aware(weight, current, groups, nodes, gpus)
    check_tables(phy2log, log2phy, logcnt, weight.shape[1])
    plain_max = gpu_loads(weight, gpus, plain).amax(-1)
    new_max = gpu_loads(weight, gpus, phy2log).amax(-1)
    current_max = gpu_loads(weight, gpus, current).amax(-1)
    assert (new_max <= plain_max * (1 + 1e-12)).all()
    assert (new_max <= current_max * (1 + 1e-12)).all()
    assert (experts_moved(current, phy2log, gpus) <= experts_moved(current, plain, gpus)).all()
    again, _, _ = rebalance_experts_movement_aware(weight, current.clone(), groups, nodes, gpus)
    assert torch.equal(phy2log, again)


@FAST
@given(current_placements())
def test_movement_aware_keeps_the_slots_of_experts_that_stay(problem):
    weight, current, groups, nodes, gpus = problem
    phy2log, _, _ = rebalance_experts_movement_aware(weight, current, groups, nodes, gpus)
    slots = current.shape[1] // gpus
    for layer in range(current.shape[0]):
        for gpu in range(gpus):
            old = current[layer, gpu * slots : (gpu + 1) * slots].tolist()
            new = phy2log[layer, gpu * slots : (gpu + 1) * slots].tolist()
            # however many replicas of e stay on this GPU, that many of its old slots keep e
            for e in set(new):
                kept = sum(o == n == e for o, n in zip(old, new))
                assert kept == min(old.count(e), new.count(e))


def test_movement_aware_is_a_no_op_on_its_own_plan_and_relabels_a_permuted_plan():
    gen = torch.Generator().manual_seed(3)
    weight = torch.rand(4, 32, generator=gen) ** 2
    plain, _, _ = rebalance_experts(weight, 48, 4, 2, 8)
    same, _, _ = rebalance_experts_movement_aware(weight, plain, 4, 2, 8)
    assert torch.equal(same, plain)
    # Swap the two nodes and shuffle GPUs and slots: the plan should find its way back with zero transfers.
    by_gpu = plain.view(4, 8, 6)[:, [5, 4, 7, 6, 1, 0, 3, 2]]
    shuffled = by_gpu[:, :, torch.randperm(6, generator=gen)].reshape(4, 48)
    back, _, _ = rebalance_experts_movement_aware(weight * 1.5, shuffled, 4, 2, 8)
    assert experts_moved(shuffled, back, 8).sum() == 0


def test_small_drift_moves_few_experts():
    """When the load drifts a little, the movement-aware plan keeps the plain plan's balance and moves a
    fraction of what re-planning from scratch moves."""
    gen = torch.Generator().manual_seed(5)
    layers, experts, gpus = 4, 64, 8
    position = torch.rand(layers, experts, generator=gen) * experts
    weight = 1000.0 / (position.argsort(-1).argsort(-1) + 1.0) ** 0.8
    current, _, _ = rebalance_experts(weight, 80, 4, 2, gpus)
    position = position + torch.randn(layers, experts, generator=gen)
    drifted = 1000.0 / (position.argsort(-1).argsort(-1) + 1.0) ** 0.8
    plain, _, _ = rebalance_experts(drifted, 80, 4, 2, gpus)
    aware, _, _ = rebalance_experts_movement_aware(drifted, current, 4, 2, gpus)
    assert (
        gpu_loads(drifted, gpus, aware).amax(-1) <= gpu_loads(drifted, gpus, plain).amax(-1) * (1 + 1e-12)
    ).all()
    assert experts_moved(current, aware, gpus).sum() * 3 <= experts_moved(current, plain, gpus).sum() * 2


def test_min_improvement_keeps_layers_that_would_barely_improve():
    gen = torch.Generator().manual_seed(4)
    weight = torch.rand(3, 16, generator=gen) + 1.0
    current = torch.arange(16).repeat(3, 2)
    kept, _, _ = rebalance_experts_movement_aware(weight, current, 1, 1, 4, min_improvement=0.99)
    assert torch.equal(kept, current)
    with pytest.raises(ValueError, match="no replica of logical expert"):
        rebalance_experts_movement_aware(weight, torch.zeros(3, 32, dtype=torch.int64), 1, 1, 4)
