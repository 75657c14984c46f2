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
