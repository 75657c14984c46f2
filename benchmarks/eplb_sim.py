"""EPLB on synthetic DeepSeek-scale loads: balance gained, planning time, bytes moved.

Two scenarios, for each GPU count (8 GPUs per node) and both policies (hierarchical: num_groups=8 expert groups
packed onto nodes; global: num_groups=1):
  static  Zipf-skewed load per layer (a random expert permutation per layer). Baseline: no redundancy, experts in
          order (E / G per GPU). Plain DeepSeek plan vs that baseline.
  drift   a sequence of windows whose hot set shifts gradually (each expert's popularity rank takes a Gaussian
          step every window); each window is rebalanced starting from the previous placement, once by the plain
          plan and once by the movement-aware plan (two independent chains). Reports bytes that cross the wire
          per rebalance (DeepSeek-V3 expert: 3 x 7168 x 2048 params, 44 MB fp8 / 88 MB bf16).

  python benchmarks/eplb_sim.py            # default run, ~1 minute on a small CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from moeserve.eplb import (
    DEEPSEEK_V3_EXPERT_PARAMS,
    balancedness,
    experts_moved,
    gpu_loads,
    plan_moves,
    rebalance_experts,
    rebalance_experts_movement_aware,
)

POLICIES = {"hierarchical": None, "global": 1}  # None: use --groups


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--groups", type=int, default=8, help="expert groups for the hierarchical policy")
    p.add_argument("--gpus", default="8,16,32,64", help="comma-separated GPU counts")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--zipf", type=float, default=0.8, help="Zipf exponent of expert popularity")
    p.add_argument("--tokens", type=int, default=1 << 21, help="token-expert assignments per layer per window")
    p.add_argument("--windows", type=int, default=8, help="drift windows (rebalances = windows - 1)")
    p.add_argument("--drift", type=float, default=8.0, help="std of each expert's rank step per window")
    p.add_argument("--repeat", type=int, default=3, help="timing repeats (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "eplb_sim.json"))
    return p.parse_args()


def redundant_for(experts: int, gpus: int) -> int:
    """Smallest multiple of 32 redundant experts that makes the physical slots divide evenly over the GPUs."""
    extra = 32
    while (experts + extra) % gpus:
        extra += 32
    return extra


def zipf_load(position: torch.Tensor, exponent: float, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """position: [L, E] float popularity position per expert (lower = hotter). Returns [L, E] float64 counts."""
    rank = position.argsort(-1).argsort(-1).double()
    share = (rank + 1.0) ** -exponent
    expected = tokens * share / share.sum(-1, keepdim=True)
    return torch.poisson(expected, generator=gen)


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return out, statistics.median(times)


def mean_bal(weight: torch.Tensor, gpus: int, phy2log: torch.Tensor) -> float:
    return float(balancedness(gpu_loads(weight, gpus, phy2log)).mean())


def static_row(args, gpus: int, policy: str, gen: torch.Generator) -> dict:
    nodes, groups = max(1, gpus // args.gpus_per_node), POLICIES[policy] or args.groups
    replicas = args.experts + redundant_for(args.experts, gpus)
    position = torch.stack([torch.randperm(args.experts, generator=gen) for _ in range(args.layers)]).double()
    weight = zipf_load(position, args.zipf, args.tokens, gen)
    trivial = torch.arange(args.experts).expand(args.layers, -1)
    (phy2log, _, _), ms = timed(lambda: rebalance_experts(weight, replicas, groups, nodes, gpus), args.repeat)
    return dict(gpus=gpus, nodes=nodes, physical=replicas, redundant=replicas - args.experts, policy=policy,
                bal_before=mean_bal(weight, gpus, trivial), bal_after=mean_bal(weight, gpus, phy2log), plan_ms=ms)


def drift_row(args, gpus: int, policy: str, gen: torch.Generator) -> dict:
    nodes, groups = max(1, gpus // args.gpus_per_node), POLICIES[policy] or args.groups
    replicas = args.experts + redundant_for(args.experts, gpus)
    position = torch.stack([torch.randperm(args.experts, generator=gen) for _ in range(args.layers)]).double()
    weight = zipf_load(position, args.zipf, args.tokens, gen)
    plain, _, _ = rebalance_experts(weight, replicas, groups, nodes, gpus)
    aware = plain
    stats = {k: [] for k in ("stale", "plain", "aware", "moved_plain", "moved_aware", "ms_plain", "ms_aware",
                             "ms_moves", "excess")}
    for _ in range(args.windows - 1):
        position = position + args.drift * torch.randn(position.shape, generator=gen, dtype=torch.float64)
        weight = zipf_load(position, args.zipf, args.tokens, gen)
        stats["stale"].append(mean_bal(weight, gpus, plain))
        (new_plain, _, _), ms_plain = timed(lambda: rebalance_experts(weight, replicas, groups, nodes, gpus), 1)
        (new_aware, _, _), ms_aware = timed(
            lambda: rebalance_experts_movement_aware(weight, aware, groups, nodes, gpus), 1)
        _, ms_moves = timed(lambda: plan_moves(aware, new_aware, gpus, gpus // nodes), 1)
        stats["moved_plain"].append(int(experts_moved(plain, new_plain, gpus).sum()))
        stats["moved_aware"].append(int(experts_moved(aware, new_aware, gpus).sum()))
        peak_plain = gpu_loads(weight, gpus, new_plain).amax(-1)
        peak_aware = gpu_loads(weight, gpus, new_aware).amax(-1)
        stats["excess"].append(float((peak_aware / peak_plain - 1).max()))
        plain, aware = new_plain, new_aware
        stats["plain"].append(mean_bal(weight, gpus, plain))
        stats["aware"].append(mean_bal(weight, gpus, aware))
        stats["ms_plain"].append(ms_plain)
        stats["ms_aware"].append(ms_aware)
        stats["ms_moves"].append(ms_moves)
    row = dict(gpus=gpus, nodes=nodes, physical=replicas, policy=policy, rebalances=args.windows - 1)
    row.update({k: statistics.mean(v) for k, v in stats.items() if k != "excess"})
    row["max_peak_excess"] = max(stats["excess"])  # movement-aware peak vs plain peak, worst layer
    return row


def gigabytes(experts: float, bytes_per_param: int) -> float:
    return experts * DEEPSEEK_V3_EXPERT_PARAMS * bytes_per_param / 1e9


def print_tables(static: list[dict], drift: list[dict]) -> None:
    print("\nStatic Zipf load: balancedness (mean/max GPU load, mean over layers)")
    print(f"{'GPUs':>4} {'nodes':>5} {'phys (redund.)':>15} {'policy':>12} {'before':>7} {'after':>7} {'plan ms':>8}")
    for r in static:
        print(f"{r['gpus']:>4} {r['nodes']:>5} {r['physical']:>9} (+{r['redundant']:>2}) {r['policy']:>12} "
              f"{r['bal_before']:>7.3f} {r['bal_after']:>7.3f} {r['plan_ms']:>8.1f}")
    print("\nDrifting load: per rebalance (mean); moved = expert copies over the wire; GB = DeepSeek-V3 experts")
    print(f"{'GPUs':>4} {'policy':>12} {'stale':>6} {'plain':>6} {'aware':>6} {'moved plain':>11} {'aware':>6} "
          f"{'GB fp8 plain':>12} {'aware':>6} {'GB bf16 plain':>13} {'aware':>6} {'ms plain':>8} {'aware':>6} "
          f"{'moves':>6}")
    for r in drift:
        print(f"{r['gpus']:>4} {r['policy']:>12} {r['stale']:>6.3f} {r['plain']:>6.3f} {r['aware']:>6.3f} "
              f"{r['moved_plain']:>11.0f} {r['moved_aware']:>6.0f} "
              f"{gigabytes(r['moved_plain'], 1):>12.1f} {gigabytes(r['moved_aware'], 1):>6.1f} "
              f"{gigabytes(r['moved_plain'], 2):>13.1f} {gigabytes(r['moved_aware'], 2):>6.1f} "
              f"{r['ms_plain']:>8.1f} {r['ms_aware']:>6.1f} {r['ms_moves']:>6.1f}")
    worst = max(r["max_peak_excess"] for r in drift)
    print(f"\nworst layer, movement-aware max GPU load vs plain: {worst:+.2e} (<= 0: never worse)")


def main() -> None:
    args = parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    gpu_counts = [int(g) for g in args.gpus.split(",")]
    for gpus in gpu_counts:
        if gpus % args.gpus_per_node and gpus > args.gpus_per_node:
            raise SystemExit(f"--gpus {gpus} is not a multiple of --gpus-per-node {args.gpus_per_node}")
    static = [static_row(args, g, p, gen) for g in gpu_counts for p in POLICIES]
    drift = [drift_row(args, g, p, gen) for g in gpu_counts for p in POLICIES]
    print_tables(static, drift)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(config=vars(args), expert_params=DEEPSEEK_V3_EXPERT_PARAMS, static=static, drift=drift), f,
                  indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
