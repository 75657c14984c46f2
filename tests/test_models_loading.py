"""Loading HF checkpoints: config parsing and validation, shards, broken files, partial expert placement."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeserve.loader.model_loader as model_loader
from moeserve.attention.torch_backend import TorchAttentionBackend
from moeserve.forward_batch import build_forward_batch
from moeserve.loader.checkpoint import (
    CheckpointError,
    dequantize_fp8_block,
    read_hf_config,
    write_fp8_checkpoint,
)
from moeserve.loader.model_loader import load_model
from moeserve.models.base import ModelContext
from moeserve.models.config import ModelConfig, UnsupportedModelError
from moeserve.moe.dispatcher import LocalDispatcher
from moeserve.moe.experts import TorchExperts
from moeserve.moe.placement import ExpertPlacement
from moeserve.testing.tiny_checkpoints import DEMO_NAME, build_tiny_checkpoint, demo_checkpoint


def context(cfg: ModelConfig, placement: ExpertPlacement | None = None, dtype=torch.float32) -> ModelContext:
    placement = placement or ExpertPlacement.trivial(cfg.num_moe_layers, cfg.num_experts)
    return ModelContext(
        dtype,
        torch.device("cpu"),
        TorchAttentionBackend(),
        TorchExperts(),
        LocalDispatcher(placement.num_local_slots),
        placement,
    )


def load(path, **kwargs):
    return load_model(path, context(ModelConfig.from_hf(read_hf_config(path)), **kwargs))


@torch.inference_mode()
def prefill_logits(model, prompt: list[int]) -> torch.Tensor:
    caches = []
    for s in model.kv_cache_specs():
        k = torch.zeros(8, 4, s.num_kv_heads, s.k_dim)
        caches.append(
            (k, k[..., : s.v_dim] if s.v_is_k_prefix else torch.zeros(8, 4, s.num_kv_heads, s.v_dim))
        )
    model.bind_kv_caches(caches)
    batch = build_forward_batch([prompt], [0], [list(range(8))], 4, sample_rows=[list(range(len(prompt)))])
    return model.compute_logits(model(batch)[batch.sample_indices])


PROMPT = [3, 141, 59, 26, 53, 58, 97, 93, 23, 84]


def rewrite_weights(src, dst, edit) -> None:
    """Copy checkpoint src to dst with its single model.safetensors edited by edit(dict)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return build_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), seed=3)


# ---- config ----


def test_config_reads_moe_layout_and_rope():
    cfg = ModelConfig.from_hf(_deepseek_v3_dict())
    assert cfg.architecture == "DeepseekV3ForCausalLM" and cfg.uses_mla
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert cfg.moe_layer_indices == (1, 2, 3) and cfg.num_moe_layers == 3
    assert cfg.head_dim == 24 and cfg.topk_method == "noaux_tc" and cfg.scoring_func == "sigmoid"
    # Older files: rope_theta + rope_scaling {"type": ...} read the same as v5's rope_parameters.
    legacy = _deepseek_v3_dict()
    params = legacy.pop("rope_parameters")
    legacy["rope_theta"] = params.pop("rope_theta")
    legacy["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    assert ModelConfig.from_hf(legacy) == cfg
    # DeepSeek's softmax scale carries yarn's mscale(factor=40, mscale_all_dim=1)^2.
    m = 0.1 * torch.log(torch.tensor(40.0)).item() + 1
    assert cfg.attention_scale == pytest.approx(24**-0.5 * m * m)


def _deepseek_v3_dict() -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 320,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "q_lora_rank": 48,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 163840,
        "num_nextn_predict_layers": 1,
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "rope_theta": 10000,
        },
    }


def test_qwen_sparse_step_and_mlp_only_layers():
    d = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "vocab_size": 320,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "shared_expert_intermediate_size": 48,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
    }
    cfg = ModelConfig.from_hf(d)
    assert cfg.moe_layer_indices == (1, 5) and cfg.qkv_bias and cfg.rope_theta == 10000.0


