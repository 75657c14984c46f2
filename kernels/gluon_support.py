"""What the Gluon (Hopper) kernels share: the imports, the release they were written for, the platform check and
host-built TMA descriptors.

Gluon is Triton's experimental layout-explicit dialect (`triton.experimental.gluon`); its API still changes
between releases, so a Gluon kernel runs only on the Triton release it was written and measured with
(`TRITON_TESTED`) and on a Hopper GPU (wgmma). Elsewhere the names below are None and callers take their
Triton kernels.
"""

from __future__ import annotations

import functools

import torch
import triton

from .device import compute_capability

try:  # Gluon (Triton >= 3.5; `gluon_platform_problem` also wants the tested release)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: `gluon_platform_problem` reports it
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = TensorDescriptor = None

__all__ = ["gluon", "gl", "fence_async_shared", "mbarrier", "tma", "warpgroup_mma", "warpgroup_mma_wait",
           "TRITON_TESTED", "GL_DTYPES", "DESCRIPTOR_DTYPES", "gluon_platform_problem", "host_descriptor"]

TRITON_TESTED = "3.6."  # the Triton release the Gluon kernels were written for and measured with
GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
# What a TMA descriptor may carry: the 16-bit types and e4m3 (the fp8 grouped GEMM's operands and act).
DESCRIPTOR_DTYPES = {**GL_DTYPES, torch.float8_e4m3fn: "float8e4nv"}


def gluon_platform_problem(device: torch.device, what: str) -> str | None:
    """Why a Gluon kernel (`what`, for the message) cannot run on device, or None: Gluon present in the tested
    Triton release, and a Hopper GPU (sm_90)."""
    if gluon is None or not triton.__version__.startswith(TRITON_TESTED):
        return f"{what} is written for Triton {TRITON_TESTED}x, this is Triton {triton.__version__}"
    if device.type != "cuda" or compute_capability(device) != (9, 0):
        return f"{what} needs a Hopper GPU (sm_90: wgmma)"
    return None


def host_descriptor(t2d: torch.Tensor, block: list[int], layout_of: list[int] | None = None) -> TensorDescriptor:
    """A TMA descriptor over the 2-D tensor t2d (unit column stride, a `DESCRIPTOR_DTYPES` type) in boxes of
    `block`, in the NVMMA shared layout the kernels' wgmma read: that of a `block` tile, or of a `layout_of` tile
    where a box fills rows of a larger one."""
    layout = _shared_layout(tuple(layout_of or block), DESCRIPTOR_DTYPES[t2d.dtype])
    return TensorDescriptor(t2d, list(t2d.shape), [t2d.stride(0), 1], block, layout)


@functools.cache
def _shared_layout(block: tuple[int, ...], dtype: str):
    """The NVMMA shared layout of a box: computed once per (box, dtype), since working it out took 16 of the
    21 us a descriptor cost on the host (and a Gluon GEMM launch builds three)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), getattr(gl, dtype))
