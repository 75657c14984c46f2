"""Pure-torch attention over the paged cache: the reference every faster backend is tested against."""

from __future__ import annotations

import torch

from moeserve.attention.base import AttentionBackend
from moeserve.forward_batch import AttentionMetadata


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """cache: [num_blocks, block_size, heads, dim]; block_table: [max_blocks] int32 -> [seq_len, heads, dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(num_blocks * block_size, *cache.shape[2:])[:seq_len]


class TorchAttentionBackend(AttentionBackend):
    """One request at a time; softmax in float32. Correct on CPU and CUDA, fast on neither."""

    name = "torch"

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if meta.max_query_len == 1 and q.shape[0] == meta.num_reqs:
            return _decode(q, k_cache, v_cache, meta, scale)
        num_q_heads = q.shape[1]
        out = q.new_empty(q.shape[0], num_q_heads, v_cache.shape[-1])
        qsl = meta.query_start_loc_cpu
        for i, seq_len in enumerate(meta.seq_lens_cpu):
            lo, hi = qsl[i], qsl[i + 1]
            if hi == lo:
                continue
            k = gather_context(k_cache, meta.block_tables[i], seq_len).float()
            v = gather_context(v_cache, meta.block_tables[i], seq_len).float()
            group = num_q_heads // k.shape[1]
            k = k.repeat_interleave(group, dim=1)  # [S, Hq, Dk]
            v = v.repeat_interleave(group, dim=1)  # [S, Hq, Dv]
            qi = q[lo:hi].float()  # [n, Hq, Dk]
            scores = torch.einsum("nhd,shd->hns", qi, k) * scale
            # New token j sits at absolute position seq_len - n + j and sees positions <= its own.
            n = hi - lo
            q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
            k_pos = torch.arange(seq_len, device=q.device)
            scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[lo:hi] = torch.einsum("hns,shd->nhd", probs, v).to(q.dtype)
        return out


def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One new token per request, all requests at once: contexts padded to the longest and masked."""
    num_reqs, num_q_heads, _ = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = (meta.max_seq_len + block_size - 1) // block_size
    table = meta.block_tables[:, :num_blocks].long()
    k = k_cache[table].reshape(num_reqs, num_blocks * block_size, num_kv_heads, -1).float()
    v = v_cache[table].reshape(num_reqs, num_blocks * block_size, num_kv_heads, -1).float()
    qg = q.float().reshape(num_reqs, num_kv_heads, num_q_heads // num_kv_heads, -1)
    scores = torch.einsum("bkgd,bskd->bkgs", qg, k) * scale
    past_end = torch.arange(k.shape[1], device=q.device)[None, :] >= meta.seq_lens[:, None]
    scores.masked_fill_(past_end[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgs,bskd->bkgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(num_reqs, num_q_heads, -1).to(q.dtype)
