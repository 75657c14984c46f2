"""KVCacheManager: gives requests KV blocks, reusing cached prefix blocks and evicting idle ones if short."""

from __future__ import annotations

from collections.abc import Sequence

from moeserve.request import Request
from moeserve.scheduler.block_pool import BlockPool
from moeserve.scheduler.radix_cache import RadixCache


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    """Owns the block pool and (optionally) the prefix cache; the scheduler's only door to KV memory.

    A request's block table (request.block_ids) is a root path of the prefix cache for its full, computed
    blocks once they are cached, followed by blocks only it holds. Block ids of already computed positions can
    change between steps (a duplicate swapped for the cached copy with the same tokens), so the runner must
    use the table it is given each step.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, block_size)
        self.prefix_cache: RadixCache | None = RadixCache(self.pool) if enable_prefix_caching else None
        # Blocks of each running request already inserted into the prefix cache.
        self._num_inserted: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    # ---- stats -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could get now: free ones plus idle cached ones (evicted on demand)."""
        idle = self.prefix_cache.num_evictable_blocks if self.prefix_cache else 0
        return self.pool.num_free + idle

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (idle cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def num_cached_blocks(self) -> int:
        return self.prefix_cache.num_cached_blocks if self.prefix_cache else 0

    @property
    def num_evicted_blocks(self) -> int:
        return self.prefix_cache.num_evicted if self.prefix_cache else 0

    # ---- the request's life ------------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Cached blocks holding the start of the request's tokens, and how many tokens they cover.

        Never the whole sequence: at least one token is left to compute, because its logits give the next
        token. The blocks are not held yet; pass them to allocate_slots.
        """
        if self.prefix_cache is None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks = self.prefix_cache.match_prefix(request.all_token_ids[: max_blocks * self.block_size])
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Make request.block_ids cover its computed tokens, computed_blocks and num_new_tokens more.

        computed_blocks: from get_computed_blocks, only when the request has no blocks yet (admission); they
            become the head of its block table.
        Returns False, changing nothing, when the blocks cannot be found even by evicting idle cached blocks.
        """
        bs = self.block_size
        if computed_blocks:
            assert not request.block_ids and request.num_computed_tokens == 0, "only at admission"
        num_tokens = request.num_computed_tokens + len(computed_blocks) * bs + num_new_tokens
        need = blocks_for(num_tokens, bs) - len(request.block_ids) - len(computed_blocks)
        if need <= 0 and request.block_ids:
            return True  # the common decode step: the last block still has room
        # Locking an idle computed block takes it out of the evictable ones.
        idle_hits = sum(1 for b in computed_blocks if self.pool.ref_count(b) == 1)
        if need > self.num_free_blocks - idle_hits:
            return False
        if not request.block_ids and self.prefix_cache is not None:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(computed_blocks) * bs
        if computed_blocks:
            self.prefix_cache.lock(computed_blocks)
            request.block_ids = list(computed_blocks)
            self._num_inserted[request.request_id] = len(computed_blocks)
        if need > 0:
            short = need - self.pool.num_free
            if short > 0:
                evicted = self.prefix_cache.evict(short)
                assert evicted == short, "idle cached blocks must all be evictable"
            request.block_ids.extend(self.pool.allocate(need))
        return True

    def cache_blocks(self, request: Request) -> None:
        """After a step: put the request's newly computed full blocks into the prefix cache.

        A block whose tokens were cached meanwhile by another request is swapped for the cached copy (same
        tokens at the same positions, so the same keys and values) and freed. With asynchronous scheduling the
        computed tokens may run past the known ones (inputs still placeholders for tokens in flight): a block
        is cached only once every token in it is known, since the placeholder is no key.
        """
        if self.prefix_cache is None:
            return
        num_full = min(request.num_computed_tokens, request.num_known_tokens) // self.block_size
        done = self._num_inserted.get(request.request_id, 0)
        if num_full <= done:
            return
        cached = self.prefix_cache.insert(
            request.all_token_ids[: num_full * self.block_size], request.block_ids, start_block=done
        )
        for i in range(done, num_full):
            own = request.block_ids[i]
            if cached[i] != own:
                self.prefix_cache.lock([cached[i]])
                self.pool.free([own])
                request.block_ids[i] = cached[i]
        self._num_inserted[request.request_id] = num_full

    def reset_prefix_cache(self) -> int:
        """Forget every idle cached prefix (blocks in use stay until their requests finish); returns how many
        blocks were freed. For a clean measurement, or after the model's weights changed."""
        if self.prefix_cache is None:
            return 0
        return self.prefix_cache.evict(self.prefix_cache.num_evictable_blocks)

    def free(self, request: Request) -> None:
        """Release the request's blocks. Cached ones stay in the cache (idle) for later requests."""
        blocks = request.block_ids
        # Tail first: the tail is the least likely to be shared, so it looks older in LRU order.
        for b in reversed(blocks):
            if self.prefix_cache is not None and b in self.prefix_cache:
                self.prefix_cache.unlock([b])
            else:
                self.pool.free([b])
        request.block_ids = []
        self._num_inserted.pop(request.request_id, None)
