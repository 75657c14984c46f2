"""Which weights go where when the placement changes: a deterministic list of copy / receive operations.

For every layer and every physical slot whose logical expert changes, one op:
  LOCAL_COPY  the destination GPU already holds the expert (old placement): copy from that old slot;
  RECV        no: receive it from a GPU that holds it in the old placement (same node preferred; among the
              candidates, the one with the fewest sends so far in this plan, ties to the lower rank);
  FREE_RIDER  another slot of the same GPU receives the same expert in this plan: copy from that slot once the
              receive has landed (one transfer per (GPU, expert)).

Execution contract (for the executor, e.g. the cluster's weight mover):
  * Sources are always OLD weights. Slots are overwritten by the new placement, so every op writes into a
    staging buffer, never into a live slot: post the RECVs into staging, the matching sends from the live
    (old) slots, and LOCAL_COPYs from the live (old) slots into staging; wait; then run FREE_RIDERs from the
    staging of their RECV slot; then flip (copy staging into the slots, or swap buffers) at the agreed step.
  * ``ops`` is sorted by (layer, dst_slot) and is a pure function of the inputs, so every rank computes the
    same list; posting ``sends_for(rank)`` and ``recvs_for(rank)`` in list order gives matching
    ``batch_isend_irecv`` calls between every pair of ranks.
  * ``layer_chunks`` bounds staging memory and the stall: move a few layers at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch


class MoveKind(IntEnum):
    LOCAL_COPY = 0
    FREE_RIDER = 1
    RECV = 2


@dataclass(slots=True, frozen=True)
class MoveOp:
    """One destination slot's new weights. Slots are global physical ids (GPU = slot // slots_per_gpu).

    LOCAL_COPY: src_rank == dst_rank, src_slot is an OLD slot of that GPU holding ``expert``.
    RECV:       src_rank sends its OLD slot src_slot to dst_rank.
    FREE_RIDER: src_rank == dst_rank, src_slot is the dst_slot of this GPU's RECV of ``expert`` (read from its
                staging buffer after the receive).
    """

    layer: int
    kind: MoveKind
    expert: int
    dst_rank: int
    dst_slot: int
    src_rank: int
    src_slot: int


@dataclass(slots=True)
class MovePlan:
    """All ops of a placement change, sorted by (layer, dst_slot); layers [first_layer, end_layer)."""

    num_gpus: int
    gpus_per_node: int
    slots_per_gpu: int
    first_layer: int
    end_layer: int
    ops: list[MoveOp] = field(default_factory=list)

    def sends_for(self, rank: int) -> list[MoveOp]:
        """RECV ops this rank serves as sender, in plan order."""
        return [op for op in self.ops if op.kind == MoveKind.RECV and op.src_rank == rank]

    def recvs_for(self, rank: int) -> list[MoveOp]:
        """RECV ops this rank receives, in plan order."""
        return [op for op in self.ops if op.kind == MoveKind.RECV and op.dst_rank == rank]

    def local_ops_for(self, rank: int) -> list[MoveOp]:
        """LOCAL_COPY and FREE_RIDER ops of this rank, in plan order."""
        return [op for op in self.ops if op.kind != MoveKind.RECV and op.dst_rank == rank]

    @property
    def num_transfers(self) -> int:
        return sum(op.kind == MoveKind.RECV for op in self.ops)

    def bytes_moved(self, expert_bytes: int) -> int:
        """Bytes over the wire (RECVs only; local and free-rider copies stay on the GPU)."""
        return self.num_transfers * expert_bytes

    def cross_node_bytes(self, expert_bytes: int) -> int:
        """Bytes of RECVs whose sender sits on another node."""
        node = self.gpus_per_node
        cross = sum(
            op.kind == MoveKind.RECV and op.src_rank // node != op.dst_rank // node for op in self.ops
        )
        return cross * expert_bytes

    def sends_per_rank(self) -> list[int]:
        counts = [0] * self.num_gpus
        for op in self.ops:
            if op.kind == MoveKind.RECV:
                counts[op.src_rank] += 1
        return counts

    def layer_chunks(self, layers_per_chunk: int) -> list[MovePlan]:
        """Split into plans of at most layers_per_chunk consecutive layers (each keeps the global order)."""
        if layers_per_chunk < 1:
            raise ValueError(f"layers_per_chunk must be >= 1, got {layers_per_chunk}")
        chunks = []
        for lo in range(self.first_layer, self.end_layer, layers_per_chunk):
            hi = min(lo + layers_per_chunk, self.end_layer)
            ops = [op for op in self.ops if lo <= op.layer < hi]
            chunks.append(MovePlan(self.num_gpus, self.gpus_per_node, self.slots_per_gpu, lo, hi, ops))
        return chunks


def _first_match_slot(
    table: torch.Tensor, expert: torch.Tensor, slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every slot p of [L, R] expert, the first slot on p's GPU whose table entry equals expert[l, p].

    Returns (found [L, R] bool, slot [L, R] int64 global physical id)."""
    num_layers, num_physical = expert.shape
    gpu = torch.arange(num_physical) // slots
    same_gpu = table.view(num_layers, -1, slots)[:, gpu, :]  # [L, R, S]
    match = same_gpu == expert.unsqueeze(-1)
    return match.any(-1), gpu * slots + match.to(torch.uint8).argmax(-1)


