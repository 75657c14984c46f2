"""Attention over the paged KV cache: grouped-query attention and DeepSeek's multi-head latent attention.

Each module owns its projections and its bound cache tensors; the math over the cache is the
`AttentionBackend`'s (`write_kv` then `attend`). The runner allocates caches from `kv_cache_spec()` and hands
them over with `bind_kv_cache` before the first forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.attention.base import AttentionBackend
from moeserve.forward_batch import ForwardBatch
from moeserve.layers.linear import Linear
from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import KVCache, KVStore, RopeCache


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """The cache one attention layer needs: k ``[num_blocks, block_size, num_kv_heads, k_dim]`` and
    v ``[num_blocks, block_size, num_kv_heads, v_dim]``. When v_is_k_prefix (MLA), no v cache is allocated:
    v is the view ``k[..., :v_dim]``."""

    num_kv_heads: int
    k_dim: int
    v_dim: int
    v_is_k_prefix: bool = False


class _PagedAttention(nn.Module):
    """Holds the bound cache of one layer and checks it against the layer's spec."""

    def __init__(self, backend: AttentionBackend) -> None:
        super().__init__()
        self.backend = backend
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def kv_cache_spec(self) -> KVCacheSpec:
        raise NotImplementedError

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """k_cache: [num_blocks, block_size, num_kv_heads, k_dim]; v_cache likewise with v_dim."""
        spec = self.kv_cache_spec()
        want_k, want_v = (spec.num_kv_heads, spec.k_dim), (spec.num_kv_heads, spec.v_dim)
        if k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != want_k or tuple(v_cache.shape[2:]) != want_v:
            raise ValueError(
                f"KV cache shapes k={tuple(k_cache.shape)} v={tuple(v_cache.shape)} do not match the layer's "
                f"spec {spec} (want [blocks, block_size, {spec.num_kv_heads}, {spec.k_dim}/{spec.v_dim}])"
            )
        if spec.v_is_k_prefix and v_cache.data_ptr() != k_cache.data_ptr():
            raise ValueError(
                "this layer's v cache must be the view k_cache[..., :v_dim] (MLA stores one latent)"
            )
        self.k_cache, self.v_cache = k_cache, v_cache

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, batch: ForwardBatch, scale: float,
        written: bool = False,
    ):
        """q: [T, heads, k_dim]; k: [T, kv_heads, k_dim]; v: [T, kv_heads, v_dim] or None (MLA); written: k and v
        are already in the cache (see `_kv_store`). Returns [T, heads, v_dim]. A batch without tokens (idle rank)
        touches no cache."""
        if q.shape[0] == 0 or batch.attn is None:
            return q.new_zeros(q.shape[0], q.shape[1], self.kv_cache_spec().v_dim)
        assert self.k_cache is not None and self.v_cache is not None, "bind_kv_caches() before forward()"
        if not written:
            self.backend.write_kv(self.k_cache, self.v_cache, k, v, batch.attn)
        return self.backend.attend(q, self.k_cache, self.v_cache, batch.attn, scale)

    def _kv_store(self, v: torch.Tensor | None, batch: ForwardBatch) -> KVStore | None:
        """(v, k_cache, v_cache, slot_mapping) for a kernel that produces k to store k and v itself
        (`RopeCache.apply_qk`), where that is what the backend's `write_kv` would do; else None."""
        cache = self._kv_cache(batch, v.shape[0]) if v is not None else None
        return (v, *cache) if cache is not None else None

    def _kv_cache(self, batch: ForwardBatch, num_tokens: int) -> KVCache | None:
        """(k_cache, v_cache, slot_mapping) for a kernel that stores the step's k and v itself, where that is what
        the backend's `write_kv` would do (`AttentionBackend.writes_by_slot`) and there are tokens; else None."""
        if not self.backend.writes_by_slot or batch.attn is None or num_tokens == 0:
            return None
        assert self.k_cache is not None and self.v_cache is not None, "bind_kv_caches() before forward()"
        return self.k_cache, self.v_cache, batch.attn.slot_mapping


