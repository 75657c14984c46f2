"""The small fused kernels of the decode forward (RMSNorm + residual, q/k norm + rotary, router top-k) against
their torch references, and the model wiring that uses them.

Three groups:
- CPU, plain: launcher validation, the torch paths the CPU keeps, GQA's fused qkv parameter loaded through
  the checkpoint's q/k/v names.
- CPU, Triton interpreter: the kernels on tiny fp32/fp16 shapes (the interpreter is wrong for bf16).
  TRITON_INTERPRET must be set before triton is first imported, so `test_fused_kernels_under_interpreter`
  re-runs this file's `test_interp_*` tests in a fresh subprocess.
- GPU (`gpu` marker): bf16 at Qwen3-30B-A3B shapes, CUDA-graph capture, and a tiny model with the fused
  paths against the same model with them switched off.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.layers.rotary import rope_inv_freq
from tests.interp import interp, launches_interpreter_run, run_interpreter_tests


def inv_freq(rotary_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """[rotary_dim // 2] float32, unscaled."""
    return rope_inv_freq(rotary_dim, theta, None)[0]


def assert_same_topk(got, want, atol: float) -> None:
    """Same expert set per row; weights compared expert by expert (the order within a row is free)."""
    (gw, gi), (ww, wi) = got, want
    assert gi.dtype == torch.int32 and gw.dtype == torch.float32
    g_sorted, g_order = gi.long().sort(dim=1)
    w_sorted, w_order = wi.long().sort(dim=1)
    assert torch.equal(g_sorted, w_sorted)
    torch.testing.assert_close(gw.gather(1, g_order), ww.gather(1, w_order), atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- CPU, no kernel launches


@pytest.mark.parametrize("case", ["rope_dim", "rope_norm_pair", "rope_layout", "norm_weight", "topk_k",
                                  "router_shape", "router_dtype", "router_tokens"])
def test_launchers_reject_bad_inputs(case):
    from moeserve.kernels.norm import rms_norm
    from moeserve.kernels.rope import apply_rope
    from moeserve.kernels.router_topk import MAX_FUSED_TOKENS, router_topk
    from moeserve.kernels.topk_softmax import topk_softmax

    q, k, pos = torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.arange(2)
    with pytest.raises(ValueError):
        if case == "rope_dim":
            apply_rope(q, k, pos, inv_freq(18))
        elif case == "rope_norm_pair":
            apply_rope(q, k, pos, inv_freq(16), q_norm_weight=torch.randn(16))
        elif case == "rope_layout":
            apply_rope(q.transpose(1, 2), k, pos, inv_freq(16))
        elif case == "norm_weight":
            rms_norm(q, torch.randn(8), 1e-6)
        elif case == "router_shape":
            router_topk(torch.randn(3, 16), torch.randn(8, 12), 2)
        elif case == "router_dtype":
            router_topk(torch.randn(3, 16), torch.randn(8, 16).half(), 2)
        elif case == "router_tokens":
            router_topk(torch.randn(MAX_FUSED_TOKENS + 1, 16), torch.randn(8, 16), 2)
        else:
            topk_softmax(torch.randn(3, 4), 5)


def test_cpu_keeps_the_torch_paths():
    from moeserve.backend_choice import fused_kernels_available
    from moeserve.layers.norm import RMSNorm
    from moeserve.layers.rotary import RotaryEmbedding

    x, res = torch.randn(3, 8), torch.randn(3, 8)
    assert not fused_kernels_available(x)
    norm = RMSNorm(8, 1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    h, r = norm.add_norm(x, res)
    assert torch.equal(r, res + x) and torch.equal(h, norm(res + x))
    h0, r0 = norm.add_norm(x, None)
    assert r0 is x and torch.equal(h0, norm(x))
    rope = RotaryEmbedding(8, 10000.0, None)(torch.tensor([0, 3, 9]))
    assert not rope.fused and rope.cos.shape == (3, 4)


def test_gqa_fused_qkv_loads_through_checkpoint_names(tiny_checkpoint):
    from safetensors.torch import load_file

    from moeserve.loader.checkpoint import read_hf_config
    from moeserve.loader.model_loader import load_model
    from moeserve.models.base import ModelContext
    from moeserve.models.config import ModelConfig

    path = tiny_checkpoint("qwen2_moe")  # q/k/v with biases
    cfg = ModelConfig.from_hf(read_hf_config(path))
    model, _ = load_model(path, ModelContext.single_device(cfg, attention="torch", expert_kernel="torch"))
    names = model.required_weight_names()
    assert "model.layers.0.self_attn.k_proj.bias" in names
    assert not any("qkv_proj" in n for n in names)
    ckpt = {}
    for f in sorted(path.glob("*.safetensors")):
        ckpt.update(load_file(f))
    attn = model.model.layers[1].self_attn
    for part in ("weight", "bias"):
        want = torch.cat([ckpt[f"model.layers.1.self_attn.{p}_proj.{part}"] for p in "qkv"])
        assert torch.equal(getattr(attn.qkv_proj, part), want)


# ---------------------------------------------------------------- CPU, Triton interpreter


@launches_interpreter_run
def test_fused_kernels_under_interpreter():
    """Runs the `test_interp_*` tests below in a subprocess with TRITON_INTERPRET=1."""
    run_interpreter_tests(__file__)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 48), (3, 4, 16)])
