"""Block-size search for fused_moe, called by `benchmarks/kernels.py --tune` on the target GPU.

For each (shape, dtype, M) it tries a few block_m values around the tokens-per-expert of the benchmark's
routing and, for each, a short list of gate/up and down tiles (memory-bound lists for block_m <= 32, compute-
bound lists above), timing each grouped GEMM on its own over several routings under CUDA-graph replay (at
small M a plain launch loop would time the host's launch overhead). The best pair per block_m is kept and
the block_m with the smallest sum wins; then, by whole calls, short tiles, the pairs path and the table's current
entry at that M compete with it (`retuned_table`: the table keeps its entries at other sizes, so what the probes
adopted by hand, such as TMA, tail-tile or Gluon entries, survives a re-tune unless the search beats it). All
candidates are compiled first, each in its own process, several at
once (Triton's disk cache then serves the timing process): compiling dominates a serial search, and a compiler
crash or a faulting tile then drops only that candidate.

    python benchmarks/kernels_moe_tune.py --out probe.json [--no-search --baseline old.json]
runs `probe_large`: a wider compute-bound tile search for the M >= 512 cases of issue 6 (PROBE_CASES), then
whole-call graph timing of the winner against the table entry, alternated so drift hits both alike.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import wait

import torch
import triton
import triton.testing

from moeserve.kernels.fp8 import per_token_group_quant_fp8
from moeserve.kernels.fused_moe import down, fused_moe, gate_up
from moeserve.kernels.moe_align import moe_align
from moeserve.kernels.moe_configs import (
    CONFIG_DIR,
    GemmConfig,
    MoEConfig,
    load_table,
    save_table,
    short_heights,
    table_name,
    table_note,
)

G = GemmConfig
# (block_n, block_k, group_m, num_warps, num_stages)
_MEM_BF16_GU = [G(32, 128, 1, 4, 4), G(64, 128, 1, 4, 4), G(32, 256, 1, 4, 3), G(64, 64, 1, 4, 6),
                G(16, 256, 1, 4, 3)]
_MEM_BF16_DN = [G(32, 128, 1, 4, 4), G(64, 128, 1, 4, 4), G(128, 128, 1, 4, 3), G(128, 64, 1, 4, 5)]
_CMP_BF16_GU = [G(64, 64, 8, 4, 4), G(64, 64, 8, 8, 4), G(128, 64, 8, 8, 3), G(64, 128, 8, 8, 3),
                G(128, 64, 8, 8, 4)]
_CMP_BF16_DN = [G(128, 64, 8, 4, 4), G(128, 64, 8, 8, 4), G(256, 64, 8, 8, 3), G(128, 128, 8, 8, 3),
                G(256, 64, 8, 8, 4)]
_MEM_FP8_GU = [G(32, 128, 1, 4, 4), G(64, 128, 1, 4, 4), G(64, 128, 1, 4, 6), G(128, 128, 1, 4, 3),
               G(16, 128, 1, 4, 6)]
_MEM_FP8_DN = [G(32, 128, 1, 4, 4), G(64, 128, 1, 4, 4), G(128, 128, 1, 4, 4), G(128, 128, 1, 8, 3)]
_CMP_FP8_GU = [G(64, 128, 8, 4, 4), G(128, 128, 8, 8, 3), G(64, 128, 8, 8, 4), G(128, 128, 8, 4, 3)]
_CMP_FP8_DN = [G(128, 128, 8, 4, 4), G(128, 128, 8, 8, 3), G(256, 128, 8, 8, 3), G(64, 128, 8, 4, 4)]
# fp8 tiles with 4 stages of 48 KB (gate/up 128x128, down 256x128) hit an illegal memory access under
# Triton 3.6 on the H100 (2026-11-25), so the fp8 compute lists stop at 3 stages for those widths.
CANDIDATES = {
    ("bf16", "mem", "gate_up"): _MEM_BF16_GU, ("bf16", "mem", "down"): _MEM_BF16_DN,
    ("bf16", "cmp", "gate_up"): _CMP_BF16_GU, ("bf16", "cmp", "down"): _CMP_BF16_DN,
    ("fp8", "mem", "gate_up"): _MEM_FP8_GU, ("fp8", "mem", "down"): _MEM_FP8_DN,
    ("fp8", "cmp", "gate_up"): _CMP_FP8_GU, ("fp8", "cmp", "down"): _CMP_FP8_DN,
}
TUNE_ROTATIONS = 4
# The two-launch pairs path (MoEConfig.pairs) is tried against the aligned winner, whole call against whole
# call, while M*k is at most this; its (gate/up, down) tiles are few, as its programs only stream weights.
PAIRS_MAX_PAIRS = 64
_PAIRS_TILES = [(G(64, 128, 1, 4, 4), G(128, 128, 1, 4, 3)), (G(64, 128, 1, 4, 4), G(64, 128, 1, 4, 4)),
                (G(32, 256, 1, 4, 3), G(64, 128, 1, 4, 4)), (G(32, 128, 1, 4, 4), G(32, 128, 1, 4, 4))]
# Compile processes `precompile` runs at once by default: all cores but two (left to the parent and the
# system), at most 14.
COMPILE_WORKERS = min(14, max(1, (os.cpu_count() or 2) - 2))


def _pick_bm(pairs_per_expert: float) -> int:
    for bm, limit in ((16, 12), (32, 32), (64, 96)):
        if pairs_per_expert <= limit:
            return bm
    return 128


def bm_candidates(pairs_per_expert: float) -> list[int]:
    return sorted({_pick_bm(pairs_per_expert * f) for f in (0.5, 1.0, 2.0)})


def _candidates(dtype: str, bm: int, kind: str) -> list[GemmConfig]:
    return CANDIDATES[(dtype, "mem" if bm <= 32 else "cmp", kind)]


def _run_kernel(shape, kind: str, cfg: GemmConfig, w: dict, sets: list) -> None:
    """One gate_up or down launch per routing set (inputs prepared by _prepare)."""
    for s in sets:
        if kind == "gate_up":
            gate_up(s["x"], w["w13"], s["routing"], shape.top_k, cfg, torch.bfloat16, s.get("xs"),
                    w.get("w13_scale"))
        else:
            down(s["act"], w["w2"], s["tw"], s["routing"], cfg, torch.bfloat16, s.get("act_s"),
                 w.get("w2_scale"))


def _fused_calls(w: dict, inputs: list, cfg: MoEConfig | None) -> None:
    """One whole fused_moe call (align, quantisation, both GEMMs, top-k sum) per routing (hidden, topk_weights,
    topk_ids) of inputs, on the weights w (w13, w2 and, for fp8, their scales)."""
    for hidden, tw, ids in inputs:
        fused_moe(hidden, w["w13"], w["w2"], tw, ids, w13_scale=w.get("w13_scale"),
                  w2_scale=w.get("w2_scale"), config=cfg)


def _prepare(shape, fp8: bool, bm: int, w: dict, inputs: list) -> list[dict]:
    sets = []
    for hidden, tw, ids in inputs:
        s = dict(tw=tw, routing=moe_align(ids, w["w13"].shape[0], bm), x=hidden)
        if fp8:
            s["x"], s["xs"] = per_token_group_quant_fp8(hidden)
        act = gate_up(s["x"], w["w13"], s["routing"], shape.top_k, _candidates("fp8" if fp8 else "bf16", bm,
                      "gate_up")[0], torch.bfloat16, s.get("xs"), w.get("w13_scale"))
        s["act"] = act
        if fp8:
            s["act"], s["act_s"] = per_token_group_quant_fp8(act)
        sets.append(s)
    return sets


def _compile_weights(shape, fp8: bool) -> dict:
    """Weights with the right shapes, dtypes and strides; values do not matter for compiling."""
    from kernels import DEVICE

    e, h, i = shape.num_experts, shape.hidden, shape.inter
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    w = dict(w13=torch.randn(e, 2 * i, h, device=DEVICE).to(dtype),
             w2=torch.randn(e, h, i, device=DEVICE).to(dtype))
    if fp8:
        w["w13_scale"] = torch.rand(e, triton.cdiv(2 * i, 128), triton.cdiv(h, 128), device=DEVICE)
        w["w2_scale"] = torch.rand(e, triton.cdiv(h, 128), triton.cdiv(i, 128), device=DEVICE)
    return w


def _job_label(job: tuple) -> str:
    """A compile job (shape key, fp8, block_m, kind, config) as its error lines start; `_probe_cands` and
    benchmarks/moe_tma_probe.py look failed tiles up by it."""
    shape_key, fp8, bm, kind, cfg = job
    return f"{shape_key} fp8={fp8} bm={bm} {kind} {cfg}"


def _compile_one(job: tuple, queue) -> None:
    """Runs the (shape, fp8, bm, kind, cfg) job once on a 2-expert copy of the shape (same strides, same
    specialisation, so the compiled kernel lands in Triton's cache under the key the full run will use) and
    puts its error lines on queue. kind "whole": one fused_moe call with MoEConfig cfg (it aligns and
    quantises by itself)."""
    from kernels import SHAPES, make_inputs  # the benchmark driver module

    shape_key, fp8, bm, kind, cfg = job
    shape = SHAPES[shape_key]
    small = type(shape)(shape.name, 2, max(2, shape.top_k), shape.top_k, shape.hidden, shape.inter)
    w = _compile_weights(small, fp8)
    errors = []
    try:
        inputs = [make_inputs(small, 16, 0)]
        if kind == "whole":
            _fused_calls(w, inputs, cfg)
        else:
            _run_kernel(small, kind, cfg, w, _prepare(small, fp8, bm, w, inputs))
        torch.cuda.synchronize()
    except Exception as exc:  # a tile that does not fit is dropped from the search, not fatal
        errors.append(f"{_job_label(job)}: {type(exc).__name__}: {str(exc)[:120]}")
    queue.put(errors)


def precompile(jobs: list, workers: int = COMPILE_WORKERS, timeout_s: float = 240.0) -> list[str]:
    """Compiles each distinct job in its own spawned process, at most `workers` at once, so that a compiler
    crash (Triton's Hopper warp-specialisation pass asserts on some loops), a faulting tile or a hang drops
    only that job. Returns one line per failed job, starting with its `_job_label`."""
    ctx = mp.get_context("spawn")
    errors, running, pending = [], [], list(dict.fromkeys(jobs))
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop()
            queue = ctx.Queue()
            proc = ctx.Process(target=_compile_one, args=(job, queue))
            proc.start()
            running.append((proc, queue, job, time.time()))
        wait([proc.sentinel for proc, *_ in running], timeout=1.0)
        for item in list(running):
            proc, queue, job, t0 = item
            if proc.is_alive() and time.time() - t0 < timeout_s:
                continue
            if proc.is_alive():
                proc.kill()
                errors.append(f"{_job_label(job)}: compile timeout")
            elif not queue.empty():
                errors += queue.get()
            elif proc.exitcode != 0:
                errors.append(f"{_job_label(job)}: process died (exit {proc.exitcode})")
            running.remove(item)
    return errors


def _time_ms(fn, rep: int = 20) -> float:
    # Graph replay: at small M a plain launch loop would time the host's launch overhead, not the kernel.
    # do_bench_cudagraph runs on a side stream: inputs made on the default stream must be finished first.
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def _whole_us(w: dict, inputs: list, cfg: MoEConfig | None, rep: int = 60) -> float:
    """µs per whole fused_moe call (`_fused_calls`), graph-replayed over the routings of inputs; a first
    call outside the graph compiles."""
    _fused_calls(w, inputs, cfg)
    return _time_ms(lambda: _fused_calls(w, inputs, cfg), rep) * 1e3 / len(inputs)


def alternate_us(w: dict, inputs: list, variants: dict[str, MoEConfig], repeats: int, *,
                 before: Callable[[str], None] | None = None, failed: list | None = None) -> dict[str, list[float]]:
    """`_whole_us` of each variant, timed in turn `repeats` times (so clock drift hits all alike): label -> runs.
    before(label), when given, runs before each timing. failed, when given, catches a timing's exception: it is
    printed, that run is nan, and the label is appended to failed once (however many of its runs fail);
    without failed the exception propagates."""
    runs: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(repeats):
        for label, cfg in variants.items():
            if before is not None:
                before(label)
            try:
                runs[label].append(_whole_us(w, inputs, cfg))
            except Exception as exc:  # noqa: BLE001 - reported through failed, the caller decides
                if failed is None:
                    raise
                runs[label].append(float("nan"))
                if label not in failed:
                    failed.append(label)
                print(f"{label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    return runs


def roofline_us(shape, fp8: bool, inputs: list, copy_tbs: float, tflops: float) -> float:
    """max(bytes / copy bandwidth, FLOPs / matmul rate) of one call, in µs, with bytes and FLOPs as
    `kernels.traffic` counts them averaged over the routings of inputs; copy_tbs in TB/s, tflops in TFLOP/s."""
    from kernels import traffic

    nbytes, flops = (sum(t) / len(inputs) for t in zip(*(traffic(shape, fp8, i[2]) for i in inputs)))
    return max(nbytes / copy_tbs / 1e6, flops / tflops / 1e6)


def _tune_inputs(shape, m: int, make_inputs) -> tuple[list, float]:
    """The routings a case is tuned on, and their mean valid pairs per local expert."""
    inputs = [make_inputs(shape, m, 5000 + r) for r in range(TUNE_ROTATIONS)]
    valid = sum(int((s[2] >= 0).sum()) for s in inputs) / TUNE_ROTATIONS
    return inputs, valid / shape.num_experts


def _search_tiles(shape, fp8: bool, w: dict, inputs: list, bms, cands, log: dict) -> MoEConfig | None:
    """Per-kernel graph timing over the routings of inputs of every tile cands(bm, kind) gives, at each
    block_m in bms; the best gate/up and best down tile per block_m, and the block_m with the smallest sum.
    log gets "bm{bm} {kind} {tile}" -> µs per call (or why it failed). None when no block_m had both."""
    best = None
    for bm in bms:
        sets = _prepare(shape, fp8, bm, w, inputs)
        picked = {}
        for kind in ("gate_up", "down"):
            timed = []
            for cfg in cands(bm, kind):
                def run(c=cfg, k=kind, s=sets):
                    _run_kernel(shape, k, c, w, s)

                try:
                    us = _time_ms(run) * 1e3 / len(inputs)
                except Exception as exc:  # noqa: BLE001 - an unfit tile is skipped
                    log[f"bm{bm} {kind} {cfg}"] = f"failed: {type(exc).__name__}"
                    continue
                log[f"bm{bm} {kind} {cfg}"] = round(us, 2)
                timed.append((us, cfg))
            if timed:
                picked[kind] = min(timed, key=lambda t: t[0])
        if len(picked) == 2:
            total = picked["gate_up"][0] + picked["down"][0]
            if best is None or total < best[0]:
                best = (total, MoEConfig(bm, picked["gate_up"][1], picked["down"][1]))
    return best[1] if best else None


def tune_case(shape, fp8: bool, m: int, w: dict, inputs: list, pairs_per_expert: float) -> tuple[MoEConfig, dict]:
    """The per-kernel tile search over the routings inputs (`_tune_inputs`)."""
    dtype, log = "fp8" if fp8 else "bf16", {}
    best = _search_tiles(shape, fp8, w, inputs, bm_candidates(pairs_per_expert),
                         lambda bm, kind: _candidates(dtype, bm, kind), log)
    if best is None:
        raise RuntimeError(f"no block_m of {shape.name} {dtype} M={m} ran both GEMMs: {log}")
    return best, log


def pairs_candidates() -> dict[str, MoEConfig]:
    """The two-launch pairs configs tried against an aligned config, labelled by their tiles."""
    return {f"pairs gu{gu.block_n}x{gu.block_k} dn{dn.block_n}x{dn.block_k}": MoEConfig(16, gu, dn, pairs="pair")
            for gu, dn in _PAIRS_TILES}


def tune_whole(w: dict, inputs: list, current: MoEConfig, candidates: list[MoEConfig]) -> tuple[MoEConfig, dict]:
    """Whole-call graph timing of current against candidates over inputs (one that fails is skipped): the
    fastest, and the timings by config. Without candidates, current untimed. The candidates' kernels compile
    here, not in the parallel precompile: they depend on the tile search's winner."""
    if not candidates:
        return current, {}
    timed, log = [], {}
    for cfg in [current, *candidates]:
        try:
            us = _whole_us(w, inputs, cfg, rep=20)
        except Exception as exc:  # noqa: BLE001 - an unfit tile is skipped
            log[f"whole {cfg}"] = f"failed: {type(exc).__name__}"
            continue
        log[f"whole {cfg}"] = round(us, 2)
        timed.append((us, cfg))
    return min(timed, key=lambda t: t[0])[1], log


def with_short_m(cfg: MoEConfig, short_m: int) -> MoEConfig:
    """cfg with short tiles of short_m rows (`GemmConfig.short_m`; 0 = none) in both GEMMs; a GEMM's mid tiles
    (`GemmConfig.mid_m`) stay only where short_m is still block_m / 4, its tail tiles (`GemmConfig.tail_m`,
    short_m rows) where short_m is not 0."""

    def with_it(g):
        return replace(g, short_m=short_m, mid_m=g.mid_m and short_m * 4 == cfg.block_m,
                       tail_m=g.tail_m and short_m > 0)

    return replace(cfg, gate_up=with_it(cfg.gate_up), down=with_it(cfg.down))


def with_tiles(cfg: MoEConfig, gate_up: dict | None = None, down: dict | None = None) -> MoEConfig:
    """cfg with fields of its gate/up and down `GemmConfig`s changed (field -> value)."""
    return replace(cfg, gate_up=replace(cfg.gate_up, **(gate_up or {})), down=replace(cfg.down, **(down or {})))


def with_swap_ab(cfg: MoEConfig, swap_ab: bool) -> MoEConfig:
    """cfg with transposed MMAs (`GemmConfig.swap_ab`) on or off in both GEMMs; mid tiles need them, so off
    also drops those."""
    return with_tiles(cfg, dict(swap_ab=swap_ab, mid_m=cfg.gate_up.mid_m and swap_ab),
                      dict(swap_ab=swap_ab, mid_m=cfg.down.mid_m and swap_ab))


def with_tail_m(cfg: MoEConfig) -> MoEConfig:
    """cfg with tail tiles (`GemmConfig.tail_m`) in both GEMMs: a full block takes its expert's next block of at
    most short_m rows along. Needs short tiles and pointer loads in both."""
    return with_tiles(cfg, dict(tail_m=True), dict(tail_m=True))


def with_overlap(cfg: MoEConfig, group_m: int | None = None) -> MoEConfig:
    """cfg with down overlapping gate/up (`MoEConfig.overlap`; pointer loads in both GEMMs), and gate/up's
    group_m set where given (1: block-major order, so blocks finish early)."""
    return replace(with_tiles(cfg, gate_up=None if group_m is None else dict(group_m=group_m)), overlap=True)


def short_candidates(cfg: MoEConfig) -> list[MoEConfig]:
    """cfg with the other choices of short tiles, both GEMMs alike: none or one of `short_heights`; none for
    the pairs path."""
    if cfg.pairs:
        return []
    return [with_short_m(cfg, sm) for sm in (0, *short_heights(cfg.block_m))
            if (sm, sm) != (cfg.gate_up.short_m, cfg.down.short_m)]


def retuned_table(current: dict[int, MoEConfig], tuned: dict[int, MoEConfig], current_note: str,
                  note: str) -> tuple[dict[int, MoEConfig], str]:
    """The table after a re-tune: the tuned entries (each already timed against the current entry at its M) over
    the current table, whose entries at other sizes stay; the current note, then what this tune did."""
    if not current_note:
        return dict(tuned), note
    sizes = ", ".join(str(m) for m in sorted(tuned))
    return {**current, **tuned}, f"{current_note}; re-tuned at M = {sizes}: {note}"


def tune_all(shapes: list, ms: list[int], dtypes: list[str], make_weights, make_inputs) -> dict:
    """Tunes every (shape, dtype, M), writes kernels/configs/*.json, returns {file: table} plus timings."""
    from kernels import SHAPES

    key_of = {s.name: k for k, s in SHAPES.items()}
    jobs, plan = [], []
    for shape in shapes:
        for dtype in dtypes:
            for m in ms:
                for bm in bm_candidates(_tune_inputs(shape, m, make_inputs)[1]):
                    for kind in ("gate_up", "down"):
                        jobs += [(key_of[shape.name], dtype == "fp8", bm, kind, c)
                                 for c in _candidates(dtype, bm, kind)]
            plan.append((shape, dtype))
    t0 = time.time()
    errors = precompile(jobs, min(12, max(1, (os.cpu_count() or 2) - 4)))
    print(f"precompiled {len(set(jobs))} kernels in {time.time() - t0:.0f}s; failures: {errors}", flush=True)
    bundle: dict = {"compile_failures": errors, "timings_us": {}}
    device = torch.cuda.get_device_name()
    for shape, dtype in plan:
        fp8 = dtype == "fp8"
        name = table_name(shape.num_experts, shape.hidden, shape.inter, fp8)
        current, current_note = load_table(name), table_note(name)
        w = make_weights(shape, fp8)
        table = {}
        for m in ms:
            inputs, pairs_per_expert = _tune_inputs(shape, m, make_inputs)
            cfg, log = tune_case(shape, fp8, m, w, inputs, pairs_per_expert)
            # Then, by whole calls: short tiles for the winner, against it the pairs path at small M, and the
            # table's current entry at this M.
            cfg, short_log = tune_whole(w, inputs, cfg, short_candidates(cfg))
            pairs = list(pairs_candidates().values()) if m * shape.top_k <= PAIRS_MAX_PAIRS else []
            cfg, pairs_log = tune_whole(w, inputs, cfg, pairs)
            kept = current.get(m)
            cfg, kept_log = tune_whole(w, inputs, cfg, [kept] if kept is not None and kept != cfg else [])
            log.update(short_log | pairs_log | kept_log)
            table[m] = cfg
            bundle["timings_us"][f"{shape.name} {dtype} M={m}"] = log
            print(f"tuned {shape.name} {dtype} M={m}: {cfg}", flush=True)
        note = (f"tuned on {device}, {datetime.date.today()}, by benchmarks/kernels.py --tune; routing: "
                f"uniform top-{shape.top_k} of {shape.global_experts} experts, {shape.num_experts} local")
        table, note = retuned_table(current, table, current_note, note)
        save_table(CONFIG_DIR / name, table, note)
        bundle[name] = {"note": note, "configs": {str(m): c.to_dict() for m, c in table.items()}}
        del w
        torch.cuda.empty_cache()
    return bundle


# ---------------------------------------------------------------- wide search at M >= 512 (probe_large)

# Around the current compute-bound winners: BLOCK_N 64-256, BLOCK_K 64/128, 8 warps (4 for a few), 3-5
# stages, GROUP_M 4/8/16. Gate/up holds two fp32 accumulators, so its BLOCK_N stops at 128. fp8: no tile
# with 4+ stages above 32 KB per stage (the Triton 3.6 crash noted above kills the whole process).
_WIDE = {
    ("bf16", "gate_up"): [G(128, 64, 8, 8, 4), G(128, 64, 8, 8, 3), G(128, 64, 8, 8, 5), G(128, 64, 4, 8, 4),
                          G(128, 64, 16, 8, 4), G(64, 64, 8, 8, 5), G(64, 128, 8, 8, 3), G(64, 128, 8, 8, 4),
                          G(128, 128, 8, 8, 3), G(64, 64, 8, 4, 4)],
    ("bf16", "down"): [G(256, 64, 8, 8, 4), G(256, 64, 8, 8, 3), G(256, 64, 8, 8, 5), G(256, 64, 4, 8, 4),
                       G(256, 64, 16, 8, 4), G(128, 64, 8, 8, 4), G(128, 64, 8, 8, 5), G(128, 128, 8, 8, 3),
                       G(128, 128, 8, 8, 4), G(256, 128, 8, 8, 3), G(128, 64, 8, 4, 4)],
    ("fp8", "gate_up"): [G(128, 128, 8, 8, 3), G(128, 128, 4, 8, 3), G(128, 128, 16, 8, 3), G(128, 128, 8, 4, 3),
                         G(64, 128, 8, 4, 4), G(64, 128, 8, 8, 4), G(64, 128, 8, 8, 3)],
    ("fp8", "down"): [G(128, 128, 8, 4, 4), G(128, 128, 8, 8, 3), G(128, 128, 4, 8, 3), G(128, 128, 16, 8, 3),
                      G(256, 128, 8, 8, 3), G(64, 128, 8, 4, 4)],
}
# (shape key, dtype, M, block_m values): the cases of issue 6 that missed, weights shared per (shape, dtype).
PROBE_CASES = [("qwen3", "bf16", 8192, (128,)), ("deepseek", "bf16", 8192, (128,)),
               ("mixtral", "bf16", 2048, (128,)), ("qwen3", "bf16", 2048, (64, 128)),
               ("mixtral", "bf16", 512, (64, 128)), ("qwen3", "bf16", 512, (32, 64)),
               ("qwen3", "fp8", 512, (32, 64)), ("mixtral", "fp8", 512, (64, 128))]
# The roofline constants of the issue's table (H100, 2026-11-25), so fractions compare with it.
ISSUE_TBS, ISSUE_TFLOPS, ISSUE_FP8_TFLOPS = 3.00, 716.0, 1258.0
REPEATS = 3


def _probe_cands(dtype: str, bm: int, kind: str, current: MoEConfig, bad: str = "") -> list[GemmConfig]:
    """Candidates at block_m bm; bad: the precompile failures, whose tiles are left out (a tile that faulted
    there must not run in the timing process)."""
    listed = CANDIDATES[(dtype, "mem", kind)] if bm <= 32 else _WIDE[(dtype, kind)]
    mine = current.gate_up if kind == "gate_up" else current.down
    listed = listed + ([mine] if bm == current.block_m and mine not in listed else [])
    return [c for c in listed if f"fp8={dtype == 'fp8'} bm={bm} {kind} {c}:" not in bad]


def _search_case(shape, fp8: bool, m: int, bms: tuple, w: dict, current: MoEConfig, log: dict,
                 bad: str) -> MoEConfig:
    """`_search_tiles` over `_probe_cands` on 2 routings; current when no block_m ran both GEMMs."""
    from kernels import make_inputs

    dtype = "fp8" if fp8 else "bf16"
    inputs = [make_inputs(shape, m, 5000 + r) for r in range(2)]
    best = _search_tiles(shape, fp8, w, inputs, bms, lambda bm, kind: _probe_cands(dtype, bm, kind, current, bad),
                         log)
    return best or current


def unique_jobs(jobs: list) -> list:
    """One job per compiled kernel: the shapes' strides and sizes share Triton's specialisation (all multiples
    of 16, even tiles), so only dtype, tiles and (for the top-k sum of a whole call) k tell kernels apart."""
    from kernels import SHAPES

    unique = {}
    for job in jobs:
        key, fp8, bm, kind, cfg = job
        unique.setdefault((fp8, bm, kind, cfg, SHAPES[key].top_k if kind == "whole" else 0), job)
    return list(unique.values())


def whole_jobs(cases) -> list:
    """`unique_jobs` of whole calls: cases yields (shape key, fp8, MoEConfig)."""
    return unique_jobs([(key, fp8, cfg.block_m, "whole", cfg) for key, fp8, cfg in cases])


def probe_jobs(current: dict) -> list:
    jobs = []
    for key, dtype, m, bms in PROBE_CASES:
        cur = current[f"{key} {dtype} {m}"]
        for bm in bms:
            for kind in ("gate_up", "down"):
                jobs += [(key, dtype == "fp8", bm, kind, c) for c in _probe_cands(dtype, bm, kind, cur)]
        jobs.append((key, dtype == "fp8", cur.block_m, "whole", cur))
    return unique_jobs(jobs)


def probe_large(out_path: str, budget_s: float, search: bool, baseline: dict | None = None) -> dict:
    """For each PROBE_CASES entry: whole-call graph time of "old" (baseline's config, else the table entry)
    against "new" (search: the best tiles of a wide per-kernel search; else the table entry), timed
    alternately REPEATS times each so clock drift hits both alike. Writes out_path after every case."""
    import json

    from kernels import SHAPES, make_weights, measure_ceilings, rotating_inputs

    t0 = time.time()
    current, table = {}, {}
    for key, dtype, m, _ in PROBE_CASES:
        s = SHAPES[key]
        name = f"{key} {dtype} {m}"
        table[name] = s.table_config(m, dtype == "fp8")
        current[name] = MoEConfig.from_dict(baseline[name]) if baseline else table[name]
    jobs = probe_jobs(current) if search else whole_jobs(
        (key, dtype == "fp8", c) for key, dtype, m, _ in PROBE_CASES
        for c in {current[f"{key} {dtype} {m}"], table[f"{key} {dtype} {m}"]})
    errors = precompile(jobs)
    bundle = dict(device=torch.cuda.get_device_name(), compile_s=round(time.time() - t0, 1),
                  compile_failures=errors, ceilings=measure_ceilings(), cases={},
                  old_configs={k: c.to_dict() for k, c in current.items()})
    for key, dtype, m, bms in PROBE_CASES:
        name = f"{key} {dtype} {m}"
        if time.time() - t0 > budget_s:
            bundle["cases"][name] = "skipped: time budget"
            continue
        shape, fp8 = SHAPES[key], dtype == "fp8"
        w = make_weights(shape, fp8)
        inputs = rotating_inputs(shape, m, fp8)  # 2 routings: every PROBE_CASES call touches > 4x L2
        roof_us = roofline_us(shape, fp8, inputs, ISSUE_TBS, ISSUE_FP8_TFLOPS if fp8 else ISSUE_TFLOPS)
        log = {}
        new = _search_case(shape, fp8, m, bms, w, current[name], log, "\n".join(errors)) if search else table[name]
        variants = {"old": current[name], "new": new}
        row = dict(roofline_us=roof_us, kernels_us=log, same=new == current[name],
                   configs={k: c.to_dict() for k, c in variants.items()})
        runs = alternate_us(w, inputs, variants, 1 if row["same"] else REPEATS)
        row["runs"] = {k: [round(us, 1) for us in v] for k, v in runs.items()}
        row["us_graph"] = {k: statistics.median(v) for k, v in row["runs"].items()}
        row["frac"] = {k: round(roof_us / v, 3) for k, v in row["us_graph"].items()}
        bundle["cases"][name] = row
        print(name, row["runs"], row["frac"], flush=True)
        with open(out_path, "w") as f:
            json.dump(bundle, f, indent=1)
        del w
        torch.cuda.empty_cache()
    return bundle


if __name__ == "__main__":
    import argparse
    import json
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description="wide fused-MoE tile search at M >= 512 (probe_large)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--no-search", action="store_true", help="time the table entries (and baseline) only")
    parser.add_argument("--baseline", help="JSON {case: MoEConfig dict} timed as 'old' instead of the tables")
    args = parser.parse_args()
    base = json.load(open(args.baseline)) if args.baseline else None
    probe_large(args.out, args.budget_s, not args.no_search, base)
