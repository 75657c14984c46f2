"""When Triton code runs instead of torch code: `choose_backend` picks the attention backend and expert
kernel, `fused_kernels_available` gates the small fused kernels (norm, rotary, router top-k, skinny GEMM)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

KERNEL_BACKENDS = ("auto", "torch", "triton")  # the expert kernel's choices, and the attention backend's
ATTENTION_BACKENDS = (*KERNEL_BACKENDS, "flashinfer")
# The MoE dispatcher's choices (moe/factory.py).
DISPATCHERS = ("auto", "local", "all_to_all", "all_gather", "by_mode", "deepep")


def choose_backend(
    what: str, name: str, device: torch.device | str, make_torch: Callable[[], T], make_triton: Callable[[], T]
) -> T:
    """name: "torch" (the reference, any device), "triton" (CUDA only), or "auto" (Triton on CUDA when it
    imports, else torch). `make_triton` may raise ImportError when Triton is missing."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(map(repr, KERNEL_BACKENDS))}")
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


@functools.cache
def _triton_imports() -> bool:
    try:
        import moeserve.kernels.norm  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return True


def fused_kernels_available(x: torch.Tensor) -> bool:
    """Whether the small fused Triton kernels (norm, rotary, router top-k, skinny GEMM) may run on x: on CUDA
    only, and only when Triton imports. CPU runs keep the torch code and its exact results."""
    return x.device.type == "cuda" and _triton_imports()
