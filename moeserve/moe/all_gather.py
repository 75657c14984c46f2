"""Expert-parallel dispatch/combine as an all-gather and a reduce-scatter of fixed-size buffers.

Every rank sends all its tokens, padded to the step's capacity, to every EP rank. The capacity is the most
tokens any EP rank has this step, from the `StepPlan` every rank already holds. Each rank runs its own experts
over all ranks' tokens: choices held elsewhere become -1 and cost nothing. A reduce-scatter then sums each
token's partial results on the rank the token came from.

Unlike `TorchAllToAllDispatcher`, this backend never syncs the host. Buffer sizes are known before any data
moves, so the host goes on queueing work while the transfers run. On GPUs, two-batch overlap needs exactly
that: one micro-batch's transfers run while the other's kernels execute.

The price is traffic. Every token reaches every rank (ep_size × capacity rows each way), where the all-to-all
sends a token only to the ranks holding one of its choices. It suits decode and modest batches.

Partial results are summed in float32, as the all-to-all's combine does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeserve.forward_batch import ForwardMode
from moeserve.moe.dispatcher import CollectiveDispatcher, DispatchOutput

# The *_single names are the newer ones (torch 2.13 deprecates the *_tensor ones); same signatures.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


@dataclass(slots=True)
class GatherHandle:
    num_tokens: int  # this rank's real tokens (rows past it are padding)
    capacity: int  # rows per rank in the gathered buffers
    dtype: torch.dtype


@dataclass(slots=True)
class PendingGather:
    recv_hidden: torch.Tensor  # [ep_size * capacity, hidden]
    recv_meta: torch.Tensor  # [ep_size * capacity, 2 * top_k] int32: physical ids, then float32 weight bits
    works: list
    handle: GatherHandle


@dataclass(slots=True)
class PendingScatter:
    out: torch.Tensor  # [capacity, hidden] float32: this rank's tokens summed over all ranks
    work: object
    handle: GatherHandle


class AllGatherDispatcher(CollectiveDispatcher):
    """Fixed-size all-gather dispatch and reduce-scatter combine over an EP process group (None = default)."""

    name = "all_gather"

    def __init__(self, group: dist.ProcessGroup | None, num_local_slots: int) -> None:
        super().__init__(group, num_local_slots)
        self.capacity: int | None = None

    def sibling(self) -> AllGatherDispatcher:
        """The second TBO micro-batch's instance: its own capacity (that micro-batch's largest on any rank)."""
        return AllGatherDispatcher(self.group, self.num_local_slots)

    def begin_step(self, mode: ForwardMode, max_tokens: int | None = None) -> None:
        """max_tokens: the most tokens any EP rank has this step. It becomes the capacity of every dispatch
        until the next step. None, for calls outside the engine's lockstep, makes each dispatch agree on the
        capacity itself, which costs a host sync."""
        self.capacity = max_tokens

    def dispatch_begin(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        mode: ForwardMode,
    ) -> PendingGather:
        """hidden: [T, H]; topk_ids: [T, k] physical ids (-1 = none); topk_weights: [T, k] float32.
        Starts both all-gathers (async) and returns at once."""
        num_tokens, top_k = topk_ids.shape
        assert hidden.shape[0] == num_tokens, "hidden and topk_ids disagree on the number of tokens"
        capacity = self._capacity(num_tokens, hidden.device)
        # Padding rows are zero, with no choices (-1) and zero weights: finite and never computed.
        pad = (0, 0, 0, capacity - num_tokens)
        send = F.pad(hidden, pad)
        meta = self.pack_routing(F.pad(topk_ids.to(hidden.device), pad, value=-1),
                                 F.pad(topk_weights.to(hidden.device), pad))
        recv_hidden = send.new_empty(self.ep_size * capacity, hidden.shape[1])
        recv_meta = meta.new_empty(self.ep_size * capacity, 2 * top_k)
        works = [
            _all_gather(out, inp, group=self.group, async_op=True)
            for out, inp in ((recv_hidden, send), (recv_meta, meta))
        ]
        return PendingGather(recv_hidden, recv_meta, works, GatherHandle(num_tokens, capacity, hidden.dtype))

    def dispatch_end(self, pending: PendingGather) -> DispatchOutput:
        """Every rank's tokens, in (source rank, token) order with padding rows between, with the choices
        held here as local slots and every other choice -1."""
        for work in pending.works:
            work.wait()
        phys, weights = self.unpack_routing(pending.recv_meta)
        first = self.ep_rank * self.num_local_slots
        here = (phys >= first) & (phys < first + self.num_local_slots)
        local_ids = torch.where(here, phys - first, -1).to(torch.int32)
        return DispatchOutput(pending.recv_hidden, local_ids, weights, pending.handle)

    def combine_begin(self, expert_out: torch.Tensor, handle: GatherHandle) -> PendingScatter:
        """expert_out: [ep_size * capacity, H], the weighted sum of this rank's experts for each gathered row."""
        assert expert_out.shape[0] == self.ep_size * handle.capacity, "expert_out rows must match dispatch_end's"
        out = torch.empty(handle.capacity, expert_out.shape[1], dtype=torch.float32, device=expert_out.device)
        work = _reduce_scatter(out, expert_out.float(), group=self.group, async_op=True)
        return PendingScatter(out, work, handle)

    def combine_end(self, pending: PendingScatter) -> torch.Tensor:
        """[num_tokens, H] in the dispatched hidden's dtype."""
        pending.work.wait()
        return pending.out[: pending.handle.num_tokens].to(pending.handle.dtype)

    def _capacity(self, num_tokens: int, device: torch.device) -> int:
        if self.capacity is not None:
            if num_tokens > self.capacity:
                raise ValueError(f"{num_tokens} tokens to dispatch, but the step's capacity is {self.capacity}")
            return self.capacity
        count = torch.tensor([num_tokens], dtype=torch.int64, device=device)
        counts = count.new_empty(self.ep_size)
        _all_gather(counts, count, group=self.group)
        return int(counts.max())
