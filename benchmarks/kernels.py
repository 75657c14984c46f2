"""Kernel benchmark driver: fused MoE (bf16, FP8 block-scaled) against its roofline and the torch reference.

    python benchmarks/kernels.py [--tune] [--shapes qwen3,deepseek,mixtral] [--m 1,8,32] [--dtypes bf16,fp8]
                                 [--no-ref] [--no-attention] [--out benchmarks/out/kernels.json]

Measures the two ceilings first (device-to-device copy, bytes read + written; 8192^3 bf16 and fp8 matmuls on
random data), then for each shape and M: the fused_moe time (triton do_bench median, and the same under CUDA
graph replay), achieved TB/s and TFLOP/s, the fraction of roofline, and the pure-torch reference's time.
The matmul is timed again right after each case (`tflop_s_beside`, `frac_graph_beside`): the start-of-run rate
comes from an idle GPU at full clocks, which a sustained compute-bound kernel does not keep under the power cap.

Roofline = max(bytes / copy bandwidth, FLOPs / matmul rate), where bytes = weights (and fp8 scales) of the
experts that received at least one valid choice + hidden in + output out + routing, and FLOPs = 6 * H * I per
valid (token, expert) pair. Routing: random top-k without replacement, uniform over all experts of the model;
for DeepSeek-V3 one EP-8 rank holds experts 0..31 of 256 (the qwen3-ep* shapes likewise), so choices of other
ranks' experts become -1, and fused_moe is told the global count (`get_config`'s global_experts). Each
timing cycles through several routings (and hidden states) so the touched experts are not served from L2.

--tune searches block sizes per (shape, M) first (benchmarks/kernels_moe_tune.py), writes the tables under
kernels/configs/ and a bundle next to --out, and then benchmarks with them. Runs without Ray.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moeserve.kernels import fused_moe, moe_reference  # noqa: E402
from moeserve.kernels.fp8 import FP8_DTYPE, quant_weight_block_fp8  # noqa: E402
from moeserve.kernels.moe_configs import MoEConfig, get_config, load_table  # noqa: E402

M_VALUES = (1, 8, 32, 128, 512, 2048, 8192)
DEVICE = "cuda"
L2_BYTES = 50 * 2**20


@dataclass(slots=True, frozen=True)
class MoEShape:
    name: str
    num_experts: int  # experts on this rank
    global_experts: int  # experts the router picks from
    top_k: int
    hidden: int
    inter: int
    # An EP rank's rows: "all_gather" = every token (choices held elsewhere -1); "all_to_all" = only the tokens
    # with a choice here, as the all-to-all dispatcher delivers them (M then counts the tokens before dispatch).
    rows: Literal["all_gather", "all_to_all"] = "all_gather"

    def __post_init__(self) -> None:
        if self.rows not in ("all_gather", "all_to_all"):
            raise ValueError(f"MoEShape.rows must be 'all_gather' or 'all_to_all', got {self.rows!r}")

    def table_config(self, m: int, fp8: bool) -> MoEConfig:
        """The config `fused_moe` picks for this shape at m tokens (an EP rank's: the global count's table when
        it has none of its own, see `get_config`; all-to-all rows: keyed on their choices, which stand for the
        m tokens before dispatch in expectation)."""
        return get_config(m, self.num_experts, self.hidden, self.inter, self.top_k, fp8,
                          global_experts=self.global_experts)


SHAPES = {
    "qwen3": MoEShape("qwen3-30b-a3b", 128, 128, 8, 2048, 768),
    "deepseek": MoEShape("deepseek-v3-ep8-rank", 32, 256, 8, 7168, 2048),
    "mixtral": MoEShape("mixtral-8x7b", 8, 8, 2, 4096, 14336),
    # One rank of Qwen3-30B-A3B under expert parallelism 2/4/8, with the all-gather dispatcher's rows (all M
    # tokens, other ranks' choices -1). Without an E64/E32/E16 table they take the E128 table's entries.
    "qwen3-ep2": MoEShape("qwen3-30b-a3b-ep2-rank", 64, 128, 8, 2048, 768),
    "qwen3-ep4": MoEShape("qwen3-30b-a3b-ep4-rank", 32, 128, 8, 2048, 768),
    "qwen3-ep8": MoEShape("qwen3-30b-a3b-ep8-rank", 16, 128, 8, 2048, 768),
    # The same ranks fed by the all-to-all dispatcher (by_mode's prefill).
    "qwen3-ep4-a2a": MoEShape("qwen3-30b-a3b-ep4-rank-a2a", 32, 128, 8, 2048, 768, rows="all_to_all"),
    "qwen3-ep8-a2a": MoEShape("qwen3-30b-a3b-ep8-rank-a2a", 16, 128, 8, 2048, 768, rows="all_to_all"),
}


def bench_ms(fn, rep: int = 100) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


class MatmulRate:
    """The 8192^3 matmul's rate (TFLOP/s) on random data, bf16 or fp8 (`torch._scaled_mm`), measured whenever
    asked: once at the start of a run, and again beside each case (see `bench_case`)."""

    N = 8192

    def __init__(self) -> None:
        n = self.N
        self.a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        self.b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        self.fp8_mm = None
        try:
            a8, b8 = self.a.to(FP8_DTYPE), self.b.to(FP8_DTYPE).t()  # b column-major, as _scaled_mm wants
            one = torch.ones((), device=DEVICE)
            self.fp8_mm = lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)
            self.fp8_mm()
        except Exception as exc:  # older torch or no fp8 GEMM: fall back to twice the bf16 rate
            print(f"fp8 matmul ceiling unavailable ({exc}); using 2x bf16", flush=True)
            self.fp8_mm = None

    def tflops(self, fp8: bool) -> float:
        if fp8 and self.fp8_mm is not None:
            return 2 * self.N**3 / bench_ms(self.fp8_mm) / 1e9
        rate = 2 * self.N**3 / bench_ms(lambda: self.a @ self.b) / 1e9
        return 2 * rate if fp8 else rate


def measure_ceilings(rates: MatmulRate | None = None) -> dict:
    """Copy bandwidth (TB/s, read + written) and matmul rates (TFLOP/s) measured on this device."""
    bufs = [torch.randn(2**29, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)]
    copy_tbs = 2 * bufs[0].numel() * 2 / bench_ms(lambda: bufs[1].copy_(bufs[0])) / 1e9
    bufs.clear()
    rates = rates or MatmulRate()
    return dict(copy_tbs=copy_tbs, bf16_tflops=rates.tflops(False), fp8_tflops=rates.tflops(True))


def make_weights(shape: MoEShape, fp8: bool, seed: int = 0) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    e, h, i = shape.num_experts, shape.hidden, shape.inter
    w13 = torch.randn(e, 2 * i, h, device=DEVICE, dtype=torch.bfloat16, generator=g) * h**-0.5
    w2 = torch.randn(e, h, i, device=DEVICE, dtype=torch.bfloat16, generator=g) * i**-0.5
    if not fp8:
        return dict(w13=w13, w2=w2)
    q13, s13 = quant_weight_block_fp8(w13)
    del w13
    q2, s2 = quant_weight_block_fp8(w2)
    return dict(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2)


def make_inputs(shape: MoEShape, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [m, H] bf16, topk_weights [m, k] f32, topk_ids [m, k] int32 (uniform top-k, -1: other rank);
    all-to-all rows (`MoEShape.rows`): only the rows of the m tokens with a choice here."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(m, shape.hidden, device=DEVICE, dtype=torch.bfloat16, generator=g)
    scores = torch.rand(m, shape.global_experts, device=DEVICE, generator=g)
    ids = scores.topk(shape.top_k, dim=1).indices  # a uniform random k-subset per token
    weights = torch.softmax(torch.randn(m, shape.top_k, device=DEVICE, generator=g), dim=1)
    ids = torch.where(ids < shape.num_experts, ids, -1).to(torch.int32)  # this rank holds experts 0..E-1
    if shape.rows == "all_to_all":  # only the tokens with a choice here arrive
        keep = (ids >= 0).any(dim=1)
        hidden, weights, ids = hidden[keep], weights[keep], ids[keep]
    return hidden, weights.float().contiguous(), ids.contiguous()


def expert_bytes(shape: MoEShape, fp8: bool) -> int:
    h, i = shape.hidden, shape.inter
    weights = 3 * h * i * (1 if fp8 else 2)
    scales = 4 * (triton.cdiv(2 * i, 128) * triton.cdiv(h, 128) + triton.cdiv(h, 128) * triton.cdiv(i, 128))
    return weights + (scales if fp8 else 0)


def traffic(shape: MoEShape, fp8: bool, ids: torch.Tensor) -> tuple[int, int]:
    """(bytes, flops) of one call: touched experts' weights + activations; 6*H*I flops per valid pair."""
    valid = ids[ids >= 0]
    touched = int(torch.unique(valid).numel())
    m = ids.shape[0]
    act = 2 * m * shape.hidden * 2 + ids.numel() * 8
    return touched * expert_bytes(shape, fp8) + act, int(valid.numel()) * 6 * shape.hidden * shape.inter


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def rotating_inputs(shape: MoEShape, m: int, fp8: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The routings a timed case cycles through (`make_inputs`, seeds 1000…): 8, or 2 where the experts one
    call touches exceed 4x L2 anyway, so that the weights are not served from L2."""
    first = make_inputs(shape, m, 1000)
    first_bytes, _ = traffic(shape, fp8, first[2])
    count = 8 if first_bytes < 4 * L2_BYTES else 2
    return [first] + [make_inputs(shape, m, 1000 + r) for r in range(1, count)]


def bench_case(shape: MoEShape, weights: dict, m: int, fp8: bool, ceilings: dict, with_ref: bool,
               rates: MatmulRate | None = None) -> dict:
    """One (shape, dtype, M) case against the run's ceilings. With rates, the matmul is also timed right after
    the case's graph replays (`tflop_s_beside`, `frac_graph_beside`): under sustained tensor-core load the
    H100 holds its power cap (700 W) by lowering its clocks, so the matmul measured on an idle GPU at the start
    of a run (`ceilings`) is faster than one in the state a compute-bound case runs in (benchmarks/RESULTS.md,
    session 22). Both fractions are reported; the copy bandwidth is taken from the start of the run."""
    sets = rotating_inputs(shape, m, fp8)
    rotations = len(sets)
    totals = [traffic(shape, fp8, s[2]) for s in sets]
    nbytes = sum(t[0] for t in totals) / rotations
    flops = sum(t[1] for t in totals) / rotations

    # All-to-all rows: the lookup keys on their choices, as `TritonExperts` does with the dispatcher's count.
    counts = [int((s[2] >= 0).sum()) if shape.rows == "all_to_all" else None for s in sets]

    def run_all():
        for (hidden, tw, ids), count in zip(sets, counts):
            fused_moe(hidden, weights["w13"], weights["w2"], tw, ids, w13_scale=weights.get("w13_scale"),
                      w2_scale=weights.get("w2_scale"), global_experts=shape.global_experts, num_pairs=count)

    hidden, tw, ids = sets[0]
    out = fused_moe(hidden, weights["w13"], weights["w2"], tw, ids, w13_scale=weights.get("w13_scale"),
                    w2_scale=weights.get("w2_scale"), global_experts=shape.global_experts, num_pairs=counts[0])
    ref_fn = lambda: moe_reference(hidden, weights["w13"], weights["w2"], tw, ids,  # noqa: E731
                                   w13_scale=weights.get("w13_scale"), w2_scale=weights.get("w2_scale"))
    ref = ref_fn()
    us = bench_ms(run_all) * 1e3 / rotations
    torch.cuda.synchronize()  # do_bench_cudagraph runs on a side stream
    graph_ms = float(triton.testing.do_bench_cudagraph(run_all, rep=100, return_mode="median"))
    us_graph = graph_ms * 1e3 / rotations
    rate = ceilings["fp8_tflops"] if fp8 else ceilings["bf16_tflops"]
    mem_us, cmp_us = nbytes / ceilings["copy_tbs"] / 1e6, flops / rate / 1e6
    roof_us = max(mem_us, cmp_us)
    row = dict(kernel="fused_moe", dtype="fp8" if fp8 else "bf16", shape=shape.name, M=m, rotations=rotations,
               us=us, us_graph=us_graph, tb_s=nbytes / us / 1e6, tflop_s=flops / us / 1e6,
               roofline_us=roof_us, bound="memory" if mem_us >= cmp_us else "compute",
               frac=roof_us / us, frac_graph=roof_us / us_graph, rel_err=rel_err(out, ref),
               bytes=nbytes, flops=flops)
    if rates is not None:
        beside = rates.tflops(fp8)
        row["tflop_s_beside"] = beside
        row["frac_graph_beside"] = max(mem_us, flops / beside / 1e6) / us_graph
    if with_ref:
        row["ref_us"] = bench_ms(ref_fn, rep=50) * 1e3
        row["speedup_vs_ref"] = row["ref_us"] / us
    return row


def device_info() -> dict:
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(sys.argv))
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def format_table(rows: list[dict]) -> str:
    cols = ["dtype", "shape", "M", "us", "us_graph", "tb_s", "tflop_s", "roofline_us", "bound", "frac",
            "frac_graph", "tflop_s_beside", "frac_graph_beside", "ref_us", "speedup_vs_ref", "rel_err"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_attention(args: argparse.Namespace) -> list[dict]:
    try:
        import kernels_attention
    except ImportError as exc:
        print(f"attention benchmark not importable ({exc}); skipped", flush=True)
        return []
    return kernels_attention.run(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen3,deepseek,mixtral", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma list of token counts")
    parser.add_argument("--dtypes", default="bf16,fp8", help="comma list of bf16, fp8")
    parser.add_argument("--tune", action="store_true", help="search block sizes first and save the tables")
    parser.add_argument("--no-ref", action="store_true", help="skip timing the torch reference")
    parser.add_argument("--no-attention", action="store_true", help="skip benchmarks/kernels_attention.py")
    parser.add_argument("--quick", action="store_true", help="passed on to the attention benchmark")
    parser.add_argument("--sweep", action="store_true", help="passed on to the attention benchmark")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "kernels.json"))
    args = parser.parse_args()
    shapes = [SHAPES[s] for s in args.shapes.split(",")]
    if args.tune and any(s.rows == "all_to_all" for s in shapes):
        # A table is keyed by the experts a call holds: an all-to-all shape would overwrite its all-gather twin's.
        raise SystemExit("kernels.py --tune: all-to-all row shapes (*-a2a) share their all-gather twin's table; "
                         "tune the twin instead")
    ms = [int(m) for m in args.m.split(",")]
    dtypes = args.dtypes.split(",")
    info = device_info()
    print(info, flush=True)
    rates = MatmulRate()
    ceilings = measure_ceilings(rates)
    print(ceilings, flush=True)
    if args.tune:
        from kernels_moe_tune import tune_all

        tuned = tune_all(shapes, ms, dtypes, make_weights, make_inputs)
        bundle = os.path.join(os.path.dirname(os.path.abspath(args.out)), "tuned_configs.json")
        os.makedirs(os.path.dirname(bundle), exist_ok=True)
        with open(bundle, "w") as f:
            json.dump(tuned, f, indent=1)
        load_table.cache_clear()
        get_config.cache_clear()
    rows: list[dict] = []
    for shape in shapes:
        for dtype in dtypes:
            weights = make_weights(shape, dtype == "fp8")
            for m in ms:
                row = bench_case(shape, weights, m, dtype == "fp8", ceilings, not args.no_ref, rates)
                rows.append(row)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            del weights
            torch.cuda.empty_cache()
    attention = [] if args.no_attention else run_attention(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(info=info, ceilings=ceilings, moe=rows, attention=attention), f, indent=1)
    print(f"ceilings: {ceilings}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
