"""Completion counters: the int32 slots a kernel uses to elect "the last program of a group to finish".

A kernel whose programs each write a partial result and then need one of them to combine the partials (the
split-K GEMV, split-K router logits, the split-KV attention merge, the fused-MoE pairs path's top-k sum) calls
`last_to_arrive` on its group's counter after its writes: the program that reads ``group_size - 1`` back is the
last; it sets the counter to 0 again, then combines. So every counter is 0 between launches, and a CUDA graph can
replay the kernel any number of times without a reset.

One buffer per device serves every such kernel: they run one after another on one stream, and no two launches that
share it may run concurrently. `moe_align`'s count + scatter path also keeps its scratch here, across its two
launches (slots 0 to 3 * E_POW2: counts, starts, cursor, arrivals), and its last scatter program zeroes it. The
fused-MoE pairs path's one launch keeps a ticket, a done count and per-pair ready counts after its sum counters
(`fused_moe_pairs.one_launch_counters`), zeroed by the programs that use them last. The Gluon grouped GEMM with
drawn tiles (`GemmConfig.dynamic_tiles`) keeps its ticket in slot 0, zeroed by the program that draws the
launch's last ticket. It is
allocated lazily on the first eager call; a graph captured afterwards keeps its address. Growing allocates a new
buffer and keeps the old one alive (graphs may hold its address), and is refused during capture (nothing would
zero it): make one eager call of each shape before capturing, as `CudaGraphRunner.capture` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MIN_COUNTERS = 4096
_buffers: dict[tuple[str, int | None], torch.Tensor] = {}
_retired: list[torch.Tensor] = []  # outgrown buffers, kept alive for the graphs that captured them


def completion_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` int32 counters on ``device``, all 0 (each kernel leaves them 0 when it ends)."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    key = (device.type, index)
    buf = _buffers.get(key)
    if buf is not None and buf.numel() >= count:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"completion counters: {count} needed on {device} during CUDA-graph capture but "
            f"{0 if buf is None else buf.numel()} allocated; run the kernel once eagerly with this shape "
            "before capturing"
        )
    if buf is not None:
        _retired.append(buf)
    size = max(_MIN_COUNTERS, 1 << (count - 1).bit_length())
    _buffers[key] = torch.zeros(size, dtype=torch.int32, device=torch.device(key[0], key[1]))
    return _buffers[key]


@triton.jit
def last_to_arrive(counter_ptr, group_size):
    """Count this program in; True in the last of the group_size programs sharing counter_ptr to arrive.

    Call once per program, after storing its partial result. The barrier before the atomic orders every
    thread's stores before the atomic's (single-thread) release; the acquire, and the barrier after it, order
    the last program's later loads of the partials after every other program's stores (load them with
    cache_modifier=".cg": L1 is not coherent). The last program also sets the counter back to 0, so counters
    are 0 between launches and a CUDA graph can replay the kernel without resetting them."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    tl.debug_barrier()
    last = arrived == group_size - 1
    tl.store(counter_ptr, 0, mask=last)
    return last
