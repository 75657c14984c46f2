"""Two-batch overlap (TBO): split a step into two micro-batches whose communication and compute interleave.

Each micro-batch runs as a generator that yields at its communication points (after `dispatch_begin` and
after `combine_begin`); `run_overlapped` advances the generators in turn, so while one micro-batch's tokens
travel the other computes. Every EP rank must run the same number of micro-batches with the same yield points
(a rank with nothing to split runs an empty second micro-batch), so collectives meet in the same order.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

MicroBatch = Generator[None, None, Any]


def split_for_tbo(token_counts: list[int], *, min_fraction: float = 0.25) -> int | None:
    """The request index i that splits a step into requests [:i] and [i:] of near-equal token counts.

    token_counts: tokens each request computes this step, in batch order. Returns None when there are fewer
    than two requests or the smaller micro-batch would hold less than `min_fraction` of the tokens (too
    lopsided for the overlap to pay). Ties go to the smaller index."""
    if len(token_counts) < 2:
        return None
    total = sum(token_counts)
    best_i, best_gap, prefix = None, None, 0
    for i in range(1, len(token_counts)):
        prefix += token_counts[i - 1]
        gap = abs(2 * prefix - total)
        if best_gap is None or gap < best_gap:
            best_i, best_gap = i, gap
    smaller = (total - best_gap) // 2
    if total == 0 or smaller < min_fraction * total:
        return None
    return best_i


def tbo_cut(token_counts: list[int]) -> int:
    """Where a TBO step splits its requests: `split_for_tbo`'s index, or all requests in the first micro-batch
    (the second then runs empty) when there is no useful split. The engine tells the other ranks the first
    micro-batch's tokens from it, and the runner splits by it."""
    cut = split_for_tbo(token_counts)
    return len(token_counts) if cut is None else cut


def run_overlapped(stage_gens: list[MicroBatch]) -> list[Any]:
    """Advance each generator by one stage in turn until all finish; returns their return values in order.

    The order of stages is fixed (round robin over unfinished generators), hence identical on every rank."""
    results: list[Any] = [None] * len(stage_gens)
    active = list(range(len(stage_gens)))
    while active:
        still_running = []
        for i in active:
            try:
                next(stage_gens[i])
            except StopIteration as stop:
                results[i] = stop.value
            else:
                still_running.append(i)
        active = still_running
    return results


def drive(stages: Generator[None, None, Any]) -> Any:
    """Run one staged computation to its end (TBO off) and return its value."""
    while True:
        try:
            next(stages)
        except StopIteration as stop:
            return stop.value


def run_sequential(stage_gens: list[MicroBatch]) -> list[Any]:
    """Run each generator to completion, one after another (TBO off, same stages); for comparisons."""
    return [run_overlapped([gen])[0] for gen in stage_gens]
