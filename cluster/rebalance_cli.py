"""`moeserve rebalance`: ask a running deployment's EPLB actor to plan (and apply) a new expert placement."""

from __future__ import annotations

import argparse
import json
import sys

import ray

from moeserve.cluster.eplb_actor import get_eplb_actor


def format_report(report: dict) -> str:
    lines = [f"{'layer':>5} {'balancedness before':>20} {'after':>8}"]
    for i, (b, a) in enumerate(zip(report["balancedness_before"], report["balancedness_after"])):
        lines.append(f"{i:>5} {b:>20.3f} {a:>8.3f}")
    lines.append(f"{'mean':>5} {report['mean_before']:>20.3f} {report['mean_after']:>8.3f}")
    lines.append(f"experts to move: {report['experts_moved']}  ({report['bytes_moved'] / 1e6:.1f} MB)")
    if report.get("applied"):
        lines.append(
            f"applied as plan {report['plan_id']} in {report['seconds']:.2f}s: "
            f"{report['bytes_received'] / 1e6:.1f} MB moved in {report['chunks']} layer chunks, "
            f"checksums {'ok' if report['checksums_ok'] else 'MISMATCH'}"
        )
    else:
        lines.append("dry run: nothing moved" if report["dry_run"] else "nothing to move")
    return "\n".join(lines)


def plot_report(report: dict, path: str) -> None:
    """Heatmaps of load per GPU (rows: MoE layers) before and after."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = report["gpu_load_before"], report["gpu_load_after"]
    vmax = max(max(map(max, before)), max(map(max, after))) or 1.0
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.3 * len(before) + 2), sharey=True)
    for ax, data, title in ((axes[0], before, "before"), (axes[1], after, "after")):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(
            f"load per GPU {title} (mean balancedness "
            f"{report['mean_before' if title == 'before' else 'mean_after']:.3f})"
        )
        ax.set_xlabel("GPU (EP rank)")
    axes[0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes, label="tokens")
    fig.savefig(path, dpi=100)


def cmd_rebalance(args: argparse.Namespace) -> int:
    from moeserve.cluster.launch import connect

    try:
        connect(args.address, start_local=False)
    except ConnectionError as e:
        print(f"moeserve rebalance: error: {e}", file=sys.stderr)
        return 1
    actor = get_eplb_actor(args.app)
    try:
        report = ray.get(actor.rebalance.remote(dry_run=args.dry_run))
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        print(f"moeserve rebalance: error: {cause}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
