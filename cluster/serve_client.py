"""`EngineClient` on top of the worker group, used inside each ingress replica.

Tokenizer and prompt checks run here (the HTTP layer needs the tokenizer; bad prompts never reach a rank).
Each request goes to one DP rank, chosen by the cache-aware router from the ranks' loads: the controller's
snapshot (refreshed in the background every `LOADS_REFRESH_S`) corrected by what this replica has sent or
finished since it asked, and never below what it has in flight, so a burst between two snapshots still spreads
(`router.seen_loads`). The router is a pure function of (prompt, loads), so replicas that see the same snapshot
route a prefix the same way.

Worker handles come from the controller and are refetched when its generation changes (the group restarted)
or a call fails with an actor error. An actor error on a stream becomes `EngineUnavailable` (HTTP 503, or an
error event once streaming has begun); a ValueError raised by a rank for bad input becomes a 400.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray

from moeserve.cluster.config import DeployConfig
from moeserve.cluster.engine_client import EngineUnavailable
from moeserve.cluster.protocol import bad_request
from moeserve.cluster.router import CacheAwareRouter, seen_loads
from moeserve.engine.errors import EngineLoopFailed
from moeserve.engine.prompts import PromptChecker
from moeserve.loader.checkpoint import read_hf_config
from moeserve.models.config import ModelConfig
from moeserve.outputs import StreamChunk
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer

logger = logging.getLogger("moeserve")


class _RankGone(Exception):
    """The rank serving a request died or its engine failed."""


LOADS_REFRESH_S = 0.25
CONTROLLER_TIMEOUT_S = 30.0


class RayEngineClient:
    """The engine as one ingress replica sees it. controller: a Serve handle to this app's `Controller`."""

    def __init__(self, controller: Any, config: DeployConfig) -> None:
        assert config.model is not None, "build_app pins the model path"
        self.model_name = config.model_name
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        mc = ModelConfig.from_hf(read_hf_config(config.model))
        self.max_model_len = config.engine.max_model_len or mc.max_position_embeddings
        self.check_prompt = PromptChecker(self.tokenizer, mc.vocab_size, self.max_model_len)
        self.num_ranks = config.parallel.dp
        self.router = CacheAwareRouter(self.num_ranks, block_size=config.engine.block_size)
        self._controller = controller
        self._generation = -1
        self._actors: list[Any] | None = None
        self._fetch: asyncio.Task | None = None
        # Load bookkeeping, all per rank. Own in-flight requests now, and when the snapshot was asked for.
        self._inflight = [0] * self.num_ranks
        self._snapshot: list[int] = [0] * self.num_ranks
        self._inflight_at_snapshot = [0] * self.num_ranks
        self._where: dict[str, tuple[Any, str]] = {}  # request id -> (actor, id on the rank)
        # Ids on the ranks are made unique per replica: clients may reuse x-request-id.
        self._tag = uuid.uuid4().hex[:8]
        self._seq = itertools.count()
        self._refresher: asyncio.Task | None = None
        self._pending: set[asyncio.Task] = set()

    # ---- EngineClient ------------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[StreamChunk]:
        try:
            ids = self.check_prompt(prompt_token_ids)
        except ValueError as exc:
            raise bad_request(str(exc), param="prompt") from None
        self._start_refresher()
        # A request whose rank turns out dead before it produced anything is sent again, once, if the group
        # has already been replaced (our handles were stale): nothing was delivered yet, so that is safe.
        for attempt in range(2):
            generation, actors = await self._workers()
            rank = self.router.route(ids, self.loads())
            actor, rank_request_id = actors[rank], f"{request_id}@{self._tag}-{next(self._seq)}"
            self._inflight[rank] += 1
            self._where[request_id] = (actor, rank_request_id)
            finished = delivered = False
            try:
                stream = actor.generate.options(num_returns="streaming").remote(rank_request_id, ids, params)
                while not finished:
                    try:
                        chunk = await self._next(stream, rank)
                    except _RankGone as gone:
                        self._forget_workers(generation)
                        if delivered or attempt > 0 or not await self._replaced_since(generation):
                            raise EngineUnavailable(f"{gone}; the workers are restarting") from None
                        break
                    finished, delivered = chunk.finish_reason is not None, True
                    chunk.request_id = request_id
                    yield chunk
            finally:
                self._inflight[rank] -= 1
                self._where.pop(request_id, None)
                if not finished:  # the consumer left early, or the rank failed: make sure the rank stops too
                    self._background(actor.abort.remote(rank_request_id))
            if finished:
                return

    async def _next(self, stream: Any, rank: int) -> StreamChunk:
        """The stream's next chunk, with Ray's errors turned into the engine's."""
        try:
            ref = await stream.__anext__()
            return await ref
        except StopAsyncIteration:
            raise EngineUnavailable(f"rank {rank} ended a stream without finishing it") from None
        except ray.exceptions.RayActorError as exc:
            raise _RankGone(f"rank {rank} is gone ({type(exc).__name__})") from None
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ValueError):
                raise bad_request(str(exc.cause)) from None
            if isinstance(exc.cause, EngineLoopFailed):
                raise _RankGone(f"rank {rank} failed") from None
            raise

    async def _replaced_since(self, generation: int) -> bool:
        """Whether the controller already has a newer group than `generation` (raises while it restarts)."""
        newer, _ = await self._workers()
        return newer > generation

    async def abort(self, request_id: str) -> None:
        where = self._where.get(request_id)
        if where is not None:
            actor, rank_request_id = where
            try:
                await actor.abort.remote(rank_request_id)
            except ray.exceptions.RayActorError:
                pass  # the rank is gone, and the request with it

    async def stats(self) -> dict:
        status = await self._call_controller("status")
        if status["state"] != "up" or not status["ranks"]:
            raise EngineUnavailable(f"the workers are {status['state']}")
        return {"ranks": status["ranks"], "balancedness": status["balancedness"]}

    # ---- routing -----------------------------------------------------------------------------------------
    def loads(self) -> list[int]:
        """Per-rank load the router sees (`router.seen_loads`)."""
        return seen_loads(self._snapshot, self._inflight, self._inflight_at_snapshot)

    def _start_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loads())

    async def _refresh_loads(self) -> None:
        while True:
            asked_at = list(self._inflight)
            try:
                generation, loads = await self._call_controller("loads")
            except Exception as exc:  # routing goes on with the last snapshot
                logger.warning("loads from the controller failed: %s", exc)
            else:
                if generation != self._generation:
                    self._forget_workers(self._generation)
                if loads is not None and len(loads) == self.num_ranks:
                    self._snapshot, self._inflight_at_snapshot = loads, asked_at
            await asyncio.sleep(LOADS_REFRESH_S)

    # ---- worker handles ----------------------------------------------------------------------------------
    async def _workers(self) -> tuple[int, list[Any]]:
        if self._actors is not None:
            return self._generation, self._actors
        # One fetch shared by every request that needs it: a burst after a restart asks once, and if the
        # controller is stuck they all fail together, not one controller timeout after another.
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.get_running_loop().create_task(self._fetch_workers())
        return await asyncio.shield(self._fetch)

    async def _fetch_workers(self) -> tuple[int, list[Any]]:
        generation, actors = await self._call_controller("workers")
        if not actors:
            raise EngineUnavailable("the workers are restarting")
        self._generation, self._actors = generation, actors
        return generation, actors

    def _forget_workers(self, generation: int) -> None:
        if generation == self._generation:
            self._actors = None

    async def _call_controller(self, method: str) -> Any:
        try:
            return await asyncio.wait_for(getattr(self._controller, method).remote(), CONTROLLER_TIMEOUT_S)
        except Exception as exc:  # timeout, controller replica gone or not yet up
            raise EngineUnavailable(f"the controller does not answer ({type(exc).__name__})") from None

    def _background(self, ref: ray.ObjectRef) -> None:
        """Let a call finish on its own; its errors (e.g. the rank is gone) are of no interest."""
        task = asyncio.get_running_loop().create_task(_quietly(ref))
        self._pending.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._pending.discard)


async def _quietly(ref: ray.ObjectRef) -> None:
    try:
        await ref
    except Exception:
        pass
