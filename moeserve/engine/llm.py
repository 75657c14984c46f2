"""The offline API: `LLM(model).generate(prompts, sampling_params)`, in the style users know from vLLM.

With data_parallel_size / expert_parallel_size above 1 the same API runs on Ray worker actors (one per GPU or
CPU slot; a local Ray is started when none is running). Only then is `moeserve.cluster` (and ray) imported.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from moeserve.config import EngineConfig
from moeserve.outputs import CompletionOutput, RequestOutput, StreamChunk, merge_chunks
from moeserve.sampling_params import SamplingParams

Prompt = str | list[int]
Job = tuple[str, list[int], SamplingParams]  # (sequence id, prompt token ids, params)


class LLM:
    """Generate text offline.

    model: path of an HF-layout checkpoint directory, or None for the built-in demo model.
    engine_options: fields of `EngineConfig` (dtype, device, max_num_batched_tokens, num_kv_blocks,
    data_parallel_size, expert_parallel_size, num_redundant_experts, enable_tbo, ...).
    """

    def __init__(self, model: str | None = None, **engine_options) -> None:
        self.config = EngineConfig.from_kwargs(model=model, **engine_options)
        if self.config.data_parallel_size > 1 or self.config.expert_parallel_size > 1:
            from moeserve.cluster.offline import RayEngineGroup

            self.backend = RayEngineGroup(self.config)
        else:
            self.backend = LocalBackend(self.config)
        self.tokenizer = self.backend.tokenizer
        self._ids = itertools.count()

    @property
    def engine(self):
        """The in-process engine (single-rank LLM only)."""
        return self.backend.engine

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
        # Check every prompt first: a bad one must not leave half a batch running.
        token_ids = [self.backend.check_prompt(p) for p in prompts]
        results: list[RequestOutput] = []
        jobs: list[list[Job]] = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            rid = f"gen-{next(self._ids)}"
            results.append(
                RequestOutput(rid, prompt if isinstance(prompt, str) else None, token_ids[i], [], False, 0)
            )
            jobs.append([(f"{rid}-{j}", token_ids[i], _nth_params(params, j)) for j in range(params.n)])
        finals = self.backend.run(jobs)
        for result, prompt_jobs in zip(results, jobs):
            for j, (seq_id, _, params) in enumerate(prompt_jobs):
                chunk = finals[seq_id]
                result.outputs.append(
                    CompletionOutput(
                        j,
                        chunk.text,
                        list(chunk.token_ids),
                        chunk.finish_reason,
                        chunk.stop_reason,
                        list(chunk.logprobs or []) if params.logprobs is not None else None,
                    )
                )
            result.num_cached_tokens = finals[prompt_jobs[0][0]].num_cached_tokens
            result.finished = True
        return results

    def shutdown(self) -> None:
        self.backend.shutdown()


def _nth_params(params: SamplingParams, j: int) -> SamplingParams:
    """The j-th of n sequences: its own seed stream when seeded."""
    return params if params.seed is None or j == 0 else params.with_seed(params.seed + j)


class LocalBackend:
    """One engine in this process."""

    def __init__(self, config: EngineConfig) -> None:
        from moeserve.engine.engine import LLMEngine

        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.check_prompt = self.engine.check_prompt

    def run(self, jobs: list[list[Job]]) -> dict[str, StreamChunk]:
        """Run every sequence to completion; returns each one's whole output as one chunk."""
        pieces: dict[str, list[StreamChunk]] = {}
        try:
            for prompt_jobs in jobs:
                for seq_id, ids, params in prompt_jobs:
                    self.engine.add_request(ids, params, seq_id)
                    pieces[seq_id] = []
            pending = set(pieces)
            while pending:
                for chunk in self.engine.step():
                    pieces[chunk.request_id].append(chunk)
                    if chunk.finish_reason is not None:
                        pending.discard(chunk.request_id)
        except BaseException:
            for seq_id in pieces:
                self.engine.abort(seq_id)
            raise
        return {seq_id: merge_chunks(chunks) for seq_id, chunks in pieces.items()}

    def shutdown(self) -> None:
        pass
