"""Pure-torch references for the paged attention kernels (float32 math, one request at a time).

Semantics match `moeserve.attention.torch_backend.TorchAttentionBackend`; these take the kernels' own argument
lists so tests and benchmarks can call kernel and reference the same way.
"""

from __future__ import annotations

import itertools

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
        k = gather_paged(k_cache, block_tables[i], seq_len).float()  # [S, Hkv, Dk]
        v = gather_paged(v_cache, block_tables[i], seq_len).float()  # [S, Hkv, Dv]
        n, hkv = hi - lo, k.shape[1]
        qi = q[lo:hi].float().view(n, hkv, -1, q.shape[-1])  # query heads grouped by their KV head
        scores = torch.einsum("nkgd,skd->kgns", qi, k) * scale
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, None, None, :] > q_pos[None, None, :, None], float("-inf"))
        o = torch.einsum("kgns,skd->nkgd", torch.softmax(scores, dim=-1), v)
        out[lo:hi] = o.reshape(n, q.shape[1], -1).to(out_dtype)
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
    """Absorbed-MLA decode: q [R, H, lora + rope] over kv_cache [NB, P, 1, lora + rope] -> [R, H, lora]."""
    v_cache = kv_cache[..., :kv_lora_rank]
    return paged_decode_attention_ref(q, kv_cache, v_cache, block_tables, seq_lens, scale)


# Random inputs in the kernels' layout, shared by the tests and the benchmark.


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_paged_cache(
    seq_lens: list[int], page: int, kv_heads: int, dk: int, dv: int | None, dtype: torch.dtype,
    device: str = "cpu", seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Random caches with each request's blocks scattered over the pool (plus spare blocks).

    Returns k_cache [NB, page, Hkv, dk], v_cache [NB, page, Hkv, dv] (None if dv is None),
    block_tables [R, max_blocks] int32 (padded with 0), seq_lens [R] int32.
    """
    g = torch.Generator().manual_seed(seed)
    counts = [(n + page - 1) // page for n in seq_lens]
    num_blocks = sum(counts) + 3
    k_cache = torch.randn(num_blocks, page, kv_heads, dk, generator=g).to(dtype).to(device)
    v_cache = None
    if dv is not None:
        v_cache = torch.randn(num_blocks, page, kv_heads, dv, generator=g).to(dtype).to(device)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(counts), dtype=torch.int32)
    for i, (lo, n) in enumerate(zip(itertools.accumulate([0] + counts), counts)):
        tables[i, :n] = perm[lo : lo + n]
    return k_cache, v_cache, tables.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device)


def query_start_loc(query_lens: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device=device)
