"""One dispatcher per step mode: decode steps through one backend, prefill (extend) steps through another.

The default pairing without DeepEP is the all-gather for decode and the all-to-all for prefill. At decode sizes
the all-gather's traffic (every token to every rank) is small, and it never syncs the host, so decode steps
replay CUDA graphs holding its collectives (benchmarks/RESULTS.md: 7.5x the eager steps' throughput on a
decode-heavy workload on 2 GPUs). At prefill sizes its traffic grows with the EP size, while the all-to-all
sends a token only to the ranks holding its choices. DeepEP makes the same split inside one buffer
(low-latency and normal kernels).

Every EP rank runs the same mode in a step (`StepPlan.mode`), so all ranks pick the same backend.
"""

from __future__ import annotations

from typing import Any

from moeserve.forward_batch import ForwardMode
from moeserve.moe.dispatcher import Dispatcher, DispatchOutput


class ByModeDispatcher(Dispatcher):
    """decode: the backend of DECODE steps (and of the CUDA graphs); extend: of every other mode."""

    name = "by_mode"

    def __init__(self, decode: Dispatcher, extend: Dispatcher) -> None:
        if decode.num_local_slots != extend.num_local_slots:
            raise ValueError(f"the two backends disagree on local slots: {decode.num_local_slots} (decode) vs "
                             f"{extend.num_local_slots} (extend)")
        super().__init__(decode.num_local_slots)
        self.decode, self.extend = decode, extend
        self._active: Dispatcher = extend  # the backend of the dispatch in flight; its combine goes there too

    def for_mode(self, mode: ForwardMode) -> Dispatcher:
        return self.decode if mode == ForwardMode.DECODE else self.extend

    def sibling(self) -> ByModeDispatcher:
        return ByModeDispatcher(self.decode.sibling(), self.extend.sibling())

    def begin_step(self, mode: ForwardMode, max_tokens: int | None = None) -> None:
        self.for_mode(mode).begin_step(mode, max_tokens)

    def dispatch(self, hidden, topk_ids, topk_weights, mode) -> DispatchOutput:
        self._active = self.for_mode(mode)
        return self._active.dispatch(hidden, topk_ids, topk_weights, mode)

    def combine(self, expert_out, handle):
        return self._active.combine(expert_out, handle)

    def dispatch_begin(self, hidden, topk_ids, topk_weights, mode) -> Any:
        self._active = self.for_mode(mode)
        return self._active.dispatch_begin(hidden, topk_ids, topk_weights, mode)

    def dispatch_end(self, pending: Any) -> DispatchOutput:
        return self._active.dispatch_end(pending)

    def combine_begin(self, expert_out, handle) -> Any:
        return self._active.combine_begin(expert_out, handle)

    def combine_end(self, pending: Any):
        return self._active.combine_end(pending)
