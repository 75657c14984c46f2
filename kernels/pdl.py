"""Programmatic dependent launch (PDL) for the decode-path Triton kernels.

Inside a CUDA graph a decode step is a chain of ~100 small dependent kernels, and each boundary costs launch
and drain latency. With PDL (Hopper and newer) a kernel is launched before its predecessor has finished and
waits inside itself (`gdc_wait`) until the predecessor's writes are visible; work before the wait (address
arithmetic, loads of weights the predecessor does not write) overlaps the predecessor's tail. Measured with
benchmarks/pdl_probe.py on an H100: 0.3–0.5 µs saved per boundary, bit-identical results.

A kernel that takes part declares ``USE_PDL: tl.constexpr``, calls ``tl.extra.cuda.gdc_wait()`` before it
reads anything an earlier kernel wrote, may call ``gdc_launch_dependents()`` once its own reads are issued,
and is launched with ``**launch_kwargs(device)``. Waiting is transitive: a kernel that has passed its wait
knows every earlier kernel of the stream has finished, so kernels without PDL (cuBLAS, torch ops) can sit
anywhere in the chain. The one exception is fused-MoE's down kernel under `MoEConfig.overlap`: it never waits
for gate/up's launch to end, only for per-block counts, and its gate/up triggers only once each program's block
tables are read, so that when down ends gate/up touches no memory (its counts are each program's last access).
Later kernels then wait on down, not on gate/up. The small-M fused-MoE gate/up (`fused_moe_pairs.gate_up_pairs`)
is launched without PDL when its grid is one wave: launched early, it was slower in the batch-1 decode step.

``MOESERVE_PDL=0`` turns it off (for A/B timing and as an escape hatch).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from moeserve.kernels.device import compute_capability


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """PDL runs on CUDA devices of compute capability 9.0+ (Hopper), unless MOESERVE_PDL=0."""
    return os.environ.get("MOESERVE_PDL", "1") != "0" and compute_capability(device)[0] >= 9


def launch_kwargs(device: torch.device) -> dict:
    """Keyword arguments for a PDL-aware kernel launch: the kernel's ``USE_PDL`` and Triton's ``launch_pdl``."""
    if pdl_supported(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """First statement of a PDL-aware kernel: wait until earlier kernels' writes are visible, then let the
    next kernel launch (it in turn waits for this one to finish before it reads anything)."""
    pdl_steps(USE_PDL, True, True)


@triton.jit
def pdl_steps(USE_PDL: tl.constexpr, WAIT: tl.constexpr, LAUNCH: tl.constexpr):
    """`pdl_enter`'s two steps taken apart, for kernels that order their reads or their dependents' launch some
    other way (`fused_moe`'s gate/up and down under `MoEConfig.overlap`): WAIT for the launch before to end and
    its writes to be visible, then LAUNCH: let the next kernel launch."""
    if USE_PDL:
        if WAIT:
            tl.extra.cuda.gdc_wait()
        if LAUNCH:
            tl.extra.cuda.gdc_launch_dependents()
