"""The attention-backend interface every backend implements, and the factory that picks one."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from moeserve.forward_batch import AttentionMetadata


class AttentionBackend(ABC):
    """Writes new keys/values into the paged cache and attends over each request's cached context.

    Cache layout, per layer: ``k_cache [num_blocks, block_size, num_kv_heads, head_dim_k]`` and
    ``v_cache [num_blocks, block_size, num_kv_heads, head_dim_v]``. MLA stores one latent per token
    (``num_kv_heads = 1``, ``head_dim_k = kv_lora_rank + rope_dim``) and passes ``v_cache`` as the view
    ``k_cache[..., :kv_lora_rank]``, so the latent is stored once.
    """

    name: str = "base"
    # Whether `before_graph_replay` does anything: the graph runner calls it before replays only then.
    plans_graph_replays: bool = False
    # Whether `write_kv` stores k and v as they are (cast to the caches' dtype) at meta.slot_mapping, so that a
    # kernel producing k may store both itself instead (the fused rotary kernel does). A backend whose write_kv
    # does more (say, quantises) sets it False.
    writes_by_slot: bool = True

    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor | None,
        k: torch.Tensor,
        v: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> None:
        """Store the step's new entries. k: [num_tokens, num_kv_heads, head_dim_k]; v likewise or None when
        the value cache is a view of the key cache (MLA)."""
        nb, bs = k_cache.shape[0], k_cache.shape[1]
        k_cache.view(nb * bs, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        if v is not None:
            assert v_cache is not None
            v_cache.view(nb * bs, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

    def before_graph_replay(self, meta: AttentionMetadata) -> None:
        """Host-side preparation a captured decode batch needs (e.g. a kernel library's per-step schedule),
        called before the warm-up run that precedes each capture and, when `plans_graph_replays`, before every
        replay; meta is the graph's batch (static device buffers, host seq_lens of the padded batch). Backends
        whose kernels read only the device buffers need nothing."""
        return None

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of each request's new queries over its whole cached context.

        q: [num_tokens, num_q_heads, head_dim_k]; num_q_heads is a multiple of num_kv_heads (GQA/MQA).
        Returns [num_tokens, num_q_heads, head_dim_v] in q's dtype. The new tokens' K/V are already written.
        """


def create_attention_backend(name: str = "auto", device: torch.device | str = "cpu") -> AttentionBackend:
    """Pick a backend by name: "torch" (reference, any device), "triton" (CUDA), "auto" (best available),
    "flashinfer" (CUDA with the optional flashinfer package; decode through FlashInfer, the rest Triton)."""
    from moeserve.attention.torch_backend import TorchAttentionBackend
    from moeserve.backend_choice import ATTENTION_BACKENDS, choose_backend

    if name == "flashinfer":
        from moeserve.attention.flashinfer_backend import FlashInferAttentionBackend

        try:
            return FlashInferAttentionBackend(device)
        except (ImportError, ValueError) as exc:  # no CUDA device, or no importable flashinfer package
            raise ValueError(f"{exc}; the other choices, 'auto', 'torch' and 'triton' (CUDA), need no extra "
                             "package") from None
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; allowed: {', '.join(map(repr, ATTENTION_BACKENDS))}")

    def make_triton() -> AttentionBackend:
        from moeserve.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()

    return choose_backend("attention backend", name, device, TorchAttentionBackend, make_triton)
