"""Expert selection and the MoE layer against simple per-token references, on random inputs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from moeserve.attention.torch_backend import TorchAttentionBackend
from moeserve.forward_batch import ForwardMode, build_forward_batch
from moeserve.layers.mlp import GatedMLP
from moeserve.models.base import ModelContext
from moeserve.moe.dispatcher import LocalDispatcher
from moeserve.moe.experts import TorchExperts
from moeserve.moe.layer import MoELayer, Router
from moeserve.moe.placement import ExpertPlacement
from moeserve.moe.routing import RoutingConfig, select_experts


def reference_route(
    logits: list[float],
    top_k: int,
    *,
    scoring,
    renormalize,
    topk_method="greedy",
    n_group=None,
    topk_group=None,
    bias=None,
    scale=1.0,
) -> dict[int, float]:
    """One token, plain Python: {expert: weight}."""
    e = len(logits)
    if scoring == "softmax":
        m = max(logits)
        exps = [math.exp(x - m) for x in logits]
        scores = [x / sum(exps) for x in exps]
    else:
        scores = [1 / (1 + math.exp(-x)) for x in logits]
    choice = [s + (bias[i] if bias is not None else 0.0) for i, s in enumerate(scores)]
    allowed = set(range(e))
    if topk_method != "greedy":
        size = e // n_group
        groups = [sorted(choice[g * size : (g + 1) * size], reverse=True) for g in range(n_group)]
        rank = [grp[0] if topk_method == "group_limited_greedy" else grp[0] + grp[1] for grp in groups]
        best = sorted(range(n_group), key=lambda g: rank[g], reverse=True)[:topk_group]
        allowed = {g * size + j for g in best for j in range(size)}
    chosen = sorted(allowed, key=lambda i: choice[i], reverse=True)[:top_k]
    weights = {i: scores[i] for i in chosen}
    if renormalize:
        total = sum(weights.values())
        weights = {i: w / total for i, w in weights.items()}
    return {i: w * scale for i, w in weights.items()}


ROUTINGS = {
    "mixtral": dict(num_experts=8, top_k=2, scoring="softmax", renormalize=True),
    "qwen3": dict(num_experts=16, top_k=4, scoring="softmax", renormalize=True),
    "qwen2": dict(num_experts=12, top_k=4, scoring="softmax", renormalize=False),
    "deepseek_v2": dict(
        num_experts=16,
        top_k=3,
        scoring="softmax",
        renormalize=False,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        scale=16.0,
    ),
    "deepseek_v3": dict(
        num_experts=32,
        top_k=6,
        scoring="sigmoid",
        renormalize=True,
        topk_method="noaux_tc",
        n_group=8,
        topk_group=3,
        bias=True,
        scale=2.5,
    ),
}


@pytest.mark.parametrize("family", list(ROUTINGS))
def test_select_experts_matches_per_token_reference(family):
    spec = dict(ROUTINGS[family])
    e, k = spec.pop("num_experts"), spec.pop("top_k")
    g = torch.Generator().manual_seed(list(ROUTINGS).index(family))
    logits = torch.randn(40, e, generator=g) * 2  # continuous random values: no ties
    bias = (torch.randn(e, generator=g) * 0.3) if spec.pop("bias", False) else None
    scale = spec.pop("scale", 1.0)
    weights, ids = select_experts(logits, k, correction_bias=bias, routed_scaling_factor=scale, **spec)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (40, k)
    for t in range(logits.shape[0]):
        ref = reference_route(
            logits[t].tolist(), k, bias=None if bias is None else bias.tolist(), scale=scale, **spec
        )
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert set(got) == set(ref), f"token {t}: experts {sorted(got)} != {sorted(ref)}"
        for i in ref:
            assert got[i] == pytest.approx(ref[i], rel=1e-5)


@pytest.mark.parametrize("family", list(ROUTINGS))
def test_padding_rows_choose_no_expert(family):
    """Rows at and beyond num_real_tokens (padding of a captured decode graph) read no expert weights."""
    spec = dict(ROUTINGS[family])
    e, k, scale = spec.pop("num_experts"), spec.pop("top_k"), spec.pop("scale", 1.0)
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, e, generator=g)
    bias = torch.randn(e, generator=g) if spec.pop("bias", False) else None
    kwargs = dict(correction_bias=bias, routed_scaling_factor=scale, **spec)
    full_w, full_i = select_experts(logits, k, **kwargs)
    w, i = select_experts(logits, k, num_real_tokens=torch.tensor([4], dtype=torch.int32), **kwargs)
    assert torch.equal(i[:4], full_i[:4]) and torch.equal(w[:4], full_w[:4])
    assert torch.all(i[4:] == -1) and torch.all(w[4:] == 0)


def test_correction_bias_changes_choice_not_weights():
    """DeepSeek-V3: a large bias on one expert forces it in, but its weight is its own (unbiased) score."""
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    bias = torch.zeros(8)
    bias[5] = 10.0
    weights, ids = select_experts(logits, 2, scoring="sigmoid", renormalize=False, correction_bias=bias)
    assert (ids == 5).any(dim=1).all()
    w5 = weights[ids == 5]
    assert torch.allclose(w5, logits[:, 5].sigmoid())


def test_router_precision_modes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=g).to(torch.bfloat16)
    fp32_router = Router(32, 8, fp32=True, correction_bias=True)
    fp32_router.weight.data = torch.randn(8, 32, generator=g)
    assert fp32_router.weight.dtype == torch.float32
    assert torch.equal(fp32_router(x), x.float() @ fp32_router.weight.t())
    plain = Router(32, 8, fp32=False, correction_bias=False).to(torch.bfloat16)
    plain.weight.data = torch.randn(8, 32, generator=g).to(torch.bfloat16)
    out = plain(x)  # model-dtype logits; selection upcasts them before the softmax
    assert out.dtype == torch.bfloat16 and torch.equal(out, F.linear(x, plain.weight))
    weights, ids = select_experts(out, 2, renormalize=True)
    ref_w, ref_i = select_experts(out.float(), 2, renormalize=True)
    assert torch.equal(ids, ref_i) and torch.equal(weights, ref_w)


def _ctx(phy2log: torch.Tensor, num_logical: int) -> ModelContext:
    placement = ExpertPlacement(phy2log, num_logical, ep_rank=0, ep_size=1)
    return ModelContext(
        torch.float32,
        torch.device("cpu"),
        TorchAttentionBackend(),
        TorchExperts(),
        LocalDispatcher(placement.num_local_slots),
        placement,
    )


def _random_experts(
    e: int, h: int, i: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(i, h, generator=g) * 0.2,
            torch.randn(i, h, generator=g) * 0.2,
            torch.randn(h, i, generator=g) * 0.2,
        )
        for _ in range(e)
    ]


def _build_layer(ctx, routing, experts, gate_w, *, shared=None, shared_gate_w=None, **kwargs) -> MoELayer:
    h, i = experts[0][2].shape
    layer = MoELayer(
        h,
        i,
        len(experts),
        routing,
        0,
        ctx,
        shared_mlp=shared,
        shared_gate=shared_gate_w is not None,
        **kwargs,
    )
    layer.gate.weight.data.copy_(gate_w)
    for e, (wg, wu, wd) in enumerate(experts):
        if layer.holds_expert(e):
            for proj, w in zip(layer.expert_proj_names, (wg, wu, wd)):
                layer.load_expert(e, proj, w)
    if shared_gate_w is not None:
        layer.shared_expert_gate.weight.data.copy_(shared_gate_w)
    return layer


def _batch(num_tokens: int):
    return build_forward_batch([list(range(num_tokens))], [0], [[0] * (num_tokens // 4 + 1)], 4)


@pytest.mark.parametrize("shared_kind", ["none", "deepseek", "qwen2"])
def test_moe_layer_matches_dense_reference(shared_kind):
    e, h, i, t = 8, 16, 12, 10
    g = torch.Generator().manual_seed(11)
    experts = _random_experts(e, h, i, seed=12)
    gate_w = torch.randn(e, h, generator=g)
    x = torch.randn(t, h, generator=g)
    routing = RoutingConfig(top_k=3, renormalize=True, routed_scaling_factor=1.5)
    shared = shared_gate_w = None
    if shared_kind != "none":
        shared = GatedMLP(h, 20)
        for p in shared.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2
        if shared_kind == "qwen2":
            shared_gate_w = torch.randn(1, h, generator=g)
    layer = _build_layer(
        _ctx(torch.arange(e)[None], e), routing, experts, gate_w, shared=shared, shared_gate_w=shared_gate_w
    )
    with torch.inference_mode():
        out = layer(x, _batch(t))
    ref = torch.zeros(t, h)
    for tok in range(t):
        route = reference_route(
            (x[tok] @ gate_w.t()).tolist(), 3, scoring="softmax", renormalize=True, scale=1.5
        )
        for ex, w in route.items():
            wg, wu, wd = experts[ex]
            ref[tok] += w * (wd @ (F.silu(wg @ x[tok]) * (wu @ x[tok])))
        if shared is not None:
            s = shared(x[tok : tok + 1])[0]
            ref[tok] += s * torch.sigmoid(shared_gate_w @ x[tok]) if shared_gate_w is not None else s
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_replicated_placement_gives_same_output_and_counts_load():
    """Experts 0 and 3 replicated in extra slots: same output, and the load recorder counts every choice."""
    e, h, i, t = 6, 16, 8, 24
    g = torch.Generator().manual_seed(5)
    experts = _random_experts(e, h, i, seed=6)
    gate_w, x = torch.randn(e, h, generator=g), torch.randn(t, h, generator=g)
    routing = RoutingConfig(top_k=2, renormalize=True)
    trivial = _build_layer(_ctx(torch.arange(e)[None], e), routing, experts, gate_w)
    phy2log = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 3]])
    replicated = _build_layer(_ctx(phy2log, e), routing, experts, gate_w)
    assert replicated.local_experts == [0, 1, 2, 3, 4, 5, 0, 3]
    assert torch.equal(replicated.w13[6], replicated.w13[0]) and torch.equal(
        replicated.w2[7], replicated.w2[3]
    )
    batch = _batch(t)
    batch.extras["expert_load"] = torch.zeros(1, 8, dtype=torch.int64)
    with torch.inference_mode():
        ref, out = trivial(x, _batch(t)), replicated(x, batch)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    load = batch.extras["expert_load"][0]
    _, ids = select_experts(x @ gate_w.t(), 2, renormalize=True)
    per_logical = torch.bincount(ids.flatten().long(), minlength=e)
    assert load.sum() == t * 2
    assert torch.equal(load[:6] + torch.tensor([load[6], 0, 0, load[7], 0, 0]), per_logical)


def test_moe_layer_hands_the_dispatchers_choice_count_to_the_expert_kernel():
    """What a dispatcher knows about the received choices (`DispatchOutput.num_pairs`) reaches the expert
    kernel, which sizes its tiles by it (`TritonExperts`); the layer's output is unchanged."""
    e, h, i, t = 6, 8, 8, 9
    ctx = _ctx(torch.arange(e)[None], e)
    seen = []

    class CountingDispatcher(LocalDispatcher):
        def dispatch(self, hidden, topk_ids, topk_weights, mode):
            out = super().dispatch(hidden, topk_ids, topk_weights, mode)
            return dataclasses.replace(out, num_pairs=int((out.topk_ids >= 0).sum()))

    class RecordingExperts(TorchExperts):
        def __call__(self, hidden, w13, w2, topk_weights, topk_ids, *, num_pairs=None):
            seen.append((num_pairs, int((topk_ids >= 0).sum())))
            return super().__call__(hidden, w13, w2, topk_weights, topk_ids, num_pairs=num_pairs)

    g = torch.Generator().manual_seed(5)
    experts, gate_w, x = _random_experts(e, h, i, 3), torch.randn(e, h, generator=g), torch.randn(t, h, generator=g)
    plain = _build_layer(ctx, RoutingConfig(top_k=2), experts, gate_w)
    counting_ctx = dataclasses.replace(ctx, expert_kernel=RecordingExperts(),
                                       dispatcher=CountingDispatcher(ctx.placement.num_local_slots))
    counted = _build_layer(counting_ctx, RoutingConfig(top_k=2), experts, gate_w)
    with torch.inference_mode():
        torch.testing.assert_close(counted(x, _batch(t)), plain(x, _batch(t)))
    assert seen == [(2 * t, 2 * t)]


