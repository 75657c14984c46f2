"""What read bandwidth a kernel can reach on this card, against the copy bandwidth the rooflines use.

    python benchmarks/read_bw_probe.py [--out benchmarks/out/read_bw.json]

The memory-bound targets of issue 6 (Mixtral bf16 M=512, the engine's batch-1 step) are fractions of the
device-to-device copy's rate (bytes read + written over time). This probe measures, in one run:

- `flat`: a plain streaming read of 2 GiB (each program sums its chunks), over grid shapes;
- `tiles`: the fused-MoE GEMMs' weight walk without the MoE: one program per [BN, K] weight tile of
  [E, N, K] bf16 weights, k steps of BK by pointer loads or TMA, each step an MMA with ROWS activation rows
  (ROWS = 16: a GEMV; 128: Mixtral M=512's rows an expert), at Mixtral's gate/up and down shapes;
- `short`: the batch-1 decode step's weight streams (16.8-50 MB), as one flat read and as a 16-row tile walk,
  each launch over its own copy of the weights (no L2 reuse) in a CUDA graph, µs a call.

Every figure is bytes read over time (TB/s) and that over the copy rate measured at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels_attention import bench_ms, copy_bandwidth_tbs, graph_ms  # noqa: E402

from moeserve.kernels.fused_moe_tma import HAVE_TMA, _set_allocator  # noqa: E402

DEVICE = "cuda"
BF16 = torch.bfloat16


@triton.jit
def _read_flat(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[pid] = sum of the BLOCK-element chunks pid, pid + programs, ... of x."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


@triton.jit
def _read_tiles(w_ptr, x_ptr, out_ptr, N, K, n_tiles, BN: tl.constexpr, BK: tl.constexpr, ROWS: tl.constexpr,
                TMA: tl.constexpr, num_experts):
    """out[e, n] = sum over rows r of (w[e, n, :] . x[r, :]) for the BN-row tile of program (e, n tile)."""
    pid = tl.program_id(0)
    e = pid // n_tiles
    n0 = (pid % n_tiles) * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    offs_r = tl.arange(0, ROWS)
    x_ptrs = x_ptr + offs_r[None, :] * K + offs_k[:, None]
    acc = tl.zeros([BN, ROWS], tl.float32)
    if TMA:
        desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts * N, K], strides=[K, 1], block_shape=[BN, BK])
        for k in range(0, K, BK):
            w = desc.load([e * N + n0, k])
            acc = tl.dot(w, tl.load(x_ptrs), acc)
            x_ptrs += BK
    else:
        w_ptrs = w_ptr + e * N * K + offs_n[:, None] * K + offs_k[None, :]
        for _ in range(0, K, BK):
            acc = tl.dot(tl.load(w_ptrs), tl.load(x_ptrs), acc)
            w_ptrs += BK
            x_ptrs += BK
    tl.store(out_ptr + e * N + offs_n, tl.sum(acc, axis=1))


def bench_us(fn) -> float:
    return 1e3 * bench_ms(fn, rep_ms=200)


def flat_read(x: torch.Tensor, programs: int, block: int, warps: int):
    out = torch.empty(programs, device=DEVICE, dtype=torch.float32)
    return lambda: _read_flat[(programs,)](x, out, x.numel(), BLOCK=block, num_warps=warps)


def tile_read(w: torch.Tensor, x: torch.Tensor, bn: int, bk: int, stages: int, warps: int, tma: bool):
    e, n, k = w.shape
    out = torch.empty(e, n, device=DEVICE, dtype=torch.float32)
    n_tiles = n // bn
    rows = x.shape[0]
    return lambda: _read_tiles[(e * n_tiles,)](w, x, out, n, k, n_tiles, BN=bn, BK=bk, ROWS=rows, TMA=tma,
                                               num_experts=e, num_warps=warps, num_stages=stages)


def graph_us(fns: list) -> float:
    """µs per call of a CUDA graph that runs each of fns once, in turn (each over its own buffers)."""
    return 1e3 * graph_ms(lambda: [fn() for fn in fns]) / len(fns)


def run_flat(copy: float, rows: list[dict]) -> None:
    x = torch.randn(2**30, device=DEVICE, dtype=BF16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for per_sm in (1, 2, 4, 8, 16):
        for block, warps in ((4096, 4), (8192, 8), (16384, 8)):
            us = bench_us(flat_read(x, sms * per_sm, block, warps))
            nbytes = x.numel() * 2
            rows.append(dict(section="flat", case=f"{sms * per_sm} programs, block {block}, {warps} warps",
                             bytes=nbytes, us=us, tbs=nbytes / us / 1e6, of_copy=nbytes / us / 1e6 / copy))
    del x


# (BN, BK, stages, warps): 256 x 64 is the Mixtral bf16 M=512 gate/up entry's weight walk (gate's and up's 128
# rows a k step), 128 x 64 its down's.
TILES = ((128, 64, 4, 8), (256, 64, 4, 8), (256, 64, 3, 8), (128, 128, 3, 8), (64, 128, 4, 4), (128, 256, 2, 8),
         (64, 256, 3, 4))


def run_tiles(copy: float, rows: list[dict]) -> None:
    shapes = {"Mixtral gate/up [8, 28672, 4096]": (8, 28672, 4096), "Mixtral down [8, 4096, 14336]": (8, 4096, 14336)}
    for name, (e, n, k) in shapes.items():
        w = torch.randn(e, n, k, device=DEVICE, dtype=BF16)
        for nrows in (16, 128):
            x = torch.randn(nrows, k, device=DEVICE, dtype=BF16)
            for bn, bk, stages, warps in TILES:
                for tma in (False, True) if HAVE_TMA else (False,):
                    case = f"{name}, {nrows} rows, {bn}x{bk}, {stages} stages, {warps} warps, {'TMA' if tma else 'ptr'}"
                    try:
                        us = bench_us(tile_read(w, x, bn, bk, stages, warps, tma))
                    except Exception as exc:  # out of shared memory or registers: report, go on
                        print(f"{case}: {type(exc).__name__}", flush=True)
                        continue
                    rows.append(dict(section="tiles", case=case, bytes=w.numel() * 2, us=us,
                                     tbs=w.numel() * 2 / us / 1e6, of_copy=w.numel() * 2 / us / 1e6 / copy))
        del w


def run_short(copy: float, rows: list[dict]) -> None:
    """The batch-1 step's weight streams: [E, N, K] as the step reads them, 8 copies each."""
    streams = {"o_proj [1, 2048, 4096]": (1, 2048, 4096), "qkv [1, 5120, 2048]": (1, 5120, 2048),
               "down, 8 experts [8, 2048, 768]": (8, 2048, 768), "gate/up, 8 experts [8, 1536, 2048]": (8, 1536, 2048)}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, (e, n, k) in streams.items():
        ws = [torch.randn(e, n, k, device=DEVICE, dtype=BF16) for _ in range(8)]
        x = torch.randn(16, k, device=DEVICE, dtype=BF16)
        nbytes = ws[0].numel() * 2
        variants = {
            f"flat, {sms * 4} programs, block 8192": [flat_read(w.view(-1), sms * 4, 8192, 8) for w in ws],
            f"flat, {sms * 8} programs, block 4096": [flat_read(w.view(-1), sms * 8, 4096, 4) for w in ws],
            "16-row tiles 64x128, 4 stages": [tile_read(w, x, 64, 128, 4, 4, False) for w in ws],
            "16-row tiles 64x256, 3 stages": [tile_read(w, x, 64, 256, 3, 4, False) for w in ws],
        }
        for label, fns in variants.items():
            us = graph_us(fns)
            rows.append(dict(section="short", case=f"{name}: {label}", bytes=nbytes, us=us,
                             floor_us=nbytes / copy / 1e6, tbs=nbytes / us / 1e6, of_copy=nbytes / us / 1e6 / copy))
        del ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out/read_bw.json")
    parser.add_argument("--sections", default="flat,tiles,short")
    args = parser.parse_args()
    if HAVE_TMA:
        _set_allocator()
    copy = copy_bandwidth_tbs()
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, Triton {triton.__version__}; "
          f"copy {copy:.3f} TB/s (read + written)", flush=True)
    rows: list[dict] = []
    for section in args.sections.split(","):
        {"flat": run_flat, "tiles": run_tiles, "short": run_short}[section](copy, rows)
    print(f"{'section':<7} {'case':<92} {'us':>9} {'TB/s':>6} {'of copy':>7}")
    for r in rows:
        print(f"{r['section']:<7} {r['case']:<92} {r['us']:9.1f} {r['tbs']:6.3f} {r['of_copy']:7.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), copy_tbs=copy, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
