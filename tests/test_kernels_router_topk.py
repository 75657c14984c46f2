"""The router GEMM fused with softmax top-k (`moeserve.kernels.router_topk`) against the unfused path, and
where `MoELayer.route` uses it.

- CPU, plain: which routings and shapes take the fused path (only where it computes the same and is faster).
- CPU, Triton interpreter (fp16/fp32; `test_router_topk_under_interpreter` re-runs the `test_interp_*` tests
  in a subprocess with TRITON_INTERPRET=1): several row blocks, expert blocks and hidden slices, exact ties,
  padding rows, the same choice as `topk_softmax` on the same logits; the completion counters are left at zero.
- GPU (`gpu` marker): bf16 at real router shapes, and replay inside a CUDA graph with new inputs, together
  with the one-launch split-KV decode that uses the same counters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.compiles import recorded_compilations
from tests.interp import interp, launches_interpreter_run, run_interpreter_tests
from tests.test_kernels_fused_small import assert_same_topk


def test_fused_router_only_where_it_computes_the_same(monkeypatch):
    """`MoELayer.route` fuses the router GEMM only for what `topk_softmax` covers, at the decode shapes where
    it is faster, on CUDA (CPU keeps the unfused code, bit for bit), and never while a hook observes the gate's
    logits."""
    import moeserve.moe.routing as routing
    from moeserve.kernels.router_topk import MAX_FUSED_TOKENS
    from moeserve.moe.layer import Router

    x, w = torch.randn(4, 32), torch.randn(16, 32)
    ok = dict(scoring="softmax", topk_method="greedy", correction_bias=None)
    assert not routing.fused_router_applies(x, w, 4, **ok)  # CPU
    monkeypatch.setattr(routing, "fused_kernels_available", lambda t: True)  # as on CUDA
    assert routing.fused_router_applies(x, w, 4, **ok)
    assert routing.fused_router_applies(x.bfloat16(), w, 4, **ok)  # fp32 router weights (DeepSeek)
    refused = [
        (x, w, 4, dict(ok, scoring="sigmoid")),
        (x, w, 4, dict(ok, topk_method="group_limited_greedy")),
        (x, w, 4, dict(ok, correction_bias=torch.zeros(16))),
        (torch.randn(MAX_FUSED_TOKENS + 1, 32), w, 4, ok),
        (torch.randn(16, 32), torch.randn(128, 32), 8, ok),  # Qwen3's 128 experts top-8 beyond T = 2: slower
        (x[:0], w, 4, ok),
        (x, w.bfloat16(), 4, ok),  # logits would be rounded to bf16, unlike F.linear's fp32
        (x, torch.randn(32, 16).t(), 4, ok),  # strided weight
        (x, w, 17, ok),
    ]
    for xx, ww, k, kw in refused:
        assert not routing.fused_router_applies(xx, ww, k, **kw)
    gate = Router(32, 16, fp32=False, correction_bias=False)
    assert not gate.observed
    hook = gate.register_forward_hook(lambda *args: None)
    assert gate.observed
    hook.remove()
    assert not gate.observed


@launches_interpreter_run
def test_router_topk_under_interpreter():
    """Runs the `test_interp_*` tests below in a subprocess with TRITON_INTERPRET=1."""
    run_interpreter_tests(__file__)


@interp
@pytest.mark.parametrize("t,e,h,k,splits", [
    (1, 16, 256, 2, None), (5, 60, 192, 4, None), (20, 128, 128, 8, None), (3, 8, 512, 2, 5), (33, 24, 128, 3, 2),
])
@pytest.mark.parametrize("renormalize", [False, True])
def test_interp_router_topk_matches_reference(t, e, h, k, splits, renormalize):
    """Several row blocks, expert blocks and hidden slices; the counters are left at 0; calls repeat exactly."""
    from moeserve.kernels.counters import completion_counters
    from moeserve.kernels.router_topk import router_topk, router_topk_reference

    g = torch.Generator().manual_seed(t * e)
    x, w = torch.randn(t, h, generator=g), torch.randn(e, h, generator=g) * 3 * h**-0.5
    kw = dict(renormalize=renormalize, scaling_factor=1.5)
    got = router_topk(x, w, k, k_splits=splits, **kw)
    assert_same_topk(got, router_topk_reference(x, w, k, **kw), 1e-6)
    again = router_topk(x, w, k, k_splits=splits, **kw)
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
    assert not completion_counters(x.device, 1).any()


@interp
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float16), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32)])
def test_interp_router_topk_exact_logits_and_ties(x_dtype, w_dtype):
    """Inputs whose logits every summation order gets exactly (eighths times small integers), with duplicated
    experts: choices in descending order, ties to the lowest expert id, in every dtype pairing."""
    from moeserve.kernels.router_topk import router_topk

    g = torch.Generator().manual_seed(6)
    x = torch.randint(-3, 4, (9, 128), generator=g).float() / 8
    w = torch.randint(-2, 3, (40, 128), generator=g).float()
    w[17], w[30], w[31] = w[5], w[2], w[2]
    logits = x @ w.t()  # exact in float32
    k = 6
    want_ids = logits.sort(dim=1, descending=True, stable=True).indices[:, :k]
    want_w = logits.softmax(-1).gather(1, want_ids)
    want_w = want_w / (want_w.sum(1, keepdim=True) + 1e-20) * 1.5
    weights, ids = router_topk(x.to(x_dtype), w.to(w_dtype), k, renormalize=True, scaling_factor=1.5, k_splits=2)
    assert torch.equal(ids, want_ids.int())
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-5)


@interp
@pytest.mark.parametrize("t,e,k", [(9, 40, 6), (20, 128, 8), (3, 8, 2)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_interp_router_topk_chooses_as_topk_softmax(t, e, k, renormalize):
    """The two kernels implement the same selection rules with different code (a packed-key max per pick over
    a row block here, a max then a lowest-index min per token there): on the same exact logits, with ties and
    a padding row, they choose the same ids in the same order with the same weights."""
    from moeserve.kernels.router_topk import router_topk
    from moeserve.kernels.topk_softmax import topk_softmax

    g = torch.Generator().manual_seed(t + e)
    x = torch.randint(-3, 4, (t, 128), generator=g).float() / 8
    w = torch.randint(-2, 3, (e, 128), generator=g).float()
    w[e // 2] = w[1]  # a tie in every row
    kw = dict(renormalize=renormalize, scaling_factor=1.5, num_real_tokens=torch.tensor([t - 1]).int())
    fused = router_topk(x.half(), w.half(), k, k_splits=2, **kw)
    unfused = topk_softmax(x @ w.t(), k, **kw)  # exact in float32, and in fp16 too
    assert torch.equal(fused[1], unfused[1])
    torch.testing.assert_close(fused[0], unfused[0], atol=1e-7, rtol=1e-6)


@interp
@pytest.mark.parametrize("num_real", [0, 3, 7])
def test_interp_router_topk_padding_rows_choose_nothing(num_real):
    from moeserve.kernels.router_topk import router_topk, router_topk_reference

    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(7, 64, generator=g), torch.randn(24, 64, generator=g) / 4
    weights, ids = router_topk(x, w, 4, renormalize=True, num_real_tokens=torch.tensor([num_real]).int())
    assert torch.all(ids[num_real:] == -1) and torch.all(weights[num_real:] == 0)
    assert_same_topk((weights, ids), router_topk_reference(x, w, 4, renormalize=True, num_real_tokens=num_real),
                     1e-6)


ROUTERS = {  # experts, hidden, top-k, weight dtype (bf16 model)
    "qwen3": (128, 2048, 8, torch.bfloat16), "mixtral": (8, 4096, 2, torch.bfloat16),
    "deepseek_v2_lite": (64, 2048, 6, torch.float32),
}


def assert_valid_router_choice(weights, ids, logits, renormalize: bool) -> None:
    """ids are a top-k of the unfused path's logits up to one rounding step of their dtype (a near-tie may
    go either way when the sums are ordered differently), distinct, and weighted by their softmax."""
    idx = ids.long()
    assert (idx.sort(1).values.diff(1) > 0).all()
    tol = logits.abs().max().item() * (2**-7 if logits.dtype == torch.bfloat16 else 1e-5)
    logits = logits.float()
    rest = logits.scatter(1, idx, float("-inf"))
    assert (logits.gather(1, idx).min(1).values >= rest.max(1).values - tol).all()
    want = logits.softmax(-1).gather(1, idx)
    if renormalize:
        want = want / want.sum(1, keepdim=True)
    torch.testing.assert_close(weights, want, atol=2e-2 if tol > 1e-3 else 1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(ROUTERS))
@pytest.mark.parametrize("rows,real", [(1, 1), (16, 10), (64, 64), (256, 256)])
def test_gpu_router_topk_bf16(model, rows, real):
    from moeserve.kernels.router_topk import router_topk

    e, h, k, w_dtype = ROUTERS[model]
    x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(e, h, device="cuda") * 2 * h**-0.5).to(w_dtype)
    num_real = torch.tensor([real], device="cuda", dtype=torch.int32)
    weights, ids = router_topk(x, w, k, renormalize=model != "deepseek_v2_lite", num_real_tokens=num_real)
    logits = F.linear(x.to(w_dtype), w)  # what `Router` computes
    assert_valid_router_choice(weights[:real], ids[:real], logits[:real], model != "deepseek_v2_lite")
    assert torch.all(ids[real:] == -1) and torch.all(weights[real:] == 0)


@pytest.mark.gpu
def test_gpu_router_and_fused_decode_replay_in_cuda_graph():
    """Both kernels elect a finishing program through self-resetting counters: captured once, replayed with new
    inputs each time, they stay right (and leave the counters at 0)."""
    from moeserve.kernels.attention_decode import paged_decode_attention
    from moeserve.kernels.attention_reference import make_paged_cache, paged_decode_attention_ref, rel_err
    from moeserve.kernels.counters import completion_counters
    from moeserve.kernels.router_topk import router_topk

    e, h, k, _ = ROUTERS["qwen3"]
    x = torch.randn(16, h, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(e, h, device="cuda", dtype=torch.bfloat16) * 2 * h**-0.5
    num_real = torch.tensor([16], device="cuda", dtype=torch.int32)
    kc, vc, bt, sl = make_paged_cache([1024] * 4, 16, 4, 128, 128, torch.bfloat16, "cuda")
    q = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        return (router_topk(x, w, k, renormalize=True, num_real_tokens=num_real),
                paged_decode_attention(q, kc, vc, bt, sl, 128**-0.5, 1024, num_splits=8, fused_reduce=True))

    step()  # compiles and allocates the counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (weights, ids), attn = step()
    for real, lens in ((10, [1000, 17, 333, 1024]), (16, [1, 512, 1024, 77])):
        x.copy_(torch.randn_like(x))
        q.copy_(torch.randn_like(q))
        num_real.fill_(real)
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        assert_valid_router_choice(weights[:real], ids[:real], F.linear(x, w)[:real], True)
        assert torch.all(ids[real:] == -1)
        assert rel_err(attn, paged_decode_attention_ref(q, kc, vc, bt, sl, 128**-0.5)) <= 1e-2
    torch.cuda.synchronize()
    assert not completion_counters(x.device, 1).any()


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(ROUTERS))
def test_gpu_no_compilation_after_the_warm_up_counts(model):
    """After one `router_topk` call at each of `warmup_token_counts`' counts (part of `MoELayer.warm_up` at
    engine start-up), calls of every other row count where the fused router pays compile nothing (Triton's JIT
    hook): its tile, hidden slices and row-count specialisation change with T."""
    from moeserve.kernels.device import num_sms
    from moeserve.kernels.router_topk import (
        MAX_FUSED_TOKENS,
        fused_router_pays,
        router_topk,
        warmup_token_counts,
    )

    e, h, k, w_dtype = ROUTERS[model]
    x = torch.randn(MAX_FUSED_TOKENS, h, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(e, h, device="cuda") * h**-0.5).to(w_dtype)
    counts = warmup_token_counts(MAX_FUSED_TOKENS, e, h, k, num_sms(x.device))
    for t in counts:
        router_topk(x[:t], w, k)
    torch.cuda.synchronize()
    with recorded_compilations() as compiled:
        for t in range(1, MAX_FUSED_TOKENS + 1):
            if fused_router_pays(t, e, k):
                router_topk(x[:t], w, k)
        torch.cuda.synchronize()
    assert not compiled, f"warm-up counts {counts}; compiled after them: {compiled[:4]}"
