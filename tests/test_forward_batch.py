"""build_forward_batch (vectorised) against the obvious per-token loop, on random ragged batches."""

from __future__ import annotations

import random

import pytest
import torch

from moeserve.forward_batch import ForwardMode, build_forward_batch


def reference(toks, starts, tables, block_size, sample_rows):
    positions, slots, samples, offset = [], [], [], 0
    for i, t in enumerate(toks):
        for p in range(starts[i], starts[i] + len(t)):
            positions.append(p)
            slots.append(tables[i][p // block_size] * block_size + p % block_size)
        samples += [offset + r for r in (sample_rows[i] if sample_rows else [len(t) - 1])]
        offset += len(t)
    return positions, slots, samples


@pytest.mark.parametrize("seed", range(20))
def test_matches_per_token_reference(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    toks, starts, tables, rows = [], [], [], []
    for _ in range(rng.randint(0, 8)):
        q, start = rng.randint(1, 40), rng.randint(0, 60)
        toks.append([rng.randrange(300) for _ in range(q)])
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
        if not toks:
            assert batch.mode == ForwardMode.IDLE and batch.num_tokens == 0
        elif max(map(len, toks)) == 1:
            assert batch.mode == ForwardMode.DECODE
