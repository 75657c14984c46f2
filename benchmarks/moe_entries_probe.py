"""Fused-MoE table entries against nearby tiles and top-k-sum launch shapes.

    python benchmarks/moe_entries_probe.py [--cases qwen3:bf16:512,...] [--out benchmarks/out/moe_entries.json]

Whole `fused_moe` calls under CUDA-graph replay over the routings `kernels.rotating_inputs` gives: each case's
table entry with each top-k-sum launch shape of TOPK_SUMS, and the configs of EXTRA with the default one, timed
alternately REPEATS times so clock drift hits all alike; fractions against max(bytes / copy bandwidth, FLOPs /
matmul rate) measured in this run. Every GEMM kernel is compiled first, in parallel processes
(`kernels_moe_tune.precompile`). (Session 7 also timed the count + scatter align with and without the memset
that zeroed its scratch before: the run is in benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from kernels_moe_tune import _whole_us, precompile, roofline_us  # noqa: E402

from kernels import SHAPES, make_weights, measure_ceilings, rotating_inputs  # noqa: E402
from moeserve.kernels.moe_configs import GemmConfig as G  # noqa: E402
from moeserve.kernels.moe_configs import MoEConfig, get_config  # noqa: E402

# The module, not the function `moeserve.kernels.fused_moe` the package exports under the same name.
fused_mod = importlib.import_module("moeserve.kernels.fused_moe")

CASES = "qwen3:bf16:512,qwen3:fp8:512"
# Configs timed besides the table entry (label -> config), with the default top-k sum.
_BF16 = dict(bm=64, gu=G(64, 128, 1, 4, 4), dn=G(128, 128, 1, 4, 4))
_FP8 = dict(bm=64, gu=G(128, 128, 8, 8, 4), dn=G(128, 128, 8, 4, 4))
EXTRA = {
    "qwen3:bf16:512": {
        "previous (bm32)": MoEConfig(32, G(64, 128, 1, 4, 4), G(128, 128, 1, 4, 3)),
        "gate/up k64 6 stages": MoEConfig(64, G(64, 64, 1, 4, 6), _BF16["dn"]),
        "gate/up k64 8 stages": MoEConfig(64, G(64, 64, 1, 4, 8), _BF16["dn"]),
        "gate/up 32 wide": MoEConfig(64, G(32, 128, 1, 4, 4), _BF16["dn"]),
        "gate/up 3 stages": MoEConfig(64, G(64, 128, 1, 4, 3), _BF16["dn"]),
        "down k64 6 stages": MoEConfig(64, _BF16["gu"], G(128, 64, 1, 4, 6)),
        "down 64 wide": MoEConfig(64, _BF16["gu"], G(64, 128, 1, 4, 4)),
        "down 3 stages": MoEConfig(64, _BF16["gu"], G(128, 128, 1, 4, 3)),
    },
    "qwen3:fp8:512": {
        "previous (gate/up 3 stages)": MoEConfig(64, G(128, 128, 8, 8, 3), _FP8["dn"]),
        "down 5 stages": MoEConfig(64, _FP8["gu"], G(128, 128, 8, 4, 5)),
        "down 8 warps": MoEConfig(64, _FP8["gu"], G(128, 128, 8, 8, 4)),
        "down group_m 1": MoEConfig(64, _FP8["gu"], G(128, 128, 1, 4, 4)),
        "down 64 wide 6 stages": MoEConfig(64, _FP8["gu"], G(64, 128, 8, 4, 6)),
        "gate/up group_m 1": MoEConfig(64, G(128, 128, 1, 8, 4), _FP8["dn"]),
    },
}
# Top-k-sum launch shapes (block_n, num_warps) timed with the table entry; the first is the default.
TOPK_SUMS = [(1024, 4), (2048, 8), (2048, 4), (512, 4), (512, 2), (256, 2)]
REPEATS = 3
_topk_sum = fused_mod.topk_sum


def _variants(key: str, table: MoEConfig) -> dict[str, tuple[MoEConfig, tuple[int, int]]]:
    """label -> (config, top-k-sum launch shape) for a case."""
    out = {f"table, top-k sum {bn}x{w}w": (table, (bn, w)) for bn, w in TOPK_SUMS}
    out.update({label: (cfg, TOPK_SUMS[0]) for label, cfg in EXTRA.get(key, {}).items()})
    return out


def _table(shape_key: str, dtype: str, m: int) -> MoEConfig:
    s = SHAPES[shape_key]
    return get_config(m, s.num_experts, s.hidden, s.inter, s.top_k, dtype == "fp8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--out", default="benchmarks/out/moe_entries.json")
    args = parser.parse_args()
    cases = [(k, d, int(m)) for k, d, m in (c.split(":") for c in args.cases.split(","))]
    t0 = time.time()
    jobs = [(key, dtype == "fp8", cfg.block_m, "whole", cfg) for key, dtype, m in cases
            for cfg, _ in _variants(f"{key}:{dtype}:{m}", _table(key, dtype, m)).values()]
    errors = precompile(list(dict.fromkeys(jobs)), 14)
    print(f"compiled in {time.time() - t0:.0f} s; failures: {errors}", flush=True)
    ceilings = measure_ceilings()
    bundle = dict(device=torch.cuda.get_device_name(), ceilings=ceilings, compile_failures=errors, cases={})
    print(f"ceilings: {ceilings}")
    print("| case | variant | µs (median) | runs | frac |")
    print("|---|---|---:|---|---:|")
    for key, dtype, m in cases:
        name = f"{key}:{dtype}:{m}"
        shape, fp8 = SHAPES[key], dtype == "fp8"
        w = make_weights(shape, fp8)
        inputs = rotating_inputs(shape, m, fp8)
        roof = roofline_us(shape, fp8, inputs, ceilings["copy_tbs"],
                           ceilings["fp8_tflops"] if fp8 else ceilings["bf16_tflops"])
        variants = _variants(name, _table(key, dtype, m))
        runs: dict[str, list[float]] = {label: [] for label in variants}
        for _ in range(REPEATS):
            for label, (cfg, (block_n, warps)) in variants.items():
                fused_mod.topk_sum = functools.partial(_topk_sum, block_n=block_n, num_warps=warps)
                try:
                    runs[label].append(round(_whole_us(w, inputs, cfg), 2))
                except Exception as exc:  # noqa: BLE001 - a variant that fails is reported, not fatal
                    runs[label].append(float("nan"))
                    print(f"{name} {label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        fused_mod.topk_sum = _topk_sum
        row = dict(roofline_us=roof, variants={k: dict(config=c.to_dict(), topk_sum=t, runs=runs[k])
                                               for k, (c, t) in variants.items()})
        for label, us in runs.items():
            med = statistics.median(us)
            row["variants"][label]["median_us"] = med
            print(f"| {name} | {label} | {med:.1f} | {us} | {roof / med:.3f} |", flush=True)
        bundle["cases"][name] = row
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(bundle, f, indent=1)
        del w
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