def test_interp_rms_norm_matches_reference(dtype, shape):
    from moeserve.kernels.norm import rms_norm, rms_norm_reference

    g = torch.Generator().manual_seed(1)
    x, res = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    (h, r), (h_ref, r_ref) = rms_norm(x, w, 1e-5, res), rms_norm_reference(x, w, 1e-5, res)
    assert torch.equal(r, r_ref)  # the new residual stream is exactly torch's add
    torch.testing.assert_close(h, h_ref)


@interp
def test_interp_rms_norm_strided_rows():
    """A column slice of a wider row (MLA's latent beside k_pe) is normalised in place of a copy."""
    from moeserve.kernels.norm import rms_norm, rms_norm_reference

    wide = torch.randn(4, 40)
    x, w = wide[:, :32], torch.rand(32) + 0.5
    assert not x.is_contiguous()
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 12])
@pytest.mark.parametrize("norm", [False, True])
def test_interp_rope_matches_reference(dtype, interleaved, rotary_dim, norm):
    from moeserve.kernels.rope import apply_rope, rope_reference

    g = torch.Generator().manual_seed(2)
    # q and k as views of one fused projection output, as GQA passes them.
    qkv = torch.randn(3, 5 + 2 + 2, 16, generator=g).to(dtype)
    q, k, _ = qkv.split([5, 2, 2], dim=1)
    pos = torch.tensor([0, 7, 100_003])  # far positions exercise the 2*pi reduction
    freqs = inv_freq(rotary_dim)
    kw = {}
    if norm:
        kw = dict(q_norm_weight=(torch.rand(16, generator=g) + 0.5).to(dtype),
                  k_norm_weight=(torch.rand(16, generator=g) + 0.5).to(dtype), eps=1e-6)
    want = rope_reference(q, k, pos, freqs, 0.8, interleaved=interleaved, **kw)
    got = apply_rope(q, k, pos, freqs, 0.8, interleaved=interleaved, **kw)
    for a, b in zip(got, want):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, atol=2e-5 if dtype == torch.float32 else 2e-3, rtol=1e-3)
    before = qkv.clone()
    q2, k2 = apply_rope(q, k, pos, freqs, 0.8, interleaved=interleaved, inplace=True, **kw)
    assert q2.data_ptr() == q.data_ptr()
    torch.testing.assert_close(qkv[:, :7], torch.cat(got, dim=1))
    assert torch.equal(qkv[:, 7:], before[:, 7:])  # v untouched


@interp
def test_interp_rope_single_tensor_strided():
    """MLA: q_pe is the tail of each [nope | rope] head, rotated out of place, no k."""
    from moeserve.kernels.rope import apply_rope, rope_reference

    q = torch.randn(4, 3, 24)[..., 16:]
    pos = torch.tensor([5, 0, 31, 2])
    got, none = apply_rope(q, None, pos, inv_freq(8), interleaved=True)
    assert none is None
    torch.testing.assert_close(got, rope_reference(q, None, pos, inv_freq(8), interleaved=True)[0])


