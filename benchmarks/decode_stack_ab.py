"""The engine's decode stack against other versions of its kernel, side by side on one GPU.

    python benchmarks/decode_stack_ab.py [--layers 8] [--baseline FILE ...] [--rings 10:2:3,...]
                                         [--out benchmarks/out/decode_stack_ab.json]

Each version runs `DecodeStack` over the same random Qwen3-30B-A3B layers (`decode_layer_probe.Layers`: `--layers`
layers with their own weights, a paged KV cache of CONTEXT past tokens in pages of 16): the working tree's kernel,
each `--baseline` file (another version of `kernels/decode_stack_gluon.py`, say `git show REV:kernels/
decode_stack_gluon.py > benchmarks/out/stack_REV.py`; on the GPU box it must travel with the tree), and the tree's
at each `--rings` setting (stages:loads in flight:gate/up's loads in flight). Printed: each version's last layer's
experts and its final residual stream against the first version's (a check that they compute the same layer, up
to bf16 near-ties in the routing), a trace of each (`decode_layer_gluon.trace_report`: each step's time, each
barrier's skew and latency, the producer's wait for the router's choice), then µs a layer under CUDA-graph replay,
three rounds with the versions in turn, against the floor (weight bytes a layer over the copy rate measured here).
Timing only: the engine's GPU tests check the kernel's results against transformers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_layer_gluon  # noqa: E402
import decode_layer_probe as probe  # noqa: E402
from read_bw_probe import graph_us  # noqa: E402

import moeserve.kernels.decode_stack_gluon as tree  # noqa: E402
from moeserve.layers.rotary import rope_inv_freq  # noqa: E402

BLOCK = 16  # KV page size (tokens)


def load_version(path: str):
    """Another version of the kernel module, imported from path inside `moeserve.kernels` (its relative
    imports resolve there)."""
    name = "moeserve.kernels._version_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stack_runner(module, m: probe.Layers, ring: tuple[int, ...] | None = None):
    """The module's `DecodeStack` over m's layers, and a function of an optional trace tensor that runs it."""
    weights = [m.wqkv.view(-1, probe.HID), m.wo.view(-1, probe.ATT), m.wr.view(-1, probe.HID),
               m.w13.view(-1, probe.HID), m.w2.view(-1, probe.INTER)]
    norms = [t.reshape(-1) for t in (m.w_in, m.w_post, m.w_q, m.w_k)]
    stack = module.DecodeStack(weights, norms, rope_inv_freq(probe.HEAD_DIM, probe.ROPE_THETA, None)[0].cuda())
    blocks = -(-(probe.CONTEXT + 1) // BLOCK)
    g = torch.Generator(device="cuda").manual_seed(1)
    k_all, v_all = (torch.randn(m.layers * blocks * BLOCK, probe.KV_HEADS * probe.HEAD_DIM, generator=g,
                                device="cuda").to(torch.bfloat16) for _ in range(2))
    stack.bind_kv(k_all, v_all, BLOCK)
    for attr, value in zip(("STAGES", "CAP", "CAP_GU"), ring or ()):
        setattr(stack, attr, value)
    table = torch.arange(blocks, dtype=torch.int32, device="cuda")[None]
    pos = torch.full((1,), probe.CONTEXT, dtype=torch.int64, device="cuda")
    return stack, lambda trace=None: stack.launch(m.x0, pos, pos, table, trace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--baseline", action="append", default=[], help="another version of the kernel's file")
    parser.add_argument("--rings", type=lambda t: [tuple(int(v) for v in r.split(":")) for r in t.split(",")],
                        default=[], help="stages:cap:cap_gu settings of the tree's kernel, each a version")
    parser.add_argument("--out", default="benchmarks/out/decode_stack_ab.json")
    args = parser.parse_args()
    m = probe.Layers(args.layers, "cuda")
    copy = probe.copy_bandwidth_tbs()
    floor = m.weight_bytes_per_layer() / copy / 1e6
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; copy {copy:.3f} TB/s, floor {floor:.1f} µs "
          f"a layer, {args.layers} layers, context {probe.CONTEXT}", flush=True)
    modules = {os.path.basename(path): load_version(path) for path in args.baseline}
    modules["tree"] = tree
    versions = {name: (module, None) for name, module in modules.items()}
    versions.update({f"tree, ring {':'.join(map(str, ring))}": (tree, ring) for ring in args.rings})
    runners = {name: stack_runner(module, m, ring) for name, (module, ring) in versions.items()}
    first = None
    for name, (stack, run) in runners.items():
        out = run().clone()
        torch.cuda.synchronize()
        first = out if first is None else first
        offs = versions[name][0].OFFS["ids"]
        print(f"{name}: last layer's experts {stack.ws[offs:offs + probe.TOP_K].int().tolist()}; final stream "
              f"against the first version's: relative difference {((out - first).norm() / first.norm()).item():.1e}")
    rows = []
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    trace = torch.zeros(args.layers, programs, tree.MARKS, dtype=torch.int64, device="cuda")
    for name, (_, run) in runners.items():
        trace.zero_()
        run(trace)
        torch.cuda.synchronize()
        print(f"trace {name}: µs, mean over layers 1-{args.layers - 1}")
        for row in decode_layer_gluon.trace_report(trace):
            print(f"  {row['part']:<44} {row['mean_us']:7.2f}" + (f"  slowest program {row['slowest_us']:7.2f}"
                                                                 if "slowest_us" in row else ""))
            rows.append(dict(version=name, **row))
    times = {name: [] for name in runners}
    for _ in range(3):
        for name, (_, run) in runners.items():
            times[name].append(graph_us([run]) / args.layers)
    for name, us in times.items():
        print(f"{name:<32} µs a layer: " + " ".join(f"{t:6.2f}" for t in us) + f"  best {min(us):6.2f} "
              f"({min(us) / floor:.3f}x floor)")
        rows.append(dict(version=name, us_per_layer=min(us), rounds=us, floor_us=floor))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), copy_tbs=copy, layers=args.layers, rows=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
