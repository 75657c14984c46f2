"""A rebalance proposal: from measured load and the current placement to a new placement, with the predicted
balancedness per layer and the bytes the move would cost. What `moeserve rebalance --dry-run` prints."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.eplb.metrics import balancedness, gpu_loads
from moeserve.eplb.movement import rebalance_experts_movement_aware
from moeserve.eplb.plan import plan_moves


@dataclass(slots=True)
class Proposal:
    """new_phy2log: [L, P] int64. before/after: [L] balancedness (mean/max GPU load) of the current and the
    proposed placement under the same load. gpu_load_before/after: [L, G] float64."""

    new_phy2log: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor
    gpu_load_before: torch.Tensor
    gpu_load_after: torch.Tensor
    experts_moved: int
    bytes_moved: int

    @property
    def improvement(self) -> float:
        """Rise of the mean balancedness over layers (0 when nothing improves)."""
        return float(self.after.mean() - self.before.mean())

    def summary(self) -> dict:
        return {
            "balancedness_before": self.before.tolist(),
            "balancedness_after": self.after.tolist(),
            "mean_before": float(self.before.mean()),
            "mean_after": float(self.after.mean()),
            "experts_moved": self.experts_moved,
            "bytes_moved": self.bytes_moved,
            "gpu_load_before": self.gpu_load_before.tolist(),
            "gpu_load_after": self.gpu_load_after.tolist(),
        }


def propose(
    logical_load: torch.Tensor,
    current_phy2log: torch.Tensor,
    *,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    expert_bytes: int,
) -> Proposal:
    """logical_load: [L, E] tokens per logical expert (summed over ranks); current_phy2log: [L, P] int64."""
    current = current_phy2log.to(torch.int64).cpu()
    load = logical_load.double().cpu()
    if num_groups % num_nodes:
        num_groups = 1  # groups do not divide over nodes: the global policy
    new, _, _ = rebalance_experts_movement_aware(load, current, num_groups, num_nodes, num_gpus)
    before = gpu_loads(load, num_gpus, current)
    after = gpu_loads(load, num_gpus, new)
    plan = plan_moves(current, new, num_gpus, num_gpus // num_nodes)
    return Proposal(
        new,
        balancedness(before),
        balancedness(after),
        before,
        after,
        plan.num_transfers,
        plan.bytes_moved(expert_bytes),
    )
