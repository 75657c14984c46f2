"""Split-KV decode attention at decode batch sizes: which split count and which merge are fastest?

    PYTHONPATH=. python benchmarks/attention_splits_probe.py [--contexts 1024,4096] [--batches 1,4,10,16]
                                                            [--tiles [--cold [write|read|spread]] [--picked]]
                                                            [--out DIR or FILE.json]

Times `paged_decode_attention` (kernels/attention_decode.py) under CUDA-graph replay for the Qwen3-30B-A3B
attention shape (32 query / 4 KV heads x 128, bf16, page 16), every request at the same context, with
num_splits in {1, 2, 4, 8, 16, 32} and the splits merged in the same launch (fused_reduce) or by the
`split_reduce` launch. Each timed call reads a different copy of the KV cache (distinct blocks of one pool,
together larger than L2), as the layers of a decode step do, so no replay is served from L2. Each result is
checked against the fp32 reference (`rel_err`). Printed: a table per (context, batch) with the fastest
configuration and what the current rule picks (`gqa_num_splits` for a graph runner's max_seq_len and for
the context itself, `use_fused_reduce`), then JSON. Measures only: the rule is not changed here.

--tiles instead times, at the split count a graph runner takes, the decode kernel's context tokens per k step
(block_n 32/64/128, `choose_block_n` picks one) with 4 or 8 warps and 1-3 pipeline stages: µs per call under
graph replay and each kernel's own µs (torch.profiler; run with MOESERVE_PDL=0 for durations that exclude the
wait for the kernel before). --cold flushes L2 before each call, as a decode step's MoE does between layers:
by writing 128 MiB (write, the default), by reading it (read), or by reading 1 MiB pieces spread over 16 GiB
with the KV pages themselves spread over a 16 GiB pool (spread: an engine's weights and KV cache fill the card,
so address translations miss as well). --picked times only the tile `choose_block_n` picks (4 warps, 2 stages).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels_small import time_graph  # noqa: E402

from moeserve.kernels.attention_decode import (  # noqa: E402
    choose_block_n,
    gqa_num_splits,
    head_grid,
    paged_decode_attention,
    use_fused_reduce,
)
from moeserve.kernels.attention_reference import (  # noqa: E402
    make_paged_cache,
    paged_decode_attention_ref,
    rel_err,
)

HQ, HK, D, PAGE, BLOCK_N, BLOCK_H = 32, 4, 128, 16, 32, 16
SPLITS = (1, 2, 4, 8, 16, 32)
ENGINE_MAX_SEQ_LEN = 40960  # Qwen3-30B-A3B's max_position_embeddings: a graph runner's max_seq_len by default
L2_DEFEAT_BYTES = 128 * 2**20  # KV bytes touched per pass over the copies (H100 L2: 50 MB)
SPREAD_BYTES = 16 * 2**30  # --cold spread: the pool the KV pages and the flush reads are spread over
BF16 = torch.bfloat16


def make_copies(batch: int, ctx: int, copies: int, seed: int):
    """One K and one V pool [blocks, PAGE, HK, D] (`make_paged_cache` over copies * batch requests) and `copies`
    block tables [batch, blocks_per_req], each over its own blocks (shuffled), so that every copy reads distinct
    memory; seq_lens [batch] int32."""
    k, v, tables, seq_lens = make_paged_cache([ctx] * (copies * batch), PAGE, HK, D, D, BF16, "cuda", seed)
    return k, v, list(tables.view(copies, batch, -1).unbind(0)), seq_lens[:batch]


def rule(batch: int, ctx: int, max_seq_len: int) -> dict:
    """What the current code picks for this shape: split counts for a graph runner (its max_seq_len is the
    context limit) and for an eager step."""
    group = HQ // HK
    heads_per_program = min(group, head_grid(group, HK, BLOCK_H)[0])  # as paged_decode_attention's merge
    dev = torch.device("cuda")
    graph = gqa_num_splits(batch, HQ, HK, max_seq_len, dev)
    eager = gqa_num_splits(batch, HQ, HK, ctx, dev)
    return dict(graph_splits=graph, graph_fused=use_fused_reduce(graph, heads_per_program, D),
                eager_splits=eager, eager_fused=use_fused_reduce(eager, heads_per_program, D))


def make_case(batch: int, ctx: int, seed: int):
    """(KV bytes of one call, copies, k, v, tables, seq_lens, q, the reference output over tables[0]): enough
    cache copies (`make_copies`) that a pass over them does not fit L2."""
    kv_bytes = 2 * batch * ctx * HK * D * 2
    copies = max(2, min(64, -(-L2_DEFEAT_BYTES // kv_bytes)))
    k, v, tables, seq_lens = make_copies(batch, ctx, copies, seed)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=BF16)
    ref = paged_decode_attention_ref(q, k, v, tables[0], seq_lens, D**-0.5)
    return kv_bytes, copies, k, v, tables, seq_lens, q, ref


def probe(batch: int, ctx: int, seed: int) -> list[dict]:
    kv_bytes, copies, k, v, tables, seq_lens, q, ref = make_case(batch, ctx, seed)
    scale = D**-0.5
    rows = []
    for splits in SPLITS:
        for fused in ((False, True) if splits > 1 else (False,)):
            row = dict(context=ctx, batch=batch, num_splits=splits, fused_reduce=fused, copies=copies)
            try:
                def call(t, s=splits, f=fused):
                    return paged_decode_attention(q, k, v, t, seq_lens, scale, ctx, num_splits=s, fused_reduce=f)

                row["rel_err"] = rel_err(call(tables[0]), ref)
                reps = max(1, 64 // copies)
                row["us"] = time_graph(lambda: [call(t) for t in tables], reps=reps, replays=10) / copies
                row["gbs"] = kv_bytes / row["us"] / 1e3
            except Exception as exc:  # a configuration that fails is a result: print it and go on
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
    return rows


def spread_pages(k: torch.Tensor, v: torch.Tensor, tables: list[torch.Tensor], seed: int):
    """The same pages at random places of pools of SPREAD_BYTES each: (k, v, tables) over the new pools."""
    blocks = SPREAD_BYTES // (k[0].numel() * k.element_size())
    g = torch.Generator(device="cuda").manual_seed(seed)
    where = torch.randperm(blocks, generator=g, device="cuda")[: k.shape[0]]
    big_k = torch.empty(blocks, *k.shape[1:], dtype=k.dtype, device="cuda")
    big_v = torch.empty(blocks, *v.shape[1:], dtype=v.dtype, device="cuda")
    big_k[where], big_v[where] = k, v
    return big_k, big_v, [where[t.long()].to(torch.int32) for t in tables]


def make_flush(cold: str):
    """A callable that leaves L2 (and for `spread`, address translation) as a decode step's MoE leaves it."""
    if cold == "spread":  # 128 reads of 1 MiB, 128 MiB apart
        pieces = torch.empty(SPREAD_BYTES // 4, dtype=torch.float32, device="cuda").view(128, -1)
        return lambda: pieces[:, : 2**18].sum()
    buf = torch.empty(L2_DEFEAT_BYTES // 4, dtype=torch.float32, device="cuda")
    return buf.zero_ if cold == "write" else buf.sum


def probe_tiles(batch: int, ctx: int, seed: int, max_seq_len: int, cold: str | None = None,
                picked_only: bool = False) -> list[dict]:
    """The graph runner's split count with each (block_n, num_warps, num_stages): graph µs per call and the
    profiler's µs per launch of each kernel. cold (`make_flush`): each call after an L2 flush and a rewrite of
    q, as in a decode step, where a layer's MoE weights have streamed through L2 since the last attention
    (block tables and context lengths then come from HBM; q, just written, from L2); only the kernel µs are
    then meaningful."""
    from torch.profiler import ProfilerActivity, profile

    _, copies, k, v, tables, seq_lens, q, ref = make_case(batch, ctx, seed)
    if cold == "spread":
        k, v, tables = spread_pages(k, v, tables, seed)
    q_src = q.clone()
    flush = make_flush(cold) if cold else None
    splits = rule(batch, ctx, max_seq_len)["graph_splits"]
    tiles = itertools.product((32, 64, 128), (4, 8), (1, 2, 3))
    if picked_only:
        tiles = [(choose_block_n(splits), 4, 2)]
    rows = []
    for bn, warps, stages in tiles:
        def calls(bn=bn, warps=warps, stages=stages):
            outs = []
            for t in tables:
                if cold:
                    flush()
                    q.copy_(q_src)
                outs.append(paged_decode_attention(q, k, v, t, seq_lens, D**-0.5, max_seq_len,
                                                   num_splits=splits, block_n=bn, num_warps=warps,
                                                   num_stages=stages))
            return outs

        row = dict(context=ctx, batch=batch, num_splits=splits, block_n=bn, num_warps=warps, num_stages=stages,
                   cold=cold, picked=bn == choose_block_n(splits), rel_err=rel_err(calls()[0], ref))
        row["us"] = time_graph(calls, reps=max(1, 64 // copies), replays=10) / copies
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            calls()
            torch.cuda.synchronize()
        row["kernel_us"] = {e.key.split("(")[0][:40]: e.device_time_total / e.count
                            for e in prof.key_averages() if e.device_time_total > 0}
        print(f"ctx {ctx} batch {batch} splits {splits} block_n {bn:3d} warps {warps} stages {stages} cold {cold}"
              f"{' (picked)' if row['picked'] else ''}: {row['us']:.2f} µs/call, kernels "
              f"{ {n: round(us, 2) for n, us in row['kernel_us'].items()} }, rel_err {row['rel_err']:.1e}", flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict], picks: dict) -> None:
    """One line per (context, batch): µs per split count (unfused / fused), the best, the rule's picks."""
    head = " ".join(f"{s:>13}" for s in SPLITS)
    print(f"{'ctx':>5} {'B':>3} | {head} | best             | rule graph / eager")
    for (ctx, b), pick in picks.items():
        cells, best = [], None
        for s in SPLITS:
            got = {r["fused_reduce"]: r for r in rows if (r["context"], r["batch"], r["num_splits"]) == (ctx, b, s)}
            us = [f"{got[f]['us']:.1f}" if "us" in got.get(f, {}) else "-" for f in (False, True) if f in got]
            cells.append("/".join(us))
            for r in got.values():
                if "us" in r and (best is None or r["us"] < best["us"]):
                    best = r
        best_s = "-"
        if best is not None:
            best_s = f"{best['num_splits']}{' fused' if best['fused_reduce'] else ''} {best['us']:.1f}"
        rule_s = (f"{pick['graph_splits']}{'f' if pick['graph_fused'] else ''} / "
                  f"{pick['eager_splits']}{'f' if pick['eager_fused'] else ''}")
        print(f"{ctx:>5} {b:>3} | {' '.join(f'{c:>13}' for c in cells)} | {best_s:<16} | {rule_s}")
    print("(cells: µs with split_reduce / with the merge fused; 'f' = the rule fuses the merge)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--batches", default="1,4,10,16")
    parser.add_argument("--tiles", action="store_true", help="time block_n / warps / stages at the graph's splits")
    parser.add_argument("--cold", nargs="?", const="write", choices=("write", "read", "spread"),
                        help="with --tiles: flush L2 before each call (see make_flush)")
    parser.add_argument("--max-seq-len", type=int, default=ENGINE_MAX_SEQ_LEN,
                        help="a graph runner's context limit (its split count; the engine's max_model_len)")
    parser.add_argument("--picked", action="store_true", help="with --tiles: only the tile choose_block_n picks")
    parser.add_argument("--out", default="benchmarks/out", help="a directory, or a .json file")
    args = parser.parse_args()
    tiles_name = f"attention_tiles{'_' + args.cold if args.cold else ''}_probe.json"
    name = tiles_name if args.tiles else "attention_splits_probe.json"
    out = args.out if args.out.endswith(".json") else os.path.join(args.out, name)
    print(f"{torch.cuda.get_device_name()}; GQA {HQ}/{HK} heads x {D}, bf16, page {PAGE}")
    t0 = time.perf_counter()
    rows: list[dict] = []
    picks: dict = {}
    for ctx in (int(c) for c in args.contexts.split(",")):
        for b in (int(x) for x in args.batches.split(",")):
            picks[(ctx, b)] = rule(b, ctx, args.max_seq_len)
            try:
                if args.tiles:
                    got = probe_tiles(b, ctx, ctx + b, args.max_seq_len, args.cold, args.picked)
                else:
                    got = probe(b, ctx, seed=ctx + b)
            except Exception as exc:  # e.g. out of memory: report and go on with the next shape
                print(f"ctx {ctx} batch {b} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            rows += got
            errs = [r for r in got if "error" in r]
            print(f"ctx {ctx} batch {b}: {len(got) - len(errs)} timed, {len(errs)} failed, "
                  f"max rel_err {max((r['rel_err'] for r in got if 'rel_err' in r), default=float('nan')):.1e}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            for r in errs:
                print("  ", r, flush=True)
    if not args.tiles:
        table(rows, picks)
    result = dict(device=torch.cuda.get_device_name(), shape=dict(hq=HQ, hk=HK, d=D, page=PAGE),
                  rule={f"{c}x{b}": p for (c, b), p in picks.items()}, rows=rows)
    print(json.dumps(result))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
