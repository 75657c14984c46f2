"""RadixCache: a prefix tree over FULL KV blocks, so requests sharing a prompt prefix share its blocks.

Each edge is one full block of token ids (a tuple of block_size ids); the node it leads to names the block
holding those tokens' keys and values. Only full blocks are cached: a partly filled block is still being
written by its request.

Holders: the cache keeps one reference (in the BlockPool) on every cached block, and each request using the
block keeps another. So a cached block with reference count 1 is idle; idle blocks are evicted
least-recently-used first, leaves before their parents (a parent becomes evictable once its children are
gone). Requests always hold a root-to-node path, so an idle node never has a busy descendant and every idle
block can eventually be evicted: `num_evictable_blocks` blocks are really available.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from moeserve.scheduler.block_pool import BlockPool


@dataclass(slots=True, eq=False)
class _Node:
    key: tuple[int, ...]  # the block's token ids (empty for the root)
    block_id: int
    parent: _Node | None
    depth: int  # blocks from the root to here, inclusive: this block holds positions [(depth-1)*B, depth*B)
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    last_access: int = 0


class RadixCache:
    """Prefix cache of full blocks; see the module docstring for the holding rules."""

    def __init__(self, block_pool: BlockPool) -> None:
        self.pool = block_pool
        self.block_size = block_pool.block_size
        self._root = _Node((), -1, None, 0)
        self._by_block: dict[int, _Node] = {}
        # A logical clock (not wall time) makes LRU order deterministic and every touch unique.
        self._clock = 0
        # Eviction candidates (last_access, block_id), validated lazily when popped: an entry is current only
        # if the node still exists, was not touched since, is a leaf and is idle.
        self._heap: list[tuple[int, int]] = []
        self._num_idle = 0
        self.num_evicted = 0

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_block)

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks no request holds (all can be evicted, leaves first)."""
        return self._num_idle

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._by_block

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids of the longest cached run of full blocks at the start of token_ids; marks them used now.

        Does not take a reference: call lock() on the blocks before anything can evict them.
        """
        bs, node, out = self.block_size, self._root, []
        for i in range(len(token_ids) // bs):
            child = node.children.get(tuple(token_ids[i * bs : (i + 1) * bs]))
            if child is None:
                break
            self._touch(child)
            out.append(child.block_id)
            node = child
        return out

    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int], start_block: int = 0) -> list[int]:
        """Cache the full blocks of a sequence; returns the cached block id of each of them.

        token_ids: the sequence from position 0; only its len // block_size full blocks are inserted.
        block_ids: the caller's blocks holding those tokens (the caller holds a reference to each).
        start_block: blocks [0, start_block) are known to be cached already as block_ids[:start_block]
            (a previous insert of the same request), so the walk starts below them.
        Returns ids[i] for each full block i: block_ids[i] when it was added (the cache takes its own
        reference), or the block that already cached those tokens, in which case block_ids[i] is a
        duplicate the caller may swap for ids[i] and free.
        """
        bs = self.block_size
        num_full = len(token_ids) // bs
        assert len(block_ids) >= num_full, "every full block needs a block id"
        node = self._root
        if start_block > 0:
            node = self._by_block[block_ids[start_block - 1]]
            assert node.depth == start_block, "start_block does not match the cached path"
        out = list(block_ids[:start_block])
        for i in range(start_block, num_full):
            key = tuple(token_ids[i * bs : (i + 1) * bs])
            child = node.children.get(key)
            if child is None:
                block = block_ids[i]
                assert block not in self._by_block, f"block {block} already caches another prefix"
                self.pool.incref([block])  # the cache's own hold; the caller's keeps it busy for now
                child = _Node(key, block, node, node.depth + 1)
                node.children[key] = child
                self._by_block[block] = child
            self._touch(child)
            out.append(child.block_id)
            node = child
        return out

    def lock(self, block_ids: Sequence[int]) -> None:
        """A request starts using these cached blocks: they cannot be evicted until unlocked."""
        for b in block_ids:
            assert b in self._by_block, f"block {b} is not cached"
            if self.pool.ref_count(b) == 1:
                self._num_idle -= 1
            self.pool.incref([b])

    def unlock(self, block_ids: Sequence[int]) -> None:
        """A request stops using these cached blocks; they stay cached and count as used now."""
        for b in block_ids:
            node = self._by_block[b]
            assert self.pool.ref_count(b) >= 2, f"cached block {b} is not locked"
            self.pool.decref([b])
            if self.pool.ref_count(b) == 1:
                self._num_idle += 1
            self._touch(node)

    def evict(self, num_blocks: int) -> int:
        """Free up to num_blocks idle blocks, least recently used leaves first; returns how many it freed."""
        evicted = 0
        while evicted < num_blocks and self._heap:
            stamp, b = heapq.heappop(self._heap)
            node = self._by_block.get(b)
            if node is None or node.last_access != stamp or not self._is_evictable_leaf(node):
                continue  # stale entry; a current one exists if the node is an idle leaf
            self._remove(node)
            evicted += 1
        return evicted

    # ---- internals -----------------------------------------------------------------------------------
    def _is_evictable_leaf(self, node: _Node) -> bool:
        return not node.children and self.pool.ref_count(node.block_id) == 1

    def _touch(self, node: _Node) -> None:
        self._clock += 1
        node.last_access = self._clock
        if self._is_evictable_leaf(node):
            self._push(node)

    def _push(self, node: _Node) -> None:
        heapq.heappush(self._heap, (node.last_access, node.block_id))
        if len(self._heap) > 2 * len(self._by_block) + 64:
            # Too many stale entries: rebuild from the current idle leaves.
            self._heap = [(n.last_access, b) for b, n in self._by_block.items() if self._is_evictable_leaf(n)]
            heapq.heapify(self._heap)

    def _remove(self, node: _Node) -> None:
        parent = node.parent
        assert parent is not None
        del parent.children[node.key]
        del self._by_block[node.block_id]
        self.pool.decref([node.block_id])  # the cache's hold was the last one: back to the free list
        self._num_idle -= 1
        self.num_evicted += 1
        if parent is not self._root and self._is_evictable_leaf(parent):
            self._push(parent)

    def cached_prefixes(self) -> dict[tuple[int, ...], int]:
        """Every cached prefix (tokens from position 0, a multiple of block_size long) -> its last block.

        For tests and debugging; costs a walk of the whole tree.
        """
        out: dict[tuple[int, ...], int] = {}
        stack: list[tuple[_Node, tuple[int, ...]]] = [(self._root, ())]
        while stack:
            node, prefix = stack.pop()
            for key, child in node.children.items():
                out[prefix + key] = child.block_id
                stack.append((child, prefix + key))
        return out
