"""Packing that prefers where items are now: balanced like DeepSeek's greedy, but an item stays on a pack that
holds it already whenever that keeps the pack under the target peak; then swaps to bring any pack that ended
above the target back down, preferring swaps that add no transfer.

Rows are independent problems (layers, or layer x node); every step is one tensor op over all rows.
"""

from __future__ import annotations

import torch

_REL = 1e-12  # relative slack for float comparisons against a target computed by another summation order
COST_WEIGHT = 4.0  # repair swaps: one added transfer costs COST_WEIGHT x peak load (i.e. transfers first)


def sticky_packing(
    weight: torch.Tensor, key: torch.Tensor, home: torch.Tensor, num_packs: int, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack n items into num_packs packs of n / num_packs items, heaviest first. An item goes to a pack that
    holds a copy of its key now (home[x, pack, key] > 0, each copy used once) if that pack stays <= target
    with room left for its remaining items; otherwise to the lightest pack with room (DeepSeek's rule).

    weight: [X, n] float64; key: [X, n] int64 in [0, K); home: [X, num_packs, K] int64; target: [X] float64.
    Returns pack_index [X, n] int64 and rank_in_pack [X, n] int64.
    """
    rows, num_items = weight.shape
    per_pack = num_items // num_packs
    order = weight.argsort(dim=-1, descending=True, stable=True)
    sorted_weight, sorted_key = weight.gather(-1, order), key.gather(-1, order)
    lightest_item = sorted_weight[:, -1:]
    limit = (target * (1 + _REL)).unsqueeze(-1)
    copies_left = home.clone()
    pack_load = torch.zeros(rows, num_packs, dtype=weight.dtype)
    pack_size = torch.zeros(rows, num_packs, dtype=torch.int64)
    pack_of_sorted = torch.empty(rows, num_items, dtype=torch.int64)
    rank_of_sorted = torch.empty(rows, num_items, dtype=torch.int64)
    row, packs = torch.arange(rows), torch.arange(num_packs)
    for i in range(num_items):
        w, k = sorted_weight[:, i : i + 1], sorted_key[:, i]
        has_room = pack_size < per_pack
        at_home = copies_left[row.unsqueeze(-1), packs, k.unsqueeze(-1)] > 0
        # Reserve room: the pack still needs (per_pack - size - 1) more items, each at least the lightest one.
        after = pack_load + w + (per_pack - pack_size - 1).clamp_min(0) * lightest_item
        fits = has_room & at_home & (after <= limit)
        home_pack = pack_load.masked_fill(~fits, float("inf")).argmin(-1)
        lightest = pack_load.masked_fill(~has_room, float("inf")).argmin(-1)
        pack = torch.where(fits.any(-1), home_pack, lightest)
        copies_left[row, pack, k] -= at_home[row, pack].long()
        pack_of_sorted[:, i] = pack
        rank_of_sorted[:, i] = pack_size[row, pack]
        pack_load[row, pack] += w.squeeze(-1)
        pack_size[row, pack] += 1
    pack_index = torch.empty_like(pack_of_sorted).scatter_(-1, order, pack_of_sorted)
    rank_in_pack = torch.empty_like(rank_of_sorted).scatter_(-1, order, rank_of_sorted)
    return pack_index, rank_in_pack


def _best_swaps(
    load: torch.Tensor, key: torch.Tensor, home: torch.Tensor, heavy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best swap for each of J heavy packs, per row: an item a of heavy pack M trades places with an item b
    of a pack Q outside the heavy set so that both end below M's load; fewest added transfers first, then the
    lowest resulting max of the two.

    load, key: [A, P, S]; home: [A, P, K] bool (pack holds key now); heavy: [A, J] pack indices.
    Returns score [A, J] float64 (inf: no helpful swap) and flat index [A, J] into (S_heavy, P, S).
    """
    rows, num_packs, slots = load.shape
    r = torch.arange(rows).unsqueeze(-1)
    pack_load = load.sum(-1)
    peak = pack_load.gather(-1, heavy)  # [A, J]
    heavy_load, heavy_key = load[r, heavy], key[r, heavy]  # [A, J, S]
    # Added transfers, from who holds what now: a goes M -> Q, b goes Q -> M. Scaled by COST_WEIGHT x peak so
    # that one transfer outweighs any balance difference between candidate swaps (pair < peak).
    home = home.to(load.dtype)
    home_m = home[r, heavy]  # [A, J, K]
    a_on_m = home_m.gather(-1, heavy_key)  # [A, J, S]
    width = heavy.shape[1]
    a_index = heavy_key.view(rows, -1, 1).expand(-1, -1, num_packs)
    a_on_q = home.transpose(1, 2).gather(1, a_index).view(rows, width, slots, num_packs)  # [A, J, S, P]
    b_on_q = home.gather(2, key).unsqueeze(1)  # [A, 1, P, S]
    b_on_m = home_m.gather(-1, key.view(rows, 1, -1).expand(-1, width, -1)).view(
        rows, width, num_packs, slots
    )
    scale = (COST_WEIGHT * peak)[:, :, None, None]
    cost_a = ((a_on_m.unsqueeze(-1) - a_on_q) * scale).unsqueeze(-1)  # [A, J, S, P, 1]
    cost_b = ((b_on_q - b_on_m) * scale).unsqueeze(2)  # [A, J, 1, P, S]
    # A swap moves delta = w_a - w_b from M to Q; it helps iff both sides end below M's load (so delta > 0).
    delta = heavy_load[..., None, None] - load[:, None, None]  # [A, J, S, P, S]
    pair = torch.maximum(peak[..., None, None, None] - delta, pack_load[:, None, None, :, None] + delta)
    partner = torch.ones(rows, num_packs, dtype=torch.bool).scatter_(1, heavy, False)[:, None, None, :, None]
    helps = (pair < (peak * (1 - _REL))[..., None, None, None]) & partner
    score = torch.where(helps, pair + cost_a + cost_b, float("inf")).view(rows, width, -1)
    return score.min(-1)


def repair_peaks(
    load: torch.Tensor,
    key: torch.Tensor,
    home: torch.Tensor,
    target: torch.Tensor,
    max_rounds: int = 256,
    packs_per_round: int | None = None,
) -> torch.Tensor:
    """Swap items between packs until no pack exceeds target (or the heaviest pack has no helpful swap).

    Each round fixes up to packs_per_round (default P // 8, at least 1: the work per round then stays about
    R^2 / 8 per row) of the heaviest packs per row at once, each with a distinct partner outside that set.
    load: [X, P, S] float64 item loads; key: [X, P, S] int64 item keys; home: [X, P, K] bool, pack p holds
    key k now; target: [X] float64. Returns the rearranged key [X, P, S] (items only change packs; each pack
    keeps S).
    """
    load, key = load.clone(), key.clone()
    rows, num_packs, slots = load.shape
    limit = (target * (1 + _REL)).unsqueeze(-1)
    stuck = torch.zeros(rows, dtype=torch.bool)
    per_round = packs_per_round or max(1, num_packs // 8)
    for _ in range(max_rounds):
        pack_load = load.sum(-1)
        over = pack_load > limit
        todo = (over.any(-1) & ~stuck).nonzero().flatten()
        if not len(todo):
            break
        width = min(int(over[todo].sum(-1).max()), per_round, num_packs - 1)
        heavy = pack_load[todo].argsort(dim=-1, descending=True, stable=True)[:, :width]  # [A, J]
        score, index = _best_swaps(load[todo], key[todo], home[todo], heavy)
        stuck[todo[~torch.isfinite(score[:, 0])]] = True
        # Accept heavy packs in order; a partner serves one heavy pack per round.
        taken = torch.zeros(len(todo), num_packs, dtype=torch.bool)
        a_idx, q_idx = index // (num_packs * slots), (index // slots) % num_packs
        for j in range(width):
            q = q_idx[:, j]
            ok = torch.isfinite(score[:, j]) & over[todo].gather(-1, heavy[:, j : j + 1]).squeeze(-1)
            ok &= ~taken.gather(-1, q.unsqueeze(-1)).squeeze(-1)
            taken[ok, q[ok]] = True
            r, m, a, b = todo[ok], heavy[ok, j], a_idx[ok, j], (index % slots)[ok, j]
            load_a, key_a = load[r, m, a], key[r, m, a]
            load[r, m, a], key[r, m, a] = load[r, q[ok], b], key[r, q[ok], b]
            load[r, q[ok], b], key[r, q[ok], b] = load_a, key_a
    return key
