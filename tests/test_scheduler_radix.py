"""RadixCache against a reference: a dict from cached prefixes (whole blocks of tokens) to block ids, with LRU
stamps and per-block lock counts, evicting the least recently used unlocked prefix that no longer prefix
extends, one at a time."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from moeserve.scheduler.block_pool import BlockPool
from moeserve.scheduler.radix_cache import RadixCache

BS = 2  # tiny blocks and a 3-token alphabet so that prefixes are shared often
NUM_BLOCKS = 24


class RefCache:
    """Simple model of the prefix cache: prefix tuple -> block id."""

    def __init__(self) -> None:
        self.blocks: dict[tuple[int, ...], int] = {}
        self.stamp: dict[tuple[int, ...], int] = {}
        self.locks: dict[int, int] = {}
        self.clock = 0

    def touch(self, prefix: tuple[int, ...]) -> None:
        self.clock += 1
        self.stamp[prefix] = self.clock

    def match(self, tokens: list[int]) -> list[int]:
        out = []
        for k in range(1, len(tokens) // BS + 1):
            prefix = tuple(tokens[: k * BS])
            if prefix not in self.blocks:
                break
            self.touch(prefix)
            out.append(self.blocks[prefix])
        return out

    def insert(self, tokens: list[int], block_ids: list[int]) -> list[int]:
        out = []
        for k in range(1, len(tokens) // BS + 1):
            prefix = tuple(tokens[: k * BS])
            self.blocks.setdefault(prefix, block_ids[k - 1])
            self.touch(prefix)
            out.append(self.blocks[prefix])
        return out

    def prefix_of(self, block: int) -> tuple[int, ...]:
        return next(p for p, b in self.blocks.items() if b == block)

    def unlock(self, block_ids: list[int]) -> None:
        for b in block_ids:
            self.locks[b] -= 1
            self.touch(self.prefix_of(b))

    def evictable(self) -> list[tuple[int, ...]]:
        has_child = {p[:-BS] for p in self.blocks}
        return [p for p, b in self.blocks.items() if p not in has_child and self.locks.get(b, 0) == 0]

    def evict(self, n: int) -> int:
        for done in range(n):
            candidates = self.evictable()
            if not candidates:
                return done
            del self.blocks[min(candidates, key=self.stamp.__getitem__)]
        return n


class RadixMachine(RuleBasedStateMachine):
    """Requests come (match, lock, allocate, insert, swap duplicates), go (unlock) and eviction runs."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS, BS)
        self.cache = RadixCache(self.pool)
        self.ref = RefCache()
        self.live: list[list[int]] = []  # block tables of live requests (all cached)

    @rule(tokens=st.lists(st.integers(0, 2), max_size=10))
    def admit(self, tokens):
        hit = self.cache.match_prefix(tokens)
        assert hit == self.ref.match(tokens)
        num_full = len(tokens) // BS
        need = num_full - len(hit)
        idle_hits = sum(self.pool.ref_count(b) == 1 for b in hit)
        if need > self.pool.num_free + self.cache.num_evictable_blocks - idle_hits:
            return
        self.cache.lock(hit)
        for b in hit:
            self.ref.locks[b] += 1
        short = need - self.pool.num_free
        if short > 0:
            assert self.cache.evict(short) == self.ref.evict(short) == short
        own = hit + self.pool.allocate(need)
        cached = self.cache.insert(tokens, own)
        assert cached == self.ref.insert(tokens, own)
        for i, (mine, kept) in enumerate(zip(own, cached)):
            if mine != kept:  # a duplicate: take the cached copy, give ours back
                self.cache.lock([kept])
                self.pool.free([mine])
                own[i] = kept
        for b in own[len(hit) :]:
            self.ref.locks[b] = self.ref.locks.get(b, 0) + 1
        self.live.append(own)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        table = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.cache.unlock(table[::-1])
        self.ref.unlock(table[::-1])

    @rule(tokens=st.lists(st.integers(0, 2), max_size=10))
    def lookup(self, tokens):
        assert self.cache.match_prefix(tokens) == self.ref.match(tokens)

    @rule(n=st.integers(0, 6))
    def evict(self, n):
        assert self.cache.evict(n) == self.ref.evict(n)

    @invariant()
    def same_contents(self):
        assert self.cache.cached_prefixes() == self.ref.blocks
        assert self.cache.num_cached_blocks == len(self.ref.blocks)
        locked = {b for table in self.live for b in table}
        assert self.cache.num_evictable_blocks == len(self.ref.blocks) - len(locked)
        # Every block is free, or held by the cache (+1 per live request using it).
        for b in range(NUM_BLOCKS):
            users = sum(table.count(b) for table in self.live)
            expected = users + (1 if b in self.cache else 0)
            assert self.pool.ref_count(b) == expected
        assert self.pool.num_free == NUM_BLOCKS - self.cache.num_cached_blocks


TestRadixAgainstReference = RadixMachine.TestCase
TestRadixAgainstReference.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)


def _filled(pool: BlockPool, cache: RadixCache, tokens: list[int]) -> list[int]:
    blocks = pool.allocate(len(tokens) // pool.block_size)
    assert cache.insert(tokens, blocks) == blocks
    return blocks


def test_locked_blocks_survive_eviction_and_parents_follow_children():
    pool = BlockPool(8, 4)
    cache = RadixCache(pool)
    a = _filled(pool, cache, list(range(12)))  # 3 blocks, a chain
    b = _filled(pool, cache, [100 + t for t in range(8)])  # 2 blocks, another chain
    cache.unlock(a)  # a idle, b still in use
    assert cache.num_evictable_blocks == 3
    assert cache.evict(10) == 3  # all of a, leaf first, nothing of b
    assert all(x not in cache for x in a) and all(x in cache for x in b)
    assert pool.num_free == 6
    assert cache.match_prefix(list(range(12))) == []
    assert cache.match_prefix([100 + t for t in range(8)] + [1, 2]) == b


def test_lru_order_and_match_refreshes():
    pool = BlockPool(8, 2)
    cache = RadixCache(pool)
    old = _filled(pool, cache, [1, 1])
    new = _filled(pool, cache, [2, 2])
    cache.unlock(old)
    cache.unlock(new)
    cache.match_prefix([1, 1, 5])  # "old" is now the most recently used
    assert cache.evict(1) == 1
    assert new[0] not in cache and old[0] in cache


def test_insert_resumes_below_known_blocks_and_reports_duplicates():
    pool = BlockPool(10, 2)
    cache = RadixCache(pool)
    first = _filled(pool, cache, [1, 2, 3, 4])
    mine = pool.allocate(3)
    # Blocks 0..1 of the second request hold the same tokens as `first`: the cached ones are reported back.
    out = cache.insert([1, 2, 3, 4, 5, 6], mine)
    assert out == [first[0], first[1], mine[2]]
    # Resume after the first two known blocks (e.g. the request's next step).
    more = pool.allocate(1)
    table = out + more
    assert cache.insert([1, 2, 3, 4, 5, 6, 7, 8], table, start_block=3) == table
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9]) == table
    with pytest.raises(AssertionError, match="start_block"):
        cache.insert([1, 2, 3, 4, 5, 6, 7, 8], [table[1], *table[1:]], start_block=1)