@interp
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.float16, torch.float32)])
@pytest.mark.parametrize("norm", [False, True])
def test_interp_rope_stores_k_and_v_in_the_paged_cache(dtype, cache_dtype, norm):
    """kv_write: the launch that rotates k also stores it, and v, at each token's slot, exactly what
    `store_kv_reference` stores from its outputs; every other slot is left as it was."""
    from moeserve.kernels.kv_store import KVWrite, store_kv_reference
    from moeserve.kernels.rope import apply_rope

    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(5, 4 + 2 + 2, 16, generator=g).to(dtype)
    q, k, v = qkv.split([4, 2, 2], dim=1)
    k_cache = torch.randn(6, 4, 2, 16, generator=g).to(cache_dtype)
    v_cache = torch.randn(6, 4, 2, 16, generator=g).to(cache_dtype)
    slots = torch.randperm(24, generator=g)[:5]
    kw = {}
    if norm:
        kw = dict(q_norm_weight=(torch.rand(16, generator=g) + 0.5).to(dtype),
                  k_norm_weight=(torch.rand(16, generator=g) + 0.5).to(dtype))
    pos = torch.tensor([3, 0, 70, 9, 1])
    q_plain, k_plain = apply_rope(q, k, pos, inv_freq(12), **kw)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    store_kv_reference(k_plain, v, kc_ref, vc_ref, slots)
    q_got, k_got = apply_rope(q, k, pos, inv_freq(12), **kw, inplace=True,
                              kv_write=KVWrite(v, k_cache, v_cache, slots))
    assert torch.equal(q_got, q_plain) and torch.equal(k_got, k_plain)
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)


def test_kv_write_fits_refuses_what_the_kernel_cannot_store():
    from moeserve.kernels.kv_store import KVWrite
    from moeserve.kernels.rope import apply_rope, kv_write_fits

    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 8)
    kc, vc, slots = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 8), torch.tensor([5, 0, 9])
    assert kv_write_fits(k, KVWrite(v, kc, vc, slots))
    bad = {
        "cache heads": KVWrite(v, torch.zeros(4, 4, 3, 16), vc, slots),
        "k cache width": KVWrite(v, torch.zeros(4, 4, 2, 8), vc, slots),
        "v cache width": KVWrite(v, kc, torch.zeros(4, 4, 2, 16), slots),
        "block counts": KVWrite(v, kc, torch.zeros(5, 4, 2, 8), slots),
        "slots": KVWrite(v, kc, vc, slots[:2]),
        "slot dtype": KVWrite(v, kc, vc, slots.float()),
        "strided cache": KVWrite(v, torch.zeros(4, 4, 2, 32)[..., :16], vc, slots),
        "v heads": KVWrite(torch.randn(3, 1, 8), kc, vc, slots),
    }
    for what, w in bad.items():
        assert not kv_write_fits(k, w), what
    assert not kv_write_fits(None, KVWrite(v, kc, vc, slots))
    with pytest.raises(ValueError, match="kv_write"):
        apply_rope(torch.randn(3, 4, 16), k, torch.arange(3), inv_freq(16), kv_write=bad["slots"])


