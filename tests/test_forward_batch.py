"""build_forward_batch (vectorised) against the obvious per-token loop, on random ragged batches."""

from __future__ import annotations

import random

import pytest
import torch

from moeserve.forward_batch import BlockTableRows, ForwardMode, build_forward_batch


def reference(toks, starts, tables, block_size, sample_rows):
    positions, slots, samples, offset = [], [], [], 0
    for i, t in enumerate(toks):
        for p in range(starts[i], starts[i] + len(t)):
            positions.append(p)
            slots.append(tables[i][p // block_size] * block_size + p % block_size)
        samples += [offset + r for r in (sample_rows[i] if sample_rows else [len(t) - 1])]
        offset += len(t)
    return positions, slots, samples


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_matches_per_token_reference(seed, decode):
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    toks, starts, tables, rows = [], [], [], []
    for _ in range(rng.randint(0, 8) if not decode else rng.randint(1, 300)):
        q, start = (1 if decode else rng.randint(1, 40)), rng.randint(0, 60)
        toks.append([rng.randrange(-1, 300) for _ in range(q)])  # -1: a placeholder the runner fills in
        starts.append(start)
        tables.append(rng.sample(range(1000), (start + q + block_size - 1) // block_size + rng.randint(0, 2)))
        rows.append(sorted(rng.sample(range(q), rng.randint(0, min(q, 3)))))
    for sample_rows in (None, rows):
        batch = build_forward_batch(toks, starts, tables, block_size, sample_rows=sample_rows)
        positions, slots, samples = reference(toks, starts, tables, block_size, sample_rows)
        assert batch.positions.tolist() == positions
        assert batch.attn.slot_mapping.tolist() == slots
        assert batch.sample_indices.tolist() == samples
        assert batch.input_ids.tolist() == [t for x in toks for t in x]
        assert batch.attn.seq_lens_cpu == [s + len(t) for s, t in zip(starts, toks)]
        assert batch.positions.dtype == batch.attn.slot_mapping.dtype == torch.int64
        width = max([1, *map(len, tables)])
        assert batch.attn.block_tables.tolist() == [t + [0] * (width - len(t)) for t in tables]
        assert batch.attn.block_tables.dtype == batch.attn.seq_lens.dtype == torch.int32
        assert batch.attn.query_start_loc.tolist() == batch.attn.query_start_loc_cpu
        assert batch.attn.seq_lens.tolist() == batch.attn.seq_lens_cpu
        if not toks:
            assert batch.mode == ForwardMode.IDLE and batch.num_tokens == 0
        elif max(map(len, toks)) == 1:
            assert batch.mode == ForwardMode.DECODE


def test_rejects_block_table_too_short():
    with pytest.raises(AssertionError, match="too short"):
        build_forward_batch([[1, 2, 3]], [4], [[7]], 4)  # positions 4..6 need a second block
    with pytest.raises(AssertionError, match="too short"):
        build_forward_batch([[1], [2]], [3, 4], [[7], [8]], 4)  # decode: position 4 needs block 2 of request 1


def test_block_table_rows_track_changing_tables():
    """Kept rows against packing from lists, over steps where tables grow, get blocks swapped, shrink
    (a preempted request back with a new table), requests come and go, and the buffer must grow."""
    rng = random.Random(0)
    rows = BlockTableRows(num_rows=2, width=2)
    tables: dict[str, list[int]] = {}
    next_id = 0
    for _ in range(200):
        for rid in list(tables):
            r = rng.random()
            if r < 0.3:
                tables[rid].append(rng.randrange(10_000))
            elif r < 0.35 and tables[rid]:
                tables[rid][rng.randrange(len(tables[rid]))] = rng.randrange(10_000)  # swapped for a cached copy
            elif r < 0.38:
                tables[rid] = tables[rid][: rng.randrange(len(tables[rid]) + 1)]  # preempted and readmitted
            elif r < 0.45:
                del tables[rid]
                if rng.random() < 0.7:
                    rows.drop([rid])  # correctness must not depend on it
        for _ in range(rng.randint(0, 3)):
            tables[f"r{next_id}"] = [rng.randrange(10_000) for _ in range(rng.randint(0, 5))]
            next_id += 1
        ids = rng.sample(sorted(tables), rng.randint(0, len(tables)))  # any subset, any order (as TBO does)
        lists = [list(tables[rid]) for rid in ids]
        packed = rows.pack(ids, lists)
        width = max([1, *map(len, lists)])
        assert packed.table.tolist() == [t + [0] * (width - len(t)) for t in lists]
        assert packed.lens.tolist() == [len(t) for t in lists]
        assert packed.table.dtype == torch.int32 and packed.lens.dtype == torch.int64


def test_packed_block_tables_give_the_same_batch():
    rng = random.Random(1)
    toks = [[rng.randrange(300)] for _ in range(50)]
    starts = [rng.randrange(100) for _ in toks]
    tables = [rng.sample(range(1000), s // 16 + 1) for s in starts]
    rows = BlockTableRows()
    packed = rows.pack([f"r{i}" for i in range(len(toks))], tables)
    a = build_forward_batch(toks, starts, tables, 16)
    b = build_forward_batch(toks, starts, packed, 16)
    assert torch.equal(a.attn.slot_mapping, b.attn.slot_mapping)
    assert torch.equal(a.attn.block_tables, b.attn.block_tables)