def plan_moves(
    old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, num_gpus: int, gpus_per_node: int
) -> MovePlan:
    """Plan the weight moves from old to new placement.

    old_phy2log, new_phy2log: [L, R] int64 (R a multiple of num_gpus); every expert of new must be present in
    old in the same layer. num_gpus: a multiple of gpus_per_node. Returns a MovePlan (see module docstring).
    """
    if old_phy2log.shape != new_phy2log.shape or old_phy2log.dim() != 2:
        raise ValueError(
            f"placements must be equal [L, R] shapes: {tuple(old_phy2log.shape)}, {tuple(new_phy2log.shape)}"
        )
    num_layers, num_physical = old_phy2log.shape
    if num_physical % num_gpus or num_gpus % gpus_per_node:
        raise ValueError(
            f"need R={num_physical} % num_gpus={num_gpus} == 0 and num_gpus % gpus_per_node="
            f"{gpus_per_node} == 0"
        )
    slots = num_physical // num_gpus
    old = old_phy2log.detach().to("cpu", torch.int64)
    new = new_phy2log.detach().to("cpu", torch.int64)

    is_local, local_src = _first_match_slot(old, new, slots)
    _, first_arrival = _first_match_slot(new, new, slots)
    changed = old != new
    slot_id = torch.arange(num_physical).expand(num_layers, -1)
    kind = torch.where(
        is_local,
        MoveKind.LOCAL_COPY,
        torch.where(first_arrival == slot_id, MoveKind.RECV, MoveKind.FREE_RIDER),
    )
    src_slot = torch.where(is_local, local_src, first_arrival)

    holders = _holders(old.tolist(), slots)
    new_rows, kind_rows, src_rows = new.tolist(), kind.tolist(), src_slot.tolist()
    sends = [0] * num_gpus
    ops = []
    for layer, dst in changed.nonzero().tolist():
        expert = new_rows[layer][dst]
        dst_rank = dst // slots
        op_kind = MoveKind(kind_rows[layer][dst])
        if op_kind != MoveKind.RECV:
            ops.append(MoveOp(layer, op_kind, expert, dst_rank, dst, dst_rank, src_rows[layer][dst]))
            continue
        candidates = holders[layer].get(expert)
        if candidates is None:
            raise ValueError(f"layer {layer}: expert {expert} is not held by any GPU in the old placement")
        node = dst_rank // gpus_per_node
        near = [c for c in candidates if c[0] // gpus_per_node == node]
        src_rank, src = min(near or candidates, key=lambda c: (sends[c[0]], c[0]))
        sends[src_rank] += 1
        ops.append(MoveOp(layer, MoveKind.RECV, expert, dst_rank, dst, src_rank, src))
    return MovePlan(num_gpus, gpus_per_node, slots, 0, num_layers, ops)


def _holders(old: list[list[int]], slots: int) -> list[dict[int, list[tuple[int, int]]]]:
    """Per layer: expert -> [(gpu, first old slot of that expert on the gpu)] in ascending gpu order."""
    out = []
    for row in old:
        table: dict[int, list[tuple[int, int]]] = {}
        for slot, expert in enumerate(row):
            gpus = table.setdefault(expert, [])
            if not gpus or gpus[-1][0] != slot // slots:
                gpus.append((slot // slots, slot))
        out.append(table)
    return out
