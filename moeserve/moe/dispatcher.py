"""The dispatcher contract: send each token to the ranks holding its experts, and bring the results back.

Every backend (local, torch all-to-all, all-gather, DeepEP) has the same contract and must give the same result
as `LocalDispatcher` run with all experts on one rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moeserve.forward_batch import ForwardMode


@dataclass(slots=True)
class DispatchOutput:
    """What one rank received: each token at most once, with the choices that fall on this rank. Rows may have
    no choice here at all (the all-gather backend sends every token everywhere, plus zero padding rows); the
    expert kernel must return exact zeros for them, since combine adds them into real tokens.

    hidden:       [num_recv, hidden], the activations received.
    topk_ids:     [num_recv, top_k], int32 — this rank's local expert slot (0 .. num_local_slots - 1) for each
                  choice held here, -1 for choices held elsewhere.
    topk_weights: [num_recv, top_k], float32 — routing weights (those of -1 choices are ignored).
    handle:       backend state `combine` needs to send results back.
    num_pairs:    the choices held here (topk_ids >= 0), when the backend knows the count on the host without an
                  extra sync (the all-to-all exchanges it with its row counts; DeepEP's normal mode returns it),
                  else None. The expert kernel's tile lookup keys on it (`ExpertKernel`): rows that arrive only
                  because they have a choice here carry more choices per row than the tables assume.
    """

    hidden: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    handle: Any
    num_pairs: int | None = None


class Dispatcher(ABC):
    """Moves tokens to their experts' ranks and back. Physical expert p lives on rank p // num_local_slots."""

    name: str = "base"

    def __init__(self, num_local_slots: int) -> None:
        self.num_local_slots = num_local_slots

    @abstractmethod
    def dispatch(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        mode: ForwardMode,
    ) -> DispatchOutput:
        """hidden: [num_tokens, hidden]; topk_ids: [num_tokens, top_k] int32 physical expert ids (-1 = none);
        topk_weights: [num_tokens, top_k] float32."""

    @abstractmethod
    def combine(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor:
        """expert_out: [num_recv, hidden], each row the weighted sum of this rank's experts for that token.
        Returns [num_tokens, hidden]: for each original token, the sum over all ranks."""

    def sibling(self) -> Dispatcher:
        """A second instance for the other TBO micro-batch (backends with per-call buffers override this)."""
        return self

    def for_mode(self, mode: ForwardMode) -> Dispatcher:
        """The backend that moves tokens in steps of this mode (itself, except for `ByModeDispatcher`)."""
        return self

    def begin_step(self, mode: ForwardMode, max_tokens: int | None = None) -> None:
        """Called once per step with the mode all EP ranks agreed on, before any dispatch (and before a CUDA
        graph replay). max_tokens: the most tokens any EP rank has this step (None off the lockstep path).
        Backends with per-step state switch here (DeepEP's buffer mode, the all-gather's capacity); others
        ignore it."""
        return None

    # Split API for two-batch overlap: `*_begin` starts a transfer, `*_end` waits for it, and the other
    # micro-batch computes in between. Backends that cannot overlap keep these defaults (all work in begin).
    def dispatch_begin(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, mode: ForwardMode
    ) -> Any:
        """Same arguments as `dispatch`; returns an opaque pending object for `dispatch_end`."""
        return self.dispatch(hidden, topk_ids, topk_weights, mode)

    def dispatch_end(self, pending: Any) -> DispatchOutput:
        return pending

    def combine_begin(self, expert_out: torch.Tensor, handle: Any) -> Any:
        """Same arguments as `combine`; returns an opaque pending object for `combine_end`."""
        return self.combine(expert_out, handle)

    def combine_end(self, pending: Any) -> torch.Tensor:
        return pending


class StagedDispatcher(Dispatcher):
    """A backend whose transfers are truly asynchronous: it implements the four stages, and the blocking
    `dispatch` / `combine` are begin + end."""

    def dispatch(self, hidden, topk_ids, topk_weights, mode):
        return self.dispatch_end(self.dispatch_begin(hidden, topk_ids, topk_weights, mode))

    def combine(self, expert_out, handle):
        return self.combine_end(self.combine_begin(expert_out, handle))


class CollectiveDispatcher(StagedDispatcher):
    """A staged backend over a torch.distributed EP process group (None = the default group)."""

    def __init__(self, group: dist.ProcessGroup | None, num_local_slots: int) -> None:
        super().__init__(num_local_slots)
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)

    @staticmethod
    def pack_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """ids [n, k] and float32 weights [n, k] -> one [n, 2k] int32 tensor (the weights as their bits), so
        one transfer carries both."""
        return torch.cat([topk_ids.to(torch.int32), topk_weights.float().view(torch.int32)], dim=1)

    @staticmethod
    def unpack_routing(meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pack_routing`'s inverse: [n, 2k] int32 -> (ids [n, k] int32, weights [n, k] float32)."""
        top_k = meta.shape[1] // 2
        return meta[:, :top_k].contiguous(), meta[:, top_k:].contiguous().view(torch.float32)


class LocalDispatcher(Dispatcher):
    """One rank holds every expert: nothing moves."""

    name = "local"

    def dispatch(self, hidden, topk_ids, topk_weights, mode):
        return DispatchOutput(hidden, topk_ids.to(torch.int32), topk_weights.float(), None)

    def combine(self, expert_out, handle):
        return expert_out
