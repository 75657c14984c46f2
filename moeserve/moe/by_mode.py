"""One dispatcher per step mode: decode steps through one backend, prefill (extend) steps through another.

The default pairing without DeepEP is the all-gather for decode and the all-to-all for prefill. At decode sizes
the all-gather's traffic (every token to every rank) is small, and it never syncs the host, so decode steps
replay CUDA graphs holding its collectives (benchmarks/RESULTS.md: 7.5x the eager steps' throughput on a
decode-heavy workload, 2 GPUs). At prefill sizes its traffic grows with the EP size, faster than the
all-to-all's, which sends a token only to the ranks holding its choices. DeepEP makes the same split inside one
buffer (low-latency and normal kernels).

The backend is the step's: `begin_step` receives the mode every EP rank agreed on (`StepPlan.mode`), so all
ranks pick the same one whatever mode a single call names (an idle rank's batch says IDLE). Handles carry their
backend, so each combine goes back through the backend that dispatched.
"""

from __future__ import annotations

from typing import Any

import torch

from moeserve.forward_batch import ForwardMode
from moeserve.moe.dispatcher import Dispatcher, DispatchOutput, StagedDispatcher


class ByModeDispatcher(StagedDispatcher):
    """decode: the backend of DECODE steps (and of the CUDA graphs); extend: of every other mode."""

    name = "by_mode"

    def __init__(self, decode: Dispatcher, extend: Dispatcher) -> None:
        if decode.num_local_slots != extend.num_local_slots:
            raise ValueError(f"the two backends disagree on local slots: {decode.num_local_slots} (decode) vs "
                             f"{extend.num_local_slots} (extend)")
        super().__init__(decode.num_local_slots)
        self.decode, self.extend = decode, extend
        self.step_mode: ForwardMode | None = None  # set by begin_step; None: each call's own mode decides

    def for_mode(self, mode: ForwardMode) -> Dispatcher:
        return self.decode if mode == ForwardMode.DECODE else self.extend

    def sibling(self) -> ByModeDispatcher:
        return ByModeDispatcher(self.decode.sibling(), self.extend.sibling())

    def begin_step(self, mode: ForwardMode, max_tokens: int | None = None) -> None:
        self.step_mode = mode
        self.for_mode(mode).begin_step(mode, max_tokens)

    def _backend(self, mode: ForwardMode) -> Dispatcher:
        return self.for_mode(mode if self.step_mode is None else self.step_mode)

    # The contract's four stages: outputs and pending objects carry their backend.
    def dispatch_begin(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       mode: ForwardMode) -> tuple[Dispatcher, Any]:
        backend = self._backend(mode)
        return backend, backend.dispatch_begin(hidden, topk_ids, topk_weights, mode)

    def dispatch_end(self, pending: tuple[Dispatcher, Any]) -> DispatchOutput:
        backend, inner = pending
        out = backend.dispatch_end(inner)
        return DispatchOutput(out.hidden, out.topk_ids, out.topk_weights, (backend, out.handle), out.num_pairs)

    def combine_begin(self, expert_out: torch.Tensor, handle: tuple[Dispatcher, Any]) -> tuple[Dispatcher, Any]:
        backend, inner = handle
        return backend, backend.combine_begin(expert_out, inner)

    def combine_end(self, pending: tuple[Dispatcher, Any]) -> torch.Tensor:
        backend, inner = pending
        return backend.combine_end(inner)
