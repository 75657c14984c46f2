"""Reading HF-layout checkpoint directories: config.json and safetensors weights.

A checkpoint is a directory with ``config.json`` and weights in one of three layouts:
``model.safetensors``; shards listed by ``*.safetensors.index.json`` (``weight_map``: name -> shard file);
or any set of ``*.safetensors`` files. Tensors are read lazily (``safe_open`` memory-maps each file), so a
rank that loads only its own experts never touches the bytes of the others.

FP8 block quantisation as DeepSeek-V3 ships it: a weight ``W`` stored as ``float8_e4m3fn`` ``[N, K]`` next to
``W_scale_inv`` float32 ``[ceil(N/bn), ceil(K/bk)]`` (block ``[bn, bk]`` from
``config.json: quantization_config.weight_block_size``, 128x128 in practice); the real weight is
``W.float() * scale`` with each scale covering one block (edge blocks are partial).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
DEFAULT_BLOCK = (128, 128)
FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
_NOT_A_CHECKPOINT = "expected an HF-layout directory with config.json and *.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, malformed or in a format moeserve cannot read."""


def checkpoint_dir(path: str | Path) -> Path:
    """Return ``path`` as a Path after checking that it is an existing directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; {_NOT_A_CHECKPOINT}")
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory; {_NOT_A_CHECKPOINT}")
    return p


def read_json(file: Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not UTF-8 text: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise CheckpointError(f"{file} is not valid JSON: {e.msg} at {where}") from None


def read_hf_config(path: str | Path) -> dict:
    """Read ``<path>/config.json`` (the HF model config) as a dict."""
    p = checkpoint_dir(path)
    file = p / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{p} is not a checkpoint: {_NOT_A_CHECKPOINT}")
    config = read_json(file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def list_weight_files(path: str | Path) -> list[Path]:
    """The safetensors files holding the checkpoint's weights, in a stable order."""
    p = checkpoint_dir(path)
    single = p / "model.safetensors"
    if single.is_file():
        return [single]
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if indexes:
        index = p / "model.safetensors.index.json"
        return _shards_from_index(index if index in indexes else indexes[0])
    files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
    if files:
        return files
    if any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth")):
        raise CheckpointError(
            f"{p} holds only PyTorch pickle weights (*.bin/*.pt); moeserve requires safetensors "
            "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise CheckpointError(f"{p} has no weights: {_NOT_A_CHECKPOINT}")


def _shards_from_index(index: Path) -> list[Path]:
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' object (tensor name -> shard file)")
    shards: list[Path] = []
    for name in dict.fromkeys(weight_map.values()):  # first-seen order, no duplicates
        shard = index.parent / str(name)
        if not shard.is_file():
            raise CheckpointError(f"{index} lists shard {name!r}, which is missing from {index.parent}")
        shards.append(shard)
    return sorted(shards)


def checkpoint_dtype(hf_config: dict) -> torch.dtype | None:
    """The dtype the checkpoint was saved in (``torch_dtype`` or ``dtype``), or None when unspecified/auto."""
    value = hf_config.get("torch_dtype", hf_config.get("dtype"))
    if value is None or value == "auto":
        return None
    name = str(value).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"config.json has an unknown torch_dtype {value!r}; expected e.g. 'bfloat16'")
    return dtype


def _block_size(hf_config: dict | None) -> tuple[int, int]:
    quant = (hf_config or {}).get("quantization_config") or {}
    block = quant.get("weight_block_size")
    if block is None:
        return DEFAULT_BLOCK
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(int(b) > 0 for b in block)):
        raise CheckpointError(f"quantization_config.weight_block_size must be [rows, cols], got {block!r}")
    return int(block[0]), int(block[1])


