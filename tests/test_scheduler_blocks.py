"""BlockPool reference counting and KVCacheManager: prefix hits, allocation with eviction, dedup, release."""

from __future__ import annotations

import random

import pytest

from moeserve.request import Request
from moeserve.sampling_params import SamplingParams
from moeserve.scheduler.block_pool import BlockPool
from moeserve.scheduler.kv_cache_manager import KVCacheManager


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(request_id=rid, prompt_token_ids=tokens, sampling_params=SamplingParams())


def _run_prefill(kv: KVCacheManager, req: Request) -> None:
    """Admit req (prefix-cache hit + allocation) and pretend its whole prompt was computed."""
    blocks, num_cached = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_cached, blocks)
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req)


# ---- BlockPool ----------------------------------------------------------------------------------------
def test_pool_reference_counts_against_a_counter_model():
    rng = random.Random(0)
    pool = BlockPool(16, 4)
    held: dict[int, int] = {}
    for _ in range(500):
        op = rng.random()
        if op < 0.4 and pool.num_free:
            for b in pool.allocate(rng.randint(1, pool.num_free)):
                assert b not in held
                held[b] = 1
        elif op < 0.6 and held:
            b = rng.choice(list(held))
            pool.incref([b])
            held[b] += 1
        elif held:
            b = rng.choice(list(held))
            freed = pool.decref([b])
            held[b] -= 1
            assert freed == ([b] if held[b] == 0 else [])
            if held[b] == 0:
                del held[b]
        assert pool.num_free == 16 - len(held)
        assert pool.usage == pytest.approx(len(held) / 16)
        assert all(pool.ref_count(b) == n for b, n in held.items())


def test_pool_refuses_what_it_cannot_do():
    pool = BlockPool(3, 4)
    blocks = pool.allocate(3)
    with pytest.raises(RuntimeError, match="cannot allocate 1 KV blocks: only 0 of 3 are free"):
        pool.allocate(1)
    pool.incref(blocks[:1])
    with pytest.raises(AssertionError):
        pool.free(blocks[:1])  # two holders: free() is for the sole holder
    pool.free(blocks[1:])
    assert pool.num_free == 2
    with pytest.raises(AssertionError):
        pool.decref(blocks[1:2])  # already free


# ---- KVCacheManager -----------------------------------------------------------------------------------
def test_prefix_hit_never_covers_the_whole_sequence():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    _run_prefill(kv, _request("a", list(range(12))))  # 3 full blocks cached
    same = _request("b", list(range(12)))
    blocks, n = kv.get_computed_blocks(same)
    assert n == 8 and len(blocks) == 2  # the last token (and so its block) is recomputed
    longer = _request("c", list(range(13)))
    blocks, n = kv.get_computed_blocks(longer)
    assert n == 12 and len(blocks) == 3


def test_shared_prefix_blocks_are_reused_and_counted():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = _request("a", list(range(10)))
    _run_prefill(kv, a)
    b = _request("b", list(range(8)) + [50, 51, 52])
    _run_prefill(kv, b)
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert kv.prefix_cache_queries == 21 and kv.prefix_cache_hits == 8
    assert kv.hit_rate == pytest.approx(8 / 21)
    assert kv.pool.ref_count(a.block_ids[0]) == 3  # a, b and the cache


def test_duplicate_block_is_swapped_for_the_cached_copy():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a, b = _request("a", list(range(9))), _request("b", list(range(9)))
    # Both admitted before either computed anything: both miss the cache and fill their own blocks.
    for r in (a, b):
        blocks, n = kv.get_computed_blocks(r)
        assert n == 0 and kv.allocate_slots(r, 9, blocks)
    for r in (a, b):
        r.num_computed_tokens = 9
        kv.cache_blocks(r)
    assert b.block_ids[:2] == a.block_ids[:2]  # b's copies of the two full blocks were given back
    assert kv.pool.num_free == 16 - 4  # 2 shared full blocks + one partial block each
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free == 14 and kv.num_cached_blocks == 2 and kv.usage == 0.0


def test_allocation_evicts_idle_cache_and_fails_cleanly():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = _request("a", list(range(17)))  # 5 blocks, 4 of them full
    _run_prefill(kv, a)
    kv.free(a)
    assert kv.pool.num_free == 2 and kv.num_cached_blocks == 4 and kv.num_free_blocks == 6
    big = _request("big", [99] * 24)  # needs all 6 blocks: the whole cache is evicted
    assert kv.allocate_slots(big, 24)
    assert kv.num_cached_blocks == 0 and kv.num_evicted_blocks == 4 and kv.pool.num_free == 0
    other = _request("other", [1, 2, 3])
    assert not kv.allocate_slots(other, 3)
    assert other.block_ids == [] and kv.prefix_cache_queries == 17 + 24  # a failed try counts nothing


def test_locked_prefix_is_not_counted_as_available():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = _request("a", list(range(12)))
    _run_prefill(kv, a)
    kv.free(a)  # 3 idle cached blocks + 1 free
    b = _request("b", list(range(12)) + [7, 7, 7, 7, 7])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 12
    # Locking the 3 hit blocks leaves 1 block: too few for 9 more tokens (3 blocks), enough for 4 (1 block).
    assert not kv.allocate_slots(b, 9, blocks)
    assert b.block_ids == [] and kv.num_cached_blocks == 3
    assert kv.allocate_slots(b, 4, blocks) and b.block_ids[:3] == blocks


def test_growth_is_block_granular():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    r = _request("r", [1] * 5)
    assert kv.allocate_slots(r, 5) and len(r.block_ids) == 2
    r.num_computed_tokens = 5
    for total in range(6, 13):
        assert kv.allocate_slots(r, 1)
        assert len(r.block_ids) == -(-total // 4)
        r.num_computed_tokens = total
    kv.cache_blocks(r)  # no prefix cache: nothing to do
    kv.free(r)
    assert kv.pool.num_free == 8 and kv.prefix_cache_queries == 0 and kv.hit_rate == 0.0
