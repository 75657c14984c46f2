"""ModelConfig: the facts about a model moeserve needs, read once from an HF ``config.json``, validated.

Real checkpoints ship either the transformers-v5 ``rope_parameters`` dict or the older ``rope_theta`` +
``rope_scaling`` keys; both are read. Fields a family does not use keep neutral defaults (e.g. MLA ranks are 0
outside DeepSeek), so every consumer can read the same names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "MixtralForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
)
_ARCH_BY_MODEL_TYPE = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
_ROPE_TYPES = ("default", "linear", "yarn")
_REQUIRED = object()


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (or one of its features) is not one moeserve implements."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Rotary scaling from ``rope_parameters`` / ``rope_scaling`` (only when rope_type != "default")."""

    rope_type: str  # "linear" | "yarn"
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model's shape and routing, family-neutral. Build with `ModelConfig.from_hf(config_dict)`.

    head_dim is the query/key head size (MLA: qk_nope_head_dim + qk_rope_head_dim).
    intermediate_size is the dense MLP width (dense layers); moe_intermediate_size one routed expert's width.
    Shared experts: DeepSeek has one MLP of num_shared_experts * moe_intermediate_size; Qwen2-MoE has one
    sigmoid-gated MLP of shared_expert_intermediate_size.
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: bool = False
    # Routing.
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    # Which layers are MoE.
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Multi-head latent attention (DeepSeek); kv_lora_rank == 0 means plain GQA.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Read an HF config.json dict; raise UnsupportedModelError or ValueError naming the bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(d).__name__}")
        arch = _architecture(d)
        r = _Reader(d, arch)
        fields = _common_fields(r, arch)
        if arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
            fields.update(_qwen_fields(r, arch))
        elif arch == "MixtralForCausalLM":
            fields.update(_mixtral_fields(r))
        else:
            fields.update(_deepseek_fields(r, arch, fields))
        cfg = cls(**fields)
        cfg._validate()
        return cfg

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer i has routed experts (else it has a dense MLP of intermediate_size)."""
        if self.num_experts <= 0:
            return False
        # By architecture, not model_type: derived models (e.g. Kimi-K2) reuse DeepseekV3ForCausalLM.
        if self.architecture in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
            return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0
        if self.architecture in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
            return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
        return True

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """Decoder-layer index of each MoE layer; position in this tuple is the layer's placement row."""
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def attention_scale(self) -> float:
        """Softmax scale. DeepSeek multiplies 1/sqrt(qk_head_dim) by yarn mscale(factor, mscale_all_dim)^2."""
        scale = self.head_dim**-0.5
        rs = self.rope_scaling
        if self.uses_mla and rs is not None and rs.rope_type == "yarn" and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.json: {name}={getattr(self, name)} must be >= 1")
        if not self.uses_mla and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config.json: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.num_moe_layers and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"config.json: num_experts_per_tok={self.top_k} must be in [1, {self.num_experts}]"
            )
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise UnsupportedModelError(
                f"scoring_func={self.scoring_func!r}; supported: 'softmax', 'sigmoid'"
            )
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise UnsupportedModelError(
                f"topk_method={self.topk_method!r}; supported: 'greedy', 'group_limited_greedy', 'noaux_tc'"
            )
        if self.topk_method != "greedy":
            g, tg = self.n_group, self.topk_group
            if not g or not tg or self.num_experts % g or not 1 <= tg <= g:
                raise ValueError(
                    f"config.json: topk_method={self.topk_method!r} needs n_group dividing "
                    f"{self.num_experts} experts and 1 <= topk_group <= n_group "
                    f"(got n_group={g}, topk_group={tg})"
                )
            if tg * (self.num_experts // g) < self.top_k:
                raise ValueError(
                    f"config.json: topk_group={tg} groups hold fewer than top_k={self.top_k} experts"
                )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor: 0.1 * mscale * ln(factor) + 1 for factor > 1, else 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures")
    if isinstance(archs, list) and archs:
        arch = archs[0]
    elif "model_type" in d:
        arch = _ARCH_BY_MODEL_TYPE.get(d["model_type"], f"model_type={d['model_type']!r}")
    else:
        raise ValueError("config.json has neither 'architectures' nor 'model_type'")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


class _Reader:
    """Typed field access with messages that name the field, the architecture and what was expected."""

    def __init__(self, d: dict[str, Any], arch: str) -> None:
        self.d, self.arch = d, arch

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        value = self.d.get(key)
        if value is None:  # absent or null: the default, if the field has one
            if default is _REQUIRED:
                raise ValueError(f"config.json ({self.arch}): required field '{key}' is missing")
            return default
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ValueError(f"config.json ({self.arch}): '{key}' must be {what}, got {value!r}")
        return value

    def int(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._get(key, default, (int,), "an integer")

    def float(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default, (int, float), "a number")
        return None if value is None else float(value)

    def bool(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._get(key, default, (bool,), "true or false")

    def str(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._get(key, default, (str,), "a string")


def _common_fields(r: _Reader, arch: str) -> dict[str, Any]:
    d = r.d
    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    if heads < 1:
        raise ValueError(f"config.json ({arch}): num_attention_heads={heads} must be >= 1")
    act = r.str("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act={act!r} ({arch}); supported: 'silu'")
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_ids):
        raise ValueError(
            f"config.json ({arch}): 'eos_token_id' must be an integer or list of integers, got {eos!r}"
        )
    theta, scaling = _rope(r, default_theta=1e6 if arch == "MixtralForCausalLM" else 10000.0)
    head_dim = r.int("head_dim", None) or hidden // heads
    return dict(
        architecture=arch,
        model_type=r.str("model_type", _model_type(arch)),
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        num_layers=r.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=r.int("num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=r.float("rms_norm_eps", 1e-5 if arch == "MixtralForCausalLM" else 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=r.int("max_position_embeddings", 4096),
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        bos_token_id=r.int("bos_token_id", None),
        eos_token_ids=eos_ids,
    )


def _model_type(arch: str) -> str:
    return next(t for t, a in _ARCH_BY_MODEL_TYPE.items() if a == arch)


def _rope(r: _Reader, default_theta: float) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from ``rope_parameters`` (v5) or ``rope_theta`` + ``rope_scaling`` (older files)."""
    params = r.d.get("rope_parameters") or r.d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(
            f"config.json ({r.arch}): 'rope_parameters'/'rope_scaling' must be an object, got {params!r}"
        )
    nested = [v for v in params.values() if isinstance(v, dict)]
    if nested:  # one entry per layer type; moeserve needs them all equal
        if any(v != nested[0] for v in nested):
            raise UnsupportedModelError(
                f"{r.arch}: different rope parameters per layer type are not supported"
            )
        params = nested[0]
    theta = params.get("rope_theta", r.d.get("rope_theta", default_theta))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"config.json ({r.arch}): 'rope_theta' must be a positive number, got {theta!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(f"{r.arch}: rope type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    max_pos = r.int("max_position_embeddings", 4096)
    orig = (
        params.get("original_max_position_embeddings")
        or r.d.get("original_max_position_embeddings")
        or max_pos
    )
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / orig
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"config.json ({r.arch}): rope 'factor' must be a positive number, got {factor!r}")

    def opt(key: str) -> float | None:
        value = params.get(key)
        return None if value is None else float(value)

    return float(theta), RopeScaling(
        rope_type=rope_type,
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        attention_factor=opt("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _qwen_fields(r: _Reader, arch: str) -> dict[str, Any]:
    if r.bool("use_sliding_window", False):
        raise UnsupportedModelError(f"{arch}: use_sliding_window=true is not supported")
    qwen3 = arch == "Qwen3MoeForCausalLM"
    attention_bias = r.bool("attention_bias", False)
    mlp_only = r.d.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
        raise ValueError(
            f"config.json ({arch}): 'mlp_only_layers' must be a list of layer indices, got {mlp_only!r}"
        )
    num_experts = r.int("num_experts", None)
    if num_experts is None:
        num_experts = r.int("num_local_experts")
    return dict(
        intermediate_size=r.int("intermediate_size"),
        num_experts=num_experts,
        top_k=r.int("num_experts_per_tok"),
        moe_intermediate_size=r.int("moe_intermediate_size"),
        norm_topk_prob=r.bool("norm_topk_prob", False),
        decoder_sparse_step=max(1, r.int("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(mlp_only),
        qk_norm=qwen3,
        qkv_bias=attention_bias if qwen3 else r.bool("qkv_bias", True),
        o_proj_bias=attention_bias if qwen3 else False,
        shared_expert_intermediate_size=0 if qwen3 else r.int("shared_expert_intermediate_size"),
    )


def _mixtral_fields(r: _Reader) -> dict[str, Any]:
    window = r.int("sliding_window", None)
    if window is not None and window < r.int("max_position_embeddings", 4096):
        raise UnsupportedModelError(f"MixtralForCausalLM: sliding_window={window} is not supported")
    inter = r.int("intermediate_size")
    return dict(
        intermediate_size=inter,
        num_experts=r.int("num_local_experts"),
        top_k=r.int("num_experts_per_tok", 2),
        moe_intermediate_size=inter,
        norm_topk_prob=True,
    )


def _deepseek_fields(r: _Reader, arch: str, common: dict[str, Any]) -> dict[str, Any]:
    v3 = arch == "DeepseekV3ForCausalLM"
    if r.bool("mlp_bias", False):
        raise UnsupportedModelError(f"{arch}: mlp_bias=true is not supported")
    nope, rope = r.int("qk_nope_head_dim"), r.int("qk_rope_head_dim")
    attention_bias = r.bool("attention_bias", False)
    q_lora = r.int("q_lora_rank", None)
    return dict(
        head_dim=nope + rope,
        intermediate_size=r.int("intermediate_size"),
        num_experts=r.int("n_routed_experts"),
        top_k=r.int("num_experts_per_tok"),
        moe_intermediate_size=r.int("moe_intermediate_size"),
        num_shared_experts=r.int("n_shared_experts", 0) or 0,
        norm_topk_prob=r.bool("norm_topk_prob", v3),
        scoring_func=r.str("scoring_func", "sigmoid" if v3 else "softmax"),
        topk_method=r.str("topk_method", "noaux_tc" if v3 else "greedy"),
        n_group=r.int("n_group", None),
        topk_group=r.int("topk_group", None),
        routed_scaling_factor=r.float("routed_scaling_factor", 1.0),
        first_k_dense_replace=r.int("first_k_dense_replace", 0) or 0,
        moe_layer_freq=max(1, r.int("moe_layer_freq", 1)),
        q_lora_rank=q_lora or None,
        kv_lora_rank=r.int("kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=r.int("v_head_dim"),
        # DeepSeek rotates (x0, x1), (x2, x3), ... pairs; V3 configs may opt out with rope_interleave=false.
        rope_interleave=r.bool("rope_interleave", True) if v3 else True,
        num_nextn_predict_layers=r.int("num_nextn_predict_layers", 0) or 0,
        qkv_bias=attention_bias,
        o_proj_bias=attention_bias,
    )
