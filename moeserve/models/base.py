"""What every model shares: the context it runs in, the decoder layer, and the `CausalLM` base class.

A family file only says how to build one layer's attention and MoE block; embedding, decoder stack, final
norm, LM head, KV-cache binding and weight loading live here. Parameter names equal the HF checkpoint names,
so loading is a lookup; the only tensors stored differently are routed experts (stacked per local slot) and
fused projections (GQA's qkv_proj), loaded through views under the checkpoint's names.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from moeserve.attention.base import AttentionBackend, create_attention_backend
from moeserve.forward_batch import ForwardBatch
from moeserve.layers.attention import GQAAttention, KVCacheSpec
from moeserve.layers.linear import Embedding, Linear
from moeserve.layers.mlp import GatedMLP
from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import RopeCache, RotaryEmbedding
from moeserve.models.config import ModelConfig
from moeserve.moe.dispatcher import Dispatcher, LocalDispatcher
from moeserve.moe.experts import ExpertKernel, create_expert_kernel
from moeserve.moe.layer import MoELayer
from moeserve.moe.placement import ExpertPlacement
from moeserve.moe.routing import RoutingConfig
from moeserve.moe.tbo import drive

__all__ = ["CausalLM", "DecoderLayer", "KVCacheSpec", "ModelContext", "WeightLoadError"]

_EXPERT_NAME = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.weight$")


@dataclass(slots=True)
class ModelContext:
    """Where and how a model runs: device and dtype of its weights, and the pluggable pieces it calls."""

    dtype: torch.dtype
    device: torch.device
    attention: AttentionBackend
    expert_kernel: ExpertKernel
    dispatcher: Dispatcher
    placement: ExpertPlacement
    # The dispatcher of the second two-batch-overlap micro-batch (None: share `dispatcher`).
    tbo_dispatcher: Dispatcher | None = None

    @property
    def dispatchers(self) -> tuple[Dispatcher, Dispatcher]:
        """The instance each two-batch-overlap micro-batch uses (the same one twice without a second)."""
        return self.dispatcher, self.tbo_dispatcher or self.dispatcher

    @classmethod
    def single_device(
        cls,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attention: str = "auto",
        expert_kernel: str = "auto",
    ) -> ModelContext:
        """One rank holding every expert (no EP): LocalDispatcher and the trivial placement."""
        device = torch.device(device)
        return cls(
            dtype=dtype,
            device=device,
            attention=create_attention_backend(attention, device),
            expert_kernel=create_expert_kernel(expert_kernel, device),
            dispatcher=LocalDispatcher(num_local_slots=config.num_experts),
            placement=ExpertPlacement.trivial(config.num_moe_layers, config.num_experts),
        )


class WeightLoadError(ValueError):
    """A checkpoint tensor does not fit the model (wrong shape)."""


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). The MLP is registered as `mlp_name`
    ("mlp", or Mixtral's "block_sparse_moe") so parameter names match the checkpoint.

    The residual stream travels beside the block output rather than added into it: each norm adds its input
    to the stream first (`RMSNorm.add_norm`, one fused kernel on CUDA), which computes the same sums as
    adding at the end of each sub-block.
    """

    def __init__(self, attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float, mlp_name: str = "mlp"):
        super().__init__()
        self.self_attn = attn
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.mlp_name)

    def forward_stages(
        self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, rope: RopeCache
    ) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor]]:
        """x: [num_tokens, hidden], the previous block's output not yet added to `residual` (the stream,
        same shape; None before the first layer, where x is the stream). Returns (this block's MLP output,
        the stream before it); their sum is the layer's output. Yields while an MoE layer's tokens travel."""
        h, residual = self.input_layernorm.add_norm(x, residual)
        x = self.self_attn(h, batch, rope)
        h, residual = self.post_attention_layernorm.add_norm(x, residual)
        ffn = self.ffn
        y = (yield from ffn.forward_stages(h, batch)) if isinstance(ffn, MoELayer) else ffn(h)
        return y, residual


