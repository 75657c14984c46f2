"""Two-batch overlap at a communication-heavy setting: step time with and without TBO on EP ranks, and the
measured compute and communication time per layer, so the expected gain on GPUs can be read off.

Each rank runs a stack of MoE layers (a dense matmul standing in for attention, then dispatch -> experts ->
combine through the dispatcher named by --dispatcher: `all_to_all` or `all_gather`, the latter with no host
sync). Runs on CPU ranks (gloo) or GPUs (nccl), without Ray:

    python benchmarks/ep_overlap.py --ranks 2 --tokens 256 --hidden 2048
    python benchmarks/ep_overlap.py --ranks 8 --backend nccl      # on an 8-GPU host

With perfect overlap a step takes max(compute, comm) per layer instead of compute + comm; on CPU ranks compute
and gloo's transfers share the same cores, so the measured gain there is a lower bound. With NCCL,
`--normal-priority-too` also times the steps with the EP collectives on a normal-priority stream (the EP group
of `init_distributed` puts them on a high-priority one), side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeserve.cluster.dist import destroy_distributed, init_distributed
from moeserve.forward_batch import ForwardMode
from moeserve.moe.experts import create_expert_kernel
from moeserve.moe.factory import create_dispatcher
from moeserve.moe.tbo import run_overlapped


def layer_stages(x, layer, dispatcher, args, experts, clock=None):
    """One layer as stages: dense compute, route, dispatch | yield | experts, combine | yield.
    experts: the engine's expert kernel for the device (`create_expert_kernel`).
    clock: when given (TBO off only), adds the seconds spent computing and communicating to it."""
    tick = clock.tick if clock else (lambda kind: None)
    tick(None)
    (w_in, w_out), w13, w2 = layer
    x = x + torch.tanh(x @ w_in) @ w_out  # stands in for attention: per-rank dense compute
    g = torch.Generator(device=x.device).manual_seed(x.shape[0])
    scores = torch.rand(x.shape[0], args.experts, generator=g, device=x.device)
    ids = scores.topk(args.topk, dim=-1).indices.to(torch.int32)  # distinct experts per token
    weights = torch.full(ids.shape, 1.0 / args.topk, device=x.device)
    tick("compute")
    pending = dispatcher.dispatch_begin(x, ids, weights, ForwardMode.EXTEND)
    yield
    out = dispatcher.dispatch_end(pending)
    tick("comm")
    y = experts(out.hidden, w13, w2, out.topk_weights, out.topk_ids)
    tick("compute")
    pending = dispatcher.combine_begin(y, out.handle)
    yield
    y = dispatcher.combine_end(pending)
    tick("comm")
    return x + y


class Clock:
    """Splits wall time between compute and communication (valid when nothing overlaps: TBO off)."""

    def __init__(self, sync) -> None:
        self.sync, self.totals, self.last = sync, {"compute": 0.0, "comm": 0.0}, 0.0

    def tick(self, kind) -> None:
        self.sync()
        now = time.perf_counter()
        if kind is not None:
            self.totals[kind] += now - self.last
        self.last = now


def model_stages(x, layers, dispatcher, args, experts, clock=None):
    for layer in layers:
        x = yield from layer_stages(x, layer, dispatcher, args, experts, clock)
    return x


def export_traces(folder: str | None, steps: dict, sync) -> None:
    """One run of each step function (label -> fn); where folder is given, profiled, its Chrome trace written to
    folder/<label>.json: which kernels ran on which stream when, so the overlap of NCCL and compute kernels can
    be read off."""
    from torch.profiler import ProfilerActivity, profile

    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
    for label, fn in steps.items():
        sync()
        recorder = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if folder else (
            contextlib.nullcontext())
        with recorder as prof:
            fn()
            sync()
        if folder:
            prof.export_chrome_trace(str(Path(folder) / f"{label}.json"))


def timed_once(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@dataclass
class Steps:
    """One step through the layer stack with TBO off (one micro-batch, dispatcher d0) and on (two, d0 and d1, its
    sibling, as the engine's runner pairs them)."""

    x: torch.Tensor
    layers: list
    experts: object
    d0: object
    args: argparse.Namespace
    d1: object = field(init=False)

    def __post_init__(self) -> None:
        self.d1 = self.d0.sibling()

    def _begin(self, sizes) -> None:  # as the engine's runner does: each instance's most tokens on any rank
        for d, n in zip((self.d0, self.d1), sizes):
            d.begin_step(ForwardMode.EXTEND, n)

    def off(self, clock: Clock | None = None) -> None:
        self._begin((self.args.tokens, self.args.tokens))
        run_overlapped([model_stages(self.x, self.layers, self.d0, self.args, self.experts, clock)])

    def on(self) -> None:
        half = self.args.tokens // 2
        self._begin((half, self.args.tokens - half))
        run_overlapped([model_stages(self.x[:half], self.layers, self.d0, self.args, self.experts),
                        model_stages(self.x[half:], self.layers, self.d1, self.args, self.experts)])


def random_layers(args, device: torch.device, rank: int) -> tuple[list, torch.Tensor]:
    """(layers, x): per layer the dense stand-in's two matrices and this rank's w13, w2; x: [tokens, hidden]."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    local = args.experts // args.ranks
    g = torch.Generator(device="cpu").manual_seed(rank)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(device=device, dtype=dtype)

    layers = [((rand(args.hidden, args.attn_rank), rand(args.attn_rank, args.hidden)),
               rand(local, 2 * args.inter, args.hidden), rand(local, args.hidden, args.inter))
              for _ in range(args.layers)]
    return layers, rand(args.tokens, args.hidden)


def worker(rank: int, args, init_file: str, out_file: str) -> None:
    torch.set_num_threads(args.threads)
    groups = init_distributed(rank, args.ranks, f"file://{init_file}", backend=args.backend, device_index=rank)
    device = groups.device
    layers, x = random_layers(args, device, rank)
    # Triton's fused MoE on a GPU (block sizes: the global expert count's table), the torch loop on a CPU
    experts = create_expert_kernel("auto", device, num_experts=args.experts)
    # The EP group of init_distributed (NCCL: collectives on a high-priority stream) and, on request, a group
    # on a normal-priority stream: the EPLB group, which init_distributed builds over the same ranks, backend
    # and timeout at normal priority. Their steps are timed in turn on every repeat.
    ep_groups = {"": groups.ep_group}
    if args.normal_priority_too:
        ep_groups["_normal_priority"] = groups.eplb_group
    steps = {}
    for suffix, group in ep_groups.items():
        d0 = create_dispatcher(args.dispatcher, group=group, ep_size=args.ranks,
                               num_local_slots=args.experts // args.ranks, device=device)
        steps[suffix] = Steps(x, layers, experts, d0, args)
    device_sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def sync():
        device_sync()
        dist.barrier(group=groups.cpu_group)

    for s in steps.values():  # warm-up
        s.off()
        s.on()
    if args.profile:  # every rank runs the steps (their collectives pair up); rank 0 records
        export_traces(args.profile if rank == 0 else None, {"off": steps[""].off, "on": steps[""].on}, sync)
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for suffix, s in steps.items():
            for mode in ("off", "on"):
                times.setdefault(f"step_{mode}{suffix}_s", []).append(timed_once(getattr(s, mode), sync))
    result = {key: statistics.median(v) for key, v in times.items()}
    splits = []
    for _ in range(args.repeats):  # TBO off with a device sync at every stage boundary
        clock = Clock(device_sync)
        steps[""].off(clock)
        splits.append(clock.totals)
    result["compute_s"] = statistics.median(t["compute"] for t in splits)
    result["comm_s"] = statistics.median(t["comm"] for t in splits)
    gathered = [None] * args.ranks
    dist.all_gather_object(gathered, result, group=groups.cpu_group)
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))
    destroy_distributed()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--dispatcher", choices=("all_to_all", "all_gather"), default="all_to_all")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=64, help="expert intermediate size")
    ap.add_argument("--attn-rank", type=int, default=64, help="width of the dense stand-in for attention")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank")
    ap.add_argument("--profile", metavar="DIR", help="write rank 0's Chrome traces of one step each way here")
    ap.add_argument("--normal-priority-too", action="store_true",
                    help="NCCL: also time the steps with the EP collectives on a normal-priority stream")
    ap.add_argument("--out", default="benchmarks/out/ep_overlap.json")
    args = ap.parse_args()
    if args.experts % args.ranks:
        ap.error("--experts must divide over --ranks")
    if args.normal_priority_too and args.backend != "nccl":
        ap.error("--normal-priority-too compares NCCL stream priorities; it needs --backend nccl")
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        mp.spawn(worker, args=(args, init_file, out_file), nprocs=args.ranks, join=True)
        per_rank = json.loads(Path(out_file).read_text())
    agg = {k: max(r[k] for r in per_rank) for k in per_rank[0]}  # the slowest rank sets the step
    per_layer = {k: agg[k] / args.layers * 1e3 for k in ("compute_s", "comm_s")}
    compute, comm = per_layer["compute_s"], per_layer["comm_s"]
    ideal = (compute + comm) / max(compute, comm)
    print(
        f"\n{args.ranks} {args.backend} ranks, {args.dispatcher}, {args.tokens} tokens/rank, hidden {args.hidden}, "
        f"{args.experts} experts top-{args.topk}, {args.layers} layers, median of {args.repeats}"
    )
    rows = [("per layer", None), ("  compute (dense + route + experts)", compute),
            ("  communication (dispatch+combine)", comm), ("step", None),
            ("  TBO off", agg["step_off_s"] * 1e3), ("  TBO on", agg["step_on_s"] * 1e3)]
    if "step_on_normal_priority_s" in agg:
        rows += [("  TBO off, EP stream normal priority", agg["step_off_normal_priority_s"] * 1e3),
                 ("  TBO on, EP stream normal priority", agg["step_on_normal_priority_s"] * 1e3)]
    for label, ms in rows:
        note = "  (includes waiting for the slowest rank)" if label.startswith("  communication") else ""
        print(f"{label:<40}{'ms' if ms is None else f'{ms:.2f}':>10}{note}")
    gain = agg["step_off_s"] / agg["step_on_s"]
    print(f"measured speed-up {gain:.2f}x; ideal with full overlap (compute+comm)/max = {ideal:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "args": vars(args),
                "per_rank": per_rank,
                "per_layer_ms": per_layer,
                "speedup": gain,
                "ideal_speedup": ideal,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
