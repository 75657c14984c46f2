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
    """Pack n items into num_packs packs of n / num_packs items, heaviest first. An item goes to a pack that holds
    a copy of its key now (home[x, pack, key] > 0, each copy used once) if that pack stays <= target with room
    left for its remaining items; otherwise to the lightest pack with room (DeepSeek's rule).

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
    load: torch.Tensor, key: torch.Tensor, home: torch.Tensor, peak: torch.Tensor, heavy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows [A] (load, key: [A, P, S]; home: [A, P, K] bool; peak, heavy: [A] load and index of the heaviest
    pack), the best swap of an item of the heaviest pack with an item of another pack: it must lower the pair's
    max below peak; fewest added transfers first, then the lowest resulting pair max.
    Returns (found [A] bool, flat index [A] into (S_heavy, P, S))."""
    rows, num_packs, slots = load.shape
    r = torch.arange(rows)
    pack_load = load.sum(-1)
    heavy_load, heavy_key = load[r, heavy], key[r, heavy]  # [A, S]
    # Added transfers, from who holds what now: item a leaves the heavy pack M for Q, item b goes Q -> M.
    # Scaled by COST_WEIGHT * peak so one transfer outweighs any balance difference (pair < peak).
    home = home.to(load.dtype)
    a_on_m = home[r, heavy].gather(-1, heavy_key)  # [A, S]
    a_on_q = home.gather(2, heavy_key.unsqueeze(1).expand(rows, num_packs, slots)).transpose(1, 2)  # [A, S, P]
    b_on_q = home.gather(2, key)  # [A, P, S]
    b_on_m = home[r, heavy].gather(-1, key.view(rows, -1)).view(rows, num_packs, slots)
    scale = (COST_WEIGHT * peak).view(rows, 1, 1)
    cost_a = ((a_on_m.unsqueeze(-1) - a_on_q) * scale).unsqueeze(-1)  # [A, S, P, 1]
    cost_b = ((b_on_q - b_on_m) * scale).unsqueeze(1)  # [A, 1, P, S]
    # A swap moves delta = w_a - w_b from M to Q; it helps iff both sides end below the peak (so delta > 0).
    delta = heavy_load[:, :, None, None] - load[:, None]  # [A, S, P, S]
    pair = torch.maximum(peak.view(rows, 1, 1, 1) - delta, pack_load[:, None, :, None] + delta)
    limit = (peak * (1 - _REL)).view(rows, 1, 1, 1)
    score = torch.where(pair < limit, pair + cost_a + cost_b, float("inf")).view(rows, -1)
    best, index = score.min(-1)
    return torch.isfinite(best), index


def repair_peaks(
    load: torch.Tensor, key: torch.Tensor, home: torch.Tensor, target: torch.Tensor, max_rounds: int = 256
) -> torch.Tensor:
    """Swap items between packs until no pack exceeds target (or no single swap lowers the heaviest pack).

    load: [X, P, S] float64 item loads; key: [X, P, S] int64 item keys; home: [X, P, K] bool, pack p holds key k
    now; target: [X] float64. Returns the rearranged key [X, P, S] (items only change packs; each pack keeps S).
    """
    load, key = load.clone(), key.clone()
    rows, num_packs, slots = load.shape
    limit = target * (1 + _REL)
    stuck = torch.zeros(rows, dtype=torch.bool)
    for _ in range(max_rounds):
        peak, heavy = load.sum(-1).max(-1)
        todo = ((peak > limit) & ~stuck).nonzero().flatten()
        if not len(todo):
            break
        found, index = _best_swaps(load[todo], key[todo], home[todo], peak[todo], heavy[todo])
        stuck[todo[~found]] = True
        r, index = todo[found], index[found]
        m, a = heavy[r], index // (num_packs * slots)
        q, b = (index // slots) % num_packs, index % slots
        load_a, key_a = load[r, m, a], key[r, m, a]
        load[r, m, a], key[r, m, a] = load[r, q, b], key[r, q, b]
        load[r, q, b], key[r, q, b] = load_a, key_a
    return key
