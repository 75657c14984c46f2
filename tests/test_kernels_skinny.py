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
from tests.interp import interp, launches_interpreter_run, run_interpreter_tests


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    ref = x.double() @ w.double().T
    return ref if b is None else ref + b.double()


@launches_interpreter_run
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


def _projection_then_rope(x, w, b, hq, hk, positions, inv_freq, factor, qw, kw, eps, caches, slots):
    """What `qkv_rope` replaces: `skinny_linear`, then `apply_rope(..., inplace=True, kv_write=...)` into copies
    of caches (no store when slots is None). Returns (qkv [T, Hq + 2 Hk, D], the caches' copies)."""
    from moeserve.kernels.kv_store import KVWrite
    from moeserve.kernels.rope import apply_rope
    from moeserve.kernels.skinny_gemm import skinny_linear

    ref = skinny_linear(x, w, b).view(x.shape[0], hq + 2 * hk, -1)
    q, k, v = ref.split([hq, hk, hk], dim=1)
    ref_caches = [c.clone() for c in caches]
    apply_rope(q, k, positions, inv_freq, factor, q_norm_weight=qw, k_norm_weight=kw, eps=eps, inplace=True,
               kv_write=KVWrite(v, *ref_caches, slots) if slots is not None else None)
    return ref, ref_caches


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 128), (64, 32)], ids=["1-tile", "2-tiles", "partial"])
def test_interp_qkv_rope_equals_projection_then_rope(dtype, head_dim, rotary_dim):
    """`qkv_rope` against `skinny_linear` followed by `apply_rope(..., inplace=True, kv_write=...)`: the same
    bits in qkv and in both caches (other slots untouched), with and without the q/k norm, bias and the cache
    store, heads of one and of two column tiles (the last tile to arrive finishes the head), partial rotary,
    one to several rows, and a second call (the head counters reset themselves)."""
    from moeserve.kernels.qkv_rope import qkv_rope, qkv_rope_fits

    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    hq, hk, hidden = 4, 2, 96
    n = (hq + 2 * hk) * head_dim
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    for t, norm, bias, store in ((1, True, False, True), (3, True, True, True), (5, False, False, False),
                                 (2, False, True, True)):
        x = torch.randn(t, hidden, generator=gen).to(dtype)
        w = (torch.randn(n, hidden, generator=gen) * hidden**-0.5).to(dtype)
        b = torch.randn(n, generator=gen).to(dtype) if bias else None
        qw, kw = (1 + 0.1 * torch.randn(2, head_dim, generator=gen)).to(dtype).unbind(0) if norm else (None, None)
        positions = torch.randint(0, 5000, (t,), generator=gen)
        caches = [torch.randn(3, 4, hk, head_dim, generator=gen).to(dtype) for _ in range(2)]
        slots = torch.randperm(12, generator=gen)[:t]
        kv = (*(c.clone() for c in caches), slots) if store else None
        assert qkv_rope_fits(x, w, hq, hk, False, kv) and not qkv_rope_fits(x, w, hq, hk, True, kv)

        ref, ref_caches = _projection_then_rope(x, w, b, hq, hk, positions, inv_freq, 1.25, qw, kw, 1e-5, caches,
                                                slots if store else None)
        for _ in range(2):
            out = qkv_rope(x, w, b, hq, hk, positions, inv_freq, 1.25, q_norm_weight=qw, k_norm_weight=kw,
                           eps=1e-5, kv_cache=kv)
            assert torch.equal(out, ref), (t, norm, bias, store)
        if store:
            assert torch.equal(kv[0], ref_caches[0]) and torch.equal(kv[1], ref_caches[1])


def test_skinny_rejects_bad_input():
    from moeserve.kernels.skinny_gemm import MAX_ROWS, skinny_linear

    with pytest.raises(ValueError, match="at most"):
        skinny_linear(torch.randn(MAX_ROWS + 1, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="need x"):
        skinny_linear(torch.randn(2, 8), torch.randn(4, 6))


def test_default_config_fills_one_wave():
    from moeserve.kernels.skinny_gemm import SkinnyConfig, default_config

    qkv, o_proj = default_config(5120, 2048, 132), default_config(2048, 4096, 132)
    assert qkv.split_k == 1 and o_proj.split_k == 4  # the measured best of the sweep
    # wider than a wave (an LM head): one unsplit stream, the measured best
    assert default_config(151936, 2048, 132) == SkinnyConfig(block_n=64, block_k=256, split_k=1, num_stages=4)
    for n, k in ((5120, 2048), (2048, 4096), (576, 2048), (128, 2048)):
        cfg = default_config(n, k, 132)
        assert -(-n // cfg.block_n) * cfg.split_k <= 132 or cfg.split_k == 1
        assert k // cfg.split_k >= 512 or cfg.split_k == 1


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(5120, 2048), (2048, 4096), (576, 2048), (6144, 4096), (10000, 2048)])
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


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk,d,hidden,bias", [(32, 4, 128, 2048, False), (32, 8, 128, 4096, False),
                                                  (16, 16, 128, 2048, True)], ids=["qwen3", "mixtral", "qwen2"])
