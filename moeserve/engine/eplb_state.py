"""This rank's part of expert-parallel load balancing: the expert-load window and a rebalance in progress.

Load is recorded every step on the device (no host sync). A rebalance is started with the new placement on
every rank; the step loop then runs one layer chunk of weight moves per step, on all ranks in the same step,
with serving steps in between.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeserve.eplb.plan import MovePlan, plan_moves
from moeserve.eplb.stats import ExpertLoadWindow
from moeserve.moe.layer import MoELayer
from moeserve.moe.placement import ExpertPlacement
from moeserve.moe.weight_mover import ChunkReport, ExpertWeightMover

logger = logging.getLogger("moeserve")


@dataclass(slots=True)
class Rebalance:
    plan_id: int
    new_phy2log: torch.Tensor
    chunks: list[MovePlan]
    done: int = 0
    reports: list[ChunkReport] = field(default_factory=list)


class RankEplb:
    """Load statistics and weight moves of one EP rank."""

    def __init__(
        self,
        model: torch.nn.Module,
        placement: ExpertPlacement,
        *,
        eplb_group: dist.ProcessGroup,
        cpu_group: dist.ProcessGroup,
        rank: int,
        gpus_per_node: int,
        window_steps: int,
        device: torch.device,
    ) -> None:
        layers = sorted((m for m in model.modules() if isinstance(m, MoELayer)), key=lambda m: m.layer_idx)
        assert [m.layer_idx for m in layers] == list(range(placement.num_layers)), "one MoE layer per row"
        self.placement = placement
        self.rank = rank
        self.gpus_per_node = gpus_per_node
        self.window = ExpertLoadWindow(placement.num_layers, placement.num_physical, window_steps, device)
        self.step_counts = torch.zeros(
            placement.num_layers, placement.num_physical, dtype=torch.int64, device=device
        )
        self.mover = ExpertWeightMover(layers, placement, eplb_group, cpu_group, rank)
        self.layers = layers
        self.pending: Rebalance | None = None
        self.last: Rebalance | None = None

    # ---- load ------------------------------------------------------------------------------------------
    def step_done(self) -> None:
        self.window.record(self.step_counts)

    def logical_load(self) -> torch.Tensor:
        """[L, E] int64 tokens per logical expert over the window (this rank's tokens only)."""
        return self.window.logical_load(self.placement.phy2log, self.placement.num_logical).cpu()

    # ---- moves -----------------------------------------------------------------------------------------
    @property
    def pending_id(self) -> int:
        return self.pending.plan_id if self.pending else 0

    def start(self, plan_id: int, new_phy2log: torch.Tensor, layers_per_chunk: int) -> None:
        """Queue a placement change; every rank must be given the same (plan_id, new_phy2log)."""
        if self.pending is not None:
            raise RuntimeError(f"rebalance {self.pending.plan_id} is still running")
        new = new_phy2log.to(torch.int64).cpu()
        old = self.placement.phy2log.cpu()
        if new.shape != old.shape:
            raise ValueError(f"new placement has shape {tuple(new.shape)}; expected {tuple(old.shape)}")
        plan = plan_moves(old, new, self.placement.ep_size, self.gpus_per_node)
        self.pending = Rebalance(plan_id, new, plan.layer_chunks(layers_per_chunk))

    def run_next_chunk(self) -> None:
        """Move one chunk (a collective step: every rank calls it in the same step)."""
        r = self.pending
        assert r is not None
        r.reports.append(self.mover.run_chunk(r.chunks[r.done], r.new_phy2log))
        r.done += 1
        if r.done == len(r.chunks):
            self.window.reset()  # old counts describe the old slots
            self.last, self.pending = r, None
            moved = sum(rep.bytes_received for rep in r.reports)
            logger.info("rebalance %d done: %d chunks, %.1f MB received", r.plan_id, r.done, moved / 1e6)

    def status(self) -> dict:
        r = self.pending or self.last
        if r is None:
            return {"plan_id": 0, "running": False}
        return {
            "plan_id": r.plan_id,
            "running": self.pending is not None,
            "chunks_done": r.done,
            "chunks_total": len(r.chunks),
            "bytes_received": sum(rep.bytes_received for rep in r.reports),
            "bytes_sent": sum(rep.bytes_sent for rep in r.reports),
            "seconds_per_chunk": [rep.seconds for rep in r.reports],
            "checksums_ok": all(rep.checksums_ok for rep in r.reports),
        }
