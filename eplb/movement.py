"""Rebalance while moving as little as possible: the plain plan's balance, far fewer bytes on the wire.

Per layer the result is the candidate with the fewest transfers among those whose max GPU load is at most the
plain DeepSeek plan's (times 1 + balance_tolerance):
  sticky      DeepSeek's steps with "stay where you are" packing (``sticky.py``): expert groups stay on their
              node and replicas on their GPU whenever that keeps the pack under the plain plan's peak, then
              swaps pull any GPU above that peak back down;
  relabelled  the plain plan with its GPU packs handed to the GPUs that hold most of their experts
              (``relabel.py``); same loads as the plain plan, so it always qualifies;
and the current placement is kept when no candidate lowers the layer's max GPU load enough (min_improvement).
Slots are aligned so an expert that stays on its GPU also keeps its slot (no copy at all).
"""

from __future__ import annotations

import torch

from moeserve.eplb.algorithm import balanced_packing, check_balance_args, hierarchical_placement
from moeserve.eplb.metrics import experts_moved, gpu_loads, physical_loads
from moeserve.eplb.relabel import align_slots, relabel_to_current
from moeserve.eplb.sticky import repair_peaks, sticky_packing
from moeserve.eplb.tables import check_placement, gpu_expert_counts, replica_tables


def _sticky_plan(
    weight: torch.Tensor,
    current: torch.Tensor,
    target: torch.Tensor,
    node_target: torch.Tensor,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> torch.Tensor:
    """DeepSeek's hierarchical steps with sticky packing. weight: [L, E] float64; current: [L, R] int64;
    target: [L] peak GPU load to stay under; node_target: [L] node load under which groups stay home.
    Returns phy2log [L, R] int64 (aligned to current's slots)."""
    num_layers, num_logical = weight.shape
    num_physical = current.shape[1]
    per_node, slots = num_gpus // num_nodes, num_physical // num_gpus
    on_gpu = gpu_expert_counts(current, num_gpus, num_logical)  # [L, G, E]

    # Groups stay on the node that holds most of their experts now, while under node_target.
    on_node = on_gpu.view(num_layers, num_nodes, per_node, num_groups, -1).sum(dim=(2, 4))  # [L, N, groups]
    group_home = torch.zeros_like(on_node).scatter_(1, on_node.argmax(1, keepdim=True), 1)

    def pack_groups(w: torch.Tensor, key: torch.Tensor, packs: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sticky_packing(w, key, group_home, packs, node_target)

    node_rows = on_gpu.view(num_layers * num_nodes, per_node, num_logical)
    row_target = target.repeat_interleave(num_nodes)

    def pack_gpus(w: torch.Tensor, key: torch.Tensor, packs: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sticky_packing(w, key, node_rows, packs, row_target)

    phy2log = hierarchical_placement(
        weight, num_physical, num_groups, num_nodes, num_gpus, pack_groups, pack_gpus
    )
    loads = physical_loads(weight, phy2log).view(-1, per_node, slots)
    keys = repair_peaks(loads, phy2log.view(-1, per_node, slots), node_rows > 0, row_target)
    return align_slots(keys.view(-1, slots), current.reshape(-1, slots)).view(num_layers, num_physical)


def _node_targets(
    weight: torch.Tensor, limit: torch.Tensor, num_groups: int, num_nodes: int, num_gpus: int
) -> list[torch.Tensor]:
    """Node loads [L] under which expert groups may stay on their node: the plain plan's node peak (groups
    move as the plain plan would need) and, with several nodes, the most a node carries with every GPU at
    limit."""
    num_layers = weight.shape[0]
    group_load = weight.view(num_layers, num_groups, -1).sum(-1)
    node_of_group, _ = balanced_packing(group_load, num_nodes)
    node_load = torch.zeros(num_layers, num_nodes, dtype=weight.dtype).scatter_add_(
        1, node_of_group, group_load
    )
    targets = [node_load.amax(-1)]
    if num_nodes > 1:
        targets.append(limit * (num_gpus // num_nodes))
    return targets


def rebalance_experts_movement_aware(
    weight: torch.Tensor,
    current_phy2log: torch.Tensor,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    balance_tolerance: float = 0.0,
    min_improvement: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rebalance like ``rebalance_experts`` but keep experts where they are whenever balance allows.

    weight: [L, E] load per logical expert. current_phy2log: [L, R] int64, a valid current placement (every
    logical expert present; R a multiple of num_gpus); R is kept. num_groups/num_nodes/num_gpus: as in
    ``rebalance_experts``.
    balance_tolerance: accept a layer's max GPU load up to (1 + balance_tolerance) x the plain plan's (0:
    never worse than the plain plan).
    min_improvement: a layer is re-placed only when its max GPU load drops below (1 - min_improvement) x its
    current max; otherwise it keeps its current placement.
    Returns phy2log [L, R], log2phy [L, E, max_replicas] (-1 padded), logcnt [L, E]; int64 on CPU.
    """
    current = current_phy2log.detach().to("cpu", torch.int64)
    if current.dim() != 2:
        raise ValueError(f"current_phy2log must be [num_layers, num_physical], got {tuple(current.shape)}")
    num_replicas = current.shape[1]
    if not check_balance_args(weight, num_replicas, num_groups, num_nodes, num_gpus):
        num_groups, num_nodes = 1, 1  # global policy: one group, one node
    num_logical = weight.shape[1]
    check_placement(current, num_logical, num_gpus, name="current_phy2log")
    if current.shape[0] != weight.shape[0]:
        raise ValueError(f"current_phy2log has {current.shape[0]} layers, weight has {weight.shape[0]}")
    if not 0.0 <= min_improvement < 1.0 or balance_tolerance < 0.0:
        raise ValueError(
            f"need 0 <= min_improvement < 1 and balance_tolerance >= 0, got {min_improvement}, "
            f"{balance_tolerance}"
        )
    weight = weight.detach().to("cpu", torch.float64)

    plain = hierarchical_placement(weight, num_replicas, num_groups, num_nodes, num_gpus)
    limit = gpu_loads(weight, num_gpus, plain).amax(-1) * (1 + balance_tolerance)
    candidates = [relabel_to_current(plain, current, num_nodes, num_gpus)]  # always within limit
    for node_target in _node_targets(weight, limit, num_groups, num_nodes, num_gpus):
        candidates.append(_sticky_plan(weight, current, limit, node_target, num_groups, num_nodes, num_gpus))
    stacked = torch.stack(candidates)  # [C, L, R]
    moves = torch.stack([experts_moved(current, c, num_gpus) for c in candidates]).double()
    peaks = torch.stack([gpu_loads(weight, num_gpus, c).amax(-1) for c in candidates])
    moves[1:].masked_fill_(peaks[1:] > limit * (1 + 1e-12), float("inf"))
    best = moves.argmin(0)  # ties: the relabelled plan
    plan = stacked.gather(0, best.view(1, -1, 1).expand(1, -1, num_replicas)).squeeze(0)

    current_peak = gpu_loads(weight, num_gpus, current).amax(-1)
    plan_peak = gpu_loads(weight, num_gpus, plan).amax(-1)
    keep = plan_peak >= current_peak * (1.0 - min_improvement)
    phy2log = torch.where(keep.unsqueeze(-1), current, plan)
    log2phy, logcnt = replica_tables(phy2log, num_logical)
    return phy2log, log2phy, logcnt
