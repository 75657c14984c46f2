"""LLMEngine: one rank's engine. `step()` = schedule -> launch -> resolve -> update -> detokenize -> emit.

It is single-threaded; serving and the Ray worker drive it from their own step loops. With asynchronous
scheduling (`EngineConfig.async_scheduling`) a step launches its forward pass and then finishes the step
launched before it, so scheduling, detokenizing and emitting step N overlap the device running step N+1.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

from moeserve.config import EngineConfig
from moeserve.engine.detokenizer import IncrementalDetokenizer
from moeserve.engine.dp_sync import StepSync
from moeserve.engine.prompts import PromptChecker
from moeserve.moe.tbo import tbo_cut
from moeserve.outputs import StreamChunk
from moeserve.request import Request
from moeserve.runner.model_runner import ModelRunner, PendingStep, RankSetup
from moeserve.sampling_params import SamplingParams
from moeserve.scheduler.output import SchedulerOutput
from moeserve.scheduler.scheduler import Scheduler
from moeserve.tokenizer import Tokenizer

logger = logging.getLogger("moeserve")


@dataclass(slots=True)
class _Tracked:
    """Per-request state the engine keeps besides the scheduler's Request."""

    request: Request
    detokenizer: IncrementalDetokenizer
    emitted_tokens: int = 0


