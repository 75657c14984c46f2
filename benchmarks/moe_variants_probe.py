"""A fused-MoE table entry against variants of it written on the command line, whole calls alternated.

    python benchmarks/moe_variants_probe.py --cases mixtral:fp8:512,qwen3:bf16:8192 \
        --variant 'gu.group_m=7' --variant 'gluon; gu.dynamic_tiles=1; dn.dynamic_tiles=1' [--repeats 3]
        [--out F.json]

A variant is a list of edits separated by ';', applied to each case's table entry: `gu.FIELD=VALUE`
or `dn.FIELD=VALUE` sets a `GemmConfig` field of gate/up or down, `FIELD=VALUE` one of `MoEConfig`'s (block_m,
pairs, overlap, ...), and `gluon` makes both GEMMs the persistent Gluon kernel's, in the tiles
`moe_gluon_probe.variants` gives them (block_m 128; fp8: 128 x 128), before the other edits. VALUE is an
integer, true/false, or a string (`gu.loads=tma`). A case is shape key:dtype:M as in `moe_entries_probe.py`.

For each case: every variant's output against the table entry's (relative error, at most 1e-2), then whole
`fused_moe` calls under CUDA-graph replay, the variants timed in turn `--repeats` times (medians;
`kernels_moe_tune.alternate_us`), as fractions of the roofline measured at the start of the run. Exits non-zero
when a variant is off or fails. Session 26 (benchmarks/RESULTS.md) made its GROUP_M and drawn-tile sweeps so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import fields, replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels_moe_tune import alternate_us, roofline_us  # noqa: E402
from moe_entries_probe import parse_cases  # noqa: E402
from moe_gluon_probe import errors_against, run_and_save  # noqa: E402
from moe_gluon_probe import variants as gluon_variants  # noqa: E402

from kernels import SHAPES, MatmulRate, make_weights, measure_ceilings, rotating_inputs  # noqa: E402
from moeserve.kernels.moe_configs import GemmConfig, MoEConfig, get_config  # noqa: E402

GEMMS = {"gu": "gate_up", "dn": "down"}


def _value(text: str):
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


def apply_variant(cfg: MoEConfig, spec: str, fp8: bool) -> MoEConfig:
    """cfg with the edits of spec (see the module's doc); `gluon`, where given, applies first, the field edits
    then all at once, so that no config between them has to be valid. A bad edit raises ValueError saying which
    fields there are."""
    edits = [e.strip() for e in spec.split(";") if e.strip()]
    if "gluon" in edits:
        cfg = gluon_variants(cfg, "best", fp8)["both gluon"]
    gemms = {name: {} for name in GEMMS.values()}
    top = {}
    for edit in (e for e in edits if e != "gluon"):
        path, sep, text = edit.partition("=")
        gemm, _, field = path.strip().rpartition(".")
        if not sep or gemm not in ("", *GEMMS):
            raise ValueError(f"bad edit {edit!r}: write gu.FIELD=VALUE, dn.FIELD=VALUE, FIELD=VALUE or gluon")
        owner = GemmConfig if gemm else MoEConfig
        names = [f.name for f in fields(owner)]
        if field not in names:
            raise ValueError(f"bad edit {edit!r}: {owner.__name__} has fields {names}")
        (gemms[GEMMS[gemm]] if gemm else top)[field] = _value(text)
    return replace(cfg, **{name: replace(getattr(cfg, name), **changes) for name, changes in gemms.items()}, **top)


def table_entry(key: str, dtype: str, m: int) -> MoEConfig:
    shape, fp8 = SHAPES[key], dtype == "fp8"
    return get_config(m, shape.num_experts, shape.hidden, shape.inter, shape.top_k, fp8, 1 if fp8 else 2,
                      global_experts=shape.global_experts)


def run_case(key: str, dtype: str, m: int, specs: list[str], ceilings: dict, repeats: int, failed: list) -> dict:
    shape, fp8 = SHAPES[key], dtype == "fp8"
    w = make_weights(shape, fp8)
    inputs = rotating_inputs(shape, m, fp8)
    table = table_entry(key, dtype, m)
    cases = {"table": table, **{spec: apply_variant(table, spec, fp8) for spec in specs}}
    errs = errors_against(w, inputs, table, cases, f"{key}:{dtype}:{m}", failed)
    runs = alternate_us(w, inputs, cases, repeats, failed=failed)
    floor = roofline_us(shape, fp8, inputs, ceilings["copy_tbs"], ceilings["fp8_tflops" if fp8 else "bf16_tflops"])
    rows = []
    for label, us in runs.items():
        med = statistics.median(us)
        rows.append(dict(variant=label, config=cases[label].to_dict(), us=med, runs=us, frac=floor / med,
                         rel_err=errs[label]))
        print(f"{key}:{dtype}:{m:<6d} {label:48s} {med:9.1f} µs  frac {floor / med:.3f}  err {errs[label]:.1e}  "
              f"runs {[round(u, 1) for u in us]}", flush=True)
    return dict(shape=shape.name, dtype=dtype, m=m, floor_us=floor, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True, help="comma list of shape key:dtype:M")
    parser.add_argument("--variant", action="append", default=[], help="edits of the table entry (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/out/moe_variants_probe.json")
    args = parser.parse_args()
    cases = parse_cases(args.cases, "moe_variants_probe")
    for key, dtype, m in cases:  # every edit checked before the GPU work starts
        for spec in args.variant:
            try:
                apply_variant(table_entry(key, dtype, m), spec, dtype == "fp8")
            except (ValueError, TypeError) as exc:
                raise SystemExit(f"moe_variants_probe: {key}:{dtype}:{m}: {exc}") from None
    ceilings = measure_ceilings(MatmulRate())
    print(f"ceilings: {ceilings}", flush=True)
    run_and_save(cases, ceilings, args.out,
                 lambda key, dtype, m, failed: run_case(key, dtype, m, args.variant, ceilings, args.repeats, failed))


if __name__ == "__main__":
    main()
