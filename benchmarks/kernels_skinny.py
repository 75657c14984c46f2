"""Decode-size projections: `skinny_linear` (Triton, split-K reduced in one launch) against cuBLAS (F.linear).

    python benchmarks/kernels_skinny.py [--sweep] [--lm-head] [--out benchmarks/out/kernels_skinny.json]

Every projection a decode step runs per layer, with real model shapes, at 1, 8 and 16 rows. Each case is timed
under CUDA-graph replay over 8 distinct weight copies (as 8 layers would be: no weight is served from L2), and
compared with the floor: weight + activation bytes over the device-to-device copy bandwidth measured in the same
run. Results are checked against an fp64 reference. `--sweep` also tries tile / split / pipeline variants on
the Qwen3 shapes to choose `default_config`. `--lm-head` times only the weights wider than one wave of tiles
(LM heads, a dense MLP's gate/up), with `--sweep` against unsplit variants at one row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels_attention import copy_bandwidth_tbs  # noqa: E402
from kernels_small import time_graph  # noqa: E402

from moeserve.kernels import pdl  # noqa: E402
from moeserve.kernels.attention_reference import rel_err  # noqa: E402
from moeserve.kernels.device import num_sms  # noqa: E402
from moeserve.kernels.skinny_gemm import SkinnyConfig, default_config, skinny_linear  # noqa: E402

BF16 = torch.bfloat16
LAYERS = 8
SHAPES = {  # name: (out N, in K)
    "qwen3 qkv": (5120, 2048),
    "qwen3 o_proj": (2048, 4096),
    "qwen3 router": (128, 2048),
    "mixtral qkv": (6144, 4096),
    "mixtral o_proj": (4096, 4096),
    "dsv2-lite q_proj": (3072, 2048),
    "dsv2-lite kv_a": (576, 2048),
    "dsv2-lite o_proj": (2048, 2048),
    "dsv2-lite shared gate_up": (5632, 2048),
    "dsv2-lite shared down": (2048, 2816),
}


# Wider than one wave of 64-column tiles (`default_config` streams them unsplit).
WIDE = {"qwen3 lm_head": (151936, 2048), "dsv2-lite lm_head": (102400, 2048), "mixtral lm_head": (32000, 4096),
        "dsv2-lite dense gate_up": (21888, 2048)}


def graph_us(fn: Callable[[int], object]) -> float:
    """µs per call of fn(layer) under CUDA-graph replay, one pass over the LAYERS distinct weights per call of
    `time_graph`'s function (so no weight is served from L2)."""
    return time_graph(lambda: [fn(i) for i in range(LAYERS)], reps=10) / LAYERS


def case(name: str, n: int, k: int, m: int, copy_tbs: float, configs: list[SkinnyConfig | None],
         cublas_us: float | None = None) -> list[dict]:
    """Rows for `skinny_linear` at each config (None: the default) on x [m, k] @ w [n, k].T, bf16, preceded by
    a cuBLAS row; cublas_us: cuBLAS already timed for this case (its row is then left out, vs_cublas uses it)."""
    ws = [torch.randn(n, k, device="cuda", dtype=BF16) * k**-0.5 for _ in range(LAYERS)]
    x = torch.randn(m, k, device="cuda", dtype=BF16)
    ref = x.double() @ ws[0].double().T
    floor_us = (n * k + m * k + m * n) * 2 / copy_tbs / 1e6
    rows = []
    cublas = cublas_us
    if cublas is None:
        cublas = graph_us(lambda i: F.linear(x, ws[i]))
        rows.append(dict(shape=name, n=n, k=k, m=m, impl="cublas", us=cublas, pct_floor=100 * floor_us / cublas,
                         rel_err=rel_err(F.linear(x, ws[0]), ref)))
    for cfg in configs:
        label = "skinny default" if cfg is None else f"skinny {cfg}"
        try:
            err = rel_err(skinny_linear(x, ws[0], config=cfg), ref)
            us = graph_us(lambda i, c=cfg: skinny_linear(x, ws[i], config=c))
        except Exception as exc:  # a config that does not compile or fit is a result
            rows.append(dict(shape=name, n=n, k=k, m=m, impl=label, error=f"{type(exc).__name__}: {exc}"[:200]))
            continue
        rows.append(dict(shape=name, n=n, k=k, m=m, impl=label, us=us, pct_floor=100 * floor_us / us,
                         rel_err=err, vs_cublas=cublas / us,
                         config=str(cfg or default_config(n, k, num_sms(x.device)))))
    for r in rows:
        print({key: round(v, 4) if isinstance(v, float) else v for key, v in r.items()}, flush=True)
    return rows


