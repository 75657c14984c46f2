"""Sampling: the one place logits become tokens, so per-request masks (constrained decoding) and several tokens
per request (speculative decoding) have a single home.

Seeded requests draw from a generator seeded by (seed, number of tokens generated so far): the draw for a given
output position does not depend on what else is in the batch, or on whether the request was preempted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        """logits: [S, V] float32; token_mask: optional [S, V] bool, True = allowed.
        Returns the sampled token of each row and, for rows that asked for logprobs, their TokenLogprobs."""
        assert logits.shape[0] == len(rows)
        if token_mask is not None:
            logits = logits.masked_fill(~token_mask, float("-inf"))
        tokens = torch.empty(len(rows), dtype=torch.int64, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        random = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(greedy) == len(rows):  # the common all-greedy batch: no index tensor to copy to the device
            tokens = logits.argmax(dim=-1)
        elif greedy:
            idx = torch.tensor(greedy, device=logits.device)
            tokens[idx] = logits[idx].argmax(dim=-1)
        if random:
            idx = torch.tensor(random, device=logits.device)
            tokens[idx] = self._sample_random(logits[idx], [rows[i] for i in random])
        token_list = tokens.tolist()
        return token_list, _logprobs(logits, rows, token_list)

    def _sample_random(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([r.params.temperature for r in rows], device=device, dtype=torch.float32)
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
    drop = rank >= torch.tensor(top_k, device=device)[:, None]
    # top-p keeps the smallest prefix whose mass reaches p (the token that crosses p stays).
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    drop |= mass_before >= torch.tensor(top_p, device=device, dtype=probs.dtype)[:, None]
    drop |= sorted_p < sorted_p[:, :1] * torch.tensor(min_p, device=device, dtype=probs.dtype)[:, None]
    drop[:, 0] = False  # the most likely token always survives
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)


def _logprobs(logits: torch.Tensor, rows: list[SamplingRow], tokens: list[int]) -> list[TokenLogprobs | None]:
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(rows)
    if not wanted:
        return out
    idx = torch.tensor(wanted, device=logits.device)
    logp = torch.log_softmax(logits[idx].float(), dim=-1)
    k = max(rows[i].params.logprobs for i in wanted)
    top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    chosen = logp.gather(1, torch.tensor([tokens[i] for i in wanted], device=logits.device)[:, None])
    chosen, top_v, top_i = chosen.squeeze(1).tolist(), top_v.tolist(), top_i.tolist()
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs
        out[i] = TokenLogprobs(tokens[i], chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
    return out