class CausalLM(nn.Module):
    """Base of every model. Subclasses implement `build_attention(i)` and `build_moe(i, moe_ordinal)`.

    Construct through `moeserve.models.registry.create_model` (or `load_model`), which places parameters on
    ctx.device in ctx.dtype.
    """

    mlp_name = "mlp"

    def __init__(self, config: ModelConfig, ctx: ModelContext) -> None:
        super().__init__()
        self.config, self.ctx = config, ctx
        c = config
        if c.uses_mla:
            self.rotary_emb = RotaryEmbedding(
                c.qk_rope_head_dim, c.rope_theta, c.rope_scaling, c.rope_interleave
            )
        else:
            self.rotary_emb = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling)
        self.model = nn.Module()
        self.model.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        moe_ordinal = {layer: k for k, layer in enumerate(c.moe_layer_indices)}
        layers = []
        for i in range(c.num_layers):
            mlp = (
                self.build_moe(i, moe_ordinal[i])
                if i in moe_ordinal
                else GatedMLP(c.hidden_size, c.intermediate_size)
            )
            layers.append(
                DecoderLayer(self.build_attention(i), mlp, c.hidden_size, c.rms_norm_eps, self.mlp_name)
            )
        self.model.layers = nn.ModuleList(layers)
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._stack_layer_parameters()
        self._index_weights()
        # Set by the runner where one kernel can run a one-token decode step's layers (`decode_stack_gluon`).
        self.decode_stack = None

    def _stack_layer_parameters(self) -> None:
        """Each parameter name that every decoder layer has, with one shape and dtype, becomes a view of one
        [num_layers, ...] tensor, so that one kernel can address that weight of any layer from one base (the
        batch-1 decode stack, `kernels/decode_stack_gluon.py`). Done before loading: every parameter is loaded
        from the checkpoint, so the uninitialised storage is dropped rather than copied (no second copy of the
        weights, even for a moment)."""
        named = [dict(layer.named_parameters()) for layer in self.model.layers]
        for name, first in named[0].items():
            group = [params.get(name) for params in named]
            if any(p is None or p.shape != first.shape or p.dtype != first.dtype for p in group):
                continue
            shape, dtype, device = tuple(first.shape), first.dtype, first.device
            for p in group:
                p.data = torch.empty(0, dtype=dtype, device=device)
            stacked = torch.empty((len(group), *shape), dtype=dtype, device=device)
            for p, view in zip(group, stacked):
                p.data = view

    # ---- what a family provides ----

    def build_attention(self, i: int) -> nn.Module:
        """GQA from the config's flags (qkv / o bias, Qwen3's per-head q/k norm); MLA families override."""
        c = self.config
        return GQAAttention(
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            self.ctx.attention,
            qkv_bias=c.qkv_bias,
            o_bias=c.o_proj_bias,
            qk_norm_eps=c.rms_norm_eps if c.qk_norm else None,
        )

    def build_moe(self, i: int, moe_ordinal: int) -> MoELayer:
        raise NotImplementedError

    def routing_config(self) -> RoutingConfig:
        return RoutingConfig.from_model_config(self.config)

    # ---- forward ----

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Returns the final-normed hidden states [num_tokens, hidden] in ctx.dtype."""
        return drive(self.forward_stages(batch))

    def forward_stages(self, batch: ForwardBatch) -> Generator[None, None, torch.Tensor]:
        """The forward pass as stages that yield at each MoE communication point, so two micro-batches can
        interleave (`moeserve.moe.tbo.run_overlapped`); the value is forward's result."""
        if self.decode_stack is not None and self.decode_stack.takes(batch):
            return self.decode_stack.forward(batch)
        x, residual = self.model.embed_tokens(batch.input_ids), None
        rope = self.rotary_emb(batch.positions)
        for layer in self.model.layers:
            x, residual = yield from layer.forward_stages(x, residual, batch, rope)
        return self.model.norm.add_norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_samples, hidden] (rows of forward's output) -> logits [num_samples, vocab] in the model
        dtype. Not upcast here: an upcast adds no information (greedy argmax is the same on either), and the
        sampler upcasts only the rows it draws from or reports logprobs for — at batch 256 and a 152k vocab
        a full float32 copy is 155 MB of writes per step."""
        return self.lm_head(hidden)

    # ---- KV cache ----

    def kv_cache_specs(self) -> list[KVCacheSpec]:
        """One spec per decoder layer, in layer order."""
        return [layer.self_attn.kv_cache_spec() for layer in self.model.layers]

    def bind_kv_caches(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """caches[i] = (k, v) of layer i: [num_blocks, block_size, kv_heads, dim]; MLA: v = k[..., :rank]."""
        if len(caches) != len(self.model.layers):
            raise ValueError(f"got {len(caches)} KV caches for {len(self.model.layers)} layers")
        for layer, (k, v) in zip(self.model.layers, caches):
            layer.self_attn.bind_kv_cache(k, v)

    # ---- weights ----

    def _index_weights(self) -> None:
        self._moe_layers: dict[str, MoELayer] = {}
        for i, layer in enumerate(self.model.layers):
            if isinstance(layer.ffn, MoELayer):
                self._moe_layers[f"model.layers.{i}.{self.mlp_name}"] = layer.ffn
        stacked = {f"{p}.{w}" for p in self._moe_layers for w in ("w13", "w2")}
        self._params = {n: p for n, p in self.named_parameters() if n not in stacked}
        # Fused parameters (GQA's qkv_proj) are loaded through views named as the checkpoint names them.
        for prefix, module in self.named_modules():
            views = getattr(module, "checkpoint_views", None)
            if views is None:
                continue
            fused, named_views = views()
            for name in fused:
                del self._params[f"{prefix}.{name}"]
            self._params.update({f"{prefix}.{name}": view for name, view in named_views.items()})

    def _match_expert(self, name: str) -> tuple[MoELayer, int, str] | None:
        m = _EXPERT_NAME.match(name)
        if m is None:
            return None
        moe = self._moe_layers.get(m["prefix"])
        expert, proj = int(m["expert"]), m["proj"]
        if moe is None or proj not in moe.expert_proj_names or not moe.holds_expert(expert):
            return None
        return moe, expert, proj

    def wants_weight(self, name: str) -> bool:
        """Whether checkpoint tensor `name` is for this rank (others' experts, MTP layers: never read)."""
        return name in self._params or self._match_expert(name) is not None

    def keeps_fp32(self, name: str) -> bool:
        """Whether `name` is kept in float32 although the model runs in another dtype (DeepSeek's router)."""
        p = self._params.get(name)
        return p is not None and p.dtype == torch.float32 and self.ctx.dtype != torch.float32

    def required_weight_names(self) -> set[str]:
        """Every checkpoint name this rank must load (dense weights + its local experts)."""
        names = set(self._params)
        for prefix, moe in self._moe_layers.items():
            names.update(moe.expert_weight_names(prefix))
        return names

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy (name, tensor) pairs into the model; unknown or unwanted names are skipped.

        Returns the names loaded. Raises WeightLoadError naming the tensor when a shape does not match.
        """
        loaded: set[str] = set()
        for name, tensor in weights:
            param = self._params.get(name)
            if param is not None:
                _check_shape(name, tuple(param.shape), tensor)
                param.copy_(tensor)
                loaded.add(name)
                continue
            hit = self._match_expert(name)
            if hit is not None:
                moe, expert, proj = hit
                _check_shape(name, moe.expert_weight_shape(proj), tensor)
                moe.load_expert(expert, proj, tensor)
                loaded.add(name)
        return loaded

    # ---- helpers for family files ----

    def _moe_layer(self, moe_ordinal: int, **kwargs) -> MoELayer:
        c = self.config
        return MoELayer(
            c.hidden_size,
            c.moe_intermediate_size,
            c.num_experts,
            self.routing_config(),
            moe_ordinal,
            self.ctx,
            **kwargs,
        )


def _check_shape(name: str, expected: tuple[int, ...], tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise WeightLoadError(
            f"checkpoint tensor '{name}' has shape {list(tensor.shape)}, the model expects {list(expected)}"
        )
