"""Where each logical expert lives: physical slots, replicas, and the logical -> physical routing map.

Physical expert p lives on EP rank p // num_local_slots. Tables (device tensors, updated in place so captured
CUDA graphs stay valid):
  phy2log:       [num_layers, num_physical] int64
  log2phy:       [num_layers, num_logical, max_replicas] int64, -1 padded
  replica_count: [num_layers, num_logical] int64
"""

from __future__ import annotations

import torch


class ExpertPlacement:
    """The placement tables of one EP rank, and the routing of logical choices to physical replicas."""

    def __init__(self, phy2log: torch.Tensor, num_logical: int, ep_rank: int, ep_size: int) -> None:
        num_layers, num_physical = phy2log.shape
        if num_physical % ep_size:
            raise ValueError(f"{num_physical} physical experts do not divide over {ep_size} EP ranks")
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.num_physical = num_physical
        self.ep_rank = ep_rank
        self.ep_size = ep_size
        self.num_local_slots = num_physical // ep_size
        self.phy2log = phy2log.clone().long()
        self.identity = num_physical == num_logical and bool(
            (self.phy2log == torch.arange(num_physical)).all()
        )

    @classmethod
    def trivial(cls, num_layers: int, num_logical: int, ep_rank: int = 0, ep_size: int = 1) -> ExpertPlacement:
        """Expert e on physical slot e: no redundancy."""
        return cls(torch.arange(num_logical).repeat(num_layers, 1), num_logical, ep_rank, ep_size)

    def local_logical_experts(self, layer: int) -> list[int]:
        """Logical expert held by each of this rank's local slots, in slot order."""
        lo = self.ep_rank * self.num_local_slots
        return self.phy2log[layer, lo : lo + self.num_local_slots].tolist()

    def to_physical(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids: [num_tokens, top_k] logical ids -> [num_tokens, top_k] int32 physical ids."""
        if self.identity:
            return topk_ids.to(torch.int32)
        raise NotImplementedError("redundant-expert routing lands with expert parallelism")
