"""The persistent Gluon grouped GEMMs (`GemmConfig.loads = "gluon"`) against the table's entries, at large M.

    python benchmarks/moe_gluon_probe.py [--cases qwen3:bf16:8192,...] [--repeats 3]
        [--variants best|all|narrow] [--out F.json]

Variants are made from each case's table entry (block_m 128): "down gluon" (down by the Gluon kernel),
"both gluon" (fp8 cases also "gate/up gluon"; tiles of one 128 x 128 scale block), and with `all` or
`narrow` other tile widths, ring depths and GROUP_M. Where the table entry
already takes the Gluon kernel, "table" is one of them. For each case: every variant's whole `fused_moe` output
against the table entry's (relative error), then whole calls under CUDA-graph replay
(`kernels_moe_tune.alternate_us`: variants timed in turn, `--repeats` times, medians), as fractions of the
roofline against the ceilings measured at the start of the run and against the matmul timed right after the
case (the power-capped rate compute-bound calls run at; `kernels.bench_case`). Per-kernel times:
`benchmarks/moe_breakdown.py` (the table entries). Exits non-zero when a variant's output is off by more than
1e-2 or its timing fails (a variant whose Triton tiles do not fit block_m 128 fails too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from kernels_moe_tune import alternate_us, roofline_us  # noqa: E402
from moe_entries_probe import parse_cases  # noqa: E402

from kernels import SHAPES, MatmulRate, device_info, make_weights, measure_ceilings, rel_err, rotating_inputs  # noqa: E402
from moeserve.kernels.fused_moe import fused_moe  # noqa: E402
from moeserve.kernels.moe_configs import MoEConfig, get_config  # noqa: E402

DEFAULT_CASES = "qwen3:bf16:8192,deepseek:bf16:8192,mixtral:bf16:2048,mixtral:bf16:8192,qwen3:bf16:2048"


def gluon(g, **kw):
    return replace(g, loads="gluon", warp_specialize=False, short_m=0, swap_ab=False, mid_m=False, tail_m=False, **kw)


def variants(table: MoEConfig, which: str, fp8: bool = False) -> dict[str, MoEConfig]:
    """The table entry and Gluon variants of it (block_m 128: the Gluon kernel's only height). fp8: tiles of one
    128 x 128 scale block."""
    base = replace(table, block_m=128, overlap=False)
    gu, dn = base.gate_up, base.down
    if fp8:
        gu_g = gluon(gu, block_n=128, block_k=128, num_stages=4)
        dn_g = gluon(dn, block_n=128, block_k=128, num_stages=5)
        out = {"table": table, "gate/up gluon": replace(base, gate_up=gu_g),
               "down gluon": replace(base, down=dn_g), "both gluon": replace(base, gate_up=gu_g, down=dn_g)}
        if which != "best":
            out["both gluon, down 6 stages"] = replace(base, gate_up=gu_g, down=replace(dn_g, num_stages=6))
            out["both gluon, group 16"] = replace(base, gate_up=replace(gu_g, group_m=16),
                                                  down=replace(dn_g, group_m=16))
            out["both gluon, gate/up 3 stages"] = replace(base, gate_up=replace(gu_g, num_stages=3), down=dn_g)
        return out
    out = {
        "table": table,
        "down gluon": replace(base, down=gluon(dn, block_n=256, block_k=64, num_stages=3)),
        "both gluon": replace(base, gate_up=gluon(gu, block_n=128, block_k=64, num_stages=4),
                              down=gluon(dn, block_n=256, block_k=64, num_stages=3)),
    }
    if which == "narrow":  # memory-bound sizes: 128-wide down tiles, deeper rings
        out["down gluon 128 x5"] = replace(base, down=gluon(dn, block_n=128, block_k=64, num_stages=5))
        out["both gluon, down 128 x5"] = replace(base, gate_up=gluon(gu, block_n=128, block_k=64, num_stages=4),
                                                 down=gluon(dn, block_n=128, block_k=64, num_stages=5))
        out["both gluon, group 1"] = replace(base, gate_up=gluon(gu, block_n=128, block_k=64, num_stages=4, group_m=1),
                                             down=gluon(dn, block_n=256, block_k=64, num_stages=3, group_m=1))
    if which == "all":
        out["both gluon, down 128 wide x5"] = replace(base, gate_up=gluon(gu, block_n=128, block_k=64, num_stages=4),
                                                      down=gluon(dn, block_n=128, block_k=64, num_stages=5))
        out["both gluon, group 16"] = replace(base, gate_up=gluon(gu, block_n=128, block_k=64, num_stages=4,
                                                                  group_m=16),
                                              down=gluon(dn, block_n=256, block_k=64, num_stages=3, group_m=16))
        out["both gluon, gate/up 3 stages"] = replace(base, gate_up=gluon(gu, block_n=128, block_k=64, num_stages=3),
                                                      down=gluon(dn, block_n=256, block_k=64, num_stages=3))
    return out


def errors_against(w: dict, inputs: list, table: MoEConfig, cases: dict[str, MoEConfig], where: str,
                   failed: list) -> dict[str, float]:
    """label -> relative error of each case's whole `fused_moe` output against table's on inputs[0] (nan, with
    the exception printed, where the call raised). A case off by more than 1e-2 goes into failed, named by
    where."""
    hidden, tw, ids = inputs[0]
    scales = dict(w13_scale=w.get("w13_scale"), w2_scale=w.get("w2_scale"))
    ref = fused_moe(hidden, w["w13"], w["w2"], tw, ids, config=table, **scales)
    errs = {}
    for label, cfg in cases.items():
        try:
            errs[label] = rel_err(fused_moe(hidden, w["w13"], w["w2"], tw, ids, config=cfg, **scales), ref)
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            errs[label] = float("nan")
            print(f"{label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if not errs[label] <= 1e-2:
            failed.append(f"{where} {label}: rel err {errs[label]}")
    torch.cuda.synchronize()
    return errs


def run_case(key: str, dtype: str, m: int, ceilings: dict, rates: MatmulRate, repeats: int, which: str,
             failed: list) -> dict:
    shape, fp8 = SHAPES[key], dtype == "fp8"
    w = make_weights(shape, fp8)
    inputs = rotating_inputs(shape, m, fp8)
    table = get_config(m, shape.num_experts, shape.hidden, shape.inter, shape.top_k, fp8, 1 if fp8 else 2,
                       global_experts=shape.global_experts)
    cases = variants(table, which, fp8)
    errs = errors_against(w, inputs, table, cases, f"{key} {m}", failed)
    runs = alternate_us(w, inputs, cases, repeats, failed=failed)
    beside = rates.tflops(fp8)
    rate = ceilings["fp8_tflops" if fp8 else "bf16_tflops"]
    floor = roofline_us(shape, fp8, inputs, ceilings["copy_tbs"], rate)
    floor_beside = roofline_us(shape, fp8, inputs, ceilings["copy_tbs"], beside)
    rows = []
    for label, us in runs.items():
        med = statistics.median(us)
        rows.append(dict(variant=label, us=med, runs=us, frac=floor / med, frac_beside=floor_beside / med,
                         rel_err=errs[label]))
        print(f"{shape.name} {dtype} M={m}  {label:32s} {med:9.1f} µs  frac {floor / med:.3f}  beside "
              f"{floor_beside / med:.3f}  err {errs[label]:.2e}  runs {[round(u, 1) for u in us]}", flush=True)
    return dict(shape=shape.name, dtype=dtype, m=m, floor_us=floor, beside_tflops=beside, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="all", choices=("all", "best", "narrow"))
    parser.add_argument("--out", default="benchmarks/out/moe_gluon_probe.json")
    args = parser.parse_args()
    rates = MatmulRate()
    ceilings = measure_ceilings(rates)
    print(f"ceilings: {ceilings}", flush=True)
    run_and_save(parse_cases(args.cases, "moe_gluon_probe"), ceilings, args.out,
                 lambda key, dtype, m, failed: run_case(key, dtype, m, ceilings, rates, args.repeats, args.variants,
                                                        failed))


def run_and_save(cases: list[tuple[str, str, int]], ceilings: dict, out: str,
                 run_one: Callable[[str, str, int, list], dict]) -> None:
    """run_one(key, dtype, M, failed) for each case, the results written to out after each; exits 1 listing what
    failed."""
    failed, results = [], []
    for key, dtype, m in cases:
        results.append(run_one(key, dtype, m, failed))
        torch.cuda.empty_cache()
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(dict(device=device_info(), ceilings=ceilings, results=results, failed=failed), f, indent=1)
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
