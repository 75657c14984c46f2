"""`skinny_linear` (decode-size projections, split-K reduced in one launch) against an fp64 reference.

- CPU, Triton interpreter: fp32/fp16 inputs (the interpreter is wrong for bf16), random shapes with ragged
  tiles, K splits that do and do not divide K, bias, and repeated calls (the split counters must reset).
- GPU (`gpu` marker): bf16 at real projection shapes, the default configs, bitwise run-to-run determinism,
  replay inside a CUDA graph with new inputs, and `Linear` taking this path for decode-size inputs only.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.kernels.attention_reference import rel_err
from tests.interp import interp, run_interpreter_tests


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    ref = x.double() @ w.double().T
    return ref if b is None else ref + b.double()


def test_skinny_kernel_under_interpreter():
    """Runs the `test_interp_*` tests below in a subprocess with TRITON_INTERPRET=1."""
    run_interpreter_tests(__file__)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_skinny_matches_reference(dtype):
    from moeserve.kernels.skinny_gemm import SkinnyConfig, skinny_linear

    gen = torch.Generator().manual_seed(0)
    cases = [  # (rows, N, K, config)
        (1, 40, 96, SkinnyConfig(block_n=16, block_k=32, split_k=2, num_stages=2)),
        (5, 70, 300, SkinnyConfig(block_n=32, block_k=64, split_k=3, num_stages=2)),  # ragged N, K, splits
        (16, 33, 64, SkinnyConfig(block_n=16, block_k=32, split_k=1, num_stages=2)),
        (3, 64, 1024, None),  # the default config: split over K
    ]
    for m, n, k, cfg in cases:
        for bias in (False, True):
            x = torch.randn(m, k, generator=gen).to(dtype)
            w = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype) if bias else None
            ref = _reference(x, w, b)
            for _ in range(2):  # the second call reuses the split counters the first one reset
                y = skinny_linear(x, w, b, cfg)
                assert y.shape == (m, n) and y.dtype == dtype
                assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 2e-3), (m, n, k, cfg, bias)


def test_skinny_rejects_bad_input():
    from moeserve.kernels.skinny_gemm import MAX_ROWS, skinny_linear

    with pytest.raises(ValueError, match="at most"):
        skinny_linear(torch.randn(MAX_ROWS + 1, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="need x"):
        skinny_linear(torch.randn(2, 8), torch.randn(4, 6))


def test_default_config_fills_one_wave():
    from moeserve.kernels.skinny_gemm import default_config

    qkv, o_proj = default_config(5120, 2048, 132), default_config(2048, 4096, 132)
    assert qkv.split_k == 1 and o_proj.split_k == 4  # the measured best of the sweep
    for n, k in ((5120, 2048), (2048, 4096), (576, 2048), (128, 2048)):
        cfg = default_config(n, k, 132)
        assert -(-n // cfg.block_n) * cfg.split_k <= 132 or cfg.split_k == 1
        assert k // cfg.split_k >= 512 or cfg.split_k == 1


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(5120, 2048), (2048, 4096), (576, 2048), (6144, 4096)])
@pytest.mark.parametrize("m", [1, 7, 16])
def test_skinny_bf16_matches_reference(n, k, m):
    from moeserve.kernels.skinny_gemm import skinny_linear

    torch.manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = skinny_linear(x, w, b)
    assert rel_err(y, _reference(x, w, b)) < 1e-2
    assert torch.equal(y, skinny_linear(x, w, b))  # deterministic: splits are summed in a fixed order


@pytest.mark.gpu
def test_skinny_replays_in_cuda_graph_with_new_inputs():
    from moeserve.kernels.skinny_gemm import skinny_linear

    torch.manual_seed(1)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) * 4096**-0.5
    skinny_linear(x, w)  # eager first: allocates the split scratch outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_linear(x, w)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, _reference(x, w, None)) < 1e-2


@pytest.mark.gpu
def test_linear_uses_skinny_for_decode_rows_only(monkeypatch):
    from moeserve.kernels import skinny_gemm
    from moeserve.layers.linear import Linear

    calls = []
    real = skinny_gemm.skinny_linear
    monkeypatch.setattr(skinny_gemm, "skinny_linear", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    layer = Linear(1024, 512, bias=True).to(device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.weight, std=0.03)
    torch.nn.init.normal_(layer.bias)
    for rows in (1, 16, 17, 300):
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
        assert rel_err(layer(x), ref) < 1e-2
    assert calls == [(1, 1024), (16, 1024)]
