"""Where should the fused MoE switch from the two-launch pairs path to the aligned path at decode sizes?

    python benchmarks/moe_pairs_probe.py [--out benchmarks/out/moe_pairs_probe.json]

`--tune` compares the pairs path with the aligned winner only while M*k <= 64 (M <= 8 at top-8), and the
table's nearest-M lookup sends a decode graph of 16 rows to the M=32 entry (aligned: align + gate/up + down
+ top-k sum = 4 launches). This times whole `fused_moe` calls under CUDA-graph replay, Qwen3-30B-A3B shape,
for graph sizes 16 and 32 with some rows real and the rest padding (ids -1, as a padded decode graph routes
them): the table's entry against each pairs tile set, over 4 routings (no weight reuse across them from L2
beyond what a real step would get).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels_moe_tune import _whole_us, pairs_candidates  # noqa: E402

from kernels import SHAPES, make_inputs, make_weights  # noqa: E402

CASES = [(16, 10), (16, 16), (32, 20), (32, 32)]  # (graph rows, real rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out/moe_pairs_probe.json")
    args = parser.parse_args()
    shape = SHAPES["qwen3"]
    w = make_weights(shape, fp8=False)
    rows = []
    for m, real in CASES:
        inputs = []
        for r in range(4):
            hidden, tw, ids = make_inputs(shape, m, 2000 + r)
            ids[real:] = -1
            inputs.append((hidden, tw, ids))
        table = shape.table_config(m, False)
        for label, cfg in {"table": table, **pairs_candidates()}.items():
            us = _whole_us(w, inputs, cfg, rep=20)
            rows.append(dict(m=m, real=real, config=label, pairs=cfg.pairs, us=us))
            print(rows[-1], flush=True)
    print("\n| graph rows | real rows | config | µs per call |\n|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['m']} | {r['real']} | {r['config']} | {r['us']:.1f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
