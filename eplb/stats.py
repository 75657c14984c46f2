"""How loaded was each expert lately: a sliding window of per-step token counts, kept on the device.

``record`` is pure tensor work (no host sync), so it can run every step next to the forward pass; only the
EPLB controller reads ``total`` / ``logical_load`` now and then.
"""

from __future__ import annotations

import torch


class ExpertLoadWindow:
    """Ring buffer of the last ``window`` steps of tokens per physical expert per layer.

    buffer: [window, L, P] int64 on ``device``. The write position is a host int advanced by ``record``.
    """

    def __init__(
        self, num_layers: int, num_physical: int, window: int, device: torch.device | str = "cpu"
    ) -> None:
        if min(num_layers, num_physical, window) < 1:
            raise ValueError(
                f"num_layers, num_physical, window must be >= 1, got {num_layers}, {num_physical}, {window}"
            )
        self.window = window
        self.buffer = torch.zeros(window, num_layers, num_physical, dtype=torch.int64, device=device)
        self.steps_recorded = 0

    def record(self, counts: torch.Tensor) -> None:
        """Add one step. counts: [L, P] integer tokens per physical expert, on the window's device."""
        self.buffer[self.steps_recorded % self.window].copy_(counts, non_blocking=True)
        self.steps_recorded += 1

    def total(self) -> torch.Tensor:
        """[L, P] int64 tokens per physical expert summed over the last min(window, steps) steps."""
        return self.buffer.sum(0)

    def logical_load(self, phy2log: torch.Tensor, num_logical: int) -> torch.Tensor:
        """[L, E] int64 tokens per logical expert (its replicas summed). phy2log: [L, P] int64, the placement
        the counts were recorded under."""
        total = self.total()
        out = torch.zeros(total.shape[0], num_logical, dtype=torch.int64, device=total.device)
        return out.scatter_add_(1, phy2log.to(total.device).long(), total)

    def reset(self) -> None:
        """Forget everything, e.g. after the placement changed (old counts describe old slots)."""
        self.buffer.zero_()
        self.steps_recorded = 0
