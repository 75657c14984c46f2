"""Expert-parallel load balancing: load statistics, placement algorithms, move plans. Pure torch."""

from moeserve.eplb.algorithm import balanced_packing, rebalance_experts, replicate_experts
from moeserve.eplb.metrics import (
    DEEPSEEK_V3_EXPERT_PARAMS,
    balancedness,
    expert_bytes,
    experts_moved,
    gpu_loads,
    physical_loads,
)
from moeserve.eplb.movement import rebalance_experts_movement_aware
from moeserve.eplb.plan import MoveKind, MoveOp, MovePlan, plan_moves
from moeserve.eplb.proposal import Proposal, propose
from moeserve.eplb.stats import ExpertLoadWindow
from moeserve.eplb.tables import check_placement, gpu_expert_counts, replica_tables

__all__ = [
    "DEEPSEEK_V3_EXPERT_PARAMS",
    "ExpertLoadWindow",
    "MoveKind",
    "MoveOp",
    "MovePlan",
    "Proposal",
    "balanced_packing",
    "balancedness",
    "check_placement",
    "expert_bytes",
    "experts_moved",
    "gpu_expert_counts",
    "gpu_loads",
    "physical_loads",
    "plan_moves",
    "propose",
    "rebalance_experts",
    "rebalance_experts_movement_aware",
    "replica_tables",
    "replicate_experts",
]
