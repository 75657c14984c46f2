"""One rule for picking a torch-or-Triton implementation, shared by the attention backend and expert kernel."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def choose_backend(
    what: str, name: str, device: torch.device | str, make_torch: Callable[[], T], make_triton: Callable[[], T]
) -> T:
    """name: "torch" (the reference, any device), "triton" (CUDA only), or "auto" (Triton on CUDA when it
    imports, else torch). `make_triton` may raise ImportError when Triton is missing."""
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown {what} {name!r}; allowed: 'auto', 'torch', 'triton'")
    on_cuda = torch.device(device).type == "cuda"
    if name == "triton" and not on_cuda:
        raise ValueError(f"{what} 'triton' needs a CUDA device")
    if name != "torch" and on_cuda:
        try:
            return make_triton()
        except ImportError:
            if name == "triton":
                raise
    return make_torch()
