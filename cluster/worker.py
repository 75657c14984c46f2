"""The engine worker actor: one per GPU (or CPU slot). It owns its rank's model shard, KV cache, scheduler and
step loop; requests arrive by async actor calls and outputs leave as a stream of `StreamChunk` lists.

Under load a consumer that falls behind receives several tokens per message (chunks are merged), never one Ray
call per token per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from moeserve.cluster.worker_group import RankActor

from moeserve.config import EngineConfig
from moeserve.engine.dp_sync import StepSync
from moeserve.engine.engine import LLMEngine
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
        self.loop = StepLoop(self.engine, self._on_chunks)
        self.loop.start()

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
            mc.num_moe_layers, mc.num_experts, cfg.num_redundant_experts, self.rank, ep,
            device=self.groups.device, dynamic=True,
        )
        dispatcher = create_dispatcher(
            cfg.moe_dispatcher, group=self.groups.ep_group, ep_size=ep,
            num_local_slots=placement.num_local_slots, device=self.groups.device,
            max_tokens_per_rank=cfg.max_num_batched_tokens, hidden=mc.hidden_size,
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
                        raise RuntimeError(f"rank {self.rank}: engine loop failed: {item!r}")
                chunk = merge_chunks(items)
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.loop.abort(request_id)

    async def generate_batch(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list[StreamChunk]:
        """Offline: run many requests to completion; one merged chunk (whole output) per request, in order."""

        async def one(rid, prompt, params):
            return merge_chunks([c async for c in self.generate(rid, prompt, params)])

        return list(await asyncio.gather(*(one(*r) for r in requests)))

    async def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    def stats(self) -> dict:
        stats = self.loop.stats() if self.loop else {}
        return {"rank": self.rank, **stats}

    def ping(self) -> int:
        if self.loop is not None and self.loop.error is not None:
            raise RuntimeError(f"rank {self.rank}: engine loop failed: {self.loop.error!r}")
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
        super().shutdown()