def dequantize_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Undo block quantisation.

    w: [N, K] float8_e4m3fn; scale_inv: [ceil(N/bn), ceil(K/bk)] float32 -> [N, K] float32.
    """
    n, k = w.shape
    bn, bk = block
    expected = (math.ceil(n / bn), math.ceil(k / bk))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} "
            f"with block {list(block)}: expected {expected}"
        )
    if n % bn == 0 and k % bk == 0:  # whole blocks: broadcast, no [N, K] scale tensor
        blocks = w.float().view(expected[0], bn, expected[1], bk) * scale_inv.float()[:, None, :, None]
        return blocks.view(n, k)
    scale = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return w.float() * scale


def iter_safetensors(
    path: str | Path,
    wants: Callable[[str], bool] | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every weight of the checkpoint at ``path`` (a directory).

    A tensor whose ``wants(name)`` is False is never read. FP8 block-quantised weights are yielded
    dequantised under their own name, in ``dtype`` (float32 when None); ``*_scale_inv`` tensors are consumed,
    never yielded. Other floating tensors are cast to ``dtype`` when given; integer/bool tensors are kept.
    """
    p = checkpoint_dir(path)
    files = list_weight_files(p)
    hf_config = read_hf_config(p) if (p / "config.json").is_file() else None
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
        where = {name: f for f, h in handles.items() for name in h.keys()}
        for f, handle in handles.items():
            for name in handle.keys():
                if name.endswith(SCALE_SUFFIX) or (wants is not None and not wants(name)):
                    continue
                tensor = handle.get_tensor(name)
                scale_file = where.get(name + SCALE_SUFFIX)
                if scale_file is not None:
                    scale = handles[scale_file].get_tensor(name + SCALE_SUFFIX)
                    yield name, _dequantize_named(name, tensor, scale, _block_size(hf_config), dtype)
                elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    raise CheckpointError(
                        f"{f.name}: {name} is {tensor.dtype} without {name}{SCALE_SUFFIX}; only "
                        "DeepSeek-style block-quantised FP8 (weight + per-block scale_inv) is supported"
                    )
                elif dtype is not None and tensor.is_floating_point():
                    yield name, tensor.to(dtype)
                else:
                    yield name, tensor


def _dequantize_named(
    name: str, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype | None
) -> torch.Tensor:
    if w.dim() != 2 or scale_inv.dim() != 2:
        raise CheckpointError(
            f"{name}: block-quantised weights must be 2-D with 2-D scales, got {tuple(w.shape)} "
            f"and {tuple(scale_inv.shape)}"
        )
    try:
        out = dequantize_fp8_block(w, scale_inv, block)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    return out.to(dtype or torch.float32)


def quantize_fp8_block(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight to FP8 e4m3 with one scale per block, as DeepSeek-V3 checkpoints store it.

    w: [N, K] float -> (w_fp8 [N, K] float8_e4m3fn, scale_inv [ceil(N/bn), ceil(K/bk)] float32), such that
    ``dequantize_fp8_block(w_fp8, scale_inv, block) ~= w``. Each block's largest magnitude maps to 448.
    """
    assert w.dim() == 2, f"expected a 2-D weight, got shape {tuple(w.shape)}"
    n, k = w.shape
    bn, bk = block
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(1, 3))  # [nb, kb]
    # An all-zero block gets scale 1 so that it stays exactly zero instead of dividing by zero.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb * bn, kb * bk)[:n, :k].contiguous(), scale.contiguous()


def write_fp8_checkpoint(src_dir: str | Path, dst_dir: str | Path, predicate: Callable[[str], bool]) -> None:
    """Copy an HF checkpoint, storing each selected 2-D floating weight as FP8 + ``<name>_scale_inv``.

    Tensors for which ``predicate(name)`` is False, or that are not 2-D floating point, are copied unchanged.
    The shard layout (and index, if any) is kept; config.json gains the DeepSeek-V3 ``quantization_config``.
    Other files (tokenizer, generation config) are copied as they are.
    """
    src, dst = checkpoint_dir(src_dir), Path(dst_dir)
    config = read_hf_config(src)
    files = list_weight_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for f in files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(f), framework="pt") as handle:
            metadata = handle.metadata()
            for name in handle.keys():
                t = handle.get_tensor(name)
                if predicate(name) and t.dim() == 2 and t.is_floating_point():
                    out[name], out[name + SCALE_SUFFIX] = quantize_fp8_block(t, DEFAULT_BLOCK)
                else:
                    out[name] = t
        save_file(out, str(dst / f.name), metadata=metadata)
        weight_map.update(dict.fromkeys(out, f.name))
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not item.name.endswith(".index.json"):
            if item.name != "config.json":
                shutil.copyfile(item, dst / item.name)
        elif item.name.endswith(".safetensors.index.json"):
            index = read_json(item)
            index["weight_map"] = weight_map
            (dst / item.name).write_text(json.dumps(index, indent=2), encoding="utf-8")
    config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    (dst / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