class GQAAttention(_PagedAttention):
    """Multi-head attention with grouped KV heads (Qwen2/3-MoE, Mixtral).

    qk_norm_eps: RMSNorm per head on q and k before rotary (Qwen3), or None.
    The q, k and v projections are one parameter, ``qkv_proj.weight [(Hq + 2 Hk) * head_dim, hidden]`` (rows
    q | k | v, bias likewise), so a CUDA step runs one GEMM; `checkpoint_views` exposes its row blocks under
    the HF names (q_proj / k_proj / v_proj), which is what checkpoints are loaded into. Other names follow HF.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        backend: AttentionBackend,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
    ) -> None:
        super().__init__(backend)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.qkv_sizes = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
        self.qkv_proj = Linear(hidden_size, sum(self.qkv_sizes), bias=qkv_bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    def checkpoint_views(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """(names of the fused parameters, {HF checkpoint name: view of the rows it fills}), names relative
        to this module. The views share the fused parameters' storage, so loading into them fills qkv_proj."""
        fused = ["qkv_proj.weight"] + (["qkv_proj.bias"] if self.qkv_proj.bias is not None else [])
        views: dict[str, torch.Tensor] = {}
        for name in fused:
            param = getattr(self.qkv_proj, name.split(".")[1]).detach()
            for proj, block in zip(("q_proj", "k_proj", "v_proj"), param.split(self.qkv_sizes)):
                views[f"{proj}.{name.split('.')[1]}"] = block
        return fused, views

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_kv_heads, self.head_dim, self.head_dim)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: RopeCache) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden]."""
        t = x.shape[0]
        fused = self._qkv_rope(x, batch, rope)
        if fused is not None:
            (q, k, v), written = fused
        else:
            q, k, v = self._project_qkv(x)
            q, k, written = rope.apply_qk(q, k, self.q_norm, self.k_norm, self._kv_store(v, batch))
        out = self._attend(q, k, v, batch, self.scale, written)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))

    def _qkv_rope(
        self, x: torch.Tensor, batch: ForwardBatch, rope: RopeCache
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], bool] | None:
        """((q, k, v), written) from one launch that projects, normalises and rotates q and k and stores k and v
        in the cache (`kernels/qkv_rope.py`), at decode sizes on CUDA where `skinny_linear` would project
        (`skinny_ok`) and the rotary kernel would take q and k (`RopeCache.fused_qk`); else None."""
        weight, bias = self.qkv_proj.weight, self.qkv_proj.bias
        if x.device.type != "cuda" or not rope.fused_qk(self.q_norm, self.k_norm, x.dtype):
            return None
        from moeserve.kernels.qkv_rope import qkv_rope, qkv_rope_fits
        from moeserve.kernels.skinny_gemm import skinny_ok

        if not skinny_ok(x, weight):
            return None
        kv_cache = self._kv_cache(batch, x.shape[0])
        if not qkv_rope_fits(x, weight, self.num_heads, self.num_kv_heads, rope.interleaved, kv_cache):
            return None
        qkv = qkv_rope(
            x, weight, bias, self.num_heads, self.num_kv_heads, rope.positions, rope.inv_freq, rope.attention_factor,
            q_norm_weight=self.q_norm.weight if self.q_norm is not None else None,
            k_norm_weight=self.k_norm.weight if self.k_norm is not None else None,
            eps=self.q_norm.eps if self.q_norm is not None else 1e-6, kv_cache=kv_cache,
        )
        return qkv.split((self.num_heads, self.num_kv_heads, self.num_kv_heads), dim=1), kv_cache is not None

    def _project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> q [T, Hq, d], k [T, Hk, d], v [T, Hk, d] (on CUDA: views of one GEMM's output)."""
        t, d = x.shape[0], self.head_dim
        heads = (self.num_heads, self.num_kv_heads, self.num_kv_heads)
        weight, bias = self.qkv_proj.weight, self.qkv_proj.bias
        if x.device.type == "cuda":
            qkv = self.qkv_proj(x).view(t, sum(heads), d)
            return qkv.split(heads, dim=1)
        # Elsewhere three GEMMs over the row blocks, bit for bit what separate projections compute.
        biases = bias.split(self.qkv_sizes) if bias is not None else (None, None, None)
        q, k, v = (
            F.linear(x, w, b).view(t, h, d)
            for w, b, h in zip(weight.split(self.qkv_sizes), biases, heads)
        )
        return q, k, v


class MLAAttention(_PagedAttention):
    """DeepSeek multi-head latent attention, computed in the absorbed form over a latent cache.

    Cache entry per token (one "kv head"): [kv_a_layernorm(latent) (kv_lora_rank) | rotated k_pe (rope_dim)].
    With kv_b_proj split per head into W_UK [nope, lora] and W_UV [v, lora]:
        q_nope . (W_UK c) = (W_UK^T q_nope) . c,   so query = [q_nope @ W_UK | q_pe] against the cache entry;
        output_h = W_UV (sum_s p_s c_s),          so attention runs with v = the latent and W_UV comes after.
    Both W_UK and W_UV are views of kv_b_proj.weight, so checkpoints load unchanged.
    scale: DeepSeek's softmax scale (1/sqrt(qk_nope + qk_rope), times yarn mscale^2 where configured).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        backend: AttentionBackend,
        *,
        scale: float,
        bias: bool = False,
    ) -> None:
        super().__init__(backend)
        self.num_heads, self.kv_lora_rank = num_heads, kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.scale = scale
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = Linear(hidden_size, num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden_size, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, 1e-6)  # DeepSeek uses the default eps here
            self.q_b_proj = Linear(q_lora_rank, num_heads * qk_dim, bias=False)
        self.q_lora = q_lora_rank is not None
        self.kv_a_proj_with_mqa = Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = Linear(num_heads * v_head_dim, hidden_size, bias=bias)

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(1, self.kv_lora_rank + self.rope_dim, self.kv_lora_rank, v_is_k_prefix=True)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: RopeCache) -> torch.Tensor:
        """x: [num_tokens, hidden] -> [num_tokens, hidden]."""
        t, h = x.shape[0], self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(t, h, self.nope_dim + self.rope_dim).split(
            [self.nope_dim, self.rope_dim], dim=-1
        )
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = rope.apply(q_pe), rope.apply(k_pe.unsqueeze(1))

        w_kv = self.kv_b_proj.weight.view(h, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv[:, : self.nope_dim], w_kv[:, self.nope_dim :]
        q_latent = torch.einsum("thd,hdl->thl", q_nope, w_uk)  # [T, H, lora]
        query = torch.cat((q_latent, q_pe), dim=-1)  # [T, H, lora + rope]
        entry = torch.cat((latent.unsqueeze(1), k_pe), dim=-1)  # [T, 1, lora + rope]
        out_latent = self._attend(query, entry, None, batch, self.scale)  # [T, H, lora]
        out = torch.einsum("thl,hvl->thv", out_latent, w_uv)  # [T, H, v]
        return self.o_proj(out.reshape(t, h * self.v_dim))
