"""torch.distributed set-up for one rank of a worker group (no ray here: usable from plain processes too).

Three groups per rank:
  world:     the default group — NCCL on GPU, gloo on CPU.
  cpu_group: gloo, for the small per-step control collective (token counts, modes), which must not queue
             behind device work.
  ep_group:  the MoE all-to-all traffic (same backend as world), a separate communicator so that other
             collectives on `world` (EPLB weight moves, barriers) never interleave with a step's dispatches.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BACKENDS = ("nccl", "gloo")


@dataclass(slots=True)
class DistGroups:
    rank: int
    world_size: int
    backend: str
    device: torch.device
    world: dist.ProcessGroup
    cpu_group: dist.ProcessGroup
    ep_group: dist.ProcessGroup
    eplb_group: dist.ProcessGroup  # expert weight moves, kept off the MoE data path's communicator


def find_free_port() -> int:
    """A TCP port free on this node right now (the OS picks it; a tiny race remains until it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def tcp_init_method(addr: str, port: int) -> str:
    host = f"[{addr}]" if ":" in addr else addr  # IPv6 literals need brackets
    return f"tcp://{host}:{port}"


def init_distributed(
    rank: int,
    world_size: int,
    init_method: str,
    *,
    backend: str,
    device_index: int | None = None,
    timeout_s: float = 600.0,
) -> DistGroups:
    """Join the process group and build the control and EP groups; every rank calls this at the same time.

    init_method: "tcp://addr:port" (see `tcp_init_method`) or "file:///path" (tests).
    backend: "nccl" (GPU ranks; device_index selects the local GPU, default 0 — Ray exposes one GPU per
    actor) or "gloo" (CPU ranks)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown torch.distributed backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised here; call destroy_distributed() first")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", device_index or 0)
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
    )
    # new_group is collective: every rank creates the groups in this same order.
    cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    ep_group = dist.new_group(ranks=list(range(world_size)), backend=backend, timeout=timeout,
                              pg_options=ep_group_options(backend, timeout))
    eplb_group = dist.new_group(ranks=list(range(world_size)), backend=backend, timeout=timeout)
    return DistGroups(rank, world_size, backend, device, dist.group.WORLD, cpu_group, ep_group, eplb_group)


def ep_group_options(backend: str, timeout: timedelta) -> dist.ProcessGroupNCCL.Options | None:
    """Options for the EP group (None for gloo): with NCCL its collectives run on a high-priority stream, so that
    under two-batch overlap their kernels are scheduled ahead of the other micro-batch's compute kernels rather
    than queued behind them. The EPLB group keeps normal priority: weight moves must not delay serving
    (benchmarks/ep_overlap.py --normal-priority-too times the EP steps over the EPLB group to compare the two).
    timeout: the group's (torch warns when the options' own timeout differs from new_group's)."""
    if backend != "nccl":
        return None
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    options._timeout = timeout
    return options


def destroy_distributed() -> None:
    """Leave the process group (all subgroups included); a no-op when not initialised."""
    if dist.is_initialized():
        dist.destroy_process_group()
