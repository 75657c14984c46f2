"""Where should each expert live? DeepSeek's EPLB placement, vectorised over layers.

Semantics follow DeepSeek's published EPLB:
  hierarchical (num_groups % num_nodes == 0): pack expert groups onto nodes with balanced load, replicate the
  heaviest experts within each node, then pack the node's physical experts onto its GPUs, equal slots per GPU;
  global (otherwise): the same with all experts as one group on one node.
Every greedy step runs as one tensor op over all rows (layers, or layers x nodes); Python loops only walk
items or replicas. Ties break towards the lower index everywhere (stable sorts, first argmin/argmax), so the
result is a deterministic function of the input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeserve.eplb.tables import inverse_permutation, replica_tables


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack n items into num_packs packs of exactly n / num_packs items each, heaviest item first into the
    lightest pack that still has room.

    weight: [X, n] float64. Returns pack_index [X, n] int64 and rank_in_pack [X, n] int64 (order of arrival).
    """
    rows, num_items = weight.shape
    per_pack = num_items // num_packs
    assert per_pack * num_packs == num_items, (num_items, num_packs)
    if per_pack == 1:
        pack_index = torch.arange(num_items, dtype=torch.int64).expand(rows, num_items).contiguous()
        return pack_index, torch.zeros_like(pack_index)
    order = weight.argsort(dim=-1, descending=True, stable=True)
    sorted_weight = weight.gather(-1, order)
    pack_load = torch.zeros(rows, num_packs, dtype=weight.dtype)
    pack_size = torch.zeros(rows, num_packs, dtype=torch.int64)
    pack_of_sorted = torch.empty(rows, num_items, dtype=torch.int64)
    rank_of_sorted = torch.empty(rows, num_items, dtype=torch.int64)
    row = torch.arange(rows)
    for i in range(num_items):
        pack = pack_load.masked_fill(pack_size >= per_pack, float("inf")).argmin(-1)
        pack_of_sorted[:, i] = pack
        rank_of_sorted[:, i] = pack_size[row, pack]
        pack_load[row, pack] += sorted_weight[:, i]
        pack_size[row, pack] += 1
    pack_index = torch.empty_like(pack_of_sorted).scatter_(-1, order, pack_of_sorted)
    rank_in_pack = torch.empty_like(rank_of_sorted).scatter_(-1, order, rank_of_sorted)
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give num_physical slots to num_logical experts, each extra replica going to the expert with the
    largest load per replica (this minimises the largest per-replica load).

    weight: [X, num_logical] float64. Returns phy2log [X, num_physical] int64 (slots 0..num_logical-1 hold the
    experts in order, extra replicas follow in the order chosen) and logcnt [X, num_logical] int64.
    """
    rows, num_logical = weight.shape
    assert num_physical >= num_logical, (num_physical, num_logical)
    extra = torch.empty(rows, num_physical - num_logical, dtype=torch.int64)
    logcnt = torch.ones(rows, num_logical, dtype=torch.int64)
    row = torch.arange(rows)
    for i in range(num_physical - num_logical):
        expert = (weight / logcnt).argmax(-1)
        extra[:, i] = expert
        logcnt[row, expert] += 1
    phy2log = torch.cat([torch.arange(num_logical).expand(rows, num_logical), extra], dim=-1)
    return phy2log, logcnt


# (weight [X, n] float64, key [X, n] int64, num_packs) -> (pack_index [X, n], rank_in_pack [X, n]); key names
# the item (group id, or logical expert id of a replica) for packers that care where it lives now.
Packer = Callable[[torch.Tensor, torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]


def _plain_packer(
    weight: torch.Tensor, key: torch.Tensor, num_packs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return balanced_packing(weight, num_packs)


def hierarchical_placement(
    weight: torch.Tensor,
    num_physical: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    pack_groups: Packer = _plain_packer,
    pack_gpus: Packer = _plain_packer,
) -> torch.Tensor:
    """DeepSeek's hierarchical plan with pluggable packing steps. weight: [L, E] float64 (validated).

    pack_groups packs group loads [L, num_groups] onto num_nodes (keys: group ids); pack_gpus packs each
    node's replica loads [L * num_nodes, R / num_nodes] onto its GPUs (keys: logical expert ids).
    Returns phy2log [L, num_physical] int64.
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    logical_per_node = num_logical // num_nodes
    physical_per_node = num_physical // num_nodes
    slots_per_gpu = num_physical // num_gpus

    # Step 1: pack expert groups onto nodes. log2mlog numbers logical experts node-major ("mlog"), so node n
    # owns mlog ids [n * logical_per_node, (n + 1) * logical_per_node).
    group_load = weight.view(num_layers, num_groups, group_size).sum(-1)
    group_ids = torch.arange(num_groups).expand(num_layers, num_groups)
    node_of_group, rank_of_group = pack_groups(group_load, group_ids, num_nodes)
    group_base = (node_of_group * groups_per_node + rank_of_group) * group_size
    log2mlog = (group_base.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)
    mlog2log = inverse_permutation(log2mlog)

    # Step 2: replicate hot experts within each node. Rows are (layer, node) pairs.
    node_weight = weight.gather(-1, mlog2log).view(num_layers * num_nodes, logical_per_node)
    phy2mlog, mlogcnt = replicate_experts(node_weight, physical_per_node)

    # Step 3: pack the node's physical experts onto its GPUs, equal slots per GPU.
    phy_load = (node_weight / mlogcnt).gather(-1, phy2mlog)
    phy_key = mlog2log.view(num_layers * num_nodes, logical_per_node).gather(-1, phy2mlog)
    gpu_of_phy, rank_on_gpu = pack_gpus(phy_load, phy_key, num_gpus // num_nodes)
    slot_of_phy = gpu_of_phy * slots_per_gpu + rank_on_gpu
    slot2mlog = torch.empty_like(phy2mlog).scatter_(-1, slot_of_phy, phy2mlog)

    node_offset = (torch.arange(num_nodes) * logical_per_node).view(1, num_nodes, 1)
    slot2mlog = (slot2mlog.view(num_layers, num_nodes, physical_per_node) + node_offset).view(num_layers, -1)
    return mlog2log.gather(-1, slot2mlog)


def check_balance_args(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> bool:
    """Validate rebalance arguments; return True when the hierarchical policy applies."""
    if weight.dim() != 2 or weight.shape[1] == 0:
        raise ValueError(f"weight must be [num_layers, num_logical_experts], got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("weight must hold finite, non-negative loads")
    num_logical = weight.shape[1]
    if min(num_groups, num_nodes, num_gpus) < 1:
        raise ValueError(
            f"num_groups, num_nodes, num_gpus must be >= 1, got {num_groups}, {num_nodes}, {num_gpus}"
        )
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus}")
    if num_replicas < num_logical:
        raise ValueError(f"num_replicas={num_replicas} must be >= the {num_logical} logical experts")
    hierarchical = num_groups % num_nodes == 0
    if hierarchical and num_logical % num_groups:
        raise ValueError(f"{num_logical} logical experts do not split into num_groups={num_groups} groups")
    return hierarchical


def rebalance_phy2log(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    """Like rebalance_experts, returning only phy2log [L, num_replicas] int64."""
    hierarchical = check_balance_args(weight, num_replicas, num_groups, num_nodes, num_gpus)
    weight = weight.detach().to("cpu", torch.float64)
    if hierarchical:
        return hierarchical_placement(weight, num_replicas, num_groups, num_nodes, num_gpus)
    return hierarchical_placement(weight, num_replicas, 1, 1, num_gpus)


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place num_replicas physical experts (logical experts plus redundant replicas) on num_gpus GPUs.

    weight: [L, E] load per logical expert (any real dtype, any device; planned on CPU in float64).
    num_replicas: physical experts in all, a multiple of num_gpus and >= E.
    num_groups: expert groups (DeepSeek's n_group); the hierarchical policy needs E % num_groups == 0.
    num_nodes: nodes; GPUs of a node share the fast interconnect. num_gpus: a multiple of num_nodes.
    Returns (CPU, int64):
      phy2log [L, num_replicas]: logical expert of each physical slot; slot p lives on GPU p // (R // G).
      log2phy [L, E, max_replicas]: physical replicas of each logical expert, ascending, -1 padded.
      logcnt  [L, E]: replicas per logical expert (>= 1).
    """
    phy2log = rebalance_phy2log(weight, num_replicas, num_groups, num_nodes, num_gpus)
    log2phy, logcnt = replica_tables(phy2log, weight.shape[1])
    return phy2log, log2phy, logcnt
