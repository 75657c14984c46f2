"""Facts about the device a kernel launch sizes its grid from."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 8 elsewhere (the Triton interpreter: small grids keep it fast)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=8)
def compute_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device; (0, 0) elsewhere. Cached: launchers ask on every call."""
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)