@pytest.mark.parametrize(
    "edit, error, words",
    [
        (lambda d: d.pop("hidden_size"), ValueError, ["hidden_size", "missing"]),
        (lambda d: d.update(num_attention_heads="4"), ValueError, ["num_attention_heads", "integer", "'4'"]),
        (lambda d: d.update(norm_topk_prob="yes"), ValueError, ["norm_topk_prob", "true or false"]),
        (lambda d: d.update(topk_group=9), ValueError, ["topk_group"]),
        (lambda d: d.update(hidden_act="gelu"), UnsupportedModelError, ["gelu", "silu"]),
        (
            lambda d: d.update(architectures=["LlamaForCausalLM"]),
            UnsupportedModelError,
            ["LlamaForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"],
        ),
    ],
)
def test_config_errors_name_the_field(edit, error, words):
    d = _deepseek_v3_dict()
    edit(d)
    with pytest.raises(error) as info:
        ModelConfig.from_hf(d)
    for w in words:
        assert w in str(info.value)


# ---- checkpoints ----


def test_sharded_checkpoint_loads_like_single_file(qwen3, tmp_path):
    sharded = build_tiny_checkpoint("qwen3_moe", tmp_path / "sharded", seed=3, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) >= 2
    (m1, _), (m2, _) = load(qwen3), load(sharded)
    assert torch.equal(prefill_logits(m1, PROMPT), prefill_logits(m2, PROMPT))


def test_missing_tensors_are_listed(qwen3, tmp_path):
    gone = ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.mlp.experts.5.up_proj.weight"]
    rewrite_weights(qwen3, tmp_path / "ck", lambda t: [t.pop(n) for n in gone])
    with pytest.raises(CheckpointError) as info:
        load(tmp_path / "ck")
    assert "missing 2 tensor(s)" in str(info.value)
    assert all(n in str(info.value) for n in gone)


def test_misshaped_tensor_names_expected_and_actual_shape(qwen3, tmp_path):
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    rewrite_weights(qwen3, tmp_path / "ck", lambda t: t.update({name: torch.zeros(64, 31)}))
    with pytest.raises(CheckpointError) as info:
        load(tmp_path / "ck")
    assert name in str(info.value) and "[64, 31]" in str(info.value) and "[64, 32]" in str(info.value)


