"""Where each logical expert lives: physical slots, replicas, and the logical -> physical routing map.

Physical expert p lives on EP rank p // num_local_slots. Tables (device tensors, updated in place so captured
CUDA graphs stay valid):
  phy2log:       [num_layers, num_physical] int64
  log2phy:       [num_layers, num_logical, max_replicas] int64, -1 padded
  replica_count: [num_layers, num_logical] int64
  local_phy:     [num_layers, num_logical] int64 — the replica on this rank (lowest physical id), -1 if none

max_replicas is num_physical - num_logical + 1, the most replicas any expert can have while every expert keeps
at least one; sizing for the worst case lets `update_` rewrite the tables without reallocating them.
"""

from __future__ import annotations

import torch


class ExpertPlacement:
    """The placement tables of one EP rank, and the routing of logical choices to physical replicas.

    Routing rule (`to_physical`): a choice of logical expert e goes to e's replica on this rank when there is
    one (no traffic); otherwise to replica ``(token_index + choice_index + ep_rank) % replica_count[e]`` of
    log2phy's list, which spreads the tokens of a step evenly over the replicas, and the ep_rank offset keeps
    the small batches of different ranks from all picking replica 0. Deterministic, no Python token loop.

    dynamic=False allows a shortcut when the placement is the identity (ids pass through unchanged); build
    with dynamic=True when `update_` may run after CUDA graphs are captured, so graphs always read the tables.
    """

    def __init__(
        self,
        phy2log: torch.Tensor,
        num_logical: int,
        ep_rank: int,
        ep_size: int,
        *,
        device: torch.device | str = "cpu",
        dynamic: bool = False,
    ) -> None:
        if phy2log.dim() != 2:
            raise ValueError(f"phy2log must be [num_layers, num_physical], got shape {tuple(phy2log.shape)}")
        num_layers, num_physical = phy2log.shape
        if num_physical % ep_size:
            raise ValueError(f"{num_physical} physical experts do not divide over {ep_size} EP ranks")
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank={ep_rank} is outside 0..{ep_size - 1}")
        if num_physical < num_logical:
            raise ValueError(f"{num_physical} physical slots cannot hold {num_logical} logical experts")
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.num_physical = num_physical
        self.num_redundant = num_physical - num_logical
        self.max_replicas = self.num_redundant + 1
        self.ep_rank = ep_rank
        self.ep_size = ep_size
        self.num_local_slots = num_physical // ep_size
        self.dynamic = dynamic
        self.device = torch.device(device)
        self.phy2log = torch.empty(num_layers, num_physical, dtype=torch.int64, device=self.device)
        self.log2phy = torch.empty(
            num_layers, num_logical, self.max_replicas, dtype=torch.int64, device=self.device
        )
        self.replica_count = torch.empty(num_layers, num_logical, dtype=torch.int64, device=self.device)
        self.local_phy = torch.empty(num_layers, num_logical, dtype=torch.int64, device=self.device)
        self.identity = False
        self.update_(phy2log)

    @classmethod
    def trivial(
        cls, num_layers: int, num_logical: int, ep_rank: int = 0, ep_size: int = 1
    ) -> ExpertPlacement:
        """Expert e on physical slot e: no redundancy."""
        return cls(torch.arange(num_logical).repeat(num_layers, 1), num_logical, ep_rank, ep_size)

    @classmethod
    def default(
        cls,
        num_layers: int,
        num_logical: int,
        num_redundant: int,
        ep_rank: int,
        ep_size: int,
        *,
        device: torch.device | str = "cpu",
        dynamic: bool = False,
    ) -> ExpertPlacement:
        """The start-up placement before any load is known: slots 0..E-1 hold experts 0..E-1 and the
        num_redundant extra slots hold replicas of experts 0, 1, 2, ... (wrapping around past E - 1), on every
        layer. EPLB replaces it with a load-aware placement via `update_`."""
        num_physical = num_logical + num_redundant
        if num_redundant < 0:
            raise ValueError(f"num_redundant_experts must be >= 0, got {num_redundant}")
        if num_physical % ep_size:
            raise ValueError(
                f"{num_logical} experts + {num_redundant} redundant = {num_physical} physical experts do not "
                f"divide over {ep_size} EP ranks; choose num_redundant_experts so that "
                f"(num_experts + num_redundant_experts) % ep_size == 0 (e.g. {-num_logical % ep_size})"
            )
        row = torch.cat([torch.arange(num_logical), torch.arange(num_redundant) % num_logical])
        return cls(row.repeat(num_layers, 1), num_logical, ep_rank, ep_size, device=device, dynamic=dynamic)

    def local_logical_experts(self, layer: int) -> list[int]:
        """Logical expert held by each of this rank's local slots, in slot order."""
        lo = self.ep_rank * self.num_local_slots
        return self.phy2log[layer, lo : lo + self.num_local_slots].tolist()

    def to_physical(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids: [num_tokens, top_k] logical ids (-1 = none) -> [num_tokens, top_k] int32 physical ids."""
        if self.identity and not self.dynamic:
            return topk_ids.to(torch.int32)
        num_tokens, top_k = topk_ids.shape
        ids = topk_ids.to(device=self.device, dtype=torch.int64)
        valid = ids >= 0
        safe = ids.clamp(min=0)
        count = self.replica_count[layer][safe]  # [T, k], >= 1
        spread = (
            torch.arange(num_tokens, device=self.device)[:, None]
            + torch.arange(top_k, device=self.device)[None, :]
            + self.ep_rank
        ) % count
        remote = self.log2phy[layer][safe, spread]
        local = self.local_phy[layer][safe]
        phys = torch.where(local >= 0, local, remote)
        return torch.where(valid, phys, -1).to(torch.int32)

    def update_(self, new_phy2log: torch.Tensor) -> None:
        """Replace the placement, rewriting every table in place (same storage, same shapes).

        new_phy2log: [num_layers, num_physical], each value in 0..num_logical-1, every logical expert present
        at least once per layer."""
        new = self._validated(new_phy2log)
        log2phy, count, local = self._build_tables(new)
        self.phy2log.copy_(new)
        self.log2phy.copy_(log2phy)
        self.replica_count.copy_(count)
        self.local_phy.copy_(local)
        self.identity = self.num_redundant == 0 and bool((new == torch.arange(self.num_physical)).all())

    def _validated(self, phy2log: torch.Tensor) -> torch.Tensor:
        expected = (self.num_layers, self.num_physical)
        if tuple(phy2log.shape) != expected:
            raise ValueError(f"phy2log must have shape {expected}, got {tuple(phy2log.shape)}")
        new = phy2log.detach().to("cpu", torch.int64)
        if new.numel() and (int(new.min()) < 0 or int(new.max()) >= self.num_logical):
            raise ValueError(f"phy2log values must lie in 0..{self.num_logical - 1}")
        present = torch.zeros(self.num_layers, self.num_logical, dtype=torch.bool)
        present.scatter_(1, new, True)
        if not bool(present.all()):
            layer, expert = (~present).nonzero()[0].tolist()
            raise ValueError(f"logical expert {expert} has no physical slot on layer {layer}")
        return new

    def _build_tables(self, phy2log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phy2log: [L, P] int64 on CPU -> (log2phy [L, E, R], replica_count [L, E], local_phy [L, E])."""
        num_layers, num_physical, num_logical = self.num_layers, self.num_physical, self.num_logical
        # One key per (layer, logical expert); a stable sort keeps replicas in physical-id order.
        key = (phy2log + torch.arange(num_layers)[:, None] * num_logical).reshape(-1)
        order = torch.argsort(key, stable=True)
        sorted_key = key[order]
        count = torch.bincount(key, minlength=num_layers * num_logical)
        first = torch.cumsum(count, 0) - count
        replica_rank = torch.arange(key.numel()) - first[sorted_key]
        phys = order % num_physical
        log2phy = torch.full((num_layers * num_logical, self.max_replicas), -1, dtype=torch.int64)
        log2phy[sorted_key, replica_rank] = phys
        # The lowest-numbered replica on this rank, if any (amin keeps it deterministic).
        on_rank = phys // self.num_local_slots == self.ep_rank
        local = torch.full((num_layers * num_logical,), num_physical, dtype=torch.int64)
        local.scatter_reduce_(0, sorted_key[on_rank], phys[on_rank], reduce="amin")
        local = torch.where(local == num_physical, -1, local)
        shape = (num_layers, num_logical)
        return (
            log2phy.view(*shape, self.max_replicas).to(self.device),
            count.view(shape).to(self.device),
            local.view(shape).to(self.device),
        )
