"""Lockstep across data-parallel ranks: one small collective at the start of every step.

MoE layers exchange tokens between all EP ranks, so every rank must enter every MoE collective of every step.
Each step starts with one all-gather over a CPU (gloo) group carrying, per rank, its token count, whether it
has prefill work and could run two-batch overlap, and how many of its tokens would go into the first
micro-batch; from it every rank derives the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeserve.forward_batch import ForwardMode


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What all ranks agreed for this step.

    mode: EXTEND when any rank computes a prompt chunk (normal dispatch), else DECODE (low-latency dispatch;
        every request on every rank computes and samples one token).
    tokens_per_rank: [world] token counts; a rank with 0 runs an idle batch that still enters every collective.
    use_tbo: every rank splits this step into two micro-batches (prefill steps only: at decode, TBO launches
        every kernel twice and measured 1.9x slower than eager decode steps, 14x slower than the decode graphs, on
        2 GPUs).
    micro_batch_tokens: with use_tbo, the most tokens any rank puts into its first and into its second
        micro-batch (the sizes a fixed-size dispatcher pads each micro-batch to).
    """

    mode: ForwardMode
    tokens_per_rank: tuple[int, ...]
    use_tbo: bool
    rebalance_id: int = 0  # nonzero: every rank holds this EPLB plan and moves its next chunk this step
    micro_batch_tokens: tuple[int, int] = (0, 0)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens_per_rank)


def plan_step(rows: list[tuple[int, bool, bool, int, int]], enable_tbo: bool) -> StepPlan | None:
    """rows[r] = (num_tokens, has_extend, tbo_possible, pending_rebalance_id, first_micro_batch_tokens) of rank
    r -> the plan, or None when no rank has anything to do."""
    tokens = tuple(r[0] for r in rows)
    ids = {r[3] for r in rows}
    rebalance_id = ids.pop() if len(ids) == 1 else 0  # only once every rank has the same plan
    if sum(tokens) == 0 and not rebalance_id:
        return None
    mode = ForwardMode.EXTEND if any(r[1] for r in rows) else ForwardMode.DECODE
    use_tbo = enable_tbo and mode == ForwardMode.EXTEND and all(r[2] for r in rows)
    micro = (max(r[4] for r in rows), max(r[0] - r[4] for r in rows)) if use_tbo else (0, 0)
    return StepPlan(mode, tokens, use_tbo, rebalance_id, micro)


class StepSync:
    """The per-step agreement over a CPU process group (gloo).

    Stopping is agreed too: `stop_requested` (set from any thread) travels in this rank's row, and once any
    row carries it every rank's `agree` returns None and sets `stopped` at the same agreement, so all step
    loops end there and none is left waiting in a collective for a rank that has gone."""

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, enable_tbo: bool = False) -> None:
        self.group = group
        self.world_size = world_size
        self.enable_tbo = enable_tbo
        self.stop_requested = False
        self.stopped = False

    def agree(
        self, num_tokens: int, has_extend: bool, tbo_possible: bool, rebalance_id: int,
        first_micro_batch_tokens: int,
    ) -> StepPlan | None:
        """first_micro_batch_tokens: this rank's tokens in its first TBO micro-batch (`tbo_cut`; any value when
        TBO is off)."""
        if self.stopped:
            return None
        local = torch.tensor(
            [num_tokens, int(has_extend), int(tbo_possible), rebalance_id, first_micro_batch_tokens,
             int(self.stop_requested)],
            dtype=torch.int64,
        )
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        table = torch.stack(gathered).tolist()
        if any(row[5] for row in table):
            self.stopped = True
            return None
        rows = [(row[0], bool(row[1]), bool(row[2]), row[3], row[4]) for row in table]
        return plan_step(rows, self.enable_tbo)
