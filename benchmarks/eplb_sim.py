"""EPLB on synthetic DeepSeek-scale loads: balance gained, planning time, bytes moved.

Two scenarios, for each GPU count (8 GPUs per node) and both policies (hierarchical: num_groups=8 expert
groups packed onto nodes; global: num_groups=1):
  static  Zipf-skewed load per layer (a random expert permutation per layer). Baseline: no redundancy, experts
          in order (E / G per GPU). Plain DeepSeek plan vs that baseline.
  drift   a sequence of windows whose hot set shifts gradually (each expert's popularity position takes a
          Gaussian step every window); each window is rebalanced starting from the previous placement by three
          independent chains: the plain plan, the movement-aware plan (max GPU load <= the plain plan's), and
          the movement-aware plan allowed --loose worse. Reports expert weights that cross the wire per
          rebalance (DeepSeek-V3 expert: 3 x 7168 x 2048 params, 44 MB fp8 / 88 MB bf16).
Redundant experts: the smallest multiple of 32 that divides the slots evenly (32 for 8/16/32 GPUs, 64 for 64).

  python benchmarks/eplb_sim.py            # default run, ~30 s on a small CPU
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
    p.add_argument(
        "--tokens", type=int, default=1 << 21, help="token-expert assignments per layer per window"
    )
    p.add_argument("--windows", type=int, default=4, help="drift windows (rebalances = windows - 1)")
    p.add_argument("--drift", type=float, default=8.0, help="std of each expert's rank step per window")
    p.add_argument("--loose", type=float, default=0.01, help="balance tolerance of the 'loose' aware chain")
    p.add_argument("--repeat", type=int, default=3, help="timing repeats (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steady timings on a shared box)"
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "eplb_sim.json"))
    return p.parse_args()


def redundant_for(experts: int, gpus: int) -> int:
    """Smallest multiple of 32 redundant experts that makes the physical slots divide evenly over the GPUs."""
    extra = 32
    while (experts + extra) % gpus:
        extra += 32
    return extra


def zipf_load(position: torch.Tensor, exponent: float, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """position: [L, E] popularity position per expert (lower = hotter). Returns [L, E] float64 counts."""
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
    return dict(
        gpus=gpus,
        nodes=nodes,
        physical=replicas,
        redundant=replicas - args.experts,
        policy=policy,
        bal_before=mean_bal(weight, gpus, trivial),
        bal_after=mean_bal(weight, gpus, phy2log),
        plan_ms=ms,
    )


class Chain:
    """One sequence of placements, each window re-planned from the previous placement by one planner."""

    def __init__(self, name: str, plan, first: torch.Tensor) -> None:
        self.name, self.plan, self.placement = name, plan, first
        self.bal, self.moved, self.ms, self.peak_excess = [], [], [], []

    def step(self, weight: torch.Tensor, gpus: int, plain_peak: torch.Tensor) -> torch.Tensor:
        (new, _, _), ms = timed(lambda: self.plan(weight, self.placement), 1)
        self.moved.append(int(experts_moved(self.placement, new, gpus).sum()))
        self.peak_excess.append(float((gpu_loads(weight, gpus, new).amax(-1) / plain_peak - 1).max()))
        self.bal.append(mean_bal(weight, gpus, new))
        self.ms.append(ms)
        old, self.placement = self.placement, new
        return old


def drift_row(args, gpus: int, policy: str, gen: torch.Generator) -> dict:
    nodes, groups = max(1, gpus // args.gpus_per_node), POLICIES[policy] or args.groups
    replicas = args.experts + redundant_for(args.experts, gpus)
    position = torch.stack([torch.randperm(args.experts, generator=gen) for _ in range(args.layers)]).double()
    first, _, _ = rebalance_experts(
        zipf_load(position, args.zipf, args.tokens, gen), replicas, groups, nodes, gpus
    )

    def aware(tolerance: float):
        return lambda w, cur: rebalance_experts_movement_aware(w, cur, groups, nodes, gpus, tolerance)

    chains = [
        Chain("plain", lambda w, cur: rebalance_experts(w, replicas, groups, nodes, gpus), first),
        Chain("aware", aware(0.0), first),
        Chain("aware_loose", aware(args.loose), first),
    ]
    stale, move_ms = [], []
    for _ in range(args.windows - 1):
        position = position + args.drift * torch.randn(position.shape, generator=gen, dtype=torch.float64)
        weight = zipf_load(position, args.zipf, args.tokens, gen)
        stale.append(mean_bal(weight, gpus, chains[0].placement))
        plain_peak = gpu_loads(
            weight, gpus, rebalance_experts(weight, replicas, groups, nodes, gpus)[0]
        ).amax(-1)
        olds = [chain.step(weight, gpus, plain_peak) for chain in chains]
        start = time.perf_counter()
        plan_moves(olds[1], chains[1].placement, gpus, gpus // nodes)
        move_ms.append((time.perf_counter() - start) * 1e3)
    row = dict(gpus=gpus, nodes=nodes, physical=replicas, policy=policy, rebalances=args.windows - 1)
    row.update(stale=statistics.mean(stale), move_plan_ms=statistics.mean(move_ms))
    for chain in chains:
        row[f"bal_{chain.name}"] = statistics.mean(chain.bal)
        row[f"moved_{chain.name}"] = statistics.mean(chain.moved)
        row[f"ms_{chain.name}"] = statistics.mean(chain.ms)
        row[f"peak_excess_{chain.name}"] = max(chain.peak_excess)  # worst layer vs the plain plan's max load
    return row


def gigabytes(experts: float, bytes_per_param: int) -> float:
    return experts * DEEPSEEK_V3_EXPERT_PARAMS * bytes_per_param / 1e9


def print_tables(static: list[dict], drift: list[dict], loose: float) -> None:
    print("\nStatic Zipf load: balancedness (mean / max GPU load, mean over layers); before = no redundancy,")
    print("experts in order; plan ms = rebalance_experts for all layers")
    head = ("GPUs", "nodes", "phys (redund.)", "policy", "before", "after", "plan ms")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (4, 5, 15, 12, 7, 7, 8))))
    for r in static:
        print(
            f"{r['gpus']:>4} {r['nodes']:>5} {r['physical']:>9} (+{r['redundant']:>2}) {r['policy']:>12} "
            f"{r['bal_before']:>7.3f} {r['bal_after']:>7.3f} {r['plan_ms']:>8.1f}"
        )
    rebalances = drift[0]["rebalances"]
    print(f"\nDrifting load, per rebalance (mean over {rebalances}): balancedness (stale = previous plain")
    print("placement on the new load); experts moved over the wire; GB moved (DeepSeek-V3 expert: 44 MB fp8,")
    print(
        f"88 MB bf16). aware = movement-aware, max load <= plain's; loose = aware within {loose:.0%} of it."
    )
    names = ("plain", "aware", "aware_loose")
    print(
        f"{'GPUs':>4} {'policy':>12} {'stale':>5} | {'bal plain':>9} {'aware':>5} {'loose':>5} | "
        f"{'moved plain':>11} {'aware':>5} {'loose':>5} | {'GB fp8 plain':>12} {'aware':>5} {'loose':>5} | "
        f"{'GB bf16 plain':>13} {'aware':>5} {'loose':>5} | {'ms plain':>8} {'aware':>5} {'loose':>5} "
        f"{'moves':>5}"
    )
    for r in drift:
        bal = " ".join(f"{r['bal_' + n]:>{w}.3f}" for n, w in zip(names, (9, 5, 5)))
        moved = " ".join(f"{r['moved_' + n]:>{w}.0f}" for n, w in zip(names, (11, 5, 5)))
        fp8 = " ".join(f"{gigabytes(r['moved_' + n], 1):>{w}.0f}" for n, w in zip(names, (12, 5, 5)))
        bf16 = " ".join(f"{gigabytes(r['moved_' + n], 2):>{w}.0f}" for n, w in zip(names, (13, 5, 5)))
        ms = " ".join(f"{r['ms_' + n]:>{w}.0f}" for n, w in zip(names, (8, 5, 5)))
        print(
            f"{r['gpus']:>4} {r['policy']:>12} {r['stale']:>5.3f} | {bal} | {moved} | {fp8} | {bf16} | {ms} "
            f"{r['move_plan_ms']:>5.0f}"
        )
    exact = max(r["peak_excess_aware"] for r in drift)
    relaxed = max(r["peak_excess_aware_loose"] for r in drift)
    print(f"\nworst layer max GPU load vs the plain plan: aware {exact:+.1e}, loose {relaxed:+.1e}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    gpu_counts = [int(g) for g in args.gpus.split(",")]
    for gpus in gpu_counts:
        if gpus % args.gpus_per_node and gpus > args.gpus_per_node:
            raise SystemExit(f"--gpus {gpus} is not a multiple of --gpus-per-node {args.gpus_per_node}")
    static = [static_row(args, g, p, gen) for g in gpu_counts for p in POLICIES]
    drift = [drift_row(args, g, p, gen) for g in gpu_counts for p in POLICIES]
    print_tables(static, drift, args.loose)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(config=vars(args), expert_params=DEEPSEEK_V3_EXPERT_PARAMS, static=static, drift=drift),
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
