"""Linear and embedding layers whose weights start uninitialised: every weight comes from a checkpoint, so
random initialisation would only cost time (minutes for large expert-parallel shards)."""

from __future__ import annotations

from torch import nn


class Linear(nn.Linear):
    """nn.Linear (y = x @ weight.T + bias; weight: [out, in]) without initialisation."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding (weight: [vocab, hidden]) without initialisation."""

    def reset_parameters(self) -> None:
        pass
