"""Cache-aware choice of a DP rank: consistent (rendezvous) hashing of the prompt prefix with bounded loads.

Requests that share a prefix should reach the rank whose radix cache already holds it, so each prefix has a
fixed preference order over ranks (highest-random-weight hashing of the prefix). The first rank in that order
whose load is under a bound takes the request; a hot prefix therefore spills to its second rank, then its
third, instead of piling onto one rank. DP ranks of an EP deployment step in lockstep, so the slowest rank
sets everyone's step time: the bound is kept tight.

The choice depends only on (prompt, loads), with a stable hash, so any number of ingress replicas that see the
same loads agree without sharing state.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


class CacheAwareRouter:
    """Pick the DP rank for a request.

    num_ranks:      number of DP ranks (attention replicas) that accept requests.
    block_size:     KV cache block size; only whole blocks of the prefix are hashed, because the radix cache
                    matches whole blocks only.
    prefix_tokens:  how many leading prompt tokens identify the prefix (rounded down to whole blocks).
    load_slack:     a rank may take a request while its load < (1 + load_slack) * mean load + 1.
    """

    def __init__(
        self, num_ranks: int, *, block_size: int = 16, prefix_tokens: int = 256, load_slack: float = 0.25
    ) -> None:
        if num_ranks < 1:
            raise ValueError(f"num_ranks={num_ranks} must be >= 1")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        if prefix_tokens < 1:
            raise ValueError(f"prefix_tokens={prefix_tokens} must be >= 1")
        if not load_slack >= 0.0:
            raise ValueError(f"load_slack={load_slack} must be >= 0")
        self.num_ranks = num_ranks
        self.block_size = block_size
        self.prefix_tokens = prefix_tokens
        self.load_slack = load_slack
        # Per-rank salts, fixed by the rank number only, so every replica computes the same weights.
        self._salts = [struct.pack("<I", r) for r in range(num_ranks)]

    def prefix_key(self, prompt_token_ids: Sequence[int]) -> bytes:
        """Stable 16-byte digest of the routing prefix of a prompt.

        The prefix is the first min(len, prefix_tokens) tokens rounded down to whole blocks; prompts shorter
        than one block use all their tokens.
        """
        n = min(len(prompt_token_ids), self.prefix_tokens)
        whole = n // self.block_size * self.block_size
        n = whole if whole > 0 else n
        data = struct.pack(f"<{n}q", *prompt_token_ids[:n])
        return hashlib.blake2b(data, digest_size=16).digest()

    def rank_order(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """All ranks, most preferred first, for this prompt's prefix (rendezvous hashing)."""
        key = self.prefix_key(prompt_token_ids)
        weights = [
            int.from_bytes(hashlib.blake2b(key + salt, digest_size=8).digest(), "little")
            for salt in self._salts
        ]
        # Ties are practically impossible with 64-bit weights; break them by rank for determinism anyway.
        return sorted(range(self.num_ranks), key=lambda r: (-weights[r], r))

    def route(self, prompt_token_ids: Sequence[int], loads: Sequence[int]) -> int:
        """Rank for a request, given each rank's current load (running + waiting requests).

        loads: [num_ranks] non-negative numbers, as seen by this ingress replica.
        """
        if len(loads) != self.num_ranks:
            raise ValueError(f"got {len(loads)} loads for {self.num_ranks} ranks")
        bound = (1.0 + self.load_slack) * (sum(loads) / self.num_ranks) + 1.0
        order = self.rank_order(prompt_token_ids)
        for rank in order:
            if loads[rank] < bound:
                return rank
        # Unreachable for non-negative loads (the least-loaded rank is <= mean < bound); kept for safety.
        return min(order, key=lambda r: loads[r])


def seen_loads(snapshot: Sequence[int], inflight: Sequence[int], inflight_at_snapshot: Sequence[int]) -> list[int]:
    """Per-rank load an ingress replica routes by: the controller's snapshot (every replica's requests, as the
    ranks last reported them), corrected by this replica's change in flight since it asked for it, and never
    below this replica's own requests in flight there. The floor matters in a burst: the ranks report a request
    only after their step loop has seen it, so a snapshot asked for mid-burst can miss requests this replica sent
    before asking, which the correction then does not count either (a clean-clone CI run routed 24 of a hot
    prefix's 40 requests to one of 4 ranks that way, session 28)."""
    return [max(now, snap + now - then) for snap, now, then in zip(snapshot, inflight, inflight_at_snapshot)]
