"""The fused-MoE target misses beside torch's own grouped GEMMs (CUTLASS kernels on Hopper): same routing, same
card, one run.

    python benchmarks/moe_vendor_baseline.py [--cases mixtral:bf16:512,qwen3:fp8:512,...] [--repeats 3]
        [--out benchmarks/out/moe_vendor_baseline.json]

For each case (shape key:dtype:M, shape keys of `kernels.SHAPES`), timed alternately `--repeats` times under
CUDA-graph replay over the routings `kernels.rotating_inputs` gives:
- "fused_moe": our whole call (align, both GEMMs with SiLU·mul and the routed weight, top-k sum);
- "vendor GEMMs": only the two grouped GEMMs, `torch._grouped_mm` (bf16) or `torch._scaled_grouped_mm` (fp8 with
  one scale per row and one per weight column, a cheaper recipe than 128x128 blocks: no scaling inside the k
  loop), on rows already in expert order, each expert's group padded to 16 rows. No gather, no SiLU, no top-k
  sum: strictly less work than a fused call.
Both against the issue's roofline of the whole layer (`kernels.traffic`: touched experts' weights +
activations over the copy bandwidth, or FLOPs over the matmul rate, both measured in this run). Where the
vendor's two GEMMs alone stay under a target, that target is beyond the vendor's grouped GEMM at that shape.
Runs without Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels_moe_tune import _fused_calls, _time_ms, precompile, roofline_us, whole_jobs  # noqa: E402
from moe_entries_probe import parse_cases  # noqa: E402

from kernels import SHAPES, device_info, make_weights, measure_ceilings, rotating_inputs  # noqa: E402
from moeserve.kernels.fp8 import FP8_DTYPE  # noqa: E402

# The target misses after session 12 (benchmarks/RESULTS.md), and one met case of each dtype for scale.
CASES = ("mixtral:bf16:256,mixtral:bf16:384,mixtral:bf16:512,mixtral:bf16:2048,qwen3:bf16:512,qwen3:bf16:8192,"
         "deepseek:bf16:8192,qwen3:fp8:256,qwen3:fp8:512,mixtral:fp8:256,mixtral:fp8:384,mixtral:fp8:512")
GROUP_ALIGN = 16  # rows per expert group are padded to this for the grouped GEMMs


def expert_order(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token of each padded row [R] int64 (-1: padding), group ends offs [E] int32, rows R) for the valid
    choices of ids [M, k] sorted by expert, each expert's group padded to GROUP_ALIGN rows."""
    flat = ids.flatten().long()
    pairs = torch.nonzero(flat >= 0).flatten()
    experts = flat[pairs]
    order = torch.argsort(experts, stable=True)
    pairs, experts = pairs[order], experts[order]
    counts = torch.bincount(experts, minlength=num_experts)
    padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    ends = torch.cumsum(padded, 0)
    rank = torch.arange(pairs.numel(), device=ids.device) - (torch.cumsum(counts, 0) - counts)[experts]
    rows = int(ends[-1])
    token = torch.full((rows,), -1, dtype=torch.long, device=ids.device)
    token[(ends - padded)[experts] + rank] = pairs // ids.shape[1]
    return token, ends.to(torch.int32), rows


def vendor_sets(shape, inputs: list, fp8: bool) -> list[dict]:
    """Per routing: the gate/up rows in expert order, an act of the same rows, the group ends, and scales."""
    sets = []
    for hidden, _, ids in inputs:
        token, offs, rows = expert_order(ids, shape.num_experts)
        x = hidden[token.clamp_min(0)]
        act = torch.randn(rows, shape.inter, device=hidden.device, dtype=torch.bfloat16)
        s = dict(x=x, act=act, offs=offs)
        if fp8:
            s["x"], s["act"] = x.to(FP8_DTYPE), act.to(FP8_DTYPE)
            s["xs"] = torch.ones(rows, device=hidden.device)
        sets.append(s)
    return sets


def vendor_weights(shape, w: dict, fp8: bool) -> dict:
    """w13 and w2 as the grouped GEMMs take them: [E, K, N] views with K contiguous (column-major per expert);
    fp8: one scale per weight column, [E, N]."""
    v = dict(w13=w["w13"].transpose(1, 2), w2=w["w2"].transpose(1, 2))
    if fp8:
        dev = w["w13"].device
        v["s13"] = torch.ones(shape.num_experts, 2 * shape.inter, device=dev)
        v["s2"] = torch.ones(shape.num_experts, shape.hidden, device=dev)
    return v