@interp
@pytest.mark.parametrize("num_experts,top_k", [(60, 4), (128, 8), (8, 2)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_interp_topk_softmax_matches_reference(num_experts, top_k, renormalize):
    from moeserve.kernels.topk_softmax import topk_softmax, topk_softmax_reference

    logits = torch.randn(7, num_experts, generator=torch.Generator().manual_seed(3)) * 3
    kw = dict(renormalize=renormalize, scaling_factor=1.5)
    assert_same_topk(topk_softmax(logits, top_k, **kw), topk_softmax_reference(logits, top_k, **kw), 1e-6)


@interp
@pytest.mark.parametrize("num_real", [0, 3, 7])
def test_interp_topk_softmax_padding_rows_choose_nothing(num_real):
    from moeserve.kernels.topk_softmax import topk_softmax, topk_softmax_reference

    logits = torch.randn(7, 16, generator=torch.Generator().manual_seed(4)) * 3
    weights, ids = topk_softmax(logits, 4, renormalize=True, num_real_tokens=torch.tensor([num_real]).int())
    assert torch.all(ids[num_real:] == -1) and torch.all(weights[num_real:] == 0)
    ref_w, ref_i = topk_softmax_reference(logits[:num_real], 4, renormalize=True)
    assert_same_topk((weights[:num_real], ids[:num_real]), (ref_w, ref_i), 1e-6)


def _kv_case(device, dtype, t=6, blocks=5, bs=4, heads=2, dk=16, dv=8, seed=5):
    """New k/v (k a strided view, as a fused qkv projection gives), caches full of random values, and
    distinct random slots."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, 3 * heads, dk, generator=g).to(device=device, dtype=dtype)
    k = qkv[:, heads : 2 * heads]
    v = torch.randn(t, heads, dv, generator=g).to(device=device, dtype=dtype)
    k_cache = torch.randn(blocks, bs, heads, dk, generator=g).to(device=device, dtype=dtype)
    v_cache = torch.randn(blocks, bs, heads, dv, generator=g).to(device=device, dtype=dtype)
    slots = torch.randperm(blocks * bs, generator=g)[:t].to(device)
    return k, v, k_cache, v_cache, slots


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_store_kv_matches_reference(dtype):
    from moeserve.kernels.kv_store import store_kv, store_kv_reference

    k, v, kc, vc, slots = _kv_case("cpu", dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv_reference(k, v, kc_ref, vc_ref, slots)
    assert store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def _argmax_logits(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """Random logits with hard cases: a row of few distinct values (many tied maxima, across chunks), a row of
    -inf but for one entry near the end, a row all -inf, and a row with NaN (torch ranks it first)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 3
    x[1] = torch.randint(0, 4, (vocab,), generator=g).float()
    x[2] = float("-inf")
    x[2, vocab - 3] = -5.0
    x[3] = float("-inf")
    x[4, vocab // 2] = float("nan")
    return x.to(dtype).to(device)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab", [151936, 10001, 7])
def test_interp_argmax_rows_equals_torch_argmax(dtype, vocab):
    from moeserve.kernels.argmax import argmax_rows

    logits = _argmax_logits(6, max(vocab, 8), dtype, "cpu")[:, :vocab]
    got = argmax_rows(logits.contiguous())
    assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1))
    assert torch.equal(argmax_rows(logits[2:3].contiguous()), logits[2:3].argmax(dim=-1))  # one row


@interp
def test_interp_argmax_rows_writes_out_and_the_steps_host_row():
    """The decode graph's argmax: into the given output and into row (step % 2) of the host's two rows, the other
    row untouched."""
    from moeserve.kernels.argmax import argmax_rows

    logits = _argmax_logits(6, 10001, torch.float32, "cpu", seed=4)
    out = torch.full((8,), -7, dtype=torch.int64)
    host = torch.full((2, 8), -7, dtype=torch.int64)
    got = argmax_rows(logits, out, host, torch.tensor([5]))
    want = logits.argmax(dim=-1)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out[:6], want) and (out[6:] == -7).all()
    assert torch.equal(host[1, :6], want) and (host[0] == -7).all() and (host[1, 6:] == -7).all()


def _step_staging_case(seed: int, rows: int = 5, max_batch: int = 8, max_blocks: int = 150, width: int = 131):
    """A filled staging and two copies of random device buffers: rows with and without placeholder sources, the
    tables' width this step (past one 64-entry block, exactly one, or within one), padding rows beyond `rows`
    that must stay untouched."""
    from moeserve.runner.cuda_graphs import StepStaging, StepTargets

    g = torch.Generator().manual_seed(seed)
    staging = StepStaging.allocate(max_batch, max_blocks, pinned=False)
    staging.meta[:] = torch.tensor([41, rows - 1, width])
    staging.tokens[:3] = torch.randint(0, 1000, (3, max_batch), generator=g)
    staging.tokens[3] = torch.tensor([-1, 3, -1, 0, 6, -1, 2, 2])
    staging.seq_lens[:] = torch.randint(1, 500, (max_batch,), generator=g, dtype=torch.int32)
    staging.tables[:] = torch.randint(0, 10**6, (max_batch, max_blocks), generator=g, dtype=torch.int32)

    def targets():
        g2 = torch.Generator().manual_seed(seed + 1)
        return StepTargets(
            tokens=torch.randint(0, 10**6, (3, max_batch), generator=g2),
            seq_lens=torch.randint(0, 10**6, (max_batch,), generator=g2, dtype=torch.int32),
            num_real=torch.zeros(1, dtype=torch.int32),
            tables=torch.randint(0, 10**6, (max_batch, max_blocks), generator=g2, dtype=torch.int32),
            step=torch.zeros(1, dtype=torch.int64),
            sampled=torch.randint(0, 10**6, (12,), generator=g2),
        )

    return staging, targets(), targets(), rows


