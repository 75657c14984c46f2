"""Does programmatic dependent launch (PDL) shorten a chain of small Triton kernels inside a CUDA graph?

A decode step at batch 1 is ~120 dependent kernels, each costing ~2 µs of launch-to-drain latency even in a
graph (benchmarks/RESULTS.md). With PDL (Hopper+) a kernel may be scheduled before its predecessor has
drained and waits in-kernel (`gdc_wait`) until the predecessor's writes are visible. This probe times chains
of row-wise kernels ([T, 2048] bf16, one program per row, like RMSNorm), alone and interleaved with cuBLAS
GEMMs, captured in CUDA graphs, with PDL off and on; results must be bit-identical.

    python benchmarks/pdl_probe.py [--out benchmarks/out/pdl_probe.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl


@triton.jit
def _row_kernel(X, Y, dim, BLOCK: tl.constexpr, USE_PDL: tl.constexpr, EARLY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the predecessor's writes are visible from here on
    x = tl.load(X + row * dim + offs, mask=offs < dim, other=0.0).to(tl.float32)
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()  # let the next kernel be scheduled now
    y = x * 0.999 + 0.001 * tl.sum(x, axis=0) / dim
    tl.store(Y + row * dim + offs, y.to(Y.dtype.element_ty), mask=offs < dim)


def chain(x: torch.Tensor, bufs, length: int, pdl: bool, early: bool, weight: torch.Tensor | None) -> torch.Tensor:
    cur = x
    for i in range(length):
        out = bufs[i % 2]
        _row_kernel[(cur.shape[0],)](cur, out, cur.shape[1], BLOCK=triton.next_power_of_2(cur.shape[1]),
                                     USE_PDL=pdl, EARLY=early, launch_pdl=pdl)
        cur = out
        if weight is not None and i % 4 == 3:  # a cuBLAS GEMM every 4 kernels, as in a decoder layer
            cur = torch.nn.functional.linear(cur, weight)
    return cur


def graph_us(fn, reps: int = 50) -> tuple[float, torch.Tensor]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2], out.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=96)
    ap.add_argument("--out", default="benchmarks/out/pdl_probe.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    print("| tokens | GEMMs | PDL off µs | PDL on µs | PDL + early trigger µs | per kernel saved µs | equal |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for t in (1, 64):
        x = torch.randn(t, 2048, device="cuda", dtype=torch.bfloat16)
        bufs = [torch.empty_like(x), torch.empty_like(x)]
        for with_gemm in (False, True):
            w = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16) / 45 if with_gemm else None
            res = {}
            for name, pdl, early in (("off", False, False), ("on", True, False), ("early", True, True)):
                res[name] = graph_us(lambda p=pdl, e=early, x=x, b=bufs, w=w: chain(x, b, args.length, p, e, w))
            equal = all(torch.equal(res[k][1], res["off"][1]) for k in res)
            best = min(res["on"][0], res["early"][0])
            saved = (res["off"][0] - best) / args.length
            rows.append(dict(tokens=t, gemm=with_gemm, off_us=res["off"][0], on_us=res["on"][0],
                             early_us=res["early"][0], saved_per_kernel_us=saved, equal=equal))
            print(f"| {t} | {'every 4' if with_gemm else 'none'} | {res['off'][0]:.1f} | {res['on'][0]:.1f} | "
                  f"{res['early'][0]:.1f} | {saved:.2f} | {equal} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), triton=triton.__version__,
                                              torch=torch.__version__, length=args.length, rows=rows), indent=1))


if __name__ == "__main__":
    main()
