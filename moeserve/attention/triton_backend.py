"""Triton attention over the paged cache: split-KV decode, MLA latent decode, prefill/extend with a prefix.

Which kernel runs depends on the step and the cache layout only:
- every request computes one token (``meta.max_query_len == 1``): a decode kernel;
  the MLA layout (one latent head, ``v_cache`` a prefix view of ``k_cache``) takes the latent kernel, which
  reads each latent once as both key and value: on Hopper with DeepSeek's 512 + 64 latent the warp-specialised
  Gluon kernel (`use_mla_gluon`), else the Triton kernel (its TMA variant on Hopper with 64-token pages and
  >= 64 heads, `use_mla_tma`);
- otherwise (prefill, chunked prefill, mixed steps): the extend kernel.
"""

from __future__ import annotations

import logging

import torch
import triton

from moeserve.attention.base import AttentionBackend
from moeserve.forward_batch import AttentionMetadata
from moeserve.kernels.attention_decode import paged_decode_attention
from moeserve.kernels.attention_prefill import extend_attention
from moeserve.kernels.kv_store import store_kv
from moeserve.kernels.mla_decode import mla_decode_attention, mla_gluon_skipped_because, use_mla_tma

logger = logging.getLogger(__name__)


def mla_lora_rank(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int | None:
    """kv_lora_rank when ``v_cache`` is ``k_cache[..., :rank]`` over one latent head (MLA), else None.

    The latent kernel also needs rank and rope width to be powers of two of at least 16 (`tl.dot` needs
    K >= 16); other shapes return None and run the generic decode kernel, which reads V separately.
    """
    if k_cache.shape[2] != 1 or v_cache.data_ptr() != k_cache.data_ptr():
        return None
    if v_cache.stride() != k_cache.stride() or v_cache.shape[:3] != k_cache.shape[:3]:
        return None
    rank, rope = v_cache.shape[-1], k_cache.shape[-1] - v_cache.shape[-1]
    if min(rank, rope) < 16 or triton.next_power_of_2(rank) != rank or triton.next_power_of_2(rope) != rope:
        return None
    return rank


class TritonAttentionBackend(AttentionBackend):
    """Fast paths for CUDA (and the Triton interpreter); same results as `TorchAttentionBackend`."""

    name = "triton"
    _mla_kernel_logged = False

    def log_mla_kernel(self, q: torch.Tensor, k_cache: torch.Tensor, rank: int) -> str:
        """Log (once per backend) which MLA decode kernel the model's decode steps take, and why; returns the
        line. The choice depends only on the device, dtypes, latent shape and page size, fixed for a model."""
        self._mla_kernel_logged = True
        why_not = mla_gluon_skipped_because(q, k_cache, rank)
        if why_not is None:
            line = "MLA decode: the warp-specialised Gluon kernel (Hopper)"
        else:
            loads = "TMA tiles" if use_mla_tma(q, k_cache) else "pointer loads"
            line = f"MLA decode: the Triton kernel ({loads}); not the Gluon kernel: {why_not}"
        logger.info(line)
        return line

    def write_kv(self, k_cache, v_cache, k, v, meta) -> None:
        """As `AttentionBackend.write_kv`, with K and V stored in one launch when both are given."""
        if v is None or v_cache is None or not store_kv(k, v, k_cache, v_cache, meta.slot_mapping):
            super().write_kv(k_cache, v_cache, k, v, meta)

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q: [num_tokens, num_q_heads, head_dim_k] -> [num_tokens, num_q_heads, head_dim_v] in q's dtype."""
        q = q if q.stride(-1) == 1 else q.contiguous()
        if q.shape[0] == 0:
            return q.new_empty(0, q.shape[1], v_cache.shape[-1])
        if meta.max_query_len == 1:
            assert q.shape[0] == meta.num_reqs, "a decode step has exactly one query per request"
            rank = mla_lora_rank(k_cache, v_cache)
            if rank is not None:
                if not self._mla_kernel_logged:  # the first decode step: graph capture, at start-up
                    self.log_mla_kernel(q, k_cache, rank)
                return mla_decode_attention(q, k_cache, meta.block_tables, meta.seq_lens, scale, rank,
                                            meta.max_seq_len, kernel="auto")
            return paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len
            )
        return extend_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
            meta.max_query_len,
        )
