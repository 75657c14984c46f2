"""Pure-torch references for the paged attention kernels (float32 math, one request at a time).

Semantics match `moeserve.attention.torch_backend.TorchAttentionBackend`; these take the kernels' own argument
lists so tests and benchmarks can call kernel and reference the same way.
"""

from __future__ import annotations

import torch


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """cache: [num_blocks, block_size, heads, dim]; block_table: [max_blocks] int -> [seq_len, heads, dim]."""
    page = cache.shape[1]
    blocks = cache.index_select(0, block_table[: (seq_len + page - 1) // page].long())
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Causal attention of each request's new queries (the last ``q_len`` of its ``seq_len`` positions).

    q: [T, Hq, Dk]; k_cache: [NB, P, Hkv, Dk]; v_cache: [NB, P, Hkv, Dv]; query_start_loc: [R + 1];
    seq_lens: [R]; block_tables: [R, max_blocks]. Returns [T, Hq, Dv] in ``out_dtype``.
    """
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=out_dtype, device=q.device)
    for i, seq_len in enumerate(lens):
        lo, hi = qsl[i], qsl[i + 1]
        if hi == lo:
            continue
        k = gather_paged(k_cache, block_tables[i], seq_len).float()
        v = gather_paged(v_cache, block_tables[i], seq_len).float()
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,shd->hns", q[lo:hi].float(), k) * scale
        q_pos = torch.arange(seq_len - (hi - lo), seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[lo:hi] = torch.einsum("hns,shd->nhd", torch.softmax(scores, dim=-1), v).to(out_dtype)
    return out


def paged_decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Decode: q [R, Hq, Dk], one query per request -> [R, Hq, Dv] float32."""
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return paged_attention_ref(q, k_cache, v_cache, qsl, seq_lens, block_tables, scale)


def mla_decode_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    scale: float, kv_lora_rank: int,
) -> torch.Tensor:
    """Absorbed-MLA decode: q [R, H, lora + rope] over kv_cache [NB, P, 1, lora + rope] -> [R, H, lora] fp32."""
    return paged_decode_attention_ref(q, kv_cache, kv_cache[..., :kv_lora_rank], block_tables, seq_lens, scale)
