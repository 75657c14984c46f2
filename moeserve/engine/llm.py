"""The offline API: `LLM(model).generate(prompts, sampling_params)`, in the style users know from vLLM."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from moeserve.config import EngineConfig
from moeserve.outputs import CompletionOutput, RequestOutput, StreamChunk
from moeserve.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate text offline with one engine in this process.

    model: path of an HF-layout checkpoint directory, or None for the built-in demo model.
    engine_options: fields of `EngineConfig` (dtype, device, max_num_batched_tokens, num_kv_blocks, ...).
    """

    def __init__(self, model: str | None = None, **engine_options) -> None:
        from moeserve.engine.engine import LLMEngine

        self.config = EngineConfig.from_kwargs(model=model, **engine_options)
        self.engine = LLMEngine(self.config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

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
        # Validate and queue everything first: a bad prompt must not leave half a batch queued.
        token_ids = [self.engine.tokenize(prompt) for prompt in prompts]
        results: list[RequestOutput] = []
        seq_of: dict[str, tuple[int, int]] = {}
        try:
            for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
                rid = f"gen-{next(self._ids)}"
                outputs = [CompletionOutput(j, "", [], None, None, [] if params.logprobs is not None else None)
                           for j in range(params.n)]
                results.append(RequestOutput(rid, prompt if isinstance(prompt, str) else None, token_ids[i],
                                             outputs, False, 0))
                for j in range(params.n):
                    seq_params = params if params.seed is None or j == 0 else params.with_seed(params.seed + j)
                    seq_id = self.engine.add_request(token_ids[i], seq_params, f"{rid}-{j}")
                    seq_of[seq_id] = (i, j)
            pending = set(seq_of)
            while pending:
                for chunk in self.engine.step():
                    i, j = seq_of[chunk.request_id]
                    _accumulate(results[i], results[i].outputs[j], chunk)
                    if chunk.finish_reason is not None:
                        pending.discard(chunk.request_id)
        except BaseException:
            for seq_id in seq_of:
                self.engine.abort(seq_id)
            raise
        for r in results:
            r.finished = True
        return results


def _accumulate(result: RequestOutput, out: CompletionOutput, chunk: StreamChunk) -> None:
    out.text += chunk.text
    out.token_ids.extend(chunk.token_ids)
    if out.logprobs is not None and chunk.logprobs:
        out.logprobs.extend(chunk.logprobs)
    if chunk.finish_reason is not None:
        out.finish_reason = chunk.finish_reason
        out.stop_reason = chunk.stop_reason
    if out.index == 0:
        result.num_cached_tokens = chunk.num_cached_tokens
