"""Expert-parallel dispatch/combine with DeepEP (`deep_ep.Buffer`), for ranks on NVLink/RDMA-connected GPUs.

Two modes on one buffer, chosen per step by the `mode` every rank agrees on:
  EXTEND (or IDLE) -> normal mode: `get_dispatch_layout` + `dispatch` / `combine`, high throughput,
                      variable sizes; the received rows and local ids match `DispatchOutput` directly.
  DECODE           -> low-latency mode: `low_latency_dispatch` / `low_latency_combine` with receive hooks,
                      fixed shapes (`max_tokens_per_rank`), CUDA-graph friendly.
`mode` must be the step's agreed mode on every EP rank (an idle rank in a decode step passes DECODE): the two
modes use different kernels and cannot meet. The buffer is sized for both; `clean_low_latency_buffer` runs
whenever low-latency mode follows a normal-mode step (normal kernels leave the low-latency area dirty).

Low-latency layout adaptation: DeepEP returns tokens packed per local expert, ``[E_local, W * max_tokens, H]``
with ``recv_count [E_local]`` valid rows each. We expose it as ``E_local * W * max_tokens`` rows with
``topk_ids [rows, 1]`` = the row's local expert (-1 past recv_count) and weight 1.0, because
`low_latency_combine` applies the routing weights itself on the sending rank. Shapes stay fixed (graph safe);
invalid rows cost nothing in kernels that skip -1 ids.

Constraints (DeepEP's): hidden in bf16; low-latency mode supports only some hidden sizes and top-k values
and at most `max_tokens_per_rank` tokens per rank; `deep_ep` is imported lazily so CPU installs never need it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moeserve.forward_batch import ForwardMode
from moeserve.moe.dispatcher import DispatchOutput, StagedDispatcher

_NORMAL = "normal"
_LOW_LATENCY = "low_latency"


class DeepEPBuffer:
    """One `deep_ep.Buffer` per process, sized for both modes, shared by the dispatchers of both TBO
    micro-batches; remembers the last mode so the low-latency area is cleaned exactly when needed."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_experts: int,
        hidden: int,
        max_tokens_per_rank: int,
        num_sms: int | None = None,
    ) -> None:
        deep_ep = importlib.import_module("deep_ep")
        buffer_cls = deep_ep.Buffer
        if num_sms is not None:
            buffer_cls.set_num_sms(num_sms)
        size = group.size()
        hidden_bytes = hidden * 2  # bf16 activations
        num_nvl, num_rdma = 0, 0
        for config in (buffer_cls.get_dispatch_config(size), buffer_cls.get_combine_config(size)):
            num_nvl = max(num_nvl, config.get_nvl_buffer_size_hint(hidden_bytes, size))
            num_rdma = max(num_rdma, config.get_rdma_buffer_size_hint(hidden_bytes, size))
        ll_bytes = buffer_cls.get_low_latency_rdma_size_hint(max_tokens_per_rank, hidden, size, num_experts)
        self.buffer = buffer_cls(
            group,
            num_nvl_bytes=num_nvl,
            num_rdma_bytes=max(num_rdma, ll_bytes),
            low_latency_mode=True,
            num_qps_per_rank=max(1, num_experts // size),
        )
        self.buffer_cls = buffer_cls
        self.num_experts = num_experts
        self.hidden = hidden
        self.max_tokens_per_rank = max_tokens_per_rank
        self.last_mode: str | None = None

    def enter(self, mode: str) -> None:
        """Call before each dispatch; every rank switches modes at the same step."""
        if mode == _LOW_LATENCY and self.last_mode == _NORMAL:
            self.buffer.clean_low_latency_buffer(self.max_tokens_per_rank, self.hidden, self.num_experts)
        self.last_mode = mode


@dataclass(slots=True)
class DeepEPHandle:
    mode: str
    inner: Any  # DeepEP's own handle
    topk_ids: torch.Tensor | None = None  # [T, k] int64, original choices (low-latency combine needs them)
    topk_weights: torch.Tensor | None = None  # [T, k] float32
    packed_shape: tuple[int, int, int] | None = None  # (E_local, W * max_tokens, H) in low-latency mode


@dataclass(slots=True)
class PendingDeepEP:
    """A transfer in flight: `event` (normal mode) or `hook` (low-latency mode) completes it."""

    mode: str
    result: Any
    handle: DeepEPHandle
    event: Any = None
    hook: Any = None


class DeepEPDispatcher(StagedDispatcher):
    """Dispatcher over a `DeepEPBuffer`. Use `sibling()` for the second TBO micro-batch (same buffer)."""

    name = "deepep"

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_local_slots: int,
        *,
        hidden: int,
        max_tokens_per_rank: int,
        num_sms: int | None = None,
        buffer: DeepEPBuffer | None = None,
    ) -> None:
        super().__init__(num_local_slots)
        num_experts = num_local_slots * group.size()
        self.group = group
        self.shared = buffer or DeepEPBuffer(group, num_experts, hidden, max_tokens_per_rank, num_sms)

    def sibling(self) -> DeepEPDispatcher:
        """A dispatcher for the other micro-batch, sharing this one's buffer (DeepEP holds two LL results)."""
        return DeepEPDispatcher(
            self.group,
            self.num_local_slots,
            hidden=self.shared.hidden,
            max_tokens_per_rank=self.shared.max_tokens_per_rank,
            buffer=self.shared,
        )

    def begin_step(self, mode: ForwardMode, max_tokens: int | None = None) -> None:
        """Switch the shared buffer to this step's mode (cleaning it for low-latency after normal mode).
        Dispatch does this itself; a runner that replays a captured CUDA graph (which skips Python) must
        call it before the replay."""
        self.shared.enter(_LOW_LATENCY if mode == ForwardMode.DECODE else _NORMAL)

    def dispatch_begin(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        mode: ForwardMode,
    ) -> PendingDeepEP:
        """hidden: [T, H] bf16; topk_ids: [T, k] physical ids (-1 = none); topk_weights: [T, k] float32."""
        ids = topk_ids.long()
        weights = topk_weights.float()
        if mode == ForwardMode.DECODE:
            return self._ll_dispatch_begin(hidden, ids, weights)
        return self._normal_dispatch_begin(hidden, ids, weights)

    def dispatch_end(self, pending: PendingDeepEP) -> DispatchOutput:
        if pending.mode == _LOW_LATENCY:
            pending.hook()
            return self._ll_rows(pending.result, pending.handle)
        pending.event.current_stream_wait()
        recv_x, recv_ids, recv_weights, num_pairs = pending.result
        return DispatchOutput(recv_x, recv_ids.to(torch.int32), recv_weights.float(), pending.handle, num_pairs)

    def combine_begin(self, expert_out: torch.Tensor, handle: DeepEPHandle) -> PendingDeepEP:
        """expert_out: [num_recv, H] bf16, rows as `dispatch_end` gave them."""
        buf = self.shared.buffer
        if handle.mode == _LOW_LATENCY:
            combined, _, hook = buf.low_latency_combine(
                expert_out.view(handle.packed_shape),
                handle.topk_ids,
                handle.topk_weights,
                handle.inner,
                async_finish=False,
                return_recv_hook=True,
            )
            return PendingDeepEP(_LOW_LATENCY, combined, handle, hook=hook)
        combined, _, event = buf.combine(
            expert_out,
            handle.inner,
            previous_event=self.shared.buffer_cls.capture(),
            async_finish=True,
            allocate_on_comm_stream=True,
        )
        return PendingDeepEP(_NORMAL, combined, handle, event=event)

    def combine_end(self, pending: PendingDeepEP) -> torch.Tensor:
        """Returns [num_tokens, H] bf16."""
        if pending.mode == _LOW_LATENCY:
            pending.hook()
        else:
            pending.event.current_stream_wait()
        return pending.result

    def _normal_dispatch_begin(self, hidden, ids, weights) -> PendingDeepEP:
        self.begin_step(ForwardMode.EXTEND)
        buf, num_experts = self.shared.buffer, self.shared.num_experts
        per_rank, per_rdma_rank, per_expert, in_rank, event = buf.get_dispatch_layout(
            ids,
            num_experts,
            previous_event=self.shared.buffer_cls.capture(),
            async_finish=True,
            allocate_on_comm_stream=True,
        )
        recv_x, recv_ids, recv_weights, per_local_expert, inner, event = buf.dispatch(
            hidden,
            topk_idx=ids,
            topk_weights=weights,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            previous_event=event,
            async_finish=True,
            allocate_on_comm_stream=True,
        )
        handle = DeepEPHandle(_NORMAL, inner)
        # DeepEP hands back, on the host, the tokens each local expert receives: the choices held here (exact
        # with its default expert_alignment of 1; an empty list, as its cached mode gives, means unknown).
        num_pairs = sum(per_local_expert) if per_local_expert else None
        return PendingDeepEP(_NORMAL, (recv_x, recv_ids, recv_weights, num_pairs), handle, event=event)

    def _ll_dispatch_begin(self, hidden, ids, weights) -> PendingDeepEP:
        shared = self.shared
        if hidden.shape[0] > shared.max_tokens_per_rank:
            raise ValueError(
                f"{hidden.shape[0]} tokens exceed max_tokens_per_rank={shared.max_tokens_per_rank} of "
                "DeepEP low-latency mode; the scheduler must cap decode batches at that size"
            )
        self.begin_step(ForwardMode.DECODE)
        recv_x, recv_count, inner, _, hook = shared.buffer.low_latency_dispatch(
            hidden,
            ids,
            shared.max_tokens_per_rank,
            shared.num_experts,
            use_fp8=False,
            async_finish=False,
            return_recv_hook=True,
        )
        handle = DeepEPHandle(_LOW_LATENCY, inner, ids, weights, tuple(recv_x.shape))
        return PendingDeepEP(_LOW_LATENCY, (recv_x, recv_count), handle, hook=hook)

    @staticmethod
    def _ll_rows(result: tuple[torch.Tensor, torch.Tensor], handle: DeepEPHandle) -> DispatchOutput:
        """packed [E_local, M, H] + recv_count [E_local] -> rows [E_local * M, H] with local ids [rows, 1]."""
        recv_x, recv_count = result
        num_local, max_rows, hidden = recv_x.shape
        rows = torch.arange(max_rows, device=recv_x.device)
        valid = rows[None, :] < recv_count.to(rows.dtype)[:, None]  # [E_local, M]
        expert = torch.arange(num_local, device=recv_x.device, dtype=torch.int32)[:, None]
        ids = torch.where(valid, expert, -1).reshape(-1, 1)
        weights = valid.to(torch.float32).reshape(-1, 1)
        return DispatchOutput(recv_x.view(num_local * max_rows, hidden), ids, weights, handle)
