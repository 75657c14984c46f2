"""Small per-layer ops of the decode forward: the torch code against the fused Triton kernels.

    python benchmarks/kernels_small.py [--tokens 1,64,256] [--sections small,router,attention,model]
                                       [--out benchmarks/out/kernels_small.json]

Qwen3-30B-A3B shapes (hidden 2048, 32 q / 4 kv heads x 128, 128 experts top-8), bf16 on one GPU. Each op is
timed two ways: under CUDA-graph replay (what a captured decode step pays: kernel time plus the gaps between
kernels, no host launch cost) and eagerly (host launch cost included). Ops, per decoder layer:

  add_norm      residual add + RMSNorm (x2 per layer)   torch: add, float, pow, mean, add, rsqrt, mul, cast, mul
  qkv_proj      the q, k, v projections                 torch: three GEMMs; fused: one GEMM
  qk_norm_rope  Qwen3 q/k RMSNorm + rotary              torch: two norms + two rotations (cos/sin built once
                                                        per step, reported separately as rope_cos_sin)
  router_topk   softmax -> top-8 -> renormalise         torch: `select_experts`' ops

Fused launches (--sections router,attention), old path vs new, graph replay only:

  router        logits GEMM (cuBLAS) + `topk_softmax`  vs  `router_topk` (one launch), Qwen3-30B-A3B (E=128,
                H=2048, top-8) and Mixtral (E=8, H=4096, top-2), T = 1, 10 real of 16 rows, 64, 256; plus the
                fused kernel at half and twice its planned hidden-dim split count (tuning data)
  decode_attn   `paged_decode_attention` split-KV with the `split_reduce` launch vs the merge in the same
                launch, batch 1/16/64, context 1024, 32/4 heads x 128, page 16, at the split count chosen
                from the context (max_seq_len 1024) and the one a graph runner gets (max_seq_len 40960)

  argmax        greedy sampling over Qwen3's 151936-token vocabulary: torch.argmax vs `argmax_rows` (chunks of
                each row, the last to finish picks), 1, 16, 64, 256 rows of bf16 logits

Then a 2-layer Qwen3-30B-A3B-shaped model: one decode forward (context 512) under graph replay and its kernel
launches (torch profiler), per layer (2 layers minus 1), with the fused norm / rotary / router paths off and on
(the fused qkv GEMM is on in both).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moeserve.moe.routing as routing  # noqa: E402
from moeserve.kernels.norm import rms_norm, rms_norm_reference  # noqa: E402
from moeserve.kernels.rope import apply_rope  # noqa: E402
from moeserve.kernels.topk_softmax import topk_softmax  # noqa: E402
from moeserve.layers.rotary import RopeCache, rope_cos_sin, rope_inv_freq  # noqa: E402

_FUSED_AVAILABLE = routing.fused_kernels_available
HIDDEN, HQ, HK, D, EXPERTS, TOP_K, EPS = 2048, 32, 4, 128, 128, 8, 1e-6
BF16 = torch.bfloat16
DEVICE = "cuda"


def time_graph(fn: Callable[[], object], reps: int = 20, replays: int = 20) -> float:
    """Microseconds per call of fn under CUDA-graph replay (reps calls captured in one graph)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * replays)


