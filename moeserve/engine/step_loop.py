"""Runs an engine's steps on a thread of its own, so requests can arrive and outputs leave while it steps.

Requests enter through `submit` / `abort` from any thread (validated on the caller's thread, so bad input fails
at once); the loop thread owns the engine. Outputs leave through `on_chunks`, called on the loop thread once per
step with every chunk of that step. When there is no work anywhere the loop sleeps on an event: it never spins.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from moeserve.engine.engine import LLMEngine
from moeserve.outputs import StreamChunk
from moeserve.sampling_params import SamplingParams

logger = logging.getLogger("moeserve")


class StepLoop:
    """The engine's step loop. With DP ranks (engine.sync set), idle ranks re-check every `idle_wait` seconds
    so that every rank joins the next step's collective soon after any rank receives work."""

    def __init__(
        self,
        engine: LLMEngine,
        on_chunks: Callable[[list[StreamChunk]], None],
        idle_wait: float = 0.005,
    ) -> None:
        self.engine = engine
        self.on_chunks = on_chunks
        self.idle_wait = idle_wait
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._stats: dict = {}
        self._stats_time = 0.0

    def stats(self) -> dict:
        """The engine's stats as of the last step (snapshots are taken on the loop thread, at most every 50 ms)."""
        return dict(self._stats)

    def _snapshot_stats(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._stats_time >= 0.05:
            self._stats = self.engine.stats()
            self._stats_time = now

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="moeserve-step-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop. A lockstep rank first asks for an agreed stop (`StepSync.stop_requested`), so that
        every rank's loop ends at the same step; only if that does not happen within `timeout` (a rank gone)
        does this one leave on its own."""
        deadline = time.monotonic() + timeout

        def join() -> None:
            if self._thread is not None:
                self._thread.join(max(0.0, deadline - time.monotonic()))

        if self.engine.sync is not None:
            self.engine.sync.stop_requested = True
            self._wake.set()
            join()
        self._stop.set()
        self._wake.set()
        join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Queue a request; raises ValueError at once for bad input. Returns the prompt's token ids."""
        if self.error is not None:
            raise RuntimeError(f"the engine loop has stopped: {self.error!r}")
        prompt_ids = self.engine.check_prompt(prompt)
        self._inbox.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        return prompt_ids

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def call(self, fn: Callable[[LLMEngine], object]) -> Future:
        """Run fn(engine) on the loop thread between two steps; the future holds its result or error."""
        future: Future = Future()
        self._inbox.put(("call", fn, future))
        self._wake.set()
        return future

    def _drain_inbox(self) -> list[StreamChunk]:
        chunks = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return chunks
            if item[0] == "add":
                _, rid, prompt_ids, params = item
                try:
                    self.engine.add_request(prompt_ids, params, rid)
                except ValueError as e:  # e.g. a duplicate id: fail only this request
                    logger.warning("request %s refused: %s", rid, e)
                    chunks.append(StreamChunk(rid, "", [], None, "abort", str(e), len(prompt_ids), 0, 0))
            elif item[0] == "call":
                _, fn, future = item
                try:
                    future.set_result(fn(self.engine))
                except Exception as e:  # the caller gets the error; the loop goes on
                    future.set_exception(e)
            else:
                chunk = self.engine.abort(item[1])
                if chunk is not None:
                    chunks.append(chunk)

    def _run(self) -> None:
        lockstep = self.engine.sync is not None
        self._stats = self.engine.stats()
        try:
            while not self._stop.is_set():
                chunks = self._drain_inbox()
                ran = False
                if lockstep or self.engine.has_unfinished():
                    chunks += self.engine.step()
                    ran = self.engine.last_step_ran
                if chunks:
                    self.on_chunks(chunks)
                if lockstep and self.engine.sync.stopped:
                    return  # every rank stops at this same agreement
                idle = not self.engine.has_unfinished() and not ran
                self._snapshot_stats(force=idle)
                if idle:
                    # Nothing here: sleep until a request arrives (or, in lockstep, until the next check).
                    self._wake.wait(self.idle_wait if lockstep else None)
                    self._wake.clear()
        except BaseException as e:  # the loop must never die silently
            logger.exception("engine step loop failed")
            self.error = e
            self.on_chunks([])
