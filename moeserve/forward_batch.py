"""The flattened batch one forward pass runs on: plain tensors the runner builds from a `SchedulerOutput`.

Tokens of all requests in a step are concatenated ("ragged" layout, no padding). Request i owns the token rows
``query_start_loc[i]:query_start_loc[i+1]``; its KV context after this step is ``seq_lens[i]`` tokens, of which
the last ``query_lens[i]`` are new. Cache slot of token t is ``slot_mapping[t] = block * block_size + offset``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

import torch


class ForwardMode(str, Enum):
    """What kind of step this is; decides the MoE dispatch mode (normal vs low-latency) across EP ranks."""

    EXTEND = "extend"  # at least one request computes more than one token (prefill or chunk)
    DECODE = "decode"  # every request computes exactly one token
    IDLE = "idle"  # this rank has no tokens but must still enter every collective


@dataclass(slots=True)
class AttentionMetadata:
    """Where each request's keys and values live in the paged cache.

    query_start_loc: [num_reqs + 1], int32, device — prefix sums of query_lens.
    seq_lens:        [num_reqs], int32, device — context length after this step (cached + new).
    block_tables:    [num_reqs, max_blocks_per_req], int32, device — block ids, padded with 0.
    slot_mapping:    [num_tokens], int64, device — cache slot each new token's K/V is written to.
    query_start_loc_cpu / seq_lens_cpu: the same as Python lists, so backends need not sync to read them.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    max_query_len: int
    max_seq_len: int

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass(slots=True)
class ForwardBatch:
    """Everything a model's forward pass reads besides its weights.

    input_ids:      [num_tokens], int64, device.
    positions:      [num_tokens], int64, device — absolute position of each token in its sequence.
    sample_indices: [num_samples], int64, device — rows of the final hidden states whose logits are needed
                    (one per request finishing its prompt or decoding; several per request when scoring
                    speculative tokens).
    """

    mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata | None
    sample_indices: torch.Tensor
    # Per-step extras the MoE layers read (e.g. whether to record expert load); set by the runner.
    extras: dict = field(default_factory=dict)
    # Which two-batch-overlap micro-batch this is (0 or 1): picks the MoE dispatcher instance.
    micro_batch: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_forward_batch(
    token_ids: list[list[int]],
    start_positions: list[int],
    block_tables: list[list[int]],
    block_size: int,
    sample_rows: list[list[int]] | None = None,
    device: torch.device | str = "cpu",
) -> ForwardBatch:
    """Build a batch from per-request new tokens (plain lists; used by the runner and by tests).

    token_ids[i]:      the tokens request i computes this step.
    start_positions[i]: number of tokens of request i already in the cache (position of token_ids[i][0]).
    block_tables[i]:   block ids holding request i's whole context (cached + new), in order.
    sample_rows[i]:    offsets within token_ids[i] whose logits are needed; default: the last token only.
    """
    num_reqs = len(token_ids)
    query_lens = [len(t) for t in token_ids]
    assert all(query_lens), "a scheduled request computes at least one token"
    seq_lens = [start + n for start, n in zip(start_positions, query_lens)]
    qsl = [0, *itertools.accumulate(query_lens)]
    if sample_rows is None:
        samples = [end - 1 for end in qsl[1:]]
    else:
        samples = [qsl[i] + r for i, rows in enumerate(sample_rows) for r in rows]
    width = max(1, max((len(t) for t in block_tables), default=0))
    assert all(len(t) * block_size >= n for t, n in zip(block_tables, seq_lens)), "block table too short"
    table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    table_tensor = table_tensor.reshape(num_reqs, width)
    # Position and cache slot of every new token, without a Python loop over tokens.
    lens = torch.tensor(query_lens, dtype=torch.int64)
    req_of_token = torch.repeat_interleave(torch.arange(num_reqs), lens)
    first_row = torch.tensor(qsl[:-1], dtype=torch.int64)
    starts = torch.tensor(start_positions, dtype=torch.int64)
    positions = torch.arange(qsl[-1], dtype=torch.int64) - first_row[req_of_token] + starts[req_of_token]
    blocks = table_tensor[req_of_token, positions // block_size].to(torch.int64)
    slots = blocks * block_size + positions % block_size
    if num_reqs == 0:
        mode = ForwardMode.IDLE
    elif max(query_lens) == 1:
        mode = ForwardMode.DECODE
    else:
        mode = ForwardMode.EXTEND
    attn = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=table_tensor.to(device),
        slot_mapping=slots.to(device),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        block_size=block_size,
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
    )
    return ForwardBatch(
        mode=mode,
        input_ids=torch.tensor(list(itertools.chain.from_iterable(token_ids)), dtype=torch.int64, device=device),
        positions=positions.to(device),
        attn=attn,
        sample_indices=torch.tensor(samples, dtype=torch.int64, device=device),
    )
