"""Do TMA tile loads (and Triton's warp specialisation) help the aligned fused-MoE GEMMs where issue 6 misses?

    python benchmarks/moe_tma_probe.py --out benchmarks/out/moe_tma_probe.json [--budget-s 300]

For each case (shape, dtype, M) of the M >= 512 misses in benchmarks/RESULTS.md: whole `fused_moe` calls under
CUDA-graph replay (2 routings, as benchmarks/kernels.py times large M) for the table's entry ("table", pointer
loads) and the same tiles with `GemmConfig.loads` = tma / tma_gathered, warp_specialize off / on, plus 3-stage
variants of the warp-specialised tiles; then the table and the best variant alternately, REPEATS times each.
Every distinct kernel is compiled first, each in its own process (`kernels_moe_tune.precompile`), so a compiler
crash (Triton's Hopper warp-specialisation pass asserts on some loops) or a faulting tile only drops that variant.
Fractions: roofline = max(bytes / copy bandwidth, FLOPs / matmul rate), both measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from kernels_moe_tune import (  # noqa: E402
    COMPILE_WORKERS,
    PROBE_CASES,
    REPEATS,
    _whole_us,
    alternate_us,
    precompile,
    roofline_us,
    whole_jobs,
)

from kernels import SHAPES, make_weights, measure_ceilings, rotating_inputs  # noqa: E402
from moeserve.kernels.moe_configs import GemmConfig, MoEConfig  # noqa: E402

CASES = [(key, dtype, m) for key, dtype, m, _ in PROBE_CASES]  # the M >= 512 misses of issue 6
MODES = [("tma", False), ("tma", True), ("tma_gathered", True)]


def by_tma(g: GemmConfig, loads: str = "tma", ws: bool = False) -> GemmConfig:
    """g's tiles under a TMA load mode, without the options that need pointer loads (transposed MMAs, mid and
    tail tiles)."""
    return dataclasses.replace(g, loads=loads, warp_specialize=ws, swap_ab=False, mid_m=False, tail_m=False)


def variants(table: MoEConfig) -> dict[str, MoEConfig]:
    """The table entry, its tiles under each load mode, and stage variants of the warp-specialised ones."""
    out = {"table": table}
    for loads, ws in MODES:
        gu = by_tma(table.gate_up, loads, ws)
        dn = by_tma(table.down, "tma", ws)
        out[f"{loads}{'+ws' if ws else ''}"] = MoEConfig(table.block_m, gu, dn)
        if ws:
            out[f"{loads}+ws s3"] = MoEConfig(table.block_m, dataclasses.replace(gu, num_stages=3),
                                              dataclasses.replace(dn, num_stages=3))
    unique = {}
    for label, cfg in out.items():  # a stage variant equal to its parent is timed once
        if cfg not in unique.values():
            unique[label] = cfg
    return unique


# --wide: per-GEMM tile search under TMA loads for the compute-bound misses, 8 warps (warp specialisation
# failed to compile with 4 warps in the first run). Each gate/up tile is timed with the table's down tiles
# (TMA loads) and each down tile with the table's gate/up tiles; the best of each are then combined.
WIDE_CASES = [("qwen3", "bf16", 8192), ("qwen3", "bf16", 2048), ("deepseek", "bf16", 8192),
              ("mixtral", "bf16", 2048), ("mixtral", "bf16", 512), ("mixtral", "fp8", 512)]
G = GemmConfig
WIDE_TILES = {  # (dtype, kind): (block_n, block_k, group_m, num_warps, num_stages)
    ("bf16", "gate_up"): [G(128, 64, 8, 8, 4), G(128, 64, 8, 8, 3), G(128, 128, 8, 8, 3), G(64, 128, 8, 8, 4),
                          G(128, 64, 16, 8, 4), G(64, 64, 8, 8, 5)],
    ("bf16", "down"): [G(256, 64, 8, 8, 4), G(256, 64, 8, 8, 3), G(256, 128, 8, 8, 3), G(128, 128, 8, 8, 4),
                       G(128, 64, 8, 8, 5), G(256, 64, 16, 8, 4)],
    ("fp8", "gate_up"): [G(128, 128, 8, 8, 3), G(64, 128, 8, 8, 4), G(128, 128, 16, 8, 3), G(128, 128, 8, 8, 2)],
    ("fp8", "down"): [G(128, 128, 8, 8, 3), G(256, 128, 8, 8, 3), G(128, 128, 8, 8, 4), G(256, 128, 8, 8, 2)],
}
WIDE_MODES = {"gate_up": [("tma", False), ("tma", True), ("tma_gathered", True)],
              "down": [("tma", False), ("tma", True)]}


def _label(g: GemmConfig) -> str:
    return (f"{g.block_n}x{g.block_k} g{g.group_m} w{g.num_warps} s{g.num_stages} {g.loads}"
            f"{'+ws' if g.warp_specialize else ''}")


def wide_variants(table: MoEConfig, dtype: str) -> dict[str, MoEConfig]:
    out = {"table": table}
    gu0, dn0 = by_tma(table.gate_up), by_tma(table.down)
    for kind in ("gate_up", "down"):
        for tile in WIDE_TILES[(dtype, kind)]:
            for loads, ws in WIDE_MODES[kind]:
                g = dataclasses.replace(tile, loads=loads, warp_specialize=ws)
                cfg = MoEConfig(table.block_m, g, dn0) if kind == "gate_up" else MoEConfig(table.block_m, gu0, g)
                out[f"{'gu' if kind == 'gate_up' else 'dn'} {_label(g)}"] = cfg
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out/moe_tma_probe.json")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--workers", type=int, default=COMPILE_WORKERS)
    parser.add_argument("--wide", action="store_true", help="per-GEMM tile search under TMA loads")
    args = parser.parse_args()
    t0 = time.time()
    plan = {}
    for key, dtype, m in WIDE_CASES if args.wide else CASES:
        table = SHAPES[key].table_config(m, dtype == "fp8")
        plan[(key, dtype, m)] = wide_variants(table, dtype) if args.wide else variants(table)
    jobs = whole_jobs((key, dtype == "fp8", c) for (key, dtype, _), vs in plan.items() for c in vs.values())
    errors = precompile(jobs, args.workers)
    failed = "\n".join(errors)
    bundle = dict(device=torch.cuda.get_device_name(), compile_s=round(time.time() - t0, 1), compile_errors=errors,
                  ceilings=measure_ceilings(), cases={})
    ceil = bundle["ceilings"]
    print(f"compiled in {bundle['compile_s']} s, {len(errors)} failures; ceilings {ceil}", flush=True)
    for e in errors:
        print("  ", e[:300], flush=True)
    for (key, dtype, m), vs in plan.items():
        name = f"{key} {dtype} {m}"
        if time.time() - t0 > args.budget_s:
            bundle["cases"][name] = "skipped: time budget"
            continue
        shape, fp8 = SHAPES[key], dtype == "fp8"
        w = make_weights(shape, fp8)
        inputs = rotating_inputs(shape, m, fp8)  # 2 routings: every case's call touches > 4x L2
        roof_us = roofline_us(shape, fp8, inputs, ceil["copy_tbs"], ceil["fp8_tflops" if fp8 else "bf16_tflops"])
        row = dict(roofline_us=roof_us, us={}, frac={})
        for label, cfg in vs.items():
            if f" {cfg}:" in failed:
                row["us"][label] = "compile failed"
                continue
            try:
                row["us"][label] = round(_whole_us(w, inputs, cfg), 1)
            except Exception as exc:  # noqa: BLE001 - report and go on
                row["us"][label] = f"failed: {type(exc).__name__}: {str(exc)[:100]}"
        timed = {k: v for k, v in row["us"].items() if isinstance(v, float)}
        if args.wide and any(k.startswith("gu ") for k in timed) and any(k.startswith("dn ") for k in timed):
            gu = min((k for k in timed if k.startswith("gu ")), key=timed.get)
            dn = min((k for k in timed if k.startswith("dn ")), key=timed.get)
            vs["combined"] = MoEConfig(vs[gu].block_m, vs[gu].gate_up, vs[dn].down)
            timed["combined"] = row["us"]["combined"] = round(_whole_us(w, inputs, vs["combined"]), 1)
        best = min((k for k in timed if k != "table"), key=timed.get, default=None)
        if best and "table" in timed:
            runs = alternate_us(w, inputs, {label: vs[label] for label in ("table", best)}, REPEATS)
            row["ab"] = {k: round(statistics.median(v), 1) for k, v in runs.items()}
            row["best"] = best
            row["best_config"] = vs[best].to_dict()
        row["frac"] = {k: round(roof_us / v, 3) for k, v in (row.get("ab") or timed).items()}
        bundle["cases"][name] = row
        print(name, f"roof {roof_us:.0f} us", row["us"], "A/B", row.get("ab"), row["frac"], flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(bundle, f, indent=1)
        del w
        torch.cuda.empty_cache()
    print("\n| case | roofline µs | table µs (frac) | best variant | µs (frac) |\n|---|---:|---:|---|---:|")
    for name, row in bundle["cases"].items():
        if isinstance(row, dict) and "ab" in row:
            b = row["best"]
            print(f"| {name} | {row['roofline_us']:.0f} | {row['ab']['table']} ({row['frac']['table']}) | {b} | "
                  f"{row['ab'][b]} ({row['frac'][b]}) |")
    with open(args.out, "w") as f:
        json.dump(bundle, f, indent=1)


if __name__ == "__main__":
    main()