@interp
@pytest.mark.parametrize("seed, rows, max_blocks, width", [(0, 5, 150, 131), (1, 5, 150, 64), (2, 1, 40, 30)])
def test_interp_step_inputs_kernel_equals_its_reference(seed, rows, max_blocks, width):
    """The decode graph's first kernel against `cuda_graphs.load_step_inputs`' torch reference: rows [0, rows)
    of every buffer, placeholders from `sampled`, the step's number and real rows, `consumed`; nothing else."""
    from moeserve.kernels.step_inputs import load_step_inputs as kernel
    from moeserve.runner.cuda_graphs import load_step_inputs as reference

    staging, got, want, rows = _step_staging_case(seed, rows, max_blocks=max_blocks, width=width)
    before = got.tables.clone()
    kernel(staging, got, rows)
    consumed = int(staging.consumed[0])
    staging.consumed.fill_(-1)
    reference(staging, want, rows)
    for name in ("tokens", "seq_lens", "num_real", "tables", "step", "sampled"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert consumed == int(staging.consumed[0]) == 41
    assert torch.equal(got.tokens[0, :rows], torch.where(staging.tokens[3, :rows] >= 0,
                                                         want.sampled[staging.tokens[3, :rows].clamp(min=0)],
                                                         staging.tokens[0, :rows]))
    assert torch.equal(got.tables[:, width:], before[:, width:]) and torch.equal(got.tables[rows:], before[rows:])


# ---------------------------------------------------------------- GPU (bf16, target shapes)


@pytest.mark.gpu
def test_gpu_store_kv_bf16_and_in_the_backend():
    from moeserve.attention.triton_backend import TritonAttentionBackend
    from moeserve.kernels.kv_store import store_kv_reference

    k, v, kc, vc, slots = _kv_case("cuda", torch.bfloat16, t=64, blocks=40, bs=16, heads=4, dk=128, dv=128)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv_reference(k, v, kc_ref, vc_ref, slots)

    class Meta:
        slot_mapping = slots

    TritonAttentionBackend().write_kv(kc, vc, k, v, Meta())
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)

QWEN3 = dict(hidden=2048, q_heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8, eps=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 256])
def test_gpu_add_norm_bf16(t):
    from moeserve.kernels.norm import rms_norm, rms_norm_reference

    x, res = (torch.randn(t, QWEN3["hidden"], device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(QWEN3["hidden"], device="cuda", dtype=torch.bfloat16) + 0.5
    (h, r), (h_ref, r_ref) = rms_norm(x, w, 1e-6, res), rms_norm_reference(x, w, 1e-6, res)
    assert torch.equal(r, r_ref)
    torch.testing.assert_close(h, h_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 256])
def test_gpu_qk_norm_rope_bf16(t):
    from moeserve.kernels.rope import apply_rope, rope_reference

    hq, hk, d = QWEN3["q_heads"], QWEN3["kv_heads"], QWEN3["head_dim"]
    qkv = torch.randn(t, hq + 2 * hk, d, device="cuda", dtype=torch.bfloat16)
    q, k, _ = qkv.split([hq, hk, hk], dim=1)
    pos = torch.randint(0, 40_000, (t,), device="cuda")
    w = dict(q_norm_weight=torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5,
             k_norm_weight=torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5)
    freqs = inv_freq(d, 1e6).cuda()
    want = rope_reference(q, k, pos, freqs, **w)
    got = apply_rope(q, k, pos, freqs, **w, inplace=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 256])
def test_gpu_topk_softmax(t):
    from moeserve.kernels.topk_softmax import topk_softmax, topk_softmax_reference

    logits = torch.randn(t, QWEN3["experts"], device="cuda") * 2
    kw = dict(renormalize=True)
    assert_same_topk(topk_softmax(logits, QWEN3["top_k"], **kw),
                     topk_softmax_reference(logits, QWEN3["top_k"], **kw), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 6, 256])
def test_gpu_argmax_rows_and_the_greedy_sampler(rows):
    """The greedy sampler's argmax on Qwen3's vocabulary in bf16 equals torch.argmax (ties included)."""
    from moeserve.kernels.argmax import argmax_rows
    from moeserve.runner.sampler import Sampler, SamplingRow
    from moeserve.sampling_params import SamplingParams

    logits = _argmax_logits(max(rows, 6), 151936, torch.bfloat16, "cuda", seed=rows)[:rows]
    want = logits.argmax(dim=-1)
    assert torch.equal(argmax_rows(logits), want)
    greedy = [SamplingRow(SamplingParams(temperature=0.0), 0) for _ in range(rows)]
    assert Sampler()(logits, greedy)[0] == want.tolist()


