"""The align step of fused MoE at 4-16 K pairs: which method and chunk size, alone and in the whole call.

    python benchmarks/align_probe.py [--out benchmarks/out/align_probe.json]

`moe_align` alone (CUDA-graph replay over 8 routings, Qwen3-30B-A3B routing: 128 experts, top-8) for the
ranked method and the zero-fill + count + scatter method at several pair chunks (`moe_align._SCATTER_CHUNK`:
the scatter path runs one program per chunk), then whole Qwen3 bf16 `fused_moe` calls at M = 512 with each variant
(graph replay, table config), alternately 3×.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from kernels_moe_tune import _time_ms, _whole_us  # noqa: E402

from kernels import SHAPES, make_inputs, make_weights  # noqa: E402
from moeserve.kernels import moe_align as align_mod  # noqa: E402

VARIANTS = {"ranked": ("ranked", 256), "scatter/1024": ("scatter", 1024), "scatter/256": ("scatter", 256),
            "scatter/128": ("scatter", 128)}


def use(variant: str) -> None:
    """Make `moe_align`'s default choice the variant (method for this many pairs, and chunk)."""
    method, chunk = VARIANTS[variant]
    align_mod._SCATTER_CHUNK = chunk
    align_mod.RANKED_MAX_PAIRS = 1 << 30 if method == "ranked" else 2048


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/out/align_probe.json")
    args = parser.parse_args()
    shape = SHAPES["qwen3"]
    rows = []
    for m in (512, 2048):
        cfg = shape.table_config(m, False)
        ids = [make_inputs(shape, m, 1000 + r)[2] for r in range(8)]
        for variant in VARIANTS:
            use(variant)
            calls = [(i, shape.num_experts, cfg.block_m) for i in ids]
            us = _time_ms(lambda calls=calls: [align_mod.moe_align(*c) for c in calls]) * 1e3 / len(calls)
            rows.append(dict(m=m, pairs=m * shape.top_k, block_m=cfg.block_m, variant=variant, align_us=us))
            print(f"align M={m} ({m * shape.top_k} pairs, block_m {cfg.block_m}) {variant:13s} {us:6.1f} µs",
                  flush=True)
    w = make_weights(shape, False)
    inputs = [make_inputs(shape, 512, 1000 + r) for r in range(8)]
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(3):
        for variant in VARIANTS:
            use(variant)
            runs[variant].append(_whole_us(w, inputs, None))
    for variant, us in runs.items():
        rows.append(dict(m=512, variant=variant, whole_us=us))
        print(f"fused_moe Qwen3 bf16 M=512 with {variant:13s}: {statistics.median(us):6.1f} µs {us}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
