"""The sampler's batched top-k / top-p / min-p filter against a per-row reference, and its contract."""

from __future__ import annotations

import pytest
import torch

from moeserve.runner.sampler import Sampler, SamplingRow, _filter
from moeserve.sampling_params import SamplingParams


def reference_filter(p: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row, the obvious way: walk tokens from most to least likely and keep while the rules allow."""
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))
    keep, mass = [], 0.0
    for rank, i in enumerate(order):
        if rank > 0 and (
            (top_k > 0 and rank >= top_k) or mass >= top_p or float(p[i]) < float(p[order[0]]) * min_p
        ):
            continue
        keep.append(i)
        mass += float(p[i])
    out = torch.zeros_like(p)
    out[keep] = p[keep]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_filter_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 50, generator=g) * 3
    probs = torch.softmax(logits, dim=-1).double()
    settings = [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (10, 0.5, 0.05), (1, 0.9, 0.0)]
    rows = [SamplingRow(SamplingParams(top_k=k, top_p=p, min_p=m), 0) for k, p, m in settings]
    got = _filter(probs, rows)
    for i, (k, p, m) in enumerate(settings):
        torch.testing.assert_close(got[i], reference_filter(probs[i], k, p, m))


def test_greedy_rows_take_argmax_and_seeded_rows_repeat():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    rows = [
        SamplingRow(SamplingParams(temperature=0.0), 0),
        SamplingRow(SamplingParams(seed=7), 3),
        SamplingRow(SamplingParams(seed=7), 4),
        SamplingRow(SamplingParams(temperature=0.0), 1),
    ]
    tokens, _ = Sampler()(logits, rows)
    assert tokens[0] == int(logits[0].argmax()) and tokens[3] == int(logits[3].argmax())
    # The same (seed, position) gives the same draw whatever else is in the batch.
    alone, _ = Sampler(seed=123)(logits[1:2], rows[1:2])
    assert alone[0] == tokens[1]


def test_seeded_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp_min(1e-12).log()[None].repeat(4000, 1)
    rows = [SamplingRow(SamplingParams(seed=1), i) for i in range(4000)]
    tokens, _ = Sampler()(logits, rows)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert freq[3] == 0
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_logprobs_are_log_softmax_of_raw_logits():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logprobs=4), 0),
        SamplingRow(SamplingParams(temperature=0.0), 0),
    ]
    tokens, lps = Sampler()(logits, rows)
    ref = torch.log_softmax(logits[0], -1)
    assert lps[1] is None
    assert lps[0].token_id == tokens[0] and abs(lps[0].logprob - float(ref[tokens[0]])) < 1e-5
    assert [t for t, _ in lps[0].top] == ref.topk(4).indices.tolist()


def test_token_mask_restricts_choices():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[:, [3, 9]] = True
    rows = [
        SamplingRow(SamplingParams(temperature=0.0), 0),
        SamplingRow(SamplingParams(seed=1), 0),
        SamplingRow(SamplingParams(temperature=2.0, seed=2), 5),
    ]
    tokens, _ = Sampler()(logits, rows, token_mask=mask)
    assert all(t in (3, 9) for t in tokens)


def test_model_dtype_logits_sample_as_their_float32_upcast():
    """The LM head's bf16 logits go to the sampler as they are: every row samples, and reports logprobs,
    exactly as from their float32 upcast (which is what the sampler computes in where it matters)."""
    logits = (torch.randn(6, 300, generator=torch.Generator().manual_seed(5)) * 4).to(torch.bfloat16)
    logits[0, 7] = logits[0, 11] = logits[0].max() + 1  # a tie: the lower id wins either way
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logprobs=2), 0),
        SamplingRow(SamplingParams(temperature=0.0), 3),
        SamplingRow(SamplingParams(temperature=0.7, seed=1, top_k=50), 0),
        SamplingRow(SamplingParams(temperature=1.3, seed=2, top_p=0.8, logprobs=3), 4),
        SamplingRow(SamplingParams(temperature=0.9, seed=3, min_p=0.05), 1),
        SamplingRow(SamplingParams(temperature=0.0, logprobs=0), 2),
    ]
    got = Sampler(seed=0)(logits, rows)
    want = Sampler(seed=0)(logits.float(), rows)
    assert got == want and got[0][0] == 7
