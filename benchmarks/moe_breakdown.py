"""Where a fused-MoE call's time goes: per-kernel device time of whole `fused_moe` calls, from the profiler.

    MOESERVE_PDL=0 python benchmarks/moe_breakdown.py [--cases qwen3:bf16:512,...] [--out F]

Each case runs the table's config on 8 (or 2, when the touched weights would fit L2 four times) routings, eager
calls after a warm-up, under torch.profiler; kernel durations are summed by kernel name and divided by the
number of calls. With PDL on, a kernel's duration includes the time it waits for its predecessor, so run with
MOESERVE_PDL=0 for clean per-kernel times (the whole call is then somewhat slower than under PDL). `floor µs`:
the call's roofline (`kernels_moe_tune.roofline_us`, ceilings measured in this run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from kernels_moe_tune import _fused_calls, roofline_us  # noqa: E402
from offline_gpu import profile_kernels  # noqa: E402

from kernels import SHAPES, make_weights, measure_ceilings, rotating_inputs  # noqa: E402

DEFAULT_CASES = "qwen3:bf16:512,qwen3:bf16:2048,qwen3:fp8:512,mixtral:bf16:512,mixtral:fp8:512"
REPS = 5


def breakdown(key: str, dtype: str, m: int, ceilings: dict) -> dict:
    """Per-kernel µs per call of one case, with the call's roofline."""
    shape, fp8 = SHAPES[key], dtype == "fp8"
    w = make_weights(shape, fp8)
    inputs = rotating_inputs(shape, m, fp8)

    rows = profile_kernels(lambda: _fused_calls(w, inputs, None), torch.device("cuda"), REPS)
    per_kernel = {name: us / len(inputs) for us, _, name in rows}  # one _fused_calls runs len(inputs) calls
    rate = ceilings["fp8_tflops"] if fp8 else ceilings["bf16_tflops"]
    return dict(shape=shape.name, dtype=dtype, m=m, kernels_us=dict(per_kernel),
                roofline_us=roofline_us(shape, fp8, inputs, ceilings["copy_tbs"], rate))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma list of shape:dtype:M")
    parser.add_argument("--out", default="benchmarks/out/moe_breakdown.json")
    args = parser.parse_args()
    ceilings = measure_ceilings()
    rows = []
    for case in args.cases.split(","):
        key, dtype, m = case.split(":")
        row = breakdown(key, dtype, int(m), ceilings)
        rows.append(row)
        total = sum(row["kernels_us"].values())
        print(f"\n{row['shape']} {dtype} M={m}: {total:.1f} µs of kernels per call, roofline "
              f"{row['roofline_us']:.1f} µs ({row['roofline_us'] / total:.3f})")
        for name, us in sorted(row["kernels_us"].items(), key=lambda kv: -kv[1]):
            print(f"    {us:8.1f} µs  {us / total:6.1%}  {name[:100]}")
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), pdl=os.environ.get("MOESERVE_PDL", "1"),
                       ceilings=ceilings, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
