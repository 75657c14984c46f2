"""Load window and metrics: sums over the last steps, replicas folded back to logical experts."""

from __future__ import annotations

import torch

from moeserve.eplb import ExpertLoadWindow, balancedness, gpu_loads, physical_loads


def test_window_sums_the_last_steps_only():
    gen = torch.Generator().manual_seed(0)
    window = ExpertLoadWindow(num_layers=3, num_physical=6, window=4)
    steps = [torch.randint(0, 50, (3, 6), generator=gen) for _ in range(7)]
    for i, counts in enumerate(steps):
        window.record(counts)
        expected = torch.stack(steps[max(0, i - 3) : i + 1]).sum(0)
        assert torch.equal(window.total(), expected)
    window.reset()
    assert window.total().sum() == 0 and window.steps_recorded == 0


def test_logical_load_folds_replicas():
    gen = torch.Generator().manual_seed(1)
    phy2log = torch.tensor([[0, 1, 2, 0, 3, 0], [3, 2, 1, 0, 1, 2]])
    window = ExpertLoadWindow(2, 6, window=2)
    a, b = (torch.randint(1, 20, (2, 6), generator=gen) for _ in range(2))
    window.record(a)
    window.record(b)
    got = window.logical_load(phy2log, num_logical=4)
    total = a + b
    for layer in range(2):
        for e in range(4):
            assert got[layer, e] == total[layer][phy2log[layer] == e].sum()


def test_gpu_loads_split_an_expert_over_its_replicas():
    weight = torch.tensor([[6.0, 2.0, 4.0]])
    phy2log = torch.tensor([[0, 1, 0, 2]])  # expert 0 twice -> 3 per replica
    assert physical_loads(weight, phy2log).tolist() == [[3.0, 2.0, 3.0, 4.0]]
    loads = gpu_loads(weight, 2, phy2log)
    assert loads.tolist() == [[5.0, 7.0]]
    assert torch.equal(gpu_loads(physical_loads(weight, phy2log), 2), loads)
    assert torch.allclose(balancedness(loads), torch.tensor([6.0 / 7.0], dtype=torch.float64))
    assert balancedness(torch.zeros(1, 4)).tolist() == [1.0]


def test_balancedness_matches_a_loop():
    gen = torch.Generator().manual_seed(2)
    loads = torch.rand(5, 8, generator=gen) * 10
    expected = [sum(row) / len(row) / max(row) for row in loads.double().tolist()]
    assert torch.allclose(balancedness(loads), torch.tensor(expected, dtype=torch.float64))
