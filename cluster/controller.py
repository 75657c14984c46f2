"""The controller: one Serve replica per deployment that owns the worker group and watches its health.

Ingress replicas ask it for the worker handles (`workers`), for per-rank load (`loads`, feeding the router)
and for operator status (`status`, what `moeserve status` and /metrics show). A monitor task pings every rank
each `health.interval_s`; when one is dead or its engine loop has failed, the whole group is restarted (expert
parallelism cannot run with a rank missing) and the generation goes up, so ingress replicas refetch handles.

Killing the old group is what makes in-flight requests fail fast: their streams end with an actor error, which
the ingress turns into a retriable 503 (or an error event mid-stream). While the group restarts, `workers()`
returns no handles and new requests get 503 at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray import serve

from moeserve.cluster.config import DeployConfig
from moeserve.cluster.eplb_actor import EplbSettings, start_eplb_actor
from moeserve.cluster.worker import EngineWorker
from moeserve.cluster.worker_group import WorkerGroup

logger = logging.getLogger("moeserve")

LOADS_MAX_AGE_S = 0.1  # loads asked for within this long of each other share one round of stats calls
STATS_TIMEOUT_S = 5.0


class Controller:
    """Owns the `WorkerGroup` of `EngineWorker`s of one app; Serve constructs it (`controller_deployment`).

    state: "up", "restarting" (a rank died; every rank is being replaced), "down" (a restart failed; the
    monitor tries again on its next tick).
    """

    async def __init__(self, config: DeployConfig) -> None:
        assert config.model is not None and config.device != "auto", "build_app pins model and device"
        self.config = config
        self.engine_config = config.engine_config(config.model)
        self.restarts = 0
        self.last_failure: str | None = None
        self._loads: tuple[float, int, list[int] | None] = (0.0, -1, None)
        self._loads_lock = asyncio.Lock()
        # Built before the constructor returns: Serve counts the replica ready only once its ranks are up.
        self.group = await asyncio.to_thread(self._new_group)
        self.state = "up"
        self.eplb = self._start_eplb()
        await self.eplb.set_workers.remote(list(self.group.actors))
        self._monitor = asyncio.get_running_loop().create_task(self._watch())

    def _start_eplb(self):
        """The app's named EPLB actor (`moeserve rebalance` finds it by the app name)."""
        e = self.config.eplb
        return start_eplb_actor(self.config.app_name, EplbSettings(
            enabled=e.enabled and self.config.parallel.ep > 1, interval_s=e.interval_s, threshold=e.threshold,
            layers_per_chunk=e.layers_per_chunk,
        ))

    def _new_group(self) -> WorkerGroup:
        return WorkerGroup(
            self.config.parallel.dp, EngineWorker, {"config": self.engine_config},
            use_gpu=self.config.use_gpu(), name=f"{self.config.app_name}-workers",
            actor_options={"max_concurrency": 1000},
        )

    # ---- what ingress replicas and operators call ----------------------------------------------------
    async def workers(self) -> tuple[int, list[Any]]:
        """(generation, actor handles in rank order); no handles while the group is not up."""
        if self.state != "up":
            return self.group.generation, []
        return self.group.generation, list(self.group.actors)

    async def loads(self) -> tuple[int, list[int] | None]:
        """(generation, running + waiting requests per rank); None when the ranks do not answer."""
        async with self._loads_lock:
            taken, generation, loads = self._loads
            if time.monotonic() - taken > LOADS_MAX_AGE_S or generation != self.group.generation:
                stats = await self._rank_stats()
                loads = None if stats is None else [s["num_running"] + s["num_waiting"] for s in stats]
                self._loads = (time.monotonic(), self.group.generation, loads)
            return self._loads[1], self._loads[2]

    async def status(self) -> dict[str, Any]:
        """Everything `moeserve status` prints: state, generation, per-rank engine stats, balancedness."""
        stats = await self._rank_stats()
        return {
            "app": self.config.app_name,
            "model": self.config.model_name,
            "state": self.state,
            "generation": self.group.generation,
            "restarts": self.restarts,
            "last_failure": self.last_failure,
            "num_ranks": self.config.parallel.dp,
            "expert_parallel_size": self.config.parallel.ep,
            "device": self.config.device,
            "ranks": stats or [],
            "balancedness": await self.balancedness(),
        }

    async def balancedness(self) -> float | None:
        """Expert-load balancedness (mean / max tokens per rank, averaged over MoE layers) of the current
        placement under the recent load, from the EPLB actor; None with EP = 1, no load yet, or restarting."""
        if self.state != "up" or self.config.parallel.ep < 2:
            return None
        try:
            return await asyncio.wait_for(self.eplb.balancedness.remote(), STATS_TIMEOUT_S)
        except Exception as exc:
            logger.info("balancedness unavailable: %r", exc)
            return None

    async def _rank_stats(self) -> list[dict] | None:
        if self.state != "up":
            return None
        actors = list(self.group.actors)
        try:
            return list(await asyncio.wait_for(
                asyncio.gather(*(a.stats.remote() for a in actors)), STATS_TIMEOUT_S
            ))
        except Exception as exc:  # a dead or hung rank: the monitor deals with it
            logger.info("rank stats failed: %r", exc)
            return None

    # ---- health ----------------------------------------------------------------------------------------
    async def _watch(self) -> None:
        health = self.config.health
        while True:
            await asyncio.sleep(health.interval_s)
            try:
                if self.state == "up":
                    problem = await asyncio.to_thread(self._check, health.ping_timeout_s)
                else:
                    problem = f"previous restart failed: {self.last_failure}"
                if problem is not None:
                    await self._restart(problem)
            except Exception:  # the monitor must outlive any one bad round (e.g. Ray hiccups)
                logger.exception("app %r: health check round failed", self.config.app_name)

    def _check(self, timeout_s: float) -> str | None:
        """None when every rank answers a ping; else what is wrong (runs off the event loop thread)."""
        try:
            dead = self.group.dead_ranks(timeout_s)
        except ray.exceptions.RayTaskError as exc:  # a rank answered, but its engine loop has failed
            return f"a rank's engine failed: {str(exc.cause)[:300]}"
        return f"ranks {dead} died or stopped answering" if dead else None

    async def _restart(self, reason: str) -> None:
        app, num_ranks = self.config.app_name, self.group.num_ranks
        logger.warning("app %r: %s; restarting all %d ranks", app, reason, num_ranks)
        self.state = "restarting"
        self.last_failure = reason
        try:
            await asyncio.to_thread(self.group.restart)
        except Exception as exc:
            self.state = "down"
            self.last_failure = f"restart failed: {exc}"
            logger.exception("app %r: restart failed; retrying", self.config.app_name)
            return
        self.restarts += 1
        await self.eplb.set_workers.remote(list(self.group.actors))
        self.state = "up"
        logger.warning("app %r: ranks back (generation %d)", self.config.app_name, self.group.generation)

    async def check_health(self) -> None:
        """Serve's replica health check: the replica is healthy unless its monitor task crashed."""
        if self._monitor.done() and not self._monitor.cancelled():
            raise RuntimeError(f"the health monitor stopped: {self._monitor.exception()!r}")

    def __del__(self) -> None:
        # Serve calls this when the app is deleted (the ranks would die with this actor anyway: Ray
        # fate-shares actors with their owner).
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()


