"""Sampling: the one place logits become tokens, so per-request masks (constrained decoding) and several tokens
per request (speculative decoding) have a single home.

Seeded requests draw from a generator seeded by (seed, number of tokens generated so far): the draw for a given
output position does not depend on what else is in the batch, or on whether the request was preempted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.backend_choice import fused_kernels_available
from moeserve.sampling_params import SamplingParams
from moeserve.scheduler.output import TokenLogprobs

_SEED_STRIDE = 1_000_003


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    num_output_tokens: int


class Sampler:
    """Greedy, temperature, top-k, top-p and min-p sampling with optional logprobs, batched over rows."""

    def __init__(self, seed: int = 0) -> None:
        self._generator: torch.Generator | None = None
        self._seed = seed

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], token_mask: torch.Tensor | None = None
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [S, V], any float dtype (float32 math where it matters); token_mask: optional [S, V] bool,
        True = allowed. Returns the sampled token of each row and, for rows asking, their TokenLogprobs."""
        return self.launch(logits, rows, token_mask).resolve()

    def launch(
        self, logits: torch.Tensor, rows: list[SamplingRow], token_mask: torch.Tensor | None = None,
        argmax: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SampledTokens:
        """Queue the sampling of every row on the logits' device without waiting for it (no host sync):
        the result's `tokens` can feed the next step on the device; `resolve()` brings the values back.
        argmax: the logits' argmax computed already (a decode graph's), on the device and in host memory that the
        device writes ([S] int64 each); taken when every row is greedy and no mask applies."""
        assert logits.shape[0] == len(rows)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if argmax is not None and len(greedy) == len(rows) and token_mask is None:
            tokens, host_tokens = argmax
            return SampledTokens(tokens, rows, _logprobs(logits, rows, tokens), host_tokens)
        if token_mask is not None:
            logits = logits.masked_fill(~token_mask, float("-inf"))
        tokens = torch.empty(len(rows), dtype=torch.int64, device=logits.device)
        random = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(greedy) == len(rows):  # the common all-greedy batch: no index tensor to copy to the device
            tokens = greedy_argmax(logits)
        elif greedy:
            idx = host_to_device(greedy, logits.device, torch.int64)
            tokens[idx] = greedy_argmax(logits[idx])
        if random:
            idx = host_to_device(random, logits.device, torch.int64)
            tokens[idx] = self._sample_random(logits[idx].float(), [rows[i] for i in random])
        return SampledTokens(tokens, rows, _logprobs(logits, rows, tokens))

    def _sample_random(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device = logits.device
        temperature = host_to_device([r.params.temperature for r in rows], device, torch.float32)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        probs = _filter(probs, rows)
        # Exponential race: argmax(p / q), q ~ Exp(1), is a sample from p; q comes from a per-row stream.
        noise = torch.empty_like(probs)
        for i, row in enumerate(rows):
            noise[i].exponential_(generator=self._row_generator(row, device))
        return (probs / noise).argmax(dim=-1)

    def _row_generator(self, row: SamplingRow, device: torch.device) -> torch.Generator:
        if row.params.seed is None:
            if self._generator is None or self._generator.device != device:
                self._generator = torch.Generator(device=device)
                self._generator.manual_seed(self._seed)
            return self._generator
        g = torch.Generator(device=device)
        g.manual_seed((row.params.seed * _SEED_STRIDE + row.num_output_tokens) % (2**63))
        return g


def greedy_argmax(logits: torch.Tensor, out: torch.Tensor | None = None, host_out: torch.Tensor | None = None,
                  step: torch.Tensor | None = None) -> torch.Tensor:
    """logits.argmax(dim=-1) of [S, V] logits: on CUDA one Triton launch with many programs a row
    (`moeserve.kernels.argmax`), where torch reduces a row in one. out, host_out, step: as `argmax_rows` (the
    result also into out [>= S], and into host_out [2, >= S], row step[0] % 2). Returns [S] int64 (out[:S])."""
    if fused_kernels_available(logits) and logits.stride(-1) == 1:
        from moeserve.kernels.argmax import argmax_rows

        return argmax_rows(logits, out, host_out, step)
    assert logits.device.type != "cuda" or host_out is None, "the host copy needs the Triton kernel on CUDA"
    tokens = logits.argmax(dim=-1)
    if host_out is not None:  # (not on CUDA: the step's number is read without a sync)
        host_out[int(step[0]) % 2, : tokens.shape[0]] = tokens
    if out is None:
        return tokens
    out[: tokens.shape[0]] = tokens
    return out[: tokens.shape[0]]


def _filter(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Apply top-k, top-p and min-p to probs [S, V]; returns renormalisation-free filtered probs."""
    top_k = [r.params.top_k if r.params.top_k > 0 else probs.shape[1] for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    if all(k >= probs.shape[1] for k in top_k) and all(p >= 1.0 for p in top_p) and not any(min_p):
        return probs
    device = probs.device
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[1], device=device)[None, :]
    drop = rank >= host_to_device(top_k, device, torch.int64)[:, None]
    # top-p keeps the smallest prefix whose mass reaches p (the token that crosses p stays).
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    drop |= mass_before >= host_to_device(top_p, device, probs.dtype)[:, None]
    drop |= sorted_p < sorted_p[:, :1] * host_to_device(min_p, device, probs.dtype)[:, None]
    drop[:, 0] = False  # the most likely token always survives
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


def host_to_device(
    values: torch.Tensor | list, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A host tensor (or a list, made a tensor of `dtype`) on `device` without waiting for the device: on CUDA
    through pinned staging and a non_blocking copy (a pageable copy would wait for the stream; PyTorch's
    pinned allocator keeps the staging block until its copy has run), elsewhere a plain `.to`."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass(slots=True)
class _LogprobTensors:
    """Device tensors of the rows that asked for logprobs (rows `wanted`, k = most alternatives asked)."""

    wanted: list[int]
    chosen: torch.Tensor  # [W] float32: log-probability of the sampled token
    top_v: torch.Tensor  # [W, k] float32
    top_i: torch.Tensor  # [W, k] int64


def _logprobs(logits: torch.Tensor, rows: list[SamplingRow], tokens: torch.Tensor) -> _LogprobTensors | None:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not wanted:
        return None
    idx = host_to_device(wanted, logits.device, torch.int64)
    logp = torch.log_softmax(logits[idx].float(), dim=-1)
    k = max(rows[i].params.logprobs for i in wanted)
    top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    chosen = logp.gather(1, tokens[idx][:, None]).squeeze(1)
    return _LogprobTensors(wanted, chosen, top_v, top_i)


class SampledTokens:
    """One step's sampled tokens: on the device at once (`tokens`, [S] int64), on the host after
    `resolve()`. On CUDA the copies back start as soon as sampling is queued (into pinned memory, behind an
    event), so resolving waits for this step only, not for work queued after it.

    host_tokens: the tokens in host memory that the step's kernels write themselves (a decode graph's argmax),
    read once the step has run; then they are not copied back."""

    def __init__(self, tokens: torch.Tensor, rows: list[SamplingRow], logprobs: _LogprobTensors | None,
                 host_tokens: torch.Tensor | None = None):
        self.tokens = tokens
        self._rows = rows
        self._logprobs = logprobs
        back = [] if host_tokens is not None else [tokens]
        if logprobs is not None:
            back += [logprobs.chosen, logprobs.top_v, logprobs.top_i]
        self._ready: torch.cuda.Event | None = None
        if tokens.device.type == "cuda":
            back = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in back]
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._host = ([host_tokens] if host_tokens is not None else []) + back

    def resolve(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Wait for this step's sampling; returns each row's token and, where asked, its TokenLogprobs."""
        if self._ready is not None:
            self._ready.synchronize()
        tokens = self._host[0].tolist()
        out: list[TokenLogprobs | None] = [None] * len(tokens)
        if self._logprobs is not None:
            chosen, top_v, top_i = (t.tolist() for t in self._host[1:])
            for j, i in enumerate(self._logprobs.wanted):
                n = self._rows[i].params.logprobs
                out[i] = TokenLogprobs(tokens[i], chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
        return tokens, out