def test_moe_layer_runs_on_zero_tokens():
    """An idle EP rank still enters dispatch/combine with an empty batch."""
    e, h, i = 4, 8, 8
    layer = _build_layer(
        _ctx(torch.arange(e)[None], e), RoutingConfig(top_k=2), _random_experts(e, h, i, 1), torch.randn(e, h)
    )
    batch = build_forward_batch([], [], [], 4)
    assert batch.mode == ForwardMode.IDLE
    with torch.inference_mode():
        out = layer(torch.zeros(0, h), batch)
    assert out.shape == (0, h)


@pytest.mark.parametrize("slots,top_k", [(6, 2), (3, 4)], ids=["all-local", "fewer-slots-than-k"])
def test_moe_layer_warm_up_calls_the_expert_kernel_at_its_counts_and_changes_nothing(slots, top_k):
    """`MoELayer.warm_up` runs the router and the expert kernel once at each count the kernel names, on this
    rank's own slots: ids distinct per row and in [0, slots), -1 beyond them (an EP rank holding fewer slots than
    k); it neither dispatches nor records load nor writes weights."""
    e, h, i = 6, 8, 8
    placement = ExpertPlacement(torch.arange(e)[None], e, ep_rank=0, ep_size=e // slots)
    calls, asked = [], []

    class Recording(TorchExperts):
        def warmup_token_counts(self, w13, max_tokens, top_k):
            asked.append((tuple(w13.shape), max_tokens, top_k))
            return [1, 5, max_tokens]

        def __call__(self, hidden, w13, w2, topk_weights, topk_ids, *, num_pairs=None):
            calls.append((hidden.shape, topk_weights.shape, topk_ids.clone()))
            return super().__call__(hidden, w13, w2, topk_weights, topk_ids)

    class NoDispatch(LocalDispatcher):
        def dispatch_begin(self, *args, **kwargs):
            raise AssertionError("the warm-up must not dispatch")

    ctx = dataclasses.replace(_ctx(torch.arange(e)[None], e), placement=placement, expert_kernel=Recording(),
                              dispatcher=NoDispatch(placement.num_local_slots))
    layer = _build_layer(ctx, RoutingConfig(top_k=top_k), _random_experts(e, h, i, 2), torch.randn(e, h))
    before = [p.clone() for p in layer.parameters()]
    assert layer.warm_up(12) == [1, 5, 12]
    assert asked == [((slots, 2 * i, h), 12, top_k)]
    assert [(tuple(x), tuple(w)) for x, w, _ in calls] == [((n, h), (n, top_k)) for n in (1, 5, 12)]
    for _, _, ids in calls:
        valid = ids[:, : min(top_k, slots)]
        assert ((valid >= 0) & (valid < slots)).all() and (ids[:, min(top_k, slots):] == -1).all()
        assert all(len(set(row.tolist())) == valid.shape[1] for row in valid)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
