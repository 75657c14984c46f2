"""Scheduler: picks each step's work under one token budget; there is no prefill phase nor decode phase.

Every request simply has tokens it has not computed yet: a whole prompt when it arrives, one sampled token
when it decodes, its whole context again after a preemption. Each step gives running requests what they need
(oldest first), then admits waiting requests first-come first-served while the budget, the sequence limit and
the KV blocks allow. A long prompt is computed in chunks across steps; a token is sampled only when a chunk
reaches the request's newest token.

A step's bookkeeping is done when it is scheduled: the request's computed-token count advances and, when it
samples, a placeholder stands for the token until `update` brings the real one. So the next step can be
scheduled before the last one's results are back (asynchronous scheduling): a decode request then feeds its
placeholder in, and the runner substitutes the token sampled on the device.
"""

from __future__ import annotations

import bisect
from collections import deque

from moeserve.request import PLACEHOLDER, FinishReason, Request, RequestStatus
from moeserve.scheduler.kv_cache_manager import KVCacheManager
from moeserve.scheduler.output import ModelOutput, ScheduledRequest, SchedulerOutput


def _arrival(request: Request) -> int:
    return request.arrival_index


class Scheduler:
    """One rank's request queue and KV cache bookkeeping. Pure Python: no tensors, no devices.

    max_num_batched_tokens: tokens computed per step, all requests together.
    max_num_seqs: most requests running (holding KV blocks) at once.
    max_model_len: longest context (prompt + output). A request also stops ("length") when its context
        would outgrow the whole KV cache (num_blocks * block_size tokens).
    """

    def __init__(
        self,
        *,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        num_blocks: int,
        enable_prefix_caching: bool = True,
    ) -> None:
        for name, value in [
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_num_seqs", max_num_seqs),
            ("max_model_len", max_model_len),
            ("block_size", block_size),
            ("num_blocks", num_blocks),
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.kv_cache = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        # A lone request can always grow to this length, which is what rules out deadlock.
        self.context_limit = min(max_model_len, num_blocks * block_size)
        self._requests: dict[str, Request] = {}  # unfinished requests by id
        self._waiting: deque[Request] = deque()  # FCFS; preempted requests go back to the front
        self._running: list[Request] = []  # sorted by arrival_index; the last one is preempted first
        self._dropped: list[str] = []  # left the running set since the last SchedulerOutput
        self._num_arrivals = 0
        self._step = 0
        self.num_preemptions = 0

    # ---- requests in and out -----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ValueError for one that can never run."""
        n = request.num_prompt_tokens
        if n == 0:
            raise ValueError("prompt is empty; a prompt needs at least one token")
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens; the context limit is {self.max_model_len} (max_model_len), "
                "which must leave room for at least one generated token"
            )
        if n >= self.context_limit:
            raise ValueError(
                f"prompt has {n} tokens; the KV cache holds at most {self.context_limit} tokens "
                f"({self.kv_cache.num_blocks} blocks of {self.block_size}), which must leave room for at "
                "least one generated token"
            )
        assert request.status is RequestStatus.WAITING and not request.output_token_ids
        request.arrival_index = self._num_arrivals
        self._num_arrivals += 1
        self._requests[request.request_id] = request
        self._waiting.append(request)

    def finish_request(
        self, request_id: str, reason: FinishReason, stop_reason: int | str | None = None
    ) -> Request | None:
        """End a request now (a stop string matched, or an abort); frees its blocks. None if not live."""
        request = self._requests.get(request_id)
        if request is not None:
            self._finish(request, reason, stop_reason)
        return request

    def abort(self, request_id: str) -> Request | None:
        """Cancel a request (finish_reason "abort"); None if it is unknown or already finished."""
        return self.finish_request(request_id, "abort")

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        """The live (unfinished) request with this id, if any."""
        return self._requests.get(request_id)

    @property
    def running(self) -> tuple[Request, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        return tuple(self._waiting)

    # ---- one step ----------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Choose this step's work: running requests first (oldest first), then waiting ones (FCFS)."""
        self._step += 1
        budget = self.max_num_batched_tokens
        out = SchedulerOutput(step=self._step, requests=[])
        preemptions_before = self.num_preemptions
        i = 0
        while i < len(self._running) and budget > 0:
            request = self._running[i]
            i += 1
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new == 0 or self._will_finish(request):
                continue  # everything is in flight, or its last token is: nothing to compute now
            if not self._allocate_or_preempt(request, num_new):
                break  # the request preempted itself: it was the newest running one
            self._schedule(out, request, num_new)
            budget -= num_new
        # After a preemption memory is short: admitting more now would only cause more preemptions.
        if self.num_preemptions == preemptions_before:
            budget = self._admit_waiting(budget, out)
        # Dropped ids ride on the next output that has work, so an engine that skips empty steps loses none.
        if out.requests:
            out.dropped_request_ids, self._dropped = self._dropped, []
        return out

    def _allocate_or_preempt(self, request: Request, num_new: int) -> bool:
        """Find blocks for request, preempting the newest running requests as needed; False if it was."""
        while not self.kv_cache.allocate_slots(request, num_new):
            victim = self._running.pop()
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _will_finish(self, request: Request) -> bool:
        """Whether a token in flight is the request's last (max_tokens or the context limit)."""
        if not request.num_placeholders:
            return False
        num_output = request.num_output_tokens + request.num_placeholders
        return self._length_reached(request, num_output, request.num_tokens)

    def _length_reached(self, request: Request, num_output: int, num_tokens: int) -> bool:
        """Whether a request with num_output generated tokens and num_tokens in all ends on length:
        max_tokens, or the context limit."""
        return num_output >= request.sampling_params.max_tokens or num_tokens >= self.context_limit

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        while self._waiting and budget > 0 and len(self._running) < self.max_num_seqs:
            request = self._waiting[0]
            if request.num_placeholders:
                break  # preempted while its last token was in flight: it waits for that token
            computed, num_cached = self.kv_cache.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv_cache.allocate_slots(request, num_new, computed):
                break  # FCFS: nobody overtakes the head of the queue
            self._waiting.popleft()
            if request.status is RequestStatus.WAITING:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached  # _schedule advances it by num_new
            request.status = RequestStatus.RUNNING
            bisect.insort(self._running, request, key=_arrival)
            self._schedule(out, request, num_new)
            budget -= num_new
        return budget

    def _schedule(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        """Add the request's work for this step to out (its description and the request itself) and book it:
        the tokens count as computed from now on, and a step that samples leaves a placeholder for its token."""
        start = request.num_computed_tokens
        sample = start + num_new == request.num_tokens
        work = ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start : start + num_new],
            start_position=start,
            block_ids=list(request.block_ids),
            sample=sample,
            sampling_params=request.sampling_params,
            num_output_tokens=request.num_output_tokens + request.num_placeholders,
        )
        assert PLACEHOLDER not in work.token_ids[:-1], "only a decode step's one input may be in flight"
        request.num_computed_tokens = start + num_new
        if sample:
            request.add_placeholder()
        out.requests.append(work)
        out.scheduled.append(request)

    def _preempt(self, request: Request) -> None:
        # Recompute, not swap: the blocks go back now; the generated tokens stay and are recomputed as
        # context when the request is admitted again (often partly from the prefix cache).
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(request)
        self._dropped.append(request.request_id)

    # ---- after the forward pass --------------------------------------------------------------------------
    def update(self, scheduler_output: SchedulerOutput, model_output: ModelOutput) -> list[Request]:
        """Apply a step's results; returns the requests that got new tokens (some may now be finished)."""
        changed: list[Request] = []
        for sched, request in zip(scheduler_output.requests, scheduler_output.scheduled, strict=True):
            if self._requests.get(sched.request_id) is not request:
                continue  # finished or aborted after it was scheduled
            if request.status is RequestStatus.RUNNING:
                self.kv_cache.cache_blocks(request)
            # A request preempted while this step ran still takes its sampled token: the token is right.
            if not sched.sample or not request.num_placeholders:
                continue
            tokens = model_output.sampled.get(request.request_id)
            assert tokens, f"request {request.request_id} was to sample but the model returned no token"
            logprobs = model_output.logprobs.get(request.request_id)
            stop = None
            for j, token in enumerate(tokens):
                request.append_output_token(token, logprobs[j] if logprobs else None)
                stop = self._stop_condition(request, token)
                if stop is not None:
                    break  # tokens after the stop (speculative ones) are dropped
            if stop is not None:
                self._finish(request, *stop)
            changed.append(request)
        return changed

    def _stop_condition(self, request: Request, token: int) -> tuple[FinishReason, int | None] | None:
        """(finish_reason, stop_reason) if the newly appended token ends the request, else None."""
        params = request.sampling_params
        if not params.ignore_eos and token in request.eos_token_ids:
            return "stop", None
        if token in params.stop_token_ids:
            return "stop", token
        if self._length_reached(request, request.num_output_tokens, request.num_known_tokens):
            return "length", None
        return None

    def _finish(self, request: Request, reason: FinishReason, stop_reason: int | str | None) -> None:
        """Take a live request out of the queues, free its blocks and record why it ended."""
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
            self._dropped.append(request.request_id)  # the runner may keep state for it
        else:
            self._waiting.remove(request)
        self.kv_cache.free(request)
        request.drop_placeholders()
        del self._requests[request.request_id]
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason

    # ---- numbers for /metrics and `moeserve status` ------------------------------------------------------
    def stats(self) -> dict:
        kv = self.kv_cache
        return {
            "step": self._step,
            "num_running": len(self._running),
            "num_waiting": len(self._waiting),
            "num_preempted_waiting": sum(1 for r in self._waiting if r.status is RequestStatus.PREEMPTED),
            "num_preemptions": self.num_preemptions,
            "kv_usage": kv.usage,
            "kv_num_blocks": kv.num_blocks,
            "kv_free_blocks": kv.num_free_blocks,
            "prefix_cache_blocks": kv.num_cached_blocks,
            "prefix_cache_evicted_blocks": kv.num_evicted_blocks,
            "prefix_cache_query_tokens": kv.prefix_cache_queries,
            "prefix_cache_hit_tokens": kv.prefix_cache_hits,
            "prefix_cache_hit_rate": kv.hit_rate,
        }
