"""Expert-parallel dispatch/combine over `torch.distributed.all_to_all_single` (NCCL on GPU, gloo on CPU).

The portable reference backend. Each token is sent once to every EP rank that holds at least one of its
choices, with its choices rewritten to that rank's local slots (-1 for choices held elsewhere). Rows leave in
(destination rank, token index) order, so `combine` can send results back with the splits reversed and add
them into the token they came from.

Per dispatch: one small all-to-all of row and choice counts (the receiver must know its buffer sizes; reading
them is the dispatch's one host sync; the choice count goes to the expert kernel's tile lookup, see
`DispatchOutput.num_pairs`), then two payload all-to-alls: hidden, and a metadata tensor packing ids and
weights as int32 bits. The send layout is built after that read, with its size known, so it adds no sync.
Every rank enters every collective, also with zero tokens (ForwardMode.IDLE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeserve.forward_batch import ForwardMode
from moeserve.moe.dispatcher import CollectiveDispatcher, DispatchOutput


@dataclass(slots=True)
class AllToAllHandle:
    """What `combine` needs to route results back.

    send_token_idx: [num_sent], int64 — local token of each sent row, rows ordered by destination rank.
    send_counts / recv_counts: rows sent to / received from each rank (Python ints).
    """

    send_token_idx: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int


@dataclass(slots=True)
class PendingDispatch:
    """A dispatch in flight: receive buffers and the async works filling them."""

    recv_hidden: torch.Tensor  # [num_recv, hidden]
    recv_meta: torch.Tensor  # [num_recv, 2 * top_k] int32: local ids, then float32 weight bits
    works: list
    handle: AllToAllHandle
    num_recv_pairs: int  # choices held here among the received rows


@dataclass(slots=True)
class PendingCombine:
    recv: torch.Tensor  # [num_sent, hidden], expert outputs coming back, in send order
    work: object
    handle: AllToAllHandle


class TorchAllToAllDispatcher(CollectiveDispatcher):
    """Variable-split all-to-all over an EP process group (None = the default group)."""

    name = "all_to_all"

    def dispatch_begin(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        mode: ForwardMode,
    ) -> PendingDispatch:
        """hidden: [T, H]; topk_ids: [T, k] physical ids (-1 = none); topk_weights: [T, k] float32.
        Exchanges row and choice counts (blocking), then starts the payload transfer (async)."""
        num_tokens, top_k = topk_ids.shape
        assert hidden.shape[0] == num_tokens, "hidden and topk_ids disagree on the number of tokens"
        ids = topk_ids.to(hidden.device).long()
        dest, in_rank = self._destinations(ids)
        # [rank r] = (rows, choices) sent to rank r; the exchange turns it into (rows, choices) received from r.
        pairs = torch.zeros(self.ep_size + 1, dtype=torch.long, device=ids.device)  # the last bin: choices of -1
        pairs.scatter_add_(0, dest.flatten(), torch.ones_like(dest.flatten()))
        send_counts = torch.stack([in_rank.sum(dim=0), pairs[: self.ep_size]], dim=1).flatten()
        recv_counts_t = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts_t, send_counts, group=self.group)
        sent, got = torch.stack([send_counts, recv_counts_t]).view(2, self.ep_size, 2).tolist()  # the host sync
        send_list, recv_list = [rows for rows, _ in sent], [rows for rows, _ in got]
        num_recv, num_recv_pairs = sum(recv_list), sum(choices for _, choices in got)
        tok_idx, local_ids = self._send_layout(ids, dest, in_rank, sum(send_list))
        meta = self.pack_routing(local_ids, topk_weights[tok_idx])
        send_hidden = hidden[tok_idx]

        recv_hidden = hidden.new_empty(num_recv, hidden.shape[1])
        recv_meta = meta.new_empty(num_recv, 2 * top_k)
        works = [
            dist.all_to_all_single(
                out, inp, recv_list, send_list, group=self.group, async_op=True
            )
            for out, inp in ((recv_hidden, send_hidden), (recv_meta, meta))
        ]
        handle = AllToAllHandle(tok_idx, send_list, recv_list, num_tokens)
        return PendingDispatch(recv_hidden, recv_meta, works, handle, num_recv_pairs)

    def dispatch_end(self, pending: PendingDispatch) -> DispatchOutput:
        for work in pending.works:
            work.wait()
        ids, weights = self.unpack_routing(pending.recv_meta)
        return DispatchOutput(pending.recv_hidden, ids, weights, pending.handle, pending.num_recv_pairs)

    def combine_begin(self, expert_out: torch.Tensor, handle: AllToAllHandle) -> PendingCombine:
        """expert_out: [num_recv, H], row i the weighted sum of this rank's experts for received row i."""
        assert expert_out.shape[0] == sum(handle.recv_counts), "expert_out rows must match dispatch_end's"
        recv = expert_out.new_empty(len(handle.send_token_idx), expert_out.shape[1])
        work = dist.all_to_all_single(
            recv,
            expert_out.contiguous(),
            handle.send_counts,
            handle.recv_counts,
            group=self.group,
            async_op=True,
        )
        return PendingCombine(recv, work, handle)

    def combine_end(self, pending: PendingCombine) -> torch.Tensor:
        """Returns [num_tokens, H] in expert_out's dtype; partial results are summed in float32."""
        pending.work.wait()
        recv = pending.recv
        out = torch.zeros(pending.handle.num_tokens, recv.shape[1], dtype=torch.float32, device=recv.device)
        out.index_add_(0, pending.handle.send_token_idx, recv.float())
        return out.to(recv.dtype)

    def _destinations(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: [T, k] physical ids (int64) -> dest [T, k], the rank of each choice (ep_size for -1), and
        in_rank [T, W] bool, whether token t has a choice on rank r."""
        # Choices of -1 go to a virtual rank ep_size, dropped after the scatter.
        dest = torch.where(ids >= 0, ids // self.num_local_slots, self.ep_size)
        in_rank = torch.zeros(ids.shape[0], self.ep_size + 1, dtype=torch.bool, device=ids.device)
        in_rank.scatter_(1, dest, True)
        return dest, in_rank[:, : self.ep_size]

    def _send_layout(self, ids: torch.Tensor, dest: torch.Tensor, in_rank: torch.Tensor,
                     num_sent: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tok_idx [num_sent] int64, local_ids [num_sent, k] int32: row j of the send buffer carries token
        tok_idx[j] to the rank of its block; rows sorted by rank. num_sent (= in_rank.sum(), known on the host)
        sizes the result, so nothing here waits for the device."""
        rank_idx, tok_idx = torch.nonzero_static(in_rank.t(), size=num_sent).unbind(1)
        rank_col = rank_idx[:, None]
        local_ids = torch.where(dest[tok_idx] == rank_col, ids[tok_idx] - rank_col * self.num_local_slots, -1)
        return tok_idx, local_ids.to(torch.int32)