@pytest.mark.gpu
def test_gpu_kernels_replay_in_cuda_graph():
    from moeserve.kernels.norm import rms_norm, rms_norm_reference
    from moeserve.kernels.rope import apply_rope, rope_reference
    from moeserve.kernels.topk_softmax import topk_softmax, topk_softmax_reference

    t, h, d = 8, QWEN3["hidden"], QWEN3["head_dim"]
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(h, device="cuda", dtype=torch.bfloat16) + 0.5
    q = torch.randn(t, 4, d, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(t, device="cuda")
    freqs = inv_freq(d).cuda()
    logits = torch.randn(t, QWEN3["experts"], device="cuda")

    def step():
        return rms_norm(x, w, 1e-6), apply_rope(q, None, pos, freqs)[0], topk_softmax(logits, 8)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for buf in (x, q, logits):
        buf.copy_(torch.randn_like(buf))
    pos.copy_(torch.randint(0, 5000, (t,), device="cuda"))
    graph.replay()
    torch.testing.assert_close(outs[0], rms_norm_reference(x, w, 1e-6))
    torch.testing.assert_close(outs[1], rope_reference(q, None, pos, freqs)[0], atol=2e-2, rtol=2e-2)
    assert_same_topk(outs[2], topk_softmax_reference(logits, 8), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "deepseek_v2"])
def test_gpu_model_fused_paths_match_torch_paths(arch, tiny_checkpoint, monkeypatch):
    """The same tiny model on CUDA in float32, fused kernels (norm, rotary, router GEMM + top-k) on vs off:
    equal hidden states up to rounding. Fused, GQA layers store k and v from the rotary kernel (the backend's
    write_kv does not run); MLA layers still write their latent through the backend."""
    import moeserve.layers.norm as norm_mod
    import moeserve.layers.rotary as rotary_mod
    import moeserve.moe.routing as routing_mod
    from moeserve.forward_batch import build_forward_batch
    from moeserve.loader.checkpoint import read_hf_config
    from moeserve.loader.model_loader import load_model
    from moeserve.models.base import ModelContext
    from moeserve.models.config import ModelConfig

    path = tiny_checkpoint(arch)
    cfg = ModelConfig.from_hf(read_hf_config(path))
    ctx = ModelContext.single_device(cfg, torch.float32, "cuda", attention="torch", expert_kernel="torch")
    model, _ = load_model(path, ctx)
    g = torch.Generator().manual_seed(0)
    caches = []
    for s in model.kv_cache_specs():
        k = torch.randn(16, 4, s.num_kv_heads, s.k_dim, generator=g).cuda()
        v = k[..., : s.v_dim] if s.v_is_k_prefix else torch.randn(16, 4, s.num_kv_heads, s.v_dim, generator=g).cuda()
        caches.append((k, v))
    model.bind_kv_caches(caches)

    def run() -> torch.Tensor:
        batch = build_forward_batch([[3, 5, 7, 11, 13], [200, 17, 4]], [0, 0], [[0, 1], [2]], 4,
                                    sample_rows=[list(range(5)), list(range(3))], device="cuda")
        with torch.inference_mode():
            return model(batch).float()

    import moeserve.kernels.router_topk as router_mod
    from moeserve.attention.base import AttentionBackend

    calls, writes = [], []
    fused_router, write_kv = router_mod.router_topk, AttentionBackend.write_kv
    monkeypatch.setattr(router_mod, "router_topk", lambda *a, **kw: calls.append(1) or fused_router(*a, **kw))
    monkeypatch.setattr(AttentionBackend, "write_kv", lambda self, *a: writes.append(1) or write_kv(self, *a))
    fused = run()
    assert calls, "the fused router GEMM + top-k did not run"  # every tiny arch here routes softmax-greedy
    assert bool(writes) == (arch == "deepseek_v2"), writes
    for mod in (norm_mod, rotary_mod, routing_mod):
        monkeypatch.setattr(mod, "fused_kernels_available", lambda x: False)
    plain = run()
    err, scale = (fused - plain).abs().max().item(), plain.abs().max().item()
    assert err <= 1e-4 * scale, f"max |diff| {err:.3g} vs max |h| {scale:.3g}"