def controller_deployment(config: DeployConfig) -> serve.Deployment:
    """The Controller as a Serve deployment: one replica, a little CPU; it never autoscales."""
    return serve.deployment(
        Controller,
        name="Controller",
        num_replicas=1,
        max_ongoing_requests=1000,
        ray_actor_options=actor_options(config, num_cpus=0.1),
        # Ingress replicas poll `loads` four times a second each: an access-log line per call is noise.
        logging_config={"enable_access_log": False},
    )


def actor_options(config: DeployConfig, num_cpus: float) -> dict[str, Any]:
    """Ray options of a deployment's replicas. The config's runtime_env only when it names one: otherwise the
    replicas inherit the deploying job's (its working_dir included)."""
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if config.runtime_env:
        options["runtime_env"] = dict(config.runtime_env)
    return options


# ---- `moeserve status` ------------------------------------------------------------------------------------
def fetch_status(address: str | None, app_name: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Connect to the Ray cluster (address / $RAY_ADDRESS / a local one) and ask the app's controller.
    Raises ConnectionError (no cluster), LookupError (no such moeserve app) or TimeoutError."""
    from moeserve.cluster.launch import connect

    connect(address, start_local=False)
    apps = serve.status().applications
    if app_name not in apps:
        running = ", ".join(sorted(apps)) or "none"
        # Several local clusters (two `moeserve serve`, a test run's) are told apart only by address.
        where = ray.get_runtime_context().gcs_address
        raise LookupError(f"no Serve app named {app_name!r} on the Ray cluster at {where} (running apps: "
                          f"{running}); another cluster: pass --address or set RAY_ADDRESS")
    if "Controller" not in apps[app_name].deployments:
        raise LookupError(f"Serve app {app_name!r} is not a moeserve app (it has no Controller deployment)")
    handle = serve.get_deployment_handle("Controller", app_name=app_name)
    return handle.status.remote().result(timeout_s=timeout_s)


def format_status(status: dict[str, Any]) -> str:
    """A short human-readable table of `Controller.status()`."""
    balance = status.get("balancedness")
    lines = [
        f"app {status['app']!r}: model {status['model']!r}, {status['num_ranks']} ranks "
        f"(ep {status['expert_parallel_size']}, {status['device']}), state {status['state']}, "
        f"generation {status['generation']}, restarts {status['restarts']}",
        f"expert balancedness: {'n/a' if balance is None else f'{balance:.3f}'}",
    ]
    if status.get("last_failure"):
        lines.append(f"last failure: {status['last_failure']}")
    if not status["ranks"]:
        lines.append("ranks: not answering (restarting?)")
        return "\n".join(lines)
    header = ("rank", "running", "waiting", "kv_use", "prefix_hit", "preempted")
    lines.append("{:>4} {:>8} {:>8} {:>7} {:>10} {:>9}".format(*header))
    for s in status["ranks"]:
        lines.append(
            f"{s['rank']:>4} {s['num_running']:>8} {s['num_waiting']:>8} {s['kv_usage']:>7.1%} "
            f"{s['prefix_cache_hit_rate']:>10.1%} {s['num_preemptions']:>9}"
        )
    return "\n".join(lines)