class LLMEngine:
    def __init__(
        self, config: EngineConfig, setup: RankSetup | None = None, sync: StepSync | None = None
    ) -> None:
        model_path = config.model
        if model_path is None:
            from moeserve.testing.tiny_checkpoints import demo_checkpoint

            model_path = str(demo_checkpoint())
        self.config = config
        self.model_path = model_path
        self.runner = ModelRunner(config, model_path, setup)  # checks the checkpoint first
        self.tokenizer = Tokenizer.from_pretrained(model_path)
        self.tokenizer.token_bytes(True)  # built now, not on the first request (byte-level tokenizers)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.model_config.vocab_size
        self.check = PromptChecker(self.tokenizer, self.vocab_size, self.max_model_len)
        self.scheduler = Scheduler(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            block_size=config.block_size,
            num_blocks=self.runner.num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.sync = sync
        # Auto: a lone CUDA rank. Lockstep DP/EP ranks run it only when asked (checked on CPU ranks; not yet
        # measured on several GPUs).
        if config.async_scheduling is None:
            self.async_scheduling = sync is None and self.runner.device.type == "cuda"
        else:
            self.async_scheduling = config.async_scheduling
        self._in_flight: tuple[SchedulerOutput, PendingStep] | None = None
        self.eplb = None  # RankEplb, attached by the EP worker
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.last_step_ran = False  # did the last step() run a forward pass (here or, in lockstep, anywhere)

    # ---- requests in -------------------------------------------------------------------------------------
    def check_prompt(self, prompt: str | list[int]) -> list[int]:
        """Tokenize and check a prompt without touching engine state (safe from any thread)."""
        return self.check(prompt)

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Queue one sequence (params.n is handled by the caller). Raises ValueError for bad input."""
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._tracked:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = self.check_prompt(prompt)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling_params=params,
            eos_token_ids=self.tokenizer.eos_token_ids,
            arrival_time=time.monotonic(),
        )
        self.scheduler.add_request(request)
        detok = IncrementalDetokenizer(
            self.tokenizer,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            prompt_token_ids=prompt_ids,
        )
        self._tracked[request_id] = _Tracked(request, detok)
        return request_id

    def abort(self, request_id: str) -> StreamChunk | None:
        """Stop a request now; returns its final chunk (finish_reason "abort"), or None if it is unknown."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return None
        self.scheduler.abort(request_id)
        return self._chunk(tracked, [], "", None, "abort", None)

    # ---- the step ---------------------------------------------------------------------------------------
    def attach_eplb(self, eplb) -> None:
        """Record expert load every step and accept rebalances (EP ranks only)."""
        self.eplb = eplb
        self.runner.expert_load = eplb.step_counts

    def has_unfinished(self) -> bool:
        return bool(self._tracked) or self._in_flight is not None

    def step(self) -> list[StreamChunk]:
        """Run one scheduling step and return the new output of every request that produced some (with
        asynchronous scheduling: the output of the step launched before this one)."""
        self.last_step_ran = False
        launched = self._launch(self.scheduler.schedule())
        if self.async_scheduling:
            launched, self._in_flight = self._in_flight, launched
        return self._finish(*launched) if launched is not None else []

    def _launch(self, sched: SchedulerOutput) -> tuple[SchedulerOutput, PendingStep] | None:
        """Queue the step's forward pass and sampling; None when this rank runs nothing to sample from."""
        cut = None  # where a TBO step splits this rank's requests
        if self.sync is None:
            if sched.is_empty:
                return None
            plan = None
        else:
            # Every rank enters this collective every step; ranks without work then run an idle batch.
            counts = [len(r.token_ids) for r in sched.requests]
            # A prompt chunk: several tokens, or one that samples nothing (a chunk short of the prompt's end).
            # Decode plans thus hold one sampling token per request on every rank, as the EP graphs need.
            has_extend = any(n > 1 or not r.sample for n, r in zip(counts, sched.requests))
            rebalance_id = self.eplb.pending_id if self.eplb is not None else 0
            cut = tbo_cut(counts) if self.sync.enable_tbo else len(counts)
            plan = self.sync.agree(sum(counts), has_extend, len(counts) >= 2, rebalance_id, sum(counts[:cut]))
            if plan is None:
                return None
            if plan.rebalance_id:  # every rank moves the same chunk of expert weights in this step
                self.eplb.run_next_chunk()
            if plan.total_tokens == 0:
                self.last_step_ran = True
                return None
        self.last_step_ran = True
        pending = self.runner.launch(sched, plan, tbo_cut=cut)
        if self.eplb is not None:
            self.eplb.step_done()
        return sched, pending

    def _finish(self, sched: SchedulerOutput, pending: PendingStep) -> list[StreamChunk]:
        """Wait for a launched step's tokens, apply them, and turn them into chunks."""
        model_out = pending.resolve()
        changed = self.scheduler.update(sched, model_out)
        self.num_steps += 1
        chunks = []
        for request in changed:
            tracked = self._tracked.get(request.request_id)
            if tracked is not None:
                chunk = self._emit(tracked, model_out.logprobs.get(request.request_id))
                if chunk is not None:
                    chunks.append(chunk)
        return chunks

    def _emit(self, tracked: _Tracked, logprobs) -> StreamChunk | None:
        request = tracked.request
        new_ids = request.output_token_ids[tracked.emitted_tokens :]
        tracked.emitted_tokens = len(request.output_token_ids)
        update = tracked.detokenizer.update(new_ids)
        text = update.text
        finish_reason, stop_reason = request.finish_reason, request.stop_reason
        if update.stop is not None and finish_reason is None:
            self.scheduler.finish_request(request.request_id, "stop", update.stop)
            finish_reason, stop_reason = "stop", update.stop
        elif update.stop is not None:
            finish_reason, stop_reason = "stop", update.stop
        elif finish_reason is not None:
            text += tracked.detokenizer.flush()
        if finish_reason is not None:
            del self._tracked[request.request_id]
        if not new_ids and finish_reason is None:
            return None
        return self._chunk(tracked, new_ids, text, logprobs, finish_reason, stop_reason)

    @staticmethod
    def _chunk(tracked: _Tracked, new_ids, text, logprobs, finish_reason, stop_reason) -> StreamChunk:
        request = tracked.request
        return StreamChunk(
            request_id=request.request_id,
            text=text,
            token_ids=new_ids,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=len(request.output_token_ids),
        )

    def reset_prefix_cache(self) -> int:
        """Drop the idle cached prefixes (see KVCacheManager.reset_prefix_cache); returns blocks freed."""
        return self.scheduler.kv_cache.reset_prefix_cache()

    def stats(self) -> dict:
        return {
            **self.scheduler.stats(),
            "num_steps": self.num_steps,
            "num_tbo_steps": self.runner.num_tbo_steps,
            "num_graph_steps": self.runner.num_graph_steps,
            "moe_dispatcher": self.runner.ctx.dispatcher.name,
            "async_scheduling": self.async_scheduling,
        }
