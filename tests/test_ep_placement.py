"""ExpertPlacement: tables, replica routing (own rank first, else spread evenly), in-place updates."""

from __future__ import annotations

import pytest
import torch

from moeserve.moe.placement import ExpertPlacement


def random_phy2log(num_layers: int, num_logical: int, num_physical: int, seed: int) -> torch.Tensor:
    """Every expert once plus random extra replicas, shuffled over the slots, per layer."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_layers):
        extra = torch.randint(0, num_logical, (num_physical - num_logical,), generator=gen)
        row = torch.cat([torch.arange(num_logical), extra])
        rows.append(row[torch.randperm(num_physical, generator=gen)])
    return torch.stack(rows)


def reference_tables(phy2log: torch.Tensor, num_logical: int) -> list[list[list[int]]]:
    """Per layer, per logical expert: its physical slots in increasing order (plain loops)."""
    tables = []
    for row in phy2log.tolist():
        tables.append([[p for p, e in enumerate(row) if e == x] for x in range(num_logical)])
    return tables


def random_topk(num_tokens: int, num_logical: int, top_k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, num_logical, generator=gen).topk(top_k, dim=1).indices


@pytest.mark.parametrize("ep_size,num_logical,num_physical", [(2, 8, 12), (3, 7, 9), (4, 16, 24)])
def test_tables_match_phy2log(ep_size, num_logical, num_physical):
    phy2log = random_phy2log(3, num_logical, num_physical, seed=ep_size)
    expected = reference_tables(phy2log, num_logical)
    for rank in range(ep_size):
        pl = ExpertPlacement(phy2log, num_logical, rank, ep_size)
        assert pl.num_local_slots == num_physical // ep_size
        assert pl.log2phy.shape == (3, num_logical, num_physical - num_logical + 1)
        for layer in range(3):
            for e in range(num_logical):
                slots = expected[layer][e]
                assert pl.replica_count[layer, e].item() == len(slots)
                row = pl.log2phy[layer, e].tolist()
                assert row[: len(slots)] == slots and all(v == -1 for v in row[len(slots) :])
            lo = rank * pl.num_local_slots
            assert pl.local_logical_experts(layer) == phy2log[layer, lo : lo + pl.num_local_slots].tolist()


def test_to_physical_prefers_own_rank_and_maps_to_the_same_expert():
    ep_size, num_logical, num_physical = 4, 16, 24
    phy2log = random_phy2log(2, num_logical, num_physical, seed=7)
    ids = random_topk(200, num_logical, 4, seed=1)
    ids[::7, 1] = -1
    for rank in range(ep_size):
        pl = ExpertPlacement(phy2log, num_logical, rank, ep_size)
        for layer in range(2):
            phys = pl.to_physical(layer, ids)
            assert phys.dtype == torch.int32 and phys.shape == ids.shape
            assert ((phys == -1) == (ids == -1)).all()
            valid = ids >= 0
            # Each physical choice holds the logical expert that was chosen.
            assert (phy2log[layer][phys[valid].long()] == ids[valid]).all()
            # A choice goes to this rank exactly when this rank holds a replica of the expert.
            local = phy2log[layer, rank * pl.num_local_slots : (rank + 1) * pl.num_local_slots]
            held_here = torch.isin(ids, local) & valid
            on_rank = (phys.long() // pl.num_local_slots == rank) & valid
            assert (held_here == on_rank).all()


def test_remote_choices_spread_evenly_over_replicas():
    # Expert 0 has 3 replicas, none on rank 0; everything else has one.
    num_logical, ep_size = 6, 3
    phy2log = torch.tensor([[1, 2, 3, 0, 4, 0, 5, 0, 1]])
    pl = ExpertPlacement(phy2log, num_logical, ep_rank=0, ep_size=ep_size)
    ids = torch.zeros(300, 1, dtype=torch.int64)
    phys = pl.to_physical(0, ids)
    counts = torch.bincount(phys.view(-1).long(), minlength=9)
    assert counts[[3, 5, 7]].tolist() == [100, 100, 100]
    # Rank 1 holds replicas at 3 and 5: it keeps the lowest local one.
    pl1 = ExpertPlacement(phy2log, num_logical, ep_rank=1, ep_size=ep_size)
    assert (pl1.to_physical(0, ids) == 3).all()


def test_identity_placement_passes_ids_through():
    pl = ExpertPlacement.trivial(2, 8, ep_rank=1, ep_size=2)
    ids = random_topk(10, 8, 2, seed=3)
    ids[0, 0] = -1
    assert torch.equal(pl.to_physical(1, ids), ids.to(torch.int32))
    dyn = ExpertPlacement(torch.arange(8).repeat(2, 1), 8, 1, 2, dynamic=True)
    assert torch.equal(dyn.to_physical(1, ids), ids.to(torch.int32))


def test_update_rewrites_tables_in_place():
    num_logical, num_physical, ep_size = 8, 12, 2
    pl = ExpertPlacement.default(2, num_logical, num_physical - num_logical, ep_rank=1, ep_size=ep_size)
    tables = (pl.phy2log, pl.log2phy, pl.replica_count, pl.local_phy)
    ptrs = [t.data_ptr() for t in tables]
    new = random_phy2log(2, num_logical, num_physical, seed=11)
    pl.update_(new)
    assert [t.data_ptr() for t in tables] == ptrs
    assert all(a is b for a, b in zip(tables, (pl.phy2log, pl.log2phy, pl.replica_count, pl.local_phy)))
    fresh = ExpertPlacement(new, num_logical, 1, ep_size)
    for a, b in zip(tables, (fresh.phy2log, fresh.log2phy, fresh.replica_count, fresh.local_phy)):
        assert torch.equal(a, b)
    ids = random_topk(50, num_logical, 3, seed=5)
    assert torch.equal(pl.to_physical(0, ids), fresh.to_physical(0, ids))


def test_default_placement_and_its_errors():
    pl = ExpertPlacement.default(3, 8, 4, ep_rank=0, ep_size=4)
    assert pl.phy2log[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    assert pl.replica_count[2].tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    wrapped = ExpertPlacement.default(1, 3, 5, ep_rank=0, ep_size=2)
    assert wrapped.phy2log[0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match=r"\(num_experts \+ num_redundant_experts\) % ep_size == 0"):
        ExpertPlacement.default(1, 8, 1, ep_rank=0, ep_size=4)
    with pytest.raises(ValueError, match="no physical slot"):
        ExpertPlacement(torch.tensor([[0, 0, 1, 1]]), 3, 0, 2)
    with pytest.raises(ValueError, match="shape"):
        pl.update_(torch.zeros(3, 5, dtype=torch.int64))
