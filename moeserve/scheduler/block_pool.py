"""BlockPool: which KV blocks are free, and how many holders each used block has."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class BlockPool:
    """Fixed set of block ids [0, num_blocks) with reference counts.

    A block is free (in the free list, count 0) or held (count >= 1). Holders are requests and the prefix
    cache; a block returns to the free list when its last holder lets go. Freed blocks go to the back of the
    list, so a just-released block is reused last (it is the most likely to be wanted again).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must both be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by anyone (requests or the prefix cache)."""
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks, each with one holder (the caller). Check num_free first."""
        if n > len(self._free):
            free, total = len(self._free), self.num_blocks
            raise RuntimeError(f"cannot allocate {n} KV blocks: only {free} of {total} are free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        return out

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add a holder to blocks that are already held."""
        for b in block_ids:
            assert self._ref[b] > 0, f"block {b} is free; allocate it instead of increfing"
            self._ref[b] += 1

    def decref(self, block_ids: Iterable[int]) -> list[int]:
        """Drop one holder of each block; returns the blocks that became free."""
        freed = []
        for b in block_ids:
            assert self._ref[b] > 0, f"block {b} is already free"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
                freed.append(b)
        return freed

    def free(self, block_ids: Iterable[int]) -> None:
        """Release blocks the caller holds alone."""
        for b in block_ids:
            assert self._ref[b] == 1, f"block {b} has {self._ref[b]} holders; free() is for sole holders"
            self._ref[b] = 0
            self._free.append(b)
