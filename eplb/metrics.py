"""How good is a placement, and how much does changing it cost?

A logical expert's load is split evenly among its replicas (the router spreads tokens over replicas), a GPU's
load is the sum over its slots, and balancedness = mean / max GPU load per layer (1.0 is perfect).
"""

from __future__ import annotations

import torch

from moeserve.eplb.tables import gpu_expert_counts, replica_tables

# DeepSeek-V3 routed expert: gate, up and down projections of 7168 x 2048.
DEEPSEEK_V3_EXPERT_PARAMS = 3 * 7168 * 2048


def expert_bytes(hidden: int, intermediate: int, bytes_per_param: float, num_matrices: int = 3) -> int:
    """Bytes of one expert's weights (gate/up/down by default), e.g. DeepSeek-V3 fp8: 3 x 7168 x 2048 x 1."""
    return int(num_matrices * hidden * intermediate * bytes_per_param)


def physical_loads(
    weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor | None = None
) -> torch.Tensor:
    """Load of each physical slot.

    weight: [L, E] load per logical expert; phy2log: [L, P] int64; logcnt: [L, E] int64 (derived if None).
    Returns [L, P] float64: weight[e] / logcnt[e] for the expert e in each slot.
    """
    phy2log = phy2log.to(weight.device).long()
    if logcnt is None:
        _, logcnt = replica_tables(phy2log, weight.shape[1])
    per_replica = weight.double() / logcnt.to(weight.device).clamp_min(1)
    return per_replica.gather(-1, phy2log)


def gpu_loads(
    weight: torch.Tensor,
    num_gpus: int,
    phy2log: torch.Tensor | None = None,
    logcnt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Load of each GPU.

    Either weight is [L, P] load per physical slot (phy2log None), or weight is [L, E] load per logical expert
    and phy2log [L, P] (with optional logcnt [L, E]) places it. Slot p lives on GPU p // (P // num_gpus).
    Returns [L, num_gpus] float64.
    """
    loads = weight.double() if phy2log is None else physical_loads(weight, phy2log, logcnt)
    num_layers, num_physical = loads.shape
    if num_physical % num_gpus:
        raise ValueError(f"{num_physical} physical slots do not divide over num_gpus={num_gpus}")
    return loads.view(num_layers, num_gpus, num_physical // num_gpus).sum(-1)


def balancedness(loads: torch.Tensor) -> torch.Tensor:
    """loads: [L, G] per-GPU load. Returns [L] float64 mean / max per layer (1.0 for an idle layer)."""
    loads = loads.double()
    peak = loads.amax(-1)
    return torch.where(peak > 0, loads.mean(-1) / peak.clamp_min(1e-300), torch.ones_like(peak))


def experts_moved(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Expert weights that must come over the wire to go from old to new placement, per layer.

    old_phy2log, new_phy2log: [L, P] int64. Counts (GPU, logical expert) pairs the new placement puts on a GPU
    that holds no replica of that expert in the old one: several slots of one GPU that receive the same expert
    count once (one transfer, then local copies), exactly the RECV ops of ``plan_moves``. Returns [L] int64.
    """
    if old_phy2log.shape != new_phy2log.shape:
        raise ValueError(
            f"placements differ in shape: {tuple(old_phy2log.shape)} vs {tuple(new_phy2log.shape)}"
        )
    num_logical = int(torch.maximum(old_phy2log.max(), new_phy2log.max())) + 1
    old = gpu_expert_counts(old_phy2log, num_gpus, num_logical) > 0
    new = gpu_expert_counts(new_phy2log, num_gpus, num_logical) > 0
    return (new & ~old).sum(dim=(1, 2))