def time_eager(fn: Callable[[], object], iters: int = 200) -> float:
    """Microseconds per call launched eagerly (host launch cost included), after a warm-up."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / iters


def build_ops(t: int) -> dict[str, tuple[Callable[[], object], Callable[[], object] | None]]:
    """op name -> (torch version, fused version or None)."""
    dev = DEVICE
    x, res = (torch.randn(t, HIDDEN, device=dev, dtype=BF16) for _ in range(2))
    w_norm = torch.rand(HIDDEN, device=dev, dtype=BF16) + 0.5
    w_qkv = torch.randn((HQ + 2 * HK) * D, HIDDEN, device=dev, dtype=BF16) * HIDDEN**-0.5
    w_q, w_k, w_v = w_qkv.split([HQ * D, HK * D, HK * D])
    qkv = torch.randn(t, HQ + 2 * HK, D, device=dev, dtype=BF16)
    q, k, _ = qkv.split([HQ, HK, HK], dim=1)
    qn, kn = (torch.rand(D, device=dev, dtype=BF16) + 0.5 for _ in range(2))
    pos = torch.randint(0, 30000, (t,), device=dev)
    inv_freq = rope_inv_freq(D, 1e6, None)[0].to(dev)
    cos, sin = rope_cos_sin(pos, inv_freq, 1.0)
    cache = RopeCache(pos, inv_freq, 1.0, False, cos, sin)
    logits = torch.randn(t, EXPERTS, device=dev)

    def torch_qk():
        qq = rms_norm_reference(q, qn, EPS)
        kk = rms_norm_reference(k, kn, EPS)
        return cache.apply(qq), cache.apply(kk)

    def torch_router():
        set_fused(False)
        try:
            return routing.select_experts(logits, TOP_K, renormalize=True)
        finally:
            set_fused(True)

    return {
        "add_norm": (lambda: rms_norm_reference(x, w_norm, EPS, res), lambda: rms_norm(x, w_norm, EPS, res)),
        "qkv_proj": (lambda: (F.linear(x, w_q), F.linear(x, w_k), F.linear(x, w_v)), lambda: F.linear(x, w_qkv)),
        "qk_norm_rope": (
            torch_qk,
            lambda: apply_rope(q, k, pos, inv_freq, q_norm_weight=qn, k_norm_weight=kn, eps=EPS, inplace=True),
        ),
        "router_topk": (torch_router, lambda: topk_softmax(logits, TOP_K, renormalize=True)),
        "rope_cos_sin": (lambda: rope_cos_sin(pos, inv_freq, 1.0), None),
    }


QWEN3_HF = dict(
    architectures=["Qwen3MoeForCausalLM"], vocab_size=4096, hidden_size=HIDDEN, num_attention_heads=HQ,
    num_key_value_heads=HK, head_dim=D, intermediate_size=6144, moe_intermediate_size=768, num_experts=EXPERTS,
    num_experts_per_tok=TOP_K, norm_topk_prob=True, max_position_embeddings=40960, rms_norm_eps=EPS,
    rope_theta=1e6, num_hidden_layers=2,
)


def set_fused(on: bool) -> None:
    """Switch the fused norm / rotary / router kernels on or off (the qkv GEMM stays fused on CUDA)."""
    import moeserve.layers.norm as norm_mod
    import moeserve.layers.rotary as rotary_mod

    for mod in (norm_mod, rotary_mod, routing):
        mod.fused_kernels_available = _FUSED_AVAILABLE if on else (lambda _: False)


def count_kernels(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def decode_layers(batch_sizes: list[int]) -> list[dict]:
    """A 2-layer Qwen3-30B-A3B-shaped model (random bf16 weights, Triton attention and experts): decode forward
    under graph replay and kernel launches, per layer (2 layers minus 1), fused paths on and off."""
    from moeserve.forward_batch import build_forward_batch
    from moeserve.models.base import ModelContext
    from moeserve.models.config import ModelConfig
    from moeserve.models.registry import create_model

    cfg = ModelConfig.from_hf(QWEN3_HF)
    model = create_model(cfg, ModelContext.single_device(cfg, BF16, DEVICE))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    block, context = 16, 512
    num_blocks = max(batch_sizes) * context // block + 1
    model.bind_kv_caches([
        (torch.randn(num_blocks, block, s.num_kv_heads, s.k_dim, device=DEVICE, dtype=BF16),
         torch.randn(num_blocks, block, s.num_kv_heads, s.v_dim, device=DEVICE, dtype=BF16))
        for s in model.kv_cache_specs()
    ])
    all_layers, rows = model.model.layers, []
    for n in batch_sizes:
        per_req = context // block
        batch = build_forward_batch([[7]] * n, [context - 1] * n,
                                    [list(range(i * per_req, (i + 1) * per_req)) for i in range(n)], block,
                                    device=DEVICE)
        row: dict = {"op": "decode_layer", "tokens": n}

        def step(b=batch):
            return model(b)

        for fused in (False, True):
            set_fused(fused)
            stats = {}
            for num in (1, 2):
                model.model.layers = all_layers[:num]
                with torch.inference_mode():
                    stats[num] = time_graph(step, reps=5, replays=20), count_kernels(step)
            key = "fused" if fused else "torch"
            row[f"{key}_graph_us"] = stats[2][0] - stats[1][0]
            row[f"{key}_kernels"] = stats[2][1] - stats[1][1]
        model.model.layers = all_layers
        set_fused(True)
        rows.append(row)
        print(f"{'decode_layer':<14}{n:>5} | {row['torch_graph_us']:>11.1f} {row['fused_graph_us']:>11.1f} "
              f"{row['torch_graph_us'] / row['fused_graph_us']:>7.2f}x | kernels per layer "
              f"{row['torch_kernels']} -> {row['fused_kernels']}")
    return rows


PER_LAYER = {"add_norm": 2, "qkv_proj": 1, "qk_norm_rope": 1, "router_topk": 1}
ROUTERS = {"qwen3": (128, 2048, 8), "mixtral": (8, 4096, 2)}  # experts, hidden, top-k
ROUTER_ROWS = [(1, 1), (10, 16), (64, 64), (256, 256)]  # (real tokens, rows the graph holds)


def _old_new_row(op: str, label: str, old: Callable[[], object], new: Callable[[], object], **extra) -> dict:
    row = {"op": op, "case": label, **extra, "old_graph_us": time_graph(old), "new_graph_us": time_graph(new)}
    print(f"{op:<12}{label:<34}| {row['old_graph_us']:>8.1f} {row['new_graph_us']:>8.1f} "
          f"{row['old_graph_us'] / row['new_graph_us']:>7.2f}x  {extra.get('note', '')}", flush=True)
    return row


def unfused_router(x: torch.Tensor, w: torch.Tensor, k: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """What `MoELayer` runs without the fused router on CUDA: bf16 logits from cuBLAS, then `topk_softmax`."""
    return topk_softmax(F.linear(x, w), k, **kw)


def router_rows() -> list[dict]:
    """Router GEMM + top-k: cuBLAS + `topk_softmax` vs `router_topk`, and the fused kernel's split count."""
    from moeserve.kernels.device import num_sms
    from moeserve.kernels.router_topk import router_topk, split_plan

    rows = []
    for name, (e, h, k) in ROUTERS.items():
        w = torch.randn(e, h, device=DEVICE, dtype=BF16) * h**-0.5
        for real, t in ROUTER_ROWS:
            x = torch.randn(t, h, device=DEVICE, dtype=BF16)
            num_real = torch.tensor([real], device=DEVICE, dtype=torch.int32)
            kw = dict(renormalize=True, num_real_tokens=num_real)
            splits = split_plan(t, e, h, num_sms(x.device))[0]
            old_out, new_out = unfused_router(x, w, k, **kw), router_topk(x, w, k, **kw)
            same = (old_out[1].sort(1).values == new_out[1].sort(1).values).all(1).float().mean().item()
            rows.append(_old_new_row(
                "router", f"{name} T={real}/{t} splits={splits}",
                functools.partial(unfused_router, x, w, k, **kw), functools.partial(router_topk, x, w, k, **kw),
                model=name, tokens=real, rows=t, k_splits=splits, same_ids_fraction=same,
                note=f"same ids {same:.3f}",
            ))
            for alt in sorted({max(1, splits // 2), min(h // 64, 2 * splits)} - {splits}):
                us = time_graph(functools.partial(router_topk, x, w, k, k_splits=alt, **kw))
                rows.append({"op": "router_splits", "model": name, "tokens": real, "rows": t, "k_splits": alt,
                             "new_graph_us": us})
                print(f"{'':<12}{'  k_splits=' + str(alt):<34}| {'':>8} {us:>8.1f}", flush=True)
    return rows


def attention_rows() -> list[dict]:
    """Split-KV decode: the `split_reduce` launch vs the merge in the same launch."""
    from moeserve.kernels.attention_decode import gqa_num_splits, paged_decode_attention
    from moeserve.kernels.attention_reference import make_paged_cache, paged_decode_attention_ref, rel_err

    rows, ctx, scale = [], 1024, D**-0.5
    for b in (1, 16, 64):
        k, v, bt, sl = make_paged_cache([ctx] * b, 16, HK, D, D, BF16, DEVICE)
        q = torch.randn(b, HQ, D, device=DEVICE, dtype=BF16)
        ref = paged_decode_attention_ref(q, k, v, bt, sl, scale)
        auto = {gqa_num_splits(b, HQ, HK, m, q.device): src for m, src in ((40960, "engine"), (ctx, "ctx"))}
        if b == 1:
            auto.setdefault(16, "sweep")
        for splits, src in sorted(auto.items()):
            def call(fused, s=splits, q=q, k=k, v=v, bt=bt, sl=sl):
                return paged_decode_attention(q, k, v, bt, sl, scale, ctx, num_splits=s, fused_reduce=fused)

            out_old, out_new = call(False), call(True)
            err_old, err_new = rel_err(out_old, ref), rel_err(out_new, ref)
            same = torch.equal(out_old, out_new)
            rows.append(_old_new_row(
                "decode_attn", f"B={b} ctx={ctx} splits={splits} ({src})",
                lambda c=call: c(False), lambda c=call: c(True),
                batch=b, context=ctx, num_splits=splits, rel_err_old=err_old, rel_err_new=err_new,
                bitwise_equal=same, note=f"rel err {err_old:.1e}/{err_new:.1e} equal={same}",
            ))
    return rows


def argmax_rows_timed() -> list[dict]:
    """Greedy sampling's argmax: torch's reduction vs `argmax_rows`, bf16 logits over Qwen3's vocabulary."""
    from moeserve.kernels.argmax import argmax_rows

    rows = []
    for b in (1, 16, 64, 256):
        logits = torch.randn(b, 151936, device=DEVICE, dtype=BF16)
        same = torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
        rows.append(_old_new_row("argmax", f"{b} rows x 151936", lambda x=logits: x.argmax(dim=-1),
                                 lambda x=logits: argmax_rows(x), rows=b, equal=same, note=f"equal={same}"))
    return rows


def small_ops(tokens: list[int]) -> list[dict]:
    """The torch-vs-fused table of the small per-layer ops."""
    rows = []
    print(f"{'op':<14}{'T':>5} | {'torch graph':>11} {'fused graph':>11} {'speedup':>8} | "
          f"{'torch eager':>11} {'fused eager':>11}   (us)")
    for t in tokens:
        ops = build_ops(t)
        layer = {"torch_graph_us": 0.0, "fused_graph_us": 0.0}
        for name, (ref, fused) in ops.items():
            row = {"op": name, "tokens": t, "torch_graph_us": time_graph(ref), "torch_eager_us": time_eager(ref)}
            if fused is not None:
                row.update(fused_graph_us=time_graph(fused), fused_eager_us=time_eager(fused))
            if name in PER_LAYER:
                layer["torch_graph_us"] += PER_LAYER[name] * row["torch_graph_us"]
                layer["fused_graph_us"] += PER_LAYER[name] * row["fused_graph_us"]
            rows.append(row)
            fg = row.get("fused_graph_us")
            print(f"{name:<14}{t:>5} | {row['torch_graph_us']:>11.1f} "
                  f"{fg if fg is not None else float('nan'):>11.1f} "
                  f"{(row['torch_graph_us'] / fg) if fg else float('nan'):>7.2f}x | "
                  f"{row['torch_eager_us']:>11.1f} {row.get('fused_eager_us', float('nan')):>11.1f}")
        rows.append({"op": "per_layer_sum", "tokens": t, **layer})
        print(f"{'per_layer_sum':<14}{t:>5} | {layer['torch_graph_us']:>11.1f} {layer['fused_graph_us']:>11.1f} "
              f"{layer['torch_graph_us'] / layer['fused_graph_us']:>7.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,64,256")
    parser.add_argument("--sections", default="small,router,attention,argmax,model",
                        help="comma-separated subset of small, router, attention, argmax, model")
    parser.add_argument("--out", default="benchmarks/out/kernels_small.json")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    tokens = [int(v) for v in args.tokens.split(",")]
    rows = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    if "small" in sections:
        rows += small_ops(tokens)
    if sections & {"router", "attention", "argmax"}:
        print(f"{'op':<12}{'case':<34}| {'old us':>8} {'new us':>8} {'speedup':>8}   (CUDA-graph replay)")
    if "router" in sections:
        rows += router_rows()
    if "attention" in sections:
        rows += attention_rows()
    if "argmax" in sections:
        rows += argmax_rows_timed()
    if "model" in sections:
        try:
            rows += decode_layers(tokens)
        except Exception as e:  # the micro-benchmarks above stand on their own
            print(f"decode_layer skipped: {type(e).__name__}: {e}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "shapes": dict(hidden=HIDDEN, q_heads=HQ, kv_heads=HK, head_dim=D, experts=EXPERTS,
                                  top_k=TOP_K), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
