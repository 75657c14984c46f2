"""The flattened batch one forward pass runs on: plain tensors the runner builds from a `SchedulerOutput`.

Tokens of all requests in a step are concatenated ("ragged" layout, no padding). Request i owns the token rows
``query_start_loc[i]:query_start_loc[i+1]``; its KV context after this step is ``seq_lens[i]`` tokens, of which
the last ``query_lens[i]`` are new. Cache slot of token t is ``slot_mapping[t] = block * block_size + offset``.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable
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

    @classmethod
    def for_decode(
        cls, block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int
    ) -> AttentionMetadata:
        """A decode step's metadata (one new token per request) over a filled paged cache, for calling an
        attention backend directly (tests, benchmarks). Every slot_mapping entry is 0: only for calls that
        read the cache, not for a forward that writes K/V.

        block_tables: [num_reqs, max_blocks] int32; seq_lens: [num_reqs] int32, on the same device (read to
        the host once).
        """
        n, lens, device = seq_lens.shape[0], seq_lens.tolist(), seq_lens.device
        return cls(
            query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=device),
            seq_lens=seq_lens,
            block_tables=block_tables,
            slot_mapping=torch.zeros(n, dtype=torch.int64, device=device),
            query_start_loc_cpu=list(range(n + 1)),
            seq_lens_cpu=lens,
            block_size=block_size,
            max_query_len=1,
            max_seq_len=max(lens, default=0),
        )


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
    # [1] int32 on the device: rows at and beyond it are padding (a CUDA-graph decode batch of a captured
    # size); MoE layers route them nowhere. None: every row is real.
    num_real_tokens: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_forward_batch(
    token_ids: list[list[int]],
    start_positions: list[int],
    block_tables: list[list[int]] | PackedBlockTables,
    block_size: int,
    sample_rows: list[list[int]] | None = None,
    device: torch.device | str = "cpu",
) -> ForwardBatch:
    """Build a batch from per-request new tokens (plain lists; used by the runner and by tests).

    token_ids[i]:      the tokens request i computes this step.
    start_positions[i]: number of tokens of request i already in the cache (position of token_ids[0]).
    block_tables[i]:   block ids holding request i's whole context (cached + new), in order; or the same
                       already packed by a `BlockTableRows` kept across steps (far cheaper at long contexts).
    sample_rows[i]:    offsets within token_ids[i] whose logits are needed; default: the last token only.

    Runs every decode step on the host, so it avoids per-element Python work: lists become tensors through
    C arrays, and positions and slots are computed by a few tensor ops (fewer still when every request
    computes one token).
    """
    num_reqs = len(token_ids)
    query_lens = [len(t) for t in token_ids]
    assert 0 not in query_lens, "a scheduled request computes at least one token"
    seq_lens = [start + n for start, n in zip(start_positions, query_lens)]
    qsl = [0, *itertools.accumulate(query_lens)]
    num_tokens = qsl[-1]
    decode = num_tokens == num_reqs  # every request computes exactly one token
    if sample_rows is None:
        samples = torch.arange(num_reqs) if decode else _tensor([end - 1 for end in qsl[1:]], "q")
    else:
        samples = _tensor([qsl[i] + r for i, rows in enumerate(sample_rows) for r in rows], "q")
    if not isinstance(block_tables, PackedBlockTables):
        block_tables = pack_block_tables(block_tables)
    table_tensor, table_lens = block_tables.table, block_tables.lens
    assert table_lens.shape[0] == num_reqs, "one block table per request"
    starts = _tensor(start_positions, "q")
    if decode:
        req_of_token, positions = torch.arange(num_reqs), starts
    else:
        req_of_token = torch.repeat_interleave(torch.arange(num_reqs), _tensor(query_lens, "q"))
        first_row = _tensor(qsl[:-1], "q")
        positions = torch.arange(num_tokens) - first_row[req_of_token] + starts[req_of_token]
    # Position and cache slot of every new token; the newest position decides whether the table is long enough.
    columns = positions // block_size
    assert not bool((columns >= table_lens[req_of_token]).any()), "block table too short"
    slots = table_tensor[req_of_token, columns].to(torch.int64) * block_size + positions % block_size
    if num_reqs == 0:
        mode = ForwardMode.IDLE
    elif decode:
        mode = ForwardMode.DECODE
    else:
        mode = ForwardMode.EXTEND
    attn = AttentionMetadata(
        query_start_loc=_tensor(qsl, "i").to(device),
        seq_lens=_tensor(seq_lens, "i").to(device),
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
        input_ids=_tensor(itertools.chain.from_iterable(token_ids), "q").to(device),
        positions=positions.to(device),
        attn=attn,
        sample_indices=samples.to(device),
    )


_DTYPES = {"i": torch.int32, "q": torch.int64}


def _tensor(values: Iterable[int], typecode: str) -> torch.Tensor:
    """CPU tensor of Python ints (typecode "i": int32, "q": int64). Filling a C array first is several
    times faster than torch.tensor, which converts the ints one object at a time."""
    buffer = array(typecode, values)
    if not buffer:  # frombuffer refuses empty buffers
        return torch.empty(0, dtype=_DTYPES[typecode])
    return torch.frombuffer(buffer, dtype=_DTYPES[typecode])  # the tensor keeps the array alive


def pack_block_tables(block_tables: list[list[int]]) -> PackedBlockTables:
    """Pack lists of block ids: table [num_reqs, max(1, longest)] int32 padded with 0, lens [num_reqs]."""
    lens = [len(t) for t in block_tables]
    width = max(1, max(lens, default=0))
    lens_tensor = _tensor(lens, "q")
    table = torch.zeros(len(block_tables), width, dtype=torch.int32)
    # Row-major boolean indexing visits each row's first lens[i] cells in order: one copy, no per-row loop.
    table[torch.arange(width) < lens_tensor[:, None]] = _tensor(itertools.chain.from_iterable(block_tables), "i")
    return PackedBlockTables(table, lens_tensor)


@dataclass(slots=True, frozen=True)
class PackedBlockTables:
    """Block tables as tensors. table: [num_reqs, width] int32, CPU, row i = request i's block ids padded
    with 0; lens: [num_reqs] int64, CPU, the number of real ids in each row."""

    table: torch.Tensor
    lens: torch.Tensor


class BlockTableRows:
    """Running requests' block tables in one host tensor that lives across steps, so that a step converts
    only block ids that changed.

    Packing every table from lists each step converts every block id of every request (about 1.4 ms at 256
    requests of 1k tokens on a slow host core, growing with context). Between two steps a request's table is
    usually the same or one block longer; a row is rewritten from its first changed id only. Each call
    compares the lists it is given with the previous ones, so the result is right whatever changed (blocks
    swapped for cached copies, a preempted request back with new blocks); `drop` only frees rows.
    """

    def __init__(self, num_rows: int = 256, width: int = 64) -> None:
        self._table = torch.zeros(num_rows, width, dtype=torch.int32)
        self._row_of: dict[str, int] = {}
        self._known: dict[str, list[int]] = {}  # what each row holds
        self._free_rows: list[int] = list(range(num_rows - 1, -1, -1))

    def pack(self, request_ids: list[str], block_tables: list[list[int]]) -> PackedBlockTables:
        """Tables of these requests, in this order (see `PackedBlockTables`); updates the kept rows."""
        rows, width = self._update(request_ids, block_tables)
        lens = _tensor([len(t) for t in block_tables], "q")
        return PackedBlockTables(self._table[rows, :width], lens)

    def gather(self, request_ids: list[str], block_tables: list[list[int]], out: torch.Tensor) -> None:
        """Write the tables of these requests, in this order, into out (e.g. pinned staging memory); updates
        the kept rows. Like `pack`'s table, without building it first.

        out: [len(request_ids), max(1, longest table)] int32, CPU, any strides; row i = request i's block ids
        padded with 0.
        """
        rows, width = self._update(request_ids, block_tables)
        need = (rows.shape[0], width)
        assert out.shape == need, f"out is {tuple(out.shape)}, the tables need {need}"
        torch.index_select(self._table[:, :width], 0, rows, out=out)

    def _update(self, request_ids: list[str], block_tables: list[list[int]]) -> tuple[torch.Tensor, int]:
        """Bring these requests' rows up to date; returns (their row indices [n] int64, max(1, longest))."""
        longest = max([1, *map(len, block_tables)])
        if longest > self._table.shape[1]:
            self._grow(self._table.shape[0], max(longest, 2 * self._table.shape[1]))
        rows = []
        for rid, blocks in zip(request_ids, block_tables, strict=True):
            row = self._row_of.get(rid)
            if row is None:
                row = self._new_row(rid)
            known = self._known[rid]
            if known != blocks:  # C-level compare: the same int objects compare by identity
                self._rewrite(row, known, blocks)
                self._known[rid] = list(blocks)
            rows.append(row)
        return _tensor(rows, "q"), longest

    def drop(self, request_ids: Iterable[str]) -> None:
        """Forget requests that finished or were preempted (their rows are zeroed and reused)."""
        for rid in request_ids:
            row = self._row_of.pop(rid, None)
            if row is not None:
                self._table[row, : len(self._known.pop(rid))] = 0
                self._free_rows.append(row)

    def _rewrite(self, row: int, known: list[int], blocks: list[int]) -> None:
        if blocks[: len(known)] == known:
            start = len(known)  # the usual change: blocks appended
        else:
            same = min(len(known), len(blocks))  # also right when blocks is a shorter prefix of known
            start = next((i for i, (a, b) in enumerate(zip(known, blocks)) if a != b), same)
        self._table[row, start : len(blocks)] = _tensor(blocks[start:], "i")
        if len(known) > len(blocks):
            self._table[row, len(blocks) : len(known)] = 0  # keep the padding zero

    def _new_row(self, rid: str) -> int:
        if not self._free_rows:
            old = self._table.shape[0]
            self._grow(2 * old, self._table.shape[1])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self._free_rows.pop()
        self._row_of[rid], self._known[rid] = row, []
        return row

    def _grow(self, num_rows: int, width: int) -> None:
        table = torch.zeros(num_rows, width, dtype=torch.int32)
        table[: self._table.shape[0], : self._table.shape[1]] = self._table
        self._table = table
