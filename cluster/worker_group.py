"""The group of rank actors: one per GPU (or CPU slot), placed together, wired with torch.distributed.

`WorkerGroup` reserves a placement group with one bundle per rank, starts one actor per bundle, orders ranks
node by node (so EP ranks on one node are contiguous and rank r // gpus_per_node is the node), has rank 0
publish the rendezvous address, and initialises torch.distributed on every rank. Expert parallelism cannot run
with a rank missing, so failure handling is whole-group: `alive()` detects a dead rank, `restart()` replaces
every actor and re-initialises torch.distributed on a fresh port.

`RankActor` is the base of the worker actor; the engine's actor subclasses it (or any class with the same
methods is passed as `actor_cls`) and extends `init_distributed` to build its model once the groups exist.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moeserve.cluster.dist import (
    DistGroups,
    destroy_distributed,
    find_free_port,
    init_distributed,
    tcp_init_method,
)

logger = logging.getLogger("moeserve")


class RankActor:
    """One rank. Methods are called through Ray; subclasses add the engine (model, scheduler, step loop)."""

    def __init__(self) -> None:
        self.rank = -1
        self.world_size = 0
        self.groups: DistGroups | None = None

    def node_info(self) -> dict[str, Any]:
        """Where this actor runs: node id, node IP and the GPU ids Ray assigned (for rank ordering)."""
        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            # Numeric ids sort numerically ("10" after "2"); other forms (UUIDs) as strings.
            "gpu_ids": sorted((len(str(g)), str(g)) for g in ray.get_gpu_ids()),
        }

    def find_free_port(self) -> int:
        return find_free_port()

    def init_distributed(
        self, rank: int, world_size: int, master_addr: str, master_port: int, backend: str
    ) -> None:
        """Join torch.distributed as `rank`; builds `self.groups` (world, cpu_group, ep_group).
        Subclasses call super().init_distributed(...) first, then build what needs the groups."""
        self.rank, self.world_size = rank, world_size
        # Published for libraries that read the rendezvous address from the environment.
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
        self.groups = init_distributed(
            rank, world_size, tcp_init_method(master_addr, master_port), backend=backend
        )

    def ping(self) -> int:
        return self.rank

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run any method of this actor by name (the group's fan-out entry point)."""
        return getattr(self, method)(*args, **kwargs)

    def shutdown(self) -> None:
        destroy_distributed()


class WorkerGroup:
    """num_ranks actors of actor_cls (a RankActor subclass, plain or already @ray.remote), one per bundle.

    use_gpu: bundles of {"GPU": 1} and NCCL, else {"CPU": 1} and gloo. name: names the placement group and
    log lines. actor_options: extra Ray actor options (e.g. max_concurrency, runtime_env)."""

    def __init__(
        self,
        num_ranks: int,
        actor_cls: type,
        actor_kwargs: dict[str, Any] | None = None,
        *,
        use_gpu: bool,
        name: str,
        actor_options: dict[str, Any] | None = None,
        ready_timeout_s: float = 300.0,
    ) -> None:
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        self.num_ranks = num_ranks
        self.use_gpu = use_gpu
        self.name = name
        self.backend = "nccl" if use_gpu else "gloo"
        self._remote_cls = actor_cls if hasattr(actor_cls, "remote") else ray.remote(actor_cls)
        self._actor_kwargs = dict(actor_kwargs or {})
        self._actor_options = dict(actor_options or {})
        self._ready_timeout_s = ready_timeout_s
        self.generation = 0  # bumps on every restart; lets callers tell old handles from new
        self.actors: list[Any] = []
        self._pg = None
        self._start()

    # ---- fan-out -------------------------------------------------------------------------------------
    def call_all_async(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        return [actor.call.remote(method, *args, **kwargs) for actor in self.actors]

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method` on every rank at once (they may meet in collectives); results in rank order."""
        return ray.get(self.call_all_async(method, *args, **kwargs))

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(self.actors[rank].call.remote(method, *args, **kwargs))

    # ---- health --------------------------------------------------------------------------------------
    def dead_ranks(self, timeout_s: float = 30.0) -> list[int]:
        """Ranks whose actor has died or does not answer a ping within timeout_s (a rank busy in a long
        call answers late: ping from the control plane between steps, or use a threaded actor)."""
        refs = [actor.ping.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        ready_set = set(ready)
        dead = []
        for rank, ref in enumerate(refs):
            if ref not in ready_set:
                dead.append(rank)
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                dead.append(rank)
        return dead

    def alive(self, timeout_s: float = 30.0) -> bool:
        return not self.dead_ranks(timeout_s)

    def restart(self) -> None:
        """Replace every actor (EP cannot run with a rank missing) and re-initialise torch.distributed on a
        fresh port. Handles from before the restart are dead afterwards."""
        logger.warning("worker group %r: restarting all %d ranks", self.name, self.num_ranks)
        self._stop()
        self.generation += 1
        self._start()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Let every rank shut down (an engine's step loop ends at a step all ranks agree on, then the process
        groups go), then end the actors. Killing ranks first would leave the others failing inside a
        collective; ranks that do not answer within timeout_s are killed anyway."""
        try:
            ray.get([actor.shutdown.remote() for actor in self.actors], timeout=timeout_s)
        except Exception:  # a dead or stuck rank: the kill below ends it
            logger.warning("worker group %r: not every rank shut down cleanly", self.name)
        self._stop()

    # ---- lifecycle -----------------------------------------------------------------------------------
    def _start(self) -> None:
        resource = "GPU" if self.use_gpu else "CPU"
        bundles = [{resource: 1} for _ in range(self.num_ranks)]
        self._pg = placement_group(bundles, strategy="PACK", name=f"{self.name}-g{self.generation}")
        try:
            ray.get(self._pg.ready(), timeout=self._ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self._pg)
            self._pg = None
            raise RuntimeError(
                f"worker group {self.name!r}: could not reserve {self.num_ranks} x {{'{resource}': 1}} "
                f"in {self._ready_timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}"
            ) from None
        try:
            self._start_actors()
        except BaseException:
            self._stop()  # never leave half a group holding resources
            raise

    def _start_actors(self) -> None:
        actors = [self._spawn(bundle) for bundle in range(self.num_ranks)]
        self.actors = actors  # bundle order until ranks are known, so _stop can clean up on failure
        infos = ray.get([actor.node_info.remote() for actor in actors])
        # Node-contiguous ranks: sort by node (IP, then id), then GPU id, then bundle index.
        order = sorted(
            range(self.num_ranks),
            key=lambda i: (infos[i]["ip"], infos[i]["node_id"], infos[i]["gpu_ids"], i),
        )
        self.actors = [actors[i] for i in order]
        master_addr = infos[order[0]]["ip"]
        master_port = ray.get(self.actors[0].find_free_port.remote())
        ray.get(
            [
                actor.init_distributed.remote(rank, self.num_ranks, master_addr, master_port, self.backend)
                for rank, actor in enumerate(self.actors)
            ]
        )
        logger.info(
            "worker group %r: %d ranks up (%s, master %s:%d)",
            self.name, self.num_ranks, self.backend, master_addr, master_port,
        )

    def _spawn(self, bundle: int) -> Any:
        options = {
            "num_cpus": 0 if self.use_gpu else 1,
            "num_gpus": 1 if self.use_gpu else 0,
            "max_restarts": 0,  # restarts are whole-group, done by restart()
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=bundle
            ),
            **self._actor_options,
        }
        return self._remote_cls.options(**options).remote(**self._actor_kwargs)

    def _stop(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead: nothing to do
                logger.debug("worker group %r: actor already gone", self.name)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
