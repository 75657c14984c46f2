"""The engine worker actor: one per GPU (or CPU slot). It owns its rank's model shard, KV cache, scheduler and
step loop; requests arrive by async actor calls and outputs leave as a stream of `StreamChunk` lists.

Under load a consumer that falls behind receives several tokens per message (chunks are merged), never one Ray
call per token per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import torch

from moeserve.cluster.worker_group import RankActor
from moeserve.config import EngineConfig
from moeserve.engine.dp_sync import StepSync
from moeserve.engine.engine import LLMEngine
from moeserve.engine.errors import EngineLoopFailed
from moeserve.engine.step_loop import StepLoop
from moeserve.outputs import StreamChunk, merge_chunks
from moeserve.runner.model_runner import RankSetup
from moeserve.sampling_params import SamplingParams

logger = logging.getLogger("moeserve")


class EngineWorker(RankActor):
    """A rank: DP attention over its own requests, EP MoE over all ranks (when expert_parallel_size > 1)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config
        self.engine: LLMEngine | None = None
        self.loop: StepLoop | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._aio_loop: asyncio.AbstractEventLoop | None = None

    def init_distributed(self, rank, world_size, master_addr, master_port, backend) -> None:
        super().init_distributed(rank, world_size, master_addr, master_port, backend)
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
        setup, sync = self._rank_setup()
        self.engine = LLMEngine(self.config, setup, sync)
        if self.config.expert_parallel_size > 1:
            from moeserve.engine.eplb_state import RankEplb

            gpus_per_node = self._ranks_on_my_node()
            self.engine.attach_eplb(
                RankEplb(
                    self.engine.runner.model,
                    setup.placement,
                    eplb_group=self.groups.eplb_group,
                    cpu_group=self.groups.cpu_group,
                    rank=self.rank,
                    gpus_per_node=gpus_per_node,
                    window_steps=self.config.eplb_window_steps,
                    device=self.groups.device,
                )
            )
        self.loop = StepLoop(self.engine, self._on_chunks)
        self.loop.start()

    def _ranks_on_my_node(self) -> int:
        """How many ranks share this node (ranks are node-contiguous, nodes assumed equal in size)."""
        import torch.distributed as dist

        ips: list = [None] * self.world_size
        dist.all_gather_object(ips, self.node_info()["ip"], group=self.groups.cpu_group)
        return ips.count(ips[self.rank])

    def _rank_setup(self) -> tuple[RankSetup, StepSync | None]:
        from moeserve.loader.checkpoint import read_hf_config
        from moeserve.models.config import ModelConfig
        from moeserve.moe.factory import create_dispatcher
        from moeserve.moe.placement import ExpertPlacement

        cfg = self.config
        ep = cfg.expert_parallel_size
        if ep == 1:
            return RankSetup(), None
        assert cfg.model is not None, "the group pins the model path before starting ranks"
        mc = ModelConfig.from_hf(read_hf_config(cfg.model))
        placement = ExpertPlacement.default(
            mc.num_moe_layers,
            mc.num_experts,
            cfg.num_redundant_experts,
            self.rank,
            ep,
            device=self.groups.device,
            dynamic=True,
        )
        dispatcher = create_dispatcher(
            cfg.moe_dispatcher,
            group=self.groups.ep_group,
            ep_size=ep,
            num_local_slots=placement.num_local_slots,
            device=self.groups.device,
            max_tokens_per_rank=cfg.max_num_batched_tokens,
            hidden=mc.hidden_size,
        )
        sync = StepSync(self.groups.cpu_group, self.world_size, cfg.enable_tbo)
        tbo_dispatcher = dispatcher.sibling() if cfg.enable_tbo else None
        return RankSetup(placement=placement, dispatcher=dispatcher, tbo_dispatcher=tbo_dispatcher), sync

    # ---- the data path ---------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[StreamChunk]:
        """Stream one request's output; each item merges every chunk produced since the previous one.
        Raises ValueError at once for bad input. Cancelling the stream aborts the request."""
        self._aio_loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            self.loop.submit(request_id, prompt, params)
            while not finished:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        raise EngineLoopFailed(f"rank {self.rank}: engine loop failed: {item!r}")
                chunk = merge_chunks(items)
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.loop.abort(request_id)

    async def generate_batch(
        self, requests: list[tuple[str, list[int], SamplingParams]]
    ) -> list[StreamChunk]:
        """Offline: run many requests to completion; one merged chunk (whole output) per request, in order."""

        async def one(rid, prompt, params):
            return merge_chunks([c async for c in self.generate(rid, prompt, params)])

        return list(await asyncio.gather(*(one(*r) for r in requests)))

    async def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    # ---- EPLB (control plane: runs on the loop thread between steps) ----------------------------------
    async def _on_loop(self, fn):
        return await asyncio.wrap_future(self.loop.call(fn))

    async def expert_load(self) -> dict:
        """This rank's recent load: {"logical": [L][E] tokens, "phy2log": [L][P], "steps": n}."""

        def read(engine):
            eplb = self._require_eplb(engine)
            moe = eplb.layers[0]
            expert_bytes = (moe.w13[0].numel() + moe.w2[0].numel()) * moe.w13.element_size()
            return {
                "logical": eplb.logical_load().tolist(),
                "phy2log": eplb.placement.phy2log.tolist(),
                "steps": min(eplb.window.steps_recorded, eplb.window.window),
                "expert_bytes": expert_bytes,
                "gpus_per_node": eplb.gpus_per_node,
                "num_groups": engine.runner.model_config.n_group or 1,
            }

        return await self._on_loop(read)

    async def start_rebalance(
        self, plan_id: int, new_phy2log: list[list[int]], layers_per_chunk: int
    ) -> None:
        import torch

        await self._on_loop(
            lambda e: self._require_eplb(e).start(plan_id, torch.tensor(new_phy2log), layers_per_chunk)
        )

    async def rebalance_status(self) -> dict:
        return await self._on_loop(lambda e: self._require_eplb(e).status())

    async def slot_checksums(self) -> list[list[float]]:
        """[L][local slots] checksums of this rank's expert weights (for verifying moves)."""
        from moeserve.moe.weight_mover import checksum

        def read(engine):
            layers = self._require_eplb(engine).layers
            return [[checksum(m.w13[s]) + checksum(m.w2[s]) for s in range(m.w13.shape[0])] for m in layers]

        return await self._on_loop(read)

    @staticmethod
    def _require_eplb(engine):
        if engine.eplb is None:
            raise ValueError(
                "expert load balancing needs expert_parallel_size > 1; this deployment has EP = 1"
            )
        return engine.eplb

    def stats(self) -> dict:
        stats = self.loop.stats() if self.loop else {}
        return {"rank": self.rank, **stats}

    def ping(self) -> int:
        if self.loop is not None and self.loop.error is not None:
            raise EngineLoopFailed(f"rank {self.rank}: engine loop failed: {self.loop.error!r}")
        return self.rank

    def _on_chunks(self, chunks: list[StreamChunk]) -> None:
        """Called on the step-loop thread after every step."""
        if self._aio_loop is not None:
            self._aio_loop.call_soon_threadsafe(self._deliver, chunks, self.loop.error)

    def _deliver(self, chunks: list[StreamChunk], error: BaseException | None) -> None:
        for chunk in chunks:
            queue = self._queues.get(chunk.request_id)
            if queue is not None:
                queue.put_nowait(chunk)
        if error is not None:
            for queue in self._queues.values():
                queue.put_nowait(error)

    def shutdown(self) -> None:
        if self.loop is not None:
            self.loop.stop()
        idle = self.loop is None or not self.loop.alive
        if self.engine is not None and self.engine.runner.graphs is not None and idle:
            # Graphs holding NCCL collectives go before their process group: destroying a group whose work
            # was captured can hang (pytorch/pytorch#115388). (A step loop still running keeps them.)
            torch.cuda.synchronize()
            self.engine.runner.graphs = None
        super().shutdown()