@pytest.mark.parametrize("m", [1, 7, 16])
def test_gpu_qkv_rope_bf16_equals_projection_then_rope(hq, hk, d, hidden, bias, m):
    """bf16 at real GQA shapes (Qwen3-30B-A3B with its q/k norm, Mixtral, Qwen2-MoE's biases): the fused launch
    gives the bits of `skinny_linear` + `apply_rope` in qkv and in both caches, and replays in a CUDA graph with
    new inputs, positions and slots."""
    from moeserve.kernels.qkv_rope import qkv_rope, qkv_rope_fits

    torch.manual_seed(hq + hk + m)
    n = (hq + 2 * hk) * d
    x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16) * hidden**-0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    qw, kw = (torch.rand(2, d, device="cuda") + 0.5).to(torch.bfloat16).unbind(0) if hq == 32 else (None, None)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d))
    positions = torch.randint(0, 30000, (m,), device="cuda")
    slots = torch.randperm(64 * 16, device="cuda")[:m]
    caches = [torch.randn(64, 16, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    assert qkv_rope_fits(x, w, hq, hk, False, (*caches, slots))

    def fused():
        return qkv_rope(x, w, b, hq, hk, positions, inv_freq, q_norm_weight=qw, k_norm_weight=kw, eps=1e-6,
                        kv_cache=(*caches, slots))

    def two_launches():
        return _projection_then_rope(x, w, b, hq, hk, positions, inv_freq, 1.0, qw, kw, 1e-6, caches, slots)

    ref, ref_caches = two_launches()
    out = fused()
    assert torch.equal(out, ref) and all(torch.equal(c, r) for c, r in zip(caches, ref_caches))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        positions.copy_(torch.randint(0, 30000, (m,), device="cuda"))
        slots.copy_(torch.randperm(64 * 16, device="cuda")[:m])
        ref, ref_caches = two_launches()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref) and all(torch.equal(c, r) for c, r in zip(caches, ref_caches))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_gpu_gqa_layers_take_qkv_rope_with_the_same_bits(arch, tiny_checkpoint, monkeypatch):
    """A bf16 model with 64-wide heads (whole 64-column tiles) on CUDA: decode-size batches project q|k|v,
    normalise, rotate and store K/V in one launch (`qkv_rope`, the backend's write_kv unused), and the hidden
    states are bit-identical to the projection + rotary kernel path."""
    from moeserve.attention.base import AttentionBackend
    from moeserve.forward_batch import build_forward_batch
    from moeserve.kernels import qkv_rope as qkv_rope_mod
    from moeserve.layers.attention import GQAAttention
    from moeserve.loader.checkpoint import read_hf_config
    from moeserve.loader.model_loader import load_model
    from moeserve.models.base import ModelContext
    from moeserve.models.config import ModelConfig

    path = tiny_checkpoint(arch, head_dim=64)
    cfg = ModelConfig.from_hf(read_hf_config(path))
    model, _ = load_model(path, ModelContext.single_device(cfg, torch.bfloat16, "cuda"))
    caches = [tuple(torch.zeros(16, 4, s.num_kv_heads, s.k_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2)) for s in model.kv_cache_specs()]
    model.bind_kv_caches(caches)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        for k, v in caches:
            k.zero_(), v.zero_()
        batch = build_forward_batch([[3, 5, 7, 11, 13], [200, 17, 4]], [0, 0], [[0, 1], [2]], 4,
                                    sample_rows=[[4], [2]], device="cuda")
        with torch.inference_mode():
            return model(batch), [c.clone() for kv in caches for c in kv]

    calls, writes = [], []
    real, write_kv = qkv_rope_mod.qkv_rope, AttentionBackend.write_kv
    monkeypatch.setattr(qkv_rope_mod, "qkv_rope", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(AttentionBackend, "write_kv", lambda self, *a: writes.append(1) or write_kv(self, *a))
    fused, fused_caches = run()
    assert len(calls) == cfg.num_layers and not writes
    monkeypatch.setattr(GQAAttention, "_qkv_rope", lambda *a: None)
    plain, plain_caches = run()
    assert torch.equal(fused, plain) and all(torch.equal(a, b) for a, b in zip(fused_caches, plain_caches))