def sweep_configs() -> list[SkinnyConfig]:
    grid = itertools.product((16, 32, 64), (128, 256), (1, 2, 4), (3, 5))
    return [SkinnyConfig(block_n=bn, block_k=bk, split_k=s, num_stages=st) for bn, bk, s, st in grid]


def lm_head_configs() -> list[SkinnyConfig]:
    """Unsplit streams of the LM head's weight: (columns, k depth, warps, stages)."""
    grid = ((64, 256, 4, 3), (64, 256, 4, 4), (64, 128, 4, 5), (64, 128, 4, 6), (128, 128, 4, 4), (128, 128, 8, 4),
            (128, 256, 8, 3), (32, 256, 4, 4), (32, 512, 4, 3), (64, 512, 4, 2), (64, 512, 8, 2))
    return [SkinnyConfig(block_n=bn, block_k=bk, split_k=1, num_warps=w, num_stages=st) for bn, bk, w, st in grid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--lm-head", action="store_true",
                        help="only the weights wider than a wave (LM heads), with --sweep their variants")
    parser.add_argument("--out", default="benchmarks/out/kernels_skinny.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    copy_tbs = copy_bandwidth_tbs()
    on = pdl.pdl_supported(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {copy_tbs:.2f} TB/s; PDL {on}")
    rows: list[dict] = []
    if args.lm_head:
        for name, (n, k) in WIDE.items():
            for m in (1, 8, 16):
                rows += case(name, n, k, m, copy_tbs, [None] + (lm_head_configs() if args.sweep and m == 1 else []))
        write_json(args.out, copy_tbs, rows)
        return
    if args.sweep:
        for name in ("qwen3 qkv", "qwen3 o_proj"):
            for m in (1, 16):
                rows += case(name, *SHAPES[name], m, copy_tbs, sweep_configs())
    for name, (n, k) in SHAPES.items():
        for m in (1, 8, 16):
            rows += case(name, n, k, m, copy_tbs, [None])
    # PDL on vs off for the default configs (the env switch is read once per device, so clear its cache).
    # cuBLAS does not use PDL: its time from the table above stands.
    for flag in ("0", "1"):
        os.environ["MOESERVE_PDL"] = flag
        pdl.pdl_supported.cache_clear()
        for name in ("qwen3 qkv", "qwen3 o_proj"):
            cb = next(r["us"] for r in rows if r["impl"] == "cublas" and r["shape"] == name and r["m"] == 1)
            for r in case(name, *SHAPES[name], 1, copy_tbs, [None], cublas_us=cb):
                rows.append(dict(r, impl=f"skinny default, MOESERVE_PDL={flag}"))
    print("\n| shape | N x K | rows | cuBLAS µs | % floor | skinny µs | % floor | speed-up | rel_err |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["impl"] != "skinny default" or "us" not in r:
            continue
        cb = next(c for c in rows if c["impl"] == "cublas" and c["shape"] == r["shape"] and c["m"] == r["m"])
        print(f"| {r['shape']} | {r['n']} x {r['k']} | {r['m']} | {cb['us']:.2f} | {cb['pct_floor']:.0f}% | "
              f"{r['us']:.2f} | {r['pct_floor']:.0f}% | {r['vs_cublas']:.2f}x | {r['rel_err']:.1e} |")
    best = {}
    for r in rows:
        if r["impl"].startswith("skinny SkinnyConfig") and "us" in r:
            key = (r["shape"], r["m"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    for (shape, m), r in best.items():
        print(f"best swept {shape} rows {m}: {r['us']:.2f} µs ({r['pct_floor']:.0f}% of floor) {r['impl']}")
    write_json(args.out, copy_tbs, rows)


def write_json(path: str, copy_tbs: float, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(copy_tbs=copy_tbs, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
