"""Relabel a plan's GPUs to match the current placement: same packs, fewer transfers.

A GPU's load depends only on which experts it holds, so handing the plan's GPU packs to different GPUs changes
no load; giving each pack to the GPU that already holds most of its experts saves transfers. Under the
hierarchical policy node packs move as a whole (each expert group stays on one node).
"""

from __future__ import annotations

import torch

from moeserve.eplb.tables import gpu_expert_counts


def assign_max(score: torch.Tensor, max_swap_rounds: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximately solve max-weight perfect matching per row: greedy on the best remaining pair, then
    improving pairwise swaps until none helps (or max_swap_rounds, default 4n).

    score: [X, n, n] float64, score[x, i, j] = value of giving item i to target j.
    Returns perm [X, n] int64 (target of each item) and value [X] float64 (total score of perm).
    """
    rows, n, _ = score.shape
    row = torch.arange(rows)
    perm = torch.empty(rows, n, dtype=torch.int64)
    masked = score.clone()
    for _ in range(n):
        flat = masked.view(rows, n * n).argmax(-1)
        item, target = flat // n, flat % n
        perm[row, item] = target
        masked[row, item, :] = -float("inf")
        masked[row, :, target] = -float("inf")
    active = row
    for _ in range(4 * n if max_swap_rounds is None else max_swap_rounds):
        # gain[x, i, j] of swapping the targets of items i and j, for rows that improved last round.
        sub, p = score[active], perm[active]
        mine = sub.gather(2, p.unsqueeze(-1))  # [A, n, 1]
        cross = sub.gather(2, p.unsqueeze(1).expand(-1, n, n))  # [A, i, j] = score[i, perm[j]]
        gain = cross + cross.transpose(1, 2) - mine - mine.transpose(1, 2)
        best_gain, flat = gain.view(len(active), n * n).max(-1)
        improve = best_gain > 1e-9
        if not bool(improve.any()):
            break
        active, i, j = active[improve], (flat // n)[improve], (flat % n)[improve]
        perm_i, perm_j = perm[active, i], perm[active, j]
        perm[active, i], perm[active, j] = perm_j, perm_i
    value = score.gather(2, perm.unsqueeze(-1)).squeeze(-1).sum(-1)
    return perm, value


def gpu_targets(overlap: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """overlap: [L, G, G] float64 experts shared by new pack i and current GPU j. Returns [L, G] int64, the
    GPU each new pack goes to; node packs move as a whole (num_nodes == 1 lets every pack go anywhere)."""
    num_layers, num_gpus, _ = overlap.shape
    per_node = num_gpus // num_nodes
    if num_nodes == 1:
        target, value = assign_max(overlap)
    else:
        blocks = overlap.view(num_layers, num_nodes, per_node, num_nodes, per_node).permute(0, 1, 3, 2, 4)
        inner, inner_value = assign_max(blocks.reshape(-1, per_node, per_node))
        node_target, value = assign_max(inner_value.view(num_layers, num_nodes, num_nodes))
        inner = inner.view(num_layers, num_nodes, num_nodes, per_node)
        index = node_target.view(num_layers, num_nodes, 1, 1).expand(-1, -1, 1, per_node)
        within = inner.gather(2, index).squeeze(2)  # [L, N, per_node]
        target = (node_target.unsqueeze(-1) * per_node + within).view(num_layers, num_gpus)
    # Never do worse than leaving the plain plan's labels as they are.
    identity = torch.arange(num_gpus).expand(num_layers, num_gpus)
    keep_identity = overlap.diagonal(dim1=1, dim2=2).sum(-1) >= value
    return torch.where(keep_identity.unsqueeze(-1), identity, target)


def align_slots(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Reorder each GPU's slots so an expert it keeps stays in its current slot.

    new, old: [X, S] int64 logical ids of the S slots of X (layer, GPU) pairs. Returns a permutation of each
    row of new where out[x, s] == old[x, s] wherever that expert can stay (each new replica used once).
    """
    rows, slots = new.shape
    out = torch.full_like(new, -1)
    used = torch.zeros_like(new, dtype=torch.bool)
    for s in range(slots):
        match = (new == old[:, s : s + 1]) & ~used
        found = match.any(-1)
        first = match.to(torch.uint8).argmax(-1)
        used |= torch.nn.functional.one_hot(first, slots).bool() & found.unsqueeze(-1)
        out[:, s] = torch.where(found, old[:, s], out[:, s])
    # Remaining replicas fill the remaining slots, both in ascending order.
    free_slots = (out >= 0).to(torch.uint8).argsort(dim=-1, stable=True)
    unused_items = used.to(torch.uint8).argsort(dim=-1, stable=True)
    num_free = (out < 0).sum(-1, keepdim=True)
    fill = torch.arange(slots).unsqueeze(0) < num_free
    values = torch.where(fill, new.gather(-1, unused_items), out.gather(-1, free_slots))
    return out.scatter(-1, free_slots, values)


def relabel_to_current(
    plan: torch.Tensor, current: torch.Tensor, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    """Move the GPU packs of plan [L, R] onto the GPUs that hold most of their experts in current [L, R] and
    align slots; every GPU keeps exactly the multiset of experts of one pack of plan. Returns [L, R] int64."""
    num_layers, num_physical = plan.shape
    slots = num_physical // num_gpus
    num_logical = int(torch.maximum(plan.max(), current.max())) + 1
    new_present = (gpu_expert_counts(plan, num_gpus, num_logical) > 0).double()
    old_present = (gpu_expert_counts(current, num_gpus, num_logical) > 0).double()
    overlap = new_present @ old_present.transpose(1, 2)
    target = gpu_targets(overlap, num_nodes)
    packs = plan.view(num_layers, num_gpus, slots)
    moved = torch.empty_like(packs).scatter_(1, target.unsqueeze(-1).expand(-1, -1, slots), packs)
    aligned = align_slots(moved.view(-1, slots), current.reshape(-1, slots))
    return aligned.view(num_layers, num_physical)
