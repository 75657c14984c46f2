"""Moving expert weights between EP ranks while serving goes on: one `MovePlan` chunk at a time.

Every rank runs the same chunk in the same step (the step loop agrees on it), so the point-to-point operations
below pair up: each rank posts its receives and sends in plan order with `batch_isend_irecv` on the EPLB
communicator (separate from the MoE data path). Sources are always the OLD weights; everything lands in staging
buffers first, is verified by checksum against what the senders sent, and only then replaces the live slots and
the placement rows of the chunk's layers — on every rank in the same step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeserve.eplb.plan import MoveKind, MovePlan
from moeserve.moe.layer import MoELayer
from moeserve.moe.placement import ExpertPlacement


@dataclass(slots=True)
class ChunkReport:
    layers: tuple[int, int]  # [first, end) MoE-layer ordinals
    bytes_received: int
    bytes_sent: int
    seconds: float
    checksums_ok: bool


def checksum(t: torch.Tensor) -> float:
    """Order-sensitive fingerprint of a weight tensor (a permuted or truncated copy does not match)."""
    flat = t.detach().reshape(-1).double()
    pos = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
    return float((flat * (1.0 + 1e-3 * (pos % 1013))).sum())


class ExpertWeightMover:
    """Executes move-plan chunks on one rank. layers[i] is the MoE layer with placement row i."""

    def __init__(
        self,
        layers: list[MoELayer],
        placement: ExpertPlacement,
        group: dist.ProcessGroup | None,
        cpu_group: dist.ProcessGroup | None,
        rank: int,
    ) -> None:
        self.layers = layers
        self.placement = placement
        self.group = group
        self.cpu_group = cpu_group
        self.rank = rank
        self.slots = placement.num_local_slots

    def _packed(self, layer: int, local_slot: int) -> torch.Tensor:
        moe = self.layers[layer]
        return torch.cat([moe.w13[local_slot].reshape(-1), moe.w2[local_slot].reshape(-1)])

    def run_chunk(self, chunk: MovePlan, new_phy2log: torch.Tensor) -> ChunkReport:
        """Move the chunk's weights, verify them, then switch its layers to the new placement rows."""
        t0 = time.perf_counter()
        me, lo = self.rank, self.rank * self.slots
        staging: dict[tuple[int, int], torch.Tensor] = {}
        p2p, sent_sums, bytes_sent = [], {}, 0
        for op in chunk.ops:
            if op.kind != MoveKind.RECV:
                continue
            if op.dst_rank == me:
                buf = torch.empty_like(self._packed(op.layer, op.dst_slot - lo))
                staging[(op.layer, op.dst_slot)] = buf
                p2p.append(dist.P2POp(dist.irecv, buf, op.src_rank, group=self.group))
            if op.src_rank == me:
                data = self._packed(op.layer, op.src_slot - lo)
                sent_sums[(op.layer, op.dst_slot)] = checksum(data)
                bytes_sent += data.numel() * data.element_size()
                p2p.append(dist.P2POp(dist.isend, data, op.dst_rank, group=self.group))
        for op in chunk.local_ops_for(me):
            if op.kind == MoveKind.LOCAL_COPY:
                staging[(op.layer, op.dst_slot)] = self._packed(op.layer, op.src_slot - lo).clone()
        if p2p:
            for work in dist.batch_isend_irecv(p2p):
                work.wait()
        for op in chunk.local_ops_for(me):
            if op.kind == MoveKind.FREE_RIDER:
                staging[(op.layer, op.dst_slot)] = staging[(op.layer, op.src_slot)].clone()
        # Verify: every receiver compares its copy with the sender's checksum.
        all_sums: list[dict] = [None] * dist.get_world_size(self.cpu_group)
        dist.all_gather_object(all_sums, sent_sums, group=self.cpu_group)
        expected = {k: v for sums in all_sums for k, v in sums.items()}
        ok = all(
            abs(checksum(staging[(op.layer, op.dst_slot)]) - expected[(op.layer, op.dst_slot)])
            <= 1e-9 * max(1.0, abs(expected[(op.layer, op.dst_slot)]))
            for op in chunk.recvs_for(me)
        )
        ok_all = [None] * len(all_sums)
        dist.all_gather_object(ok_all, ok, group=self.cpu_group)
        if not all(ok_all):
            raise RuntimeError(
                f"expert weight move for layers {chunk.first_layer}..{chunk.end_layer - 1}: "
                "checksum mismatch; placement left unchanged"
            )
        bytes_received = sum(
            staging[(op.layer, op.dst_slot)].numel() * staging[(op.layer, op.dst_slot)].element_size()
            for op in chunk.recvs_for(me)
        )
        self._flip(chunk, staging, new_phy2log)
        return ChunkReport(
            (chunk.first_layer, chunk.end_layer), bytes_received, bytes_sent, time.perf_counter() - t0, True
        )

    def _flip(self, chunk: MovePlan, staging: dict, new_phy2log: torch.Tensor) -> None:
        lo = self.rank * self.slots
        for (layer, slot), packed in staging.items():
            moe = self.layers[layer]
            w13, w2 = moe.w13[slot - lo], moe.w2[slot - lo]
            w13.copy_(packed[: w13.numel()].view_as(w13))
            w2.copy_(packed[w13.numel() :].view_as(w2))
        merged = self.placement.phy2log.clone()
        rows = slice(chunk.first_layer, chunk.end_layer)
        merged[rows] = new_phy2log[rows].to(merged.device)
        self.placement.update_(merged)
        for layer in range(chunk.first_layer, chunk.end_layer):
            self.layers[layer].set_local_experts(self.placement.local_logical_experts(layer))
