"""The engine's decode stack against other versions of its kernel, side by side on one GPU.

    python benchmarks/decode_stack_ab.py [--layers 8] [--baseline FILE ...] [--rings 10:2:3,...]
                                         [--out benchmarks/out/decode_stack_ab.json]

Each version runs `DecodeStack` over the same random Qwen3-30B-A3B layers (`decode_layer_probe.Layers`: `--layers`
layers with their own weights, a paged KV cache of CONTEXT past tokens in pages of 16): the working tree's kernel,
each `--baseline` file (another version of `kernels/decode_stack_gluon.py`, say `git show REV:kernels/
decode_stack_gluon.py > benchmarks/out/stack_REV.py`; on the GPU box it must travel with the tree), and the tree's
at each `--rings` setting (stages:loads in flight:gate/up's loads in flight). Printed: each version's final
residual stream against the first version's (a check that they compute the same layers, up to bf16 rounding and
near-ties in the routing), a trace of each (`decode_layer_gluon.trace_report`: each step's time, each
barrier's skew and latency, the producer's wait for the router's choice), then µs a layer under CUDA-graph replay,
three rounds with the versions in turn, against the floor (weight bytes a layer over the copy rate measured here).
Timing only: the engine's GPU tests check the kernel's results against transformers.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_layer_gluon  # noqa: E402
import decode_layer_probe as probe  # noqa: E402
from read_bw_probe import graph_us  # noqa: E402


def load_version(path: str):
    """Another version of the kernel module, imported from path inside `moeserve.kernels` (its relative
    imports resolve there)."""
    name = "moeserve.kernels._version_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--baseline", action="append", default=[], help="another version of the kernel's file")
    parser.add_argument("--rings", type=lambda t: [tuple(int(v) for v in r.split(":")) for r in t.split(",")],
                        default=[], help="stages:cap:cap_gu settings of the tree's kernel, each a version")
    parser.add_argument("--out", default="benchmarks/out/decode_stack_ab.json")
    args = parser.parse_args()
    from moeserve.kernels import decode_stack_gluon as tree

    m = probe.Layers(args.layers, "cuda")
    copy = probe.copy_bandwidth_tbs()
    floor = m.weight_bytes_per_layer() / copy / 1e6
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; copy {copy:.3f} TB/s, floor {floor:.1f} µs "
          f"a layer, {args.layers} layers, context {probe.CONTEXT}", flush=True)
    runners = {os.path.basename(path): m.engine_stack(module=load_version(path)) for path in args.baseline}
    runners["tree"] = m.engine_stack()
    for stages, cap, cap_gu in args.rings:
        runners[f"tree, ring {stages}:{cap}:{cap_gu}"] = m.engine_stack(stages, cap, cap_gu=cap_gu)
    first = None
    for name, run in runners.items():
        out = run().clone()
        first = out if first is None else first
        print(f"{name}: final stream against the first version's: relative difference "
              f"{((out - first).norm() / first.norm()).item():.1e}")
    rows = []
    trace = torch.zeros(args.layers, torch.cuda.get_device_properties(0).multi_processor_count, tree.MARKS,
                        dtype=torch.int64, device="cuda")
    for name, run in runners.items():
        trace.zero_()
        run(trace)
        torch.cuda.synchronize()
        print(f"trace {name}: µs, mean over layers 1-{args.layers - 1}")
        rows += [dict(version=name, **row) for row in decode_layer_gluon.print_trace(trace)]
    times = {name: [] for name in runners}
    for _ in range(3):
        for name, run in runners.items():
            times[name].append(graph_us([run]) / args.layers)
    for name, us in times.items():
        print(f"{name:<32} µs a layer: " + " ".join(f"{t:6.2f}" for t in us) + f"  best {min(us):6.2f} "
              f"({min(us) / floor:.3f}x floor)")
        rows.append(dict(version=name, us_per_layer=min(us), rounds=us, floor_us=floor))
    probe.write_rows(args.out, copy, args.layers, rows)


if __name__ == "__main__":
    main()
