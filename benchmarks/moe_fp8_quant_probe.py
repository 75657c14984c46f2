"""FP8 fused MoE: activation quantisation in the gate/up epilogue against its own launch, same process.

    python benchmarks/moe_fp8_quant_probe.py [--tiles] [--out benchmarks/out/moe_fp8_quant_probe.json]

Whole `fused_moe` calls under CUDA-graph replay: each case's table config as it is (`MoEConfig.fuse_act_quant`
on) and with fuse_act_quant=False (act through the separate launch), timed alternately REPEATS times; fractions
against max(bytes / copy bandwidth, FLOPs / fp8 matmul rate) measured in this run (`kernels.measure_ceilings`,
`kernels_moe_tune.roofline_us`). `--tiles`: instead, whole calls (fused epilogue) of the table's entry and a few
tile variants around it for the Qwen3 M=512 case, alternately.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from kernels_moe_tune import _whole_us, alternate_us, roofline_us  # noqa: E402

from kernels import SHAPES, make_inputs, make_weights, measure_ceilings, rotating_inputs  # noqa: E402
from moeserve.kernels.moe_configs import MoEConfig  # noqa: E402

CASES = [("qwen3", 128), ("qwen3", 512), ("qwen3", 2048), ("deepseek", 512), ("deepseek", 2048),
         ("mixtral", 128), ("mixtral", 512)]
REPEATS = 3


def tile_variants(table: MoEConfig) -> dict[str, MoEConfig]:
    """The table's entry and variants of it, mostly one knob each (gate/up keeps 128-wide tiles)."""
    gu, dn = table.gate_up, table.down
    rep = dataclasses.replace
    return {
        "table": table,
        "gate_up 4 warps 4 stages": rep(table, gate_up=rep(gu, num_warps=4, num_stages=4)),
        "gate_up group_m 1": rep(table, gate_up=rep(gu, group_m=1)),
        "gate_up 4 stages": rep(table, gate_up=rep(gu, num_stages=4)),  # not yet measured (session 5)
        "down 5 stages": rep(table, down=rep(dn, num_stages=5)),  # not yet measured (session 5)
        "down 8 warps 3 stages": rep(table, down=rep(dn, num_warps=8, num_stages=3)),
        "down 64 wide 5 stages": rep(table, down=rep(dn, block_n=64, num_stages=5)),
        "block_m 32, 4 warps 4 stages": MoEConfig(32, rep(gu, num_warps=4, num_stages=4),
                                                  rep(dn, num_warps=4, num_stages=4)),
    }


def search_tiles(ceilings: dict) -> list[dict]:
    shape, m = SHAPES["qwen3"], 512
    w = make_weights(shape, True)
    inputs = [make_inputs(shape, m, 1000 + r) for r in range(8)]
    roof = roofline_us(shape, True, inputs, ceilings["copy_tbs"], ceilings["fp8_tflops"])
    variants = tile_variants(shape.table_config(m, True))
    ok = {}
    for label, cfg in variants.items():  # a variant that fails to compile or run drops out
        try:
            _whole_us(w, inputs, cfg, rep=5)
            ok[label] = cfg
        except Exception as exc:  # noqa: BLE001
            print(f"{label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    runs = alternate_us(w, inputs, ok, REPEATS)
    rows = []
    print("| variant | µs (median) | frac |")
    print("|---|---:|---:|")
    for label, us in runs.items():
        med = statistics.median(us)
        rows.append(dict(shape=shape.name, m=m, variant=label, config=ok[label].to_dict(), runs=us, roofline_us=roof))
        print(f"| {label} | {med:.1f} | {roof / med:.3f} |", flush=True)
    return rows


def compare_act_quant(ceilings: dict) -> list[dict]:
    """Each case's table config with act quantised in gate/up's epilogue against the separate launch."""
    rows = []
    print("| shape | M | fused µs | separate µs | change | roofline µs | frac fused | frac separate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, m in CASES:
        shape = SHAPES[key]
        w = make_weights(shape, True)
        inputs = rotating_inputs(shape, m, True)
        cfg = shape.table_config(m, True)
        runs = alternate_us(w, inputs, {"fused": cfg, "separate": dataclasses.replace(cfg, fuse_act_quant=False)},
                            REPEATS)
        roof = roofline_us(shape, True, inputs, ceilings["copy_tbs"], ceilings["fp8_tflops"])
        on, off = statistics.median(runs["fused"]), statistics.median(runs["separate"])
        rows.append(dict(shape=shape.name, m=m, config=cfg.to_dict(), fused_runs=runs["fused"],
                         separate_runs=runs["separate"], roofline_us=roof))
        print(f"| {shape.name} | {m} | {on:.1f} | {off:.1f} | {on / off - 1:+.1%} | {roof:.1f} | "
              f"{roof / on:.3f} | {roof / off:.3f} |", flush=True)
        del w
        torch.cuda.empty_cache()
    return rows


def _write(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", action="store_true")
    parser.add_argument("--out", default="benchmarks/out/moe_fp8_quant_probe.json")
    args = parser.parse_args()
    ceilings = measure_ceilings()
    rows = search_tiles(ceilings) if args.tiles else compare_act_quant(ceilings)
    _write(args.out, dict(card=torch.cuda.get_device_name(), ceilings=ceilings, rows=rows))


if __name__ == "__main__":
    main()
