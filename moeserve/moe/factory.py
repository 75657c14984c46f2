"""Pick the dispatcher backend once, at start-up, and say which one runs and why."""

from __future__ import annotations

import importlib
import logging

import torch
import torch.distributed as dist

from moeserve.backend_choice import DISPATCHERS
from moeserve.moe.all_gather import AllGatherDispatcher
from moeserve.moe.all_to_all import TorchAllToAllDispatcher
from moeserve.moe.by_mode import ByModeDispatcher
from moeserve.moe.dispatcher import Dispatcher, LocalDispatcher

logger = logging.getLogger("moeserve")


def _deep_ep_problem() -> str | None:
    """None when `deep_ep` imports, else why not (the import error's message)."""
    try:
        importlib.import_module("deep_ep")
    except Exception as exc:  # ImportError, or a broken build failing on load (OSError, RuntimeError)
        return f"deep_ep not importable: {exc}"
    return None


def create_dispatcher(
    name: str = "auto",
    *,
    group: dist.ProcessGroup | None,
    ep_size: int,
    num_local_slots: int,
    device: torch.device | str,
    max_tokens_per_rank: int = 128,
    hidden: int | None = None,
    num_sms: int | None = None,
) -> Dispatcher:
    """Build the MoE dispatcher for this rank.

    name: "auto" (local when ep_size == 1; deepep when `deep_ep` imports and device is CUDA; else by_mode on
          CUDA, all_to_all on CPU), or one of "local", "all_to_all", "all_gather" (fixed-size all-gather +
          reduce-scatter, no host sync: see moeserve/moe/all_gather.py), "by_mode" (all_gather for decode
          steps, which then replay CUDA graphs, all_to_all for prefill: moeserve/moe/by_mode.py), "deepep".
    group: the EP process group (None = default group); ep_size: its size; num_local_slots: physical experts
    per rank. max_tokens_per_rank, hidden, num_sms: DeepEP buffer sizing (low-latency batch cap, hidden size,
    SMs for normal-mode kernels); ignored by other backends.
    Logs one line on logger "moeserve" naming the backend and the reason.
    """
    if name not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {name!r}; allowed: {', '.join(map(repr, DISPATCHERS))}")
    device = torch.device(device)
    chosen, reason = _choose(name, ep_size, device)
    logger.info("MoE dispatcher: %s (%s)", chosen, reason)
    if chosen == "local":
        if ep_size != 1:
            raise ValueError(f"dispatcher 'local' needs ep_size == 1, got ep_size={ep_size}")
        return LocalDispatcher(num_local_slots)
    group_size = dist.get_world_size(group)
    if group_size != ep_size:
        raise ValueError(f"ep_size={ep_size} but the EP process group has {group_size} ranks")
    if chosen == "all_to_all":
        return TorchAllToAllDispatcher(group, num_local_slots)
    if chosen == "all_gather":
        return AllGatherDispatcher(group, num_local_slots)
    if chosen == "by_mode":
        return ByModeDispatcher(AllGatherDispatcher(group, num_local_slots),
                                TorchAllToAllDispatcher(group, num_local_slots))
    if hidden is None:
        raise ValueError("dispatcher 'deepep' needs hidden= (the model's hidden size) to size its buffer")
    from moeserve.moe.deepep import DeepEPDispatcher

    ep_group = group if group is not None else dist.group.WORLD
    return DeepEPDispatcher(
        ep_group, num_local_slots, hidden=hidden, max_tokens_per_rank=max_tokens_per_rank, num_sms=num_sms
    )


def _choose(name: str, ep_size: int, device: torch.device) -> tuple[str, str]:
    """-> (backend, reason for the start-up log line). Raises when an explicit choice cannot run."""
    if name == "local":
        return "local", "requested"
    if name in ("all_to_all", "all_gather", "by_mode"):
        return name, "requested"
    if name == "deepep":
        problem = _deep_ep_problem()
        if problem is not None:
            raise ValueError(f"dispatcher 'deepep' requested but {problem}; use 'all_to_all' or 'auto'")
        if device.type != "cuda":
            raise ValueError(f"dispatcher 'deepep' needs CUDA devices, got device {device}; use 'all_to_all'")
        return "deepep", "requested"
    if ep_size == 1:
        return "local", "ep_size == 1, no communication"
    if device.type != "cuda":
        return "all_to_all", f"device is {device.type}, DeepEP needs CUDA"
    problem = _deep_ep_problem()
    if problem is not None:
        return "by_mode", f"{problem}; all_gather for decode (CUDA graphs), all_to_all for prefill"
    return "deepep", "deep_ep importable and device is CUDA"
