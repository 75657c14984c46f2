"""Checkpoint directories: config, weight file layouts, lazy reads, FP8 block dequantisation, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moeserve.loader import checkpoint as ckpt
from moeserve.loader.checkpoint import (
    CheckpointError,
    checkpoint_dtype,
    dequantize_fp8_block,
    iter_safetensors,
    list_weight_files,
    quantize_fp8_block,
    read_hf_config,
    write_fp8_checkpoint,
)


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.experts.0.up_proj.weight": torch.randn(200, 130, generator=g),
        "model.layers.0.mlp.experts.1.up_proj.weight": torch.randn(64, 16, generator=g),
        "model.layers.0.input_layernorm.weight": torch.rand(16, generator=g) + 0.5,
        "model.layers.0.positions": torch.randint(0, 1000, (7,), generator=g),
    }


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], shards: int = 1, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "bfloat16", **config}))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip_single_and_sharded(tmp_path: Path, shards: int) -> None:
    tensors = random_weights()
    path = write_checkpoint(tmp_path / "ckpt", tensors, shards=shards)
    assert read_hf_config(path)["model_type"] == "toy"
    assert len(list_weight_files(path)) == shards
    loaded = dict(iter_safetensors(path))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


def test_dtype_cast_keeps_integer_tensors(tmp_path: Path) -> None:
    tensors = random_weights()
    path = write_checkpoint(tmp_path / "ckpt", tensors, shards=2)
    loaded = dict(iter_safetensors(path, dtype=torch.float16))
    for name, t in tensors.items():
        if t.is_floating_point():
            assert loaded[name].dtype == torch.float16
            assert torch.equal(loaded[name], t.to(torch.float16)), name
        else:
            assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)


def test_unsharded_set_of_files_without_index(tmp_path: Path) -> None:
    tensors = random_weights()
    path = write_checkpoint(tmp_path / "ckpt", tensors, shards=2)
    (path / "model.safetensors.index.json").unlink()
    assert [f.name for f in list_weight_files(path)] == sorted(f.name for f in path.glob("*.safetensors"))
    assert dict(iter_safetensors(path)).keys() == tensors.keys()


def test_wants_prevents_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_checkpoint(tmp_path / "ckpt", random_weights(), shards=2)
    read: list[str] = []
    real_safe_open = ckpt.safe_open

    class Spy:
        def __init__(self, *args, **kwargs) -> None:
            self._inner = real_safe_open(*args, **kwargs)

        def __enter__(self) -> Spy:
            self._handle = self._inner.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self._inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self._handle.keys())

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self._handle.get_tensor(name)

    monkeypatch.setattr(ckpt, "safe_open", Spy)
    got = dict(iter_safetensors(path, wants=lambda n: "experts.1." in n))
    assert list(got) == ["model.layers.0.mlp.experts.1.up_proj.weight"]
    assert read == ["model.layers.0.mlp.experts.1.up_proj.weight"]


def fp8_error_bound(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Elementwise bound on |dequant(quant(w)) - w| for e4m3 (3 mantissa bits, min normal 2^-6).

    A normal value is rounded to the nearest of 8 steps per binade: error <= 2^-4 |x| in scaled units. Scaled
    values below 2^-6 are subnormal with spacing 2^-9: error <= 2^-10. Scaling by s multiplies both by s.
    """
    n, k = w.shape
    s = scale_inv.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return 2.0**-4 * w.abs() + 2.0**-10 * s + 1e-6 * w.abs()


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (7, 300), (129, 1)])
def test_fp8_quantise_dequantise_within_e4m3_bound(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    # Blocks of very different magnitudes, so that each block's own scale matters.
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[1]).unsqueeze(0)
    q, scale_inv = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == torch.float32
    assert scale_inv.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    deq = dequantize_fp8_block(q, scale_inv, (128, 128))
    err = (deq - w).abs()
    assert (err <= fp8_error_bound(w, scale_inv, (128, 128))).all()
    # Per block, the largest error is at most 2^-4 of the block's largest magnitude.
    for bi in range(scale_inv.shape[0]):
        for bj in range(scale_inv.shape[1]):
            blk = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            assert err[blk].max() <= 2.0**-4 * w[blk].abs().max() * (1 + 1e-6)