def vendor_calls(v: dict, sets: list[dict], fp8: bool) -> None:
    """Both grouped GEMMs of every routing: [R, H] x w13 -> [R, 2I], then [R, I] x w2 -> [R, H]."""
    for s in sets:
        if fp8:
            torch._scaled_grouped_mm(s["x"], v["w13"], s["xs"], v["s13"], offs=s["offs"], out_dtype=torch.bfloat16)
            torch._scaled_grouped_mm(s["act"], v["w2"], s["xs"], v["s2"], offs=s["offs"], out_dtype=torch.bfloat16)
        else:
            torch._grouped_mm(s["x"], v["w13"], offs=s["offs"])
            torch._grouped_mm(s["act"], v["w2"], offs=s["offs"])


def check_vendor(v: dict, s: dict, fp8: bool) -> float:
    """Relative error of the first expert's gate/up group against a plain matmul (the call is what we think)."""
    end = int(s["offs"][0])
    if fp8:
        got = torch._scaled_grouped_mm(s["x"], v["w13"], s["xs"], v["s13"], offs=s["offs"], out_dtype=torch.bfloat16)
    else:
        got = torch._grouped_mm(s["x"], v["w13"], offs=s["offs"])
    want = s["x"][:end].float() @ v["w13"][0].float()
    return float((got[:end].float() - want).norm() / want.norm().clamp_min(1e-30))


def run_case(key: str, dtype: str, m: int, ceilings: dict, repeats: int) -> dict:
    shape, fp8 = SHAPES[key], dtype == "fp8"
    w = make_weights(shape, fp8)
    inputs = rotating_inputs(shape, m, fp8)
    rate = ceilings["fp8_tflops"] if fp8 else ceilings["bf16_tflops"]
    roof = roofline_us(shape, fp8, inputs, ceilings["copy_tbs"], rate)
    v, sets = vendor_weights(shape, w, fp8), vendor_sets(shape, inputs, fp8)
    row = dict(case=f"{key}:{dtype}:{m}", roofline_us=roof, vendor_rel_err=check_vendor(v, sets[0], fp8))
    runs = {"fused_moe": lambda: _fused_calls(w, inputs, None), "vendor GEMMs": lambda: vendor_calls(v, sets, fp8)}
    for fn in runs.values():
        fn()  # compile / pick kernels outside the graph
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, fn in runs.items():
            times[label].append(_time_ms(fn, 60) * 1e3 / len(inputs))
    for label, us in times.items():
        med = statistics.median(us)
        row[label] = dict(us=med, runs=us, frac=roof / med)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=CASES, help="comma list of shape:dtype:M (or a moe_entries_probe case set)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "moe_vendor_baseline.json"))
    args = ap.parse_args()
    cases = parse_cases(args.cases, "moe_vendor_baseline")
    info, ceilings = device_info(), measure_ceilings()
    print(info, ceilings, flush=True)
    # Our kernels compile in parallel processes first (the table entries each case takes).
    errors = precompile(whole_jobs((k, d == "fp8", SHAPES[k].table_config(m, d == "fp8")) for k, d, m in cases))
    if errors:
        raise SystemExit("compile failed: " + "; ".join(errors))
    rows, failed = [], []
    for key, dtype, m in cases:
        try:
            rows.append(run_case(key, dtype, m, ceilings, args.repeats))
        except Exception as exc:  # noqa: BLE001 - report, go on with the next case, exit non-zero at the end
            failed.append(f"{key}:{dtype}:{m}: {type(exc).__name__}: {str(exc)[:300]}")
            print(failed[-1], flush=True)
            continue
        finally:
            torch.cuda.empty_cache()  # the case's weights are gone with run_case's frame
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(info=info, ceilings=ceilings, rows=rows, failed=failed), f, indent=1)
    print("| case | roofline µs | fused_moe µs | frac | vendor GEMMs µs | frac | vendor rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f, g = r["fused_moe"], r["vendor GEMMs"]
        print(f"| {r['case']} | {r['roofline_us']:.1f} | {f['us']:.1f} | {f['frac']:.3f} | {g['us']:.1f} | "
              f"{g['frac']:.3f} | {r['vendor_rel_err']:.1e} |")
    if failed:
        raise SystemExit("failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
