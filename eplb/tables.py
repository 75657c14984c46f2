"""How a placement is written down: phy2log, and the tables derived from it.

Conventions (shared with ``moeserve.moe.placement``): physical expert ``p`` lives on GPU (EP rank)
``p // slots_per_gpu``; ``log2phy`` lists each logical expert's physical replicas in ascending physical id,
padded with -1.
"""

from __future__ import annotations

import torch


def replica_tables(phy2log: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Derive the logical -> physical tables from a placement.

    phy2log: [L, P] int64, logical expert held by each physical slot.
    Returns log2phy [L, E, max_replicas] int64 (ascending physical ids, -1 padded) and
    logcnt [L, E] int64 (replicas per logical expert). max_replicas is the largest count over all layers.
    """
    num_layers, num_physical = phy2log.shape
    phy2log = phy2log.long()
    logcnt = torch.zeros(num_layers, num_logical, dtype=torch.int64, device=phy2log.device)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    max_replicas = max(int(logcnt.max()), 1)
    # Stable sort groups physical ids by logical expert while keeping them ascending inside each group.
    order = phy2log.argsort(dim=-1, stable=True)
    sorted_logical = phy2log.gather(-1, order)
    group_start = logcnt.cumsum(-1) - logcnt
    rank = torch.arange(num_physical, device=phy2log.device) - group_start.gather(-1, sorted_logical)
    log2phy = torch.full(
        (num_layers, num_logical * max_replicas), -1, dtype=torch.int64, device=phy2log.device
    )
    log2phy.scatter_(-1, sorted_logical * max_replicas + rank, order)
    return log2phy.view(num_layers, num_logical, max_replicas), logcnt


def gpu_expert_counts(phy2log: torch.Tensor, num_gpus: int, num_logical: int) -> torch.Tensor:
    """How many slots of each GPU hold each logical expert.

    phy2log: [L, P] int64 with P % num_gpus == 0. Returns [L, G, E] int64.
    """
    num_layers, num_physical = phy2log.shape
    by_gpu = phy2log.long().view(num_layers, num_gpus, num_physical // num_gpus)
    counts = torch.zeros(num_layers, num_gpus, num_logical, dtype=torch.int64, device=phy2log.device)
    return counts.scatter_add_(2, by_gpu, torch.ones_like(by_gpu))


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """perm: [X, n] int64, a permutation per row. Returns inv with inv[x, perm[x, i]] = i."""
    inv = torch.empty_like(perm)
    return inv.scatter_(1, perm, torch.arange(perm.shape[1], device=perm.device).expand_as(perm).contiguous())


def check_placement(phy2log: torch.Tensor, num_logical: int, num_gpus: int, name: str = "phy2log") -> None:
    """Raise ValueError unless phy2log [L, P] is a valid placement: ids in [0, num_logical), every logical
    expert present at least once per layer, and P divisible by num_gpus."""
    if phy2log.dim() != 2:
        raise ValueError(f"{name} must be [num_layers, num_physical], got shape {tuple(phy2log.shape)}")
    if phy2log.dtype.is_floating_point or phy2log.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer expert ids, got {phy2log.dtype}")
    if phy2log.shape[1] % num_gpus:
        raise ValueError(
            f"{name} has {phy2log.shape[1]} physical slots, not a multiple of num_gpus={num_gpus}"
        )
    if phy2log.numel() and (int(phy2log.min()) < 0 or int(phy2log.max()) >= num_logical):
        raise ValueError(f"{name} holds ids outside [0, {num_logical})")
    _, logcnt = replica_tables(phy2log, num_logical)
    missing = (logcnt == 0).nonzero()
    if len(missing):
        layer, expert = missing[0].tolist()
        raise ValueError(f"{name} has no replica of logical expert {expert} in layer {layer}")
