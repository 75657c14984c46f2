"""The Ray worker group: ranks wired with torch.distributed run EP dispatch; a dead rank restarts all."""

from __future__ import annotations

import sys
import threading

import pytest
import ray
import torch
from ray import cloudpickle

from moeserve.cluster.worker_group import RankActor, WorkerGroup

# Ray workers cannot import this test module by name: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

NUM_EXPERTS, HIDDEN, INTER, TOP_K = 6, 8, 12, 2


class EPTestActor(RankActor):
    """A rank that runs one EP MoE layer through the all-to-all dispatcher and reports its error."""

    def moe_error(self, seed: int) -> float:
        from moeserve.forward_batch import ForwardMode
        from moeserve.moe.experts import torch_experts
        from moeserve.moe.factory import create_dispatcher
        from moeserve.moe.placement import ExpertPlacement

        gen = torch.Generator().manual_seed(seed)
        w13 = torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, generator=gen)
        w2 = torch.randn(NUM_EXPERTS, HIDDEN, INTER, generator=gen)
        gen.manual_seed(seed * 100 + self.rank)
        num_tokens = 0 if self.rank == 1 and seed % 2 else 9  # odd seeds: rank 1 idles
        x = torch.randn(num_tokens, HIDDEN, generator=gen)
        weights, ids = torch.randn(num_tokens, NUM_EXPERTS, generator=gen).softmax(1).topk(TOP_K, dim=1)

        placement = ExpertPlacement.default(1, NUM_EXPERTS, 2, self.rank, self.world_size)
        dispatcher = create_dispatcher(
            group=self.groups.ep_group, ep_size=self.world_size,
            num_local_slots=placement.num_local_slots, device="cpu",
        )
        held = torch.tensor(placement.local_logical_experts(0))
        mode = ForwardMode.EXTEND if num_tokens else ForwardMode.IDLE
        received = dispatcher.dispatch(x, placement.to_physical(0, ids), weights, mode)
        y = torch_experts(received.hidden, w13[held], w2[held], received.topk_weights, received.topk_ids)
        out = dispatcher.combine(y, received.handle)
        ref = torch_experts(x, w13, w2, weights, ids)
        return float((out - ref).abs().max()) if num_tokens else 0.0


    def block(self) -> None:
        """Never returns (until the actor is killed)."""
        threading.Event().wait()


class FailingStartActor(RankActor):
    """Rank 1 fails while building its engine; rank 0 then waits for it in a collective, as EP ranks do when
    one rank's CUDA-graph capture fails (the others are inside a captured collective)."""

    def init_distributed(self, rank, world_size, master_addr, master_port, backend) -> None:
        import torch.distributed as dist

        super().init_distributed(rank, world_size, master_addr, master_port, backend)
        if rank == 1:
            raise RuntimeError("rank 1: CUDA graph capture failed")
        dist.barrier(group=self.groups.world)  # never met: rank 1 has given up


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_group_runs_ep_and_restarts_after_a_rank_dies(local_ray):
    group = WorkerGroup(2, EPTestActor, {}, use_gpu=False, name="ep-test")
    try:
        assert group.call_all("ping") == [0, 1]
        assert max(group.call_all("moe_error", 1)) < 1e-4
        assert group.alive()

        # ray.kill is asynchronous: wait for the death through a call that is running when it lands.
        victim = group.actors[1]
        blocked = victim.call.remote("block")
        ray.kill(victim)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(blocked, timeout=60)
        assert group.dead_ranks() == [1]
        assert not group.alive()

        group.restart()
        assert group.alive() and group.generation == 1
        assert group.call_all("ping") == [0, 1]
        assert max(group.call_all("moe_error", 2)) < 1e-4
    finally:
        group.shutdown()


def test_a_rank_failing_at_start_fails_the_group_and_frees_its_ranks(local_ray):
    """The start must not wait for the ranks stuck in a collective (gloo/NCCL time out after minutes): it
    raises the failing rank's error, kills every rank and gives back the placement group, so a new group
    can start on the same resources."""
    outcome = {}

    def start() -> None:
        try:
            WorkerGroup(2, FailingStartActor, {}, use_gpu=False, name="failing-start")
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(timeout=120)  # liveness bound, far below the collective's own timeout
    assert not thread.is_alive(), "the group's start hung on the rank waiting in a collective"
    assert "error" in outcome, "the group started although a rank failed"
    assert "CUDA graph capture failed" in str(outcome["error"])

    # 3 of the fixture's 4 CPUs: this starts only if the failed group gave its 2 back.
    group = WorkerGroup(3, EPTestActor, {}, use_gpu=False, name="after-failing-start", ready_timeout_s=60)
    try:
        assert group.call_all("ping") == [0, 1, 2]
    finally:
        group.shutdown()