def test_unsupported_architecture(qwen3, tmp_path):
    shutil.copytree(qwen3, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["architectures"] = ["GptOssForCausalLM"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GptOssForCausalLM.*supported: Qwen3MoeForCausalLM"):
        load(tmp_path / "ck")


def test_partial_placement_reads_only_local_experts(qwen3, monkeypatch):
    """EP rank 0 of 2 with 10 physical slots: it holds experts 0-3 and a replica of expert 0."""
    read: list[str] = []
    real = model_loader.iter_safetensors

    def spy(*args, **kwargs):
        for name, tensor in real(*args, **kwargs):
            read.append(name)
            yield name, tensor

    monkeypatch.setattr(model_loader, "iter_safetensors", spy)
    cfg = ModelConfig.from_hf(read_hf_config(qwen3))
    row = torch.tensor([0, 1, 2, 3, 0, 4, 5, 6, 7, 5])
    placement = ExpertPlacement(row.repeat(cfg.num_moe_layers, 1), cfg.num_experts, ep_rank=0, ep_size=2)
    model, _ = load_model(qwen3, context(cfg, placement))
    experts_read = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
    assert experts_read == {0, 1, 2, 3}
    full = load_file(str(qwen3 / "model.safetensors"))
    moe = model.model.layers[1].mlp
    assert moe.local_experts == [0, 1, 2, 3, 0] and moe.w13.shape[0] == 5
    for slot, e in enumerate(moe.local_experts):
        prefix = f"model.layers.1.mlp.experts.{e}"
        assert torch.equal(moe.w13[slot, :32], full[f"{prefix}.gate_proj.weight"])
        assert torch.equal(moe.w13[slot, 32:], full[f"{prefix}.up_proj.weight"])
        assert torch.equal(moe.w2[slot], full[f"{prefix}.down_proj.weight"])


def test_mtp_layers_are_skipped_and_router_stays_fp32(tmp_path):
    """DeepSeek-V3 checkpoints carry MTP layers after the last decoder layer; they are never read. In bf16
    the router weight and correction bias stay float32, bit-exact."""
    src = build_tiny_checkpoint("deepseek_v3", tmp_path / "src", seed=4)
    mtp = {
        "model.layers.3.eh_proj.weight": torch.randn(64, 128),
        "model.layers.3.mlp.experts.0.gate_proj.weight": torch.randn(32, 64),
    }
    rewrite_weights(src, tmp_path / "ck", lambda t: t.update(mtp))
    model, cfg = load(tmp_path / "ck", dtype=torch.bfloat16)
    assert not any(model.wants_weight(n) for n in mtp)
    full = load_file(str(tmp_path / "ck" / "model.safetensors"))
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and torch.equal(
        gate.weight, full["model.layers.1.mlp.gate.weight"]
    )
    bias = full["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert torch.equal(gate.e_score_correction_bias, bias) and bias.abs().sum() > 0
    assert model.model.layers[1].self_attn.kv_b_proj.weight.dtype == torch.bfloat16


def test_fp8_block_quantized_checkpoint_loads_dequantized(tmp_path):
    """DeepSeek-V3 as shipped: linear weights in FP8 with 128x128 block scales; experts land dequantized."""
    src = build_tiny_checkpoint("deepseek_v3", tmp_path / "src", seed=4)
    write_fp8_checkpoint(src, tmp_path / "fp8", lambda n: "proj" in n and n.endswith(".weight"))
    model, _ = load(tmp_path / "fp8")
    file = load_file(str(tmp_path / "fp8" / "model.safetensors"))

    def dequantized(name: str) -> torch.Tensor:
        assert file[name].dtype == torch.float8_e4m3fn
        return dequantize_fp8_block(file[name], file[name + "_scale_inv"], (128, 128))

    layer = model.model.layers[1]
    assert torch.equal(layer.mlp.w2[3], dequantized("model.layers.1.mlp.experts.3.down_proj.weight"))
    assert torch.equal(layer.mlp.w13[5, 32:], dequantized("model.layers.1.mlp.experts.5.up_proj.weight"))
    assert torch.equal(
        layer.self_attn.kv_b_proj.weight, dequantized("model.layers.1.self_attn.kv_b_proj.weight")
    )
    assert torch.isfinite(prefill_logits(model, PROMPT)).all()


def test_tied_embeddings_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = build_tiny_checkpoint("qwen3_moe", tmp_path, seed=5, tie_word_embeddings=True)
    model, cfg = load(path)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    ours = prefill_logits(model, PROMPT)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_demo_checkpoint_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESERVE_CACHE", str(tmp_path))
    path = demo_checkpoint()
    assert path == tmp_path / DEMO_NAME and (path / "tokenizer.json").is_file()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert demo_checkpoint() == path and (path / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_NAME]  # no temporary directory left behind
    model, cfg = load(path)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_experts, cfg.top_k) == (128, 4, 16, 4)
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] and prefill_logits(model, PROMPT).std() > 0.1


def test_forward_on_zero_tokens(qwen3):
    """An idle EP rank runs the model on an empty batch (it must still enter every MoE collective)."""
    model, cfg = load(qwen3)
    prefill_logits(model, PROMPT)  # binds caches
    batch = build_forward_batch([], [], [], 4)
    with torch.inference_mode():
        hidden = model(batch)
    assert hidden.shape == (0, cfg.hidden_size)
