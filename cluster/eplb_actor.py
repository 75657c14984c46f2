"""The EPLB actor: one per deployment, named. It pulls expert load from the worker ranks, plans a new placement
(movement-aware), and rebalances when balancedness would improve by more than a threshold — on a timer, or
when asked by `moeserve rebalance`.

The moves themselves run inside the workers' step loops, one layer chunk per step, while serving goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import ray
import torch

from moeserve.eplb.metrics import balancedness as balancedness_of
from moeserve.eplb.metrics import gpu_loads
from moeserve.eplb.proposal import Proposal, propose

logger = logging.getLogger("moeserve")

NAMESPACE = "moeserve"


def eplb_actor_name(app_name: str) -> str:
    return f"eplb-{app_name}"


@dataclass(frozen=True, slots=True)
class EplbSettings:
    enabled: bool = False  # the periodic loop; `rebalance` on demand works either way
    interval_s: float = 60.0
    threshold: float = 0.05  # rebalance when mean balancedness would rise by more than this
    layers_per_chunk: int = 4
    timeout_s: float = 600.0


class EplbActor:
    """Async actor. `set_workers` gives it the current worker handles (again after a group restart)."""

    def __init__(self, settings: EplbSettings) -> None:
        self.settings = settings
        self.workers: list = []
        self._plan_ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.last_report: dict | None = None
        self._loop_task = None

    async def set_workers(self, workers: list) -> None:
        self.workers = list(workers)
        if self.settings.enabled and self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._periodic())

    async def _collect(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        if len(self.workers) < 2:
            raise ValueError(
                "expert load balancing needs expert parallelism (EP > 1); this deployment has "
                f"{len(self.workers)} rank(s) holding all experts"
            )
        loads = await asyncio.gather(*(w.expert_load.remote() for w in self.workers))
        logical = sum(torch.tensor(entry["logical"], dtype=torch.float64) for entry in loads)
        return logical, torch.tensor(loads[0]["phy2log"]), loads[0]

    async def _propose(self) -> tuple[Proposal, torch.Tensor]:
        logical, current, info = await self._collect()
        num_gpus = len(self.workers)
        proposal = await asyncio.to_thread(
            propose,
            logical,
            current,
            num_groups=info["num_groups"],
            num_nodes=max(1, num_gpus // info["gpus_per_node"]),
            num_gpus=num_gpus,
            expert_bytes=info["expert_bytes"],
        )
        return proposal, current

    async def balancedness(self) -> float | None:
        """Mean balancedness of the current placement under the recent load (None without load or EP)."""
        if len(self.workers) < 2:
            return None
        try:
            logical, current, _ = await self._collect()
        except Exception:  # workers restarting: no figure now
            return None
        if not logical.sum():
            return None
        return float(balancedness_of(gpu_loads(logical, len(self.workers), current)).mean())

    async def rebalance(self, dry_run: bool = False, force: bool = True) -> dict:
        """Plan now; unless dry_run, apply the plan (force: even below the threshold). Returns the report:
        per-layer balancedness before/after, bytes to move, whether it was applied, and move statistics."""
        async with self._lock:
            proposal, _ = await self._propose()
            report = {"dry_run": dry_run, "threshold": self.settings.threshold, **proposal.summary()}
            worth_it = proposal.improvement > self.settings.threshold
            report["applied"] = False
            if not dry_run and (force or worth_it) and proposal.experts_moved > 0:
                report.update(await self._apply(proposal))
                report["applied"] = True
            self.last_report = report
            return report

    async def _apply(self, proposal: Proposal) -> dict:
        plan_id = next(self._plan_ids)
        new = proposal.new_phy2log.tolist()
        t0 = time.monotonic()
        await asyncio.gather(
            *(w.start_rebalance.remote(plan_id, new, self.settings.layers_per_chunk) for w in self.workers)
        )
        while True:
            status = await asyncio.gather(*(w.rebalance_status.remote() for w in self.workers))
            if all(s["plan_id"] == plan_id and not s["running"] for s in status):
                break
            if time.monotonic() - t0 > self.settings.timeout_s:
                raise TimeoutError(f"rebalance {plan_id} did not finish in {self.settings.timeout_s:.0f}s")
            await asyncio.sleep(0.05)
        return {
            "plan_id": plan_id,
            "seconds": time.monotonic() - t0,
            "bytes_received": sum(s["bytes_received"] for s in status),
            "checksums_ok": all(s["checksums_ok"] for s in status),
            "chunks": status[0]["chunks_total"],
            "max_chunk_seconds": max((max(s["seconds_per_chunk"], default=0.0) for s in status), default=0.0),
        }

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                report = await self.rebalance(dry_run=False, force=False)
                if report["applied"]:
                    logger.info(
                        "EPLB: balancedness %.3f -> %.3f", report["mean_before"], report["mean_after"]
                    )
            except Exception as e:  # a restart or an idle deployment: try again next interval
                logger.warning("EPLB periodic rebalance skipped: %s", e)


def start_eplb_actor(app_name: str, settings: EplbSettings):
    """Create (or replace) the deployment's named EPLB actor."""
    name = eplb_actor_name(app_name)
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
    except ValueError:
        pass
    return ray.remote(EplbActor).options(name=name, namespace=NAMESPACE, num_cpus=0).remote(settings)


def get_eplb_actor(app_name: str):
    """The running deployment's EPLB actor; ValueError with a clear message when there is none."""
    try:
        return ray.get_actor(eplb_actor_name(app_name), namespace=NAMESPACE)
    except ValueError:
        raise ValueError(
            f"no deployment named {app_name!r} with an EPLB actor is running on this Ray cluster "
            "(start one with `moeserve serve` or `ray job submit ... moeserve.cluster.launch`)"
        ) from None
