"""Benchmark the Triton paged-attention kernels against the memory roofline and torch baselines.

Decode kernels are memory-bound: their figure of merit is bytes moved (K/V cache read once + q + out) over
time, as a fraction of the device-to-device copy bandwidth measured in the same process; the backends' decode
choices are also timed as CUDA-graph replays (`pct_copy_bw_graph`, TFLOP/s from it), which is how the engine's
decode steps run them and what excludes host launch time (about 100 us for the Gluon MLA kernel). Prefill/extend is
compared with the pure-torch reference and with torch SDPA on a contiguous copy of the context.

    python benchmarks/kernels_attention.py [--quick] [--sweep] [--out PATH]

`run(args)` is what benchmarks/kernels.py calls; it reads the optional attributes ``quick`` and ``sweep``.
Every timed configuration is also checked against the fp32 reference (``rel_err``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Callable

import torch

from moeserve.kernels.attention_reference import make_paged_cache, query_start_loc, rel_err

BF16 = torch.bfloat16


def bench_ms(fn: Callable[[], object], rep_ms: int = 60) -> float:
    """Median time of ``fn`` in ms (CUDA events via triton's do_bench)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))


def copy_bandwidth_tbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + bytes written over time, TB/s."""
    src = torch.empty(2**29, device="cuda", dtype=BF16).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep_ms=100)
    return 2 * src.numel() * src.element_size() / ms / 1e9


def graph_ms(fn: Callable[[], object]) -> float:
    """Median time of one CUDA-graph replay of ``fn`` in ms, as a captured decode step runs its kernels: no host
    launch time (which ``bench_ms`` counts wherever it exceeds the kernels' time). ``do_bench`` clears L2
    before each replay, as for ``bench_ms``; ``do_bench_cudagraph`` (the fused-MoE scripts' timer) would not."""
    import triton

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(triton.testing.do_bench(graph.replay, warmup=10, rep=60, return_mode="median"))


def _try(rows: list[dict], base: dict, fn: Callable[[], torch.Tensor], ref: torch.Tensor, nbytes: int,
         copy_tbs: float, flops: float = 0.0, graph: bool = False) -> float | None:
    """Check fn against ref, time it (graph: also as a CUDA-graph replay), and append one row; returns the time
    in ms (None on failure)."""
    row = dict(base)
    try:
        row["rel_err"] = rel_err(fn(), ref)
        ms = bench_ms(fn)
    except Exception as exc:  # a config that does not compile or fit is a result, not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        rows.append(row)
        print(row, flush=True)
        return None
    row.update(time_us=ms * 1e3, tb_per_s=nbytes / ms / 1e9, pct_copy_bw=100 * nbytes / ms / 1e9 / copy_tbs)
    best_ms = ms
    if graph:
        try:
            best_ms = graph_ms(fn)
            row.update(time_graph_us=best_ms * 1e3, pct_copy_bw_graph=100 * nbytes / best_ms / 1e9 / copy_tbs)
        except Exception as exc:  # the eager time stands
            row["error"] = f"graph capture: {type(exc).__name__}: {str(exc)[:140]}"
    if flops:
        row["tflops"] = flops / best_ms / 1e9
    rows.append(row)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return ms


def bench_gqa_decode(copy_tbs: float, quick: bool, sweep: bool) -> list[dict]:
    from moeserve.kernels.attention_decode import paged_decode_attention
    from moeserve.kernels.attention_reference import paged_decode_attention_ref

    batch, ctx, heads, kv_heads, dim = (8, 1024, 32, 4, 128) if quick else (64, 4096, 32, 4, 128)
    rows: list[dict] = []
    for page in (16, 64):
        seq = [ctx] * batch
        k, v, bt, sl = make_paged_cache(seq, page, kv_heads, dim, dim, BF16, "cuda")
        q = torch.randn(batch, heads, dim, device="cuda", dtype=BF16)
        ref = paged_decode_attention_ref(q, k, v, bt, sl, dim**-0.5)
        nbytes = sum(seq) * kv_heads * 2 * dim * 2 + 2 * q.numel() * 2
        shape = f"B{batch} ctx{ctx} {heads}/{kv_heads}h d{dim} page{page}"

        call = functools.partial(functools.partial, paged_decode_attention, q, k, v, bt, sl, dim**-0.5, ctx)

        base = dict(kernel="decode_gqa", shape=shape, config="default")
        _try(rows, base, call(), ref, nbytes, copy_tbs, graph=True)
        if not sweep:
            continue
        best = (float("inf"), {})
        for block_n in (16, 32, 64, 128):
            for stages in (2, 3):
                cfg = dict(block_n=block_n, num_stages=stages)
                ms = _try(rows, dict(base, config=str(cfg)), call(**cfg), ref, nbytes, copy_tbs)
                if ms is not None and ms < best[0]:
                    best = (ms, cfg)
        for splits in (2, 3, 4, 8):
            cfg = dict(best[1], num_splits=splits)
            _try(rows, dict(base, config=str(cfg)), call(**cfg), ref, nbytes, copy_tbs)
        del k, v
    return rows


def bench_mla_decode(copy_tbs: float, quick: bool, sweep: bool) -> list[dict]:
    from moeserve.kernels.attention_reference import mla_decode_attention_ref
    from moeserve.kernels.mla_decode import mla_decode_attention, use_mla_gluon, use_mla_tma

    batch, ctx, heads, lora, rope = (8, 1024, 128, 512, 64) if quick else (64, 4096, 128, 512, 64)
    rows: list[dict] = []
    pages = (16,) if quick else (16, 64)
    for page in pages:
        seq = [ctx] * batch
        kv, _, bt, sl = make_paged_cache(seq, page, 1, lora + rope, None, BF16, "cuda")
        q = torch.randn(batch, heads, lora + rope, device="cuda", dtype=BF16)
        scale = 192**-0.5
        ref = mla_decode_attention_ref(q, kv, bt, sl, scale, lora)
        nbytes = sum(seq) * (lora + rope) * 2 + q.numel() * 2 + batch * heads * lora * 2
        flops = 2.0 * sum(seq) * heads * (lora + rope + lora)
        shape = f"B{batch} ctx{ctx} {heads}h {lora}+{rope} page{page}"

        call = functools.partial(functools.partial, mla_decode_attention, q, kv, bt, sl, scale, lora, ctx)

        base = dict(kernel="decode_mla", shape=shape, config="default")
        _try(rows, base, call(), ref, nbytes, copy_tbs, flops, graph=True)
        if use_mla_tma(q, kv):  # the Triton kernel's choice at this shape: tiles through TMA descriptors
            _try(rows, dict(base, config="TMA (use_mla_tma)"), call(kernel="tma"), ref, nbytes, copy_tbs, flops,
                 graph=True)
        if use_mla_gluon(q, kv, lora):  # the backend's choice on Hopper: the warp-specialised Gluon kernel
            _try(rows, dict(base, config="Gluon (use_mla_gluon)"), call(kernel="gluon"), ref, nbytes, copy_tbs, flops,
                 graph=True)
        if not sweep or page != 16:
            continue
        best = (float("inf"), {})
        # (block_h, num_warps, block_n, num_stages); 64 heads x 8 warps is the only shape that fits the
        # [64, 512] fp32 accumulator in registers; 128 heads overflow shared memory or registers.
        tiles = [(64, 8, bn, st) for bn, st in ((32, 2), (32, 3), (64, 1), (64, 2), (128, 1))]
        tiles += [(32, 4, 32, 2), (32, 4, 64, 2), (16, 4, 64, 2)]
        for block_h, warps, block_n, stages in tiles:
            cfg = dict(block_h=block_h, num_warps=warps, block_n=block_n, num_stages=stages)
            ms = _try(rows, dict(base, config=str(cfg)), call(**cfg), ref, nbytes, copy_tbs, flops)
            if ms is not None and ms < best[0]:
                best = (ms, cfg)
        for splits in (1, 2, 4):
            cfg = dict(best[1], num_splits=splits)
            _try(rows, dict(base, config=str(cfg)), call(**cfg), ref, nbytes, copy_tbs, flops)
        del kv
    return rows


def _sdpa_baseline(q, k, v, bt, qsl, seq, new, scale):
    """torch SDPA per request on contiguous, head-expanded copies (copies made outside the timed region)."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from moeserve.kernels.attention_reference import gather_paged

    group = q.shape[1] // k.shape[2]
    items = []
    for i, (s, n) in enumerate(zip(seq, new)):
        lo = int(qsl[i])
        kk = gather_paged(k, bt[i], s).repeat_interleave(group, 1).transpose(0, 1)[None].contiguous()
        vv = gather_paged(v, bt[i], s).repeat_interleave(group, 1).transpose(0, 1)[None].contiguous()
        items.append((q[lo : lo + n].transpose(0, 1)[None].contiguous(), kk, vv, causal_lower_right(n, s)))

    def fn() -> torch.Tensor:  # [T, Hq, Dv], like the kernel
        outs = [F.scaled_dot_product_attention(a, b, c, attn_mask=m, scale=scale) for a, b, c, m in items]
        return torch.cat([o[0].transpose(0, 1) for o in outs])

    return fn


def bench_extend(copy_tbs: float, quick: bool, sweep: bool) -> list[dict]:
    from moeserve.kernels.attention_prefill import extend_attention
    from moeserve.kernels.attention_reference import paged_attention_ref

    cases = [  # name, prefix lens, new lens, heads, kv heads, dk, dv
        ("prefill", [0] * 4, [2048] * 4, 32, 4, 128, 128),
        ("extend", [4096] * 4, [512] * 4, 32, 4, 128, 128),
        ("chunk", [6144], [2048], 32, 4, 128, 128),
        ("extend_mla", [2048] * 2, [256] * 2, 128, 1, 576, 512),
    ]
    if quick:
        cases = [(n, [p // 8 for p in pre], [x // 8 for x in new], *rest) for n, pre, new, *rest in cases[:2]]
    rows: list[dict] = []
    for name, prefix, new, heads, kv_heads, dk, dv in cases:
        mla = dk != dv
        seq = [p + n for p, n in zip(prefix, new)]
        k, v, bt, sl = make_paged_cache(seq, 16, kv_heads, dk, None if mla else dv, BF16, "cuda")
        v = k[..., :dv] if mla else v
        q = torch.randn(sum(new), heads, dk, device="cuda", dtype=BF16)
        qsl = query_start_loc(new, "cuda")
        scale = (192 if mla else dk) ** -0.5
        visible = sum(n * p + n * (n + 1) // 2 for p, n in zip(prefix, new))
        flops = 2.0 * heads * (dk + dv) * visible
        cache_bytes = sum(seq) * kv_heads * (dk + (0 if mla else dv)) * 2
        nbytes = cache_bytes + q.numel() * 2 + sum(new) * heads * dv * 2
        shape = f"{name}: prefix {prefix[0]} new {new[0]} x{len(new)} {heads}/{kv_heads}h {dk}/{dv}"
        ref = paged_attention_ref(q, k, v, qsl, sl, bt, scale)
        base = dict(kernel="extend", shape=shape)

        call = functools.partial(functools.partial, extend_attention, q, k, v, qsl, sl, bt, scale, max(new))

        idx = len(rows)
        t_triton = _try(rows, dict(base, config="default"), call(), ref, nbytes, copy_tbs, flops)
        torch_ref = functools.partial(paged_attention_ref, q, k, v, qsl, sl, bt, scale, BF16)
        t_ref = _try(rows, dict(base, config="torch reference (fp32 softmax)"), torch_ref, ref, nbytes,
                     copy_tbs, flops)
        try:
            sdpa = _sdpa_baseline(q, k, v, bt, qsl.tolist(), seq, new, scale)
            t_sdpa = _try(rows, dict(base, config="torch SDPA, contiguous copy"), sdpa, ref, nbytes,
                          copy_tbs, flops)
        except Exception as exc:
            t_sdpa = None
            rows.append(dict(base, config="torch SDPA, contiguous copy", error=str(exc)[:160]))
        if t_triton:
            rows[idx]["speedup_vs_ref"] = t_ref / t_triton if t_ref else None
            rows[idx]["speedup_vs_sdpa"] = t_sdpa / t_triton if t_sdpa else None
        if sweep:
            tiles = [(64, 64, 4), (128, 64, 4), (64, 32, 4), (128, 128, 8)]  # (block_m, block_n, num_warps)
            if mla:
                tiles = [(32, 32, 8), (64, 16, 8), (64, 64, 8)]
            configs = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=2) for bm, bn, w in tiles]
            configs.append(dict(configs[0], num_stages=3))
            for cfg in configs:
                _try(rows, dict(base, config=str(cfg)), call(**cfg), ref, nbytes, copy_tbs, flops)
        del k, v
    return rows


def kernel_resources() -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of the attention kernels (diagnostic)."""
    from moeserve.kernels import attention_decode, attention_prefill, mla_decode

    rows = []
    kernels = (attention_decode._gqa_decode_kernel, mla_decode._mla_decode_kernel,
               attention_prefill._extend_kernel)
    for fn in kernels:
        try:
            for cache in fn.device_caches.values():
                for compiled in cache[0].values():
                    consts = {fn.arg_names[k[0]] if isinstance(k, tuple) else k: v
                              for k, v in compiled.src.constants.items()}
                    keep = {k: v for k, v in consts.items() if str(k).startswith("BLOCK")}
                    rows.append(dict(kernel=fn.__name__, regs=compiled.n_regs, spills=compiled.n_spills,
                                     shared=compiled.metadata.shared, warps=compiled.metadata.num_warps,
                                     stages=compiled.metadata.num_stages, constants=str(keep)))
        except Exception as exc:  # private Triton API: report, never fail the benchmark
            rows.append(dict(kernel=fn.__name__, error=f"{type(exc).__name__}: {exc}"))
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    """All attention benchmarks; one dict per timed configuration (see module docstring)."""
    quick, sweep = getattr(args, "quick", False), getattr(args, "sweep", False)
    torch.manual_seed(0)
    copy_tbs = copy_bandwidth_tbs()
    device = torch.cuda.get_device_name()
    rows = [dict(kernel="copy", shape="1 GiB d2d", config="torch copy_", tb_per_s=copy_tbs, device=device)]
    print(rows[0], flush=True)
    for bench in (bench_gqa_decode, bench_mla_decode, bench_extend):
        rows += bench(copy_tbs, quick, sweep)
    if sweep:
        for r in kernel_resources():
            print("resources", r, flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["kernel", "shape", "config", "time_us", "tb_per_s", "pct_copy_bw", "time_graph_us",
            "pct_copy_bw_graph", "tflops", "rel_err",
            "speedup_vs_ref", "speedup_vs_sdpa", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile configurations")
    default_out = os.path.join(os.path.dirname(__file__), "out", "kernels_attention.json")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()
    rows = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(format_table(rows))


if __name__ == "__main__":
    main()