def test_fp8_checkpoint_loads_dequantised(tmp_path: Path) -> None:
    tensors = random_weights(seed=3)
    src = write_checkpoint(tmp_path / "bf16", tensors, shards=2)
    (src / "tokenizer.json").write_text("{}")
    dst = tmp_path / "fp8"
    write_fp8_checkpoint(src, dst, predicate=lambda n: "experts" in n or "layernorm" in n)
    config = read_hf_config(dst)
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert (dst / "tokenizer.json").is_file()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.experts.0.up_proj.weight_scale_inv" in index["weight_map"]

    raw = {}
    for f in list_weight_files(dst):
        from safetensors.torch import load_file

        raw.update(load_file(str(f)))
    expert = "model.layers.0.mlp.experts.0.up_proj.weight"
    assert raw[expert].dtype == torch.float8_e4m3fn
    # A 1-D norm weight is selected by the predicate but is not 2-D, so it stays as it was.
    assert raw["model.layers.0.input_layernorm.weight"].dtype == torch.float32

    loaded = dict(iter_safetensors(dst, dtype=torch.bfloat16))
    assert loaded.keys() == tensors.keys()  # no *_scale_inv names
    assert loaded[expert].dtype == torch.bfloat16
    reference = dequantize_fp8_block(raw[expert], raw[expert + "_scale_inv"], (128, 128))
    assert torch.equal(loaded[expert], reference.to(torch.bfloat16))
    bound = fp8_error_bound(tensors[expert], raw[expert + "_scale_inv"], (128, 128))
    assert ((dict(iter_safetensors(dst))[expert] - tensors[expert]).abs() <= bound).all()
    assert torch.equal(loaded["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])


def test_fp8_block_size_from_config(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(100, 70, generator=g)
    q, scale_inv = quantize_fp8_block(w, block=(64, 32))
    path = write_checkpoint(
        tmp_path / "ckpt", {"w": q, "w_scale_inv": scale_inv},
        quantization_config={"quant_method": "fp8", "weight_block_size": [64, 32]},
    )
    got = dict(iter_safetensors(path))
    assert list(got) == ["w"] and got["w"].dtype == torch.float32
    assert torch.equal(got["w"], dequantize_fp8_block(q, scale_inv, (64, 32)))
    assert ((got["w"] - w).abs() <= fp8_error_bound(w, scale_inv, (64, 32))).all()


def test_checkpoint_dtype() -> None:
    assert checkpoint_dtype({"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert checkpoint_dtype({"dtype": "float16"}) == torch.float16
    assert checkpoint_dtype({}) is None
    with pytest.raises(CheckpointError, match="unknown torch_dtype"):
        checkpoint_dtype({"torch_dtype": "bogus"})


def test_error_messages(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_hf_config(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        read_hf_config(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="is not a checkpoint: expected an HF-layout directory"):
        read_hf_config(empty)
    with pytest.raises(CheckpointError, match="has no weights"):
        list_weight_files(empty)
    (empty / "config.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON: .* line 2 column"):
        read_hf_config(empty)
    (empty / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="requires safetensors"):
        list_weight_files(empty)


def test_missing_shard_and_fp8_without_scale(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "ckpt", random_weights(), shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-00002.safetensors', which is missing"):
        list_weight_files(path)
    q, _ = quantize_fp8_block(torch.randn(8, 8))
    path = write_checkpoint(tmp_path / "fp8", {"w": q})
    with pytest.raises(CheckpointError, match="without w_scale_inv"):
        list(iter_safetensors(path))
    q, s = quantize_fp8_block(torch.randn(8, 8), block=(4, 4))
    path = write_checkpoint(tmp_path / "bad_scale", {"w": q, "w_scale_inv": s})  # config says 128x128
    with pytest.raises(CheckpointError, match=r"w: FP8 scale shape \(2, 2\) does not match"):
        list(iter_safetensors(path))
