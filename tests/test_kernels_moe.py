"""Fused MoE kernels (align, grouped GEMMs, top-k sum, FP8 quantisation) against pure-torch references.

Three groups:
- CPU, plain: launcher validation, config tables, torch-only FP8 helpers, reference == torch_experts.
- CPU, Triton interpreter: the Triton kernels themselves on tiny fp32/fp16 shapes (the interpreter is wrong
  for bf16). TRITON_INTERPRET must be set before triton is first imported, and other test files import it
  first, so `test_kernels_under_triton_interpreter` re-runs this file's `test_interp_*` tests in a fresh
  subprocess.
- GPU (`gpu` marker): the target model shapes in bf16 and FP8, CUDA-graph capture, TritonExperts.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading

import pytest
import torch

from tests.compiles import recorded_compilations
from tests.interp import interp, launches_interpreter_run, run_interpreter_tests


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def random_routing(num_tokens: int, num_experts: int, top_k: int, drop: float = 0.2, seed: int = 0,
                   skip_expert: int | None = None, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """topk_weights [M, k] float32, topk_ids [M, k] int32: distinct experts per token, a fraction set to -1,
    and optionally one expert that never receives a token."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if skip_expert is not None:
        scores[:, skip_expert] = -1.0
    ids = scores.topk(top_k, dim=1).indices
    ids[torch.rand(num_tokens, top_k, generator=g) < drop] = -1
    weights = torch.rand(num_tokens, top_k, generator=g) + 0.1
    return weights.to(device), ids.to(torch.int32).to(device)


def random_moe(num_tokens, hidden, inter, num_experts, top_k, dtype, seed=0, device="cpu", **routing):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    tw, ids = random_routing(num_tokens, num_experts, top_k, seed=seed, **routing)
    return [t.to(device=device, dtype=dtype) for t in (x, w13, w2)] + [tw.to(device), ids.to(device)]


# ---------------------------------------------------------------- CPU, no kernel launches


def test_reference_matches_torch_experts():
    from moeserve.kernels import moe_reference
    from moeserve.moe.experts import torch_experts

    x, w13, w2, tw, ids = random_moe(9, 32, 24, 5, 2, torch.float32, skip_expert=3)
    torch.testing.assert_close(moe_reference(x, w13, w2, tw, ids), torch_experts(x, w13, w2, tw, ids))


@pytest.mark.parametrize("case", ["ids_int64", "weights_bf16", "w2_shape", "noncontiguous", "fp8_no_scale",
                                  "scale_bf16_weights"])
def test_launcher_rejects_bad_inputs(case):
    from moeserve.kernels import fused_moe
    from moeserve.kernels.fp8 import quant_weight_block_fp8

    x, w13, w2, tw, ids = random_moe(4, 32, 16, 3, 2, torch.float16)
    kwargs = {}
    if case == "ids_int64":
        ids, match = ids.long(), "int32"
    elif case == "weights_bf16":
        tw, match = tw.bfloat16(), "float32"
    elif case == "w2_shape":
        w2, match = w2[:, :, :8].contiguous(), "inconsistent shapes"
    elif case == "noncontiguous":
        x, match = torch.randn(32, 4, dtype=torch.float16).t(), "contiguous"
    elif case == "fp8_no_scale":
        (w13, _), (w2, _), match = quant_weight_block_fp8(w13), quant_weight_block_fp8(w2), "scale"
    else:
        kwargs, match = dict(w13_scale=torch.ones(3, 1, 1), w2_scale=torch.ones(3, 1, 1)), "only allowed"
    with pytest.raises(ValueError, match=match):
        fused_moe(x, w13, w2, tw, ids, **kwargs)


def test_tile_pipelines_fit_shared_memory():
    """fp32 operands take fewer pipeline stages (a tiny fp32 model on a GPU once asked for 256 KB of shared
    memory against the H100's 227 KB); every tuned bf16/fp8 entry is left as it is."""
    from dataclasses import replace

    from moeserve.kernels.moe_configs import (
        CONFIG_DIR,
        SMEM_BUDGET,
        GemmConfig,
        MoEConfig,
        default_config,
        fit_shared_memory,
        load_table,
    )

    for path in CONFIG_DIR.glob("*.json"):
        elem = 1 if path.name.endswith("_fp8.json") else 2
        assert all(fit_shared_memory(c, elem) == c for c in load_table(path.name).values())

    def pipeline_bytes(c: MoEConfig, elem: int) -> list[int]:
        return [(c.block_m + g.short_m * g.tail_m + tiles * g.block_n) * g.block_k * elem * g.num_stages
                for g, tiles in ((c.gate_up, 2), (c.down, 1))]

    cfg = default_config(640, 16, 64, 32, 4, fp8=False)  # 128-row blocks, 4 stages
    assert max(pipeline_bytes(cfg, 4)) > SMEM_BUDGET
    fitted = fit_shared_memory(cfg, 4)
    assert max(pipeline_bytes(fitted, 4)) <= SMEM_BUDGET and fitted.gate_up.num_stages == 3
    assert (fitted.block_m, fitted.gate_up.block_n, fitted.down.block_n) == (128, 64, 128)  # tiles unchanged
    # A tail tile's rows count too: 9 stages of (128 + 2 * 128) x 32 bf16 would fit (216 KB), with the tail
    # tile's 32 rows they do not (234 KB), 8 do.
    tail = MoEConfig(128, GemmConfig(128, 32, num_stages=9, short_m=32, tail_m=True), GemmConfig(128, 64))
    assert pipeline_bytes(replace(tail, gate_up=replace(tail.gate_up, tail_m=False)), 2)[0] <= SMEM_BUDGET
    assert pipeline_bytes(tail, 2)[0] > SMEM_BUDGET >= pipeline_bytes(fit_shared_memory(tail, 2), 2)[0]
    assert fit_shared_memory(tail, 2).gate_up.num_stages == 8


def test_config_tables_are_valid_and_pick_nearest_m():
    from moeserve.kernels.moe_configs import CONFIG_DIR, GemmConfig, MoEConfig, load_table, nearest

    for path in CONFIG_DIR.glob("*.json"):
        table = load_table(path.name)
        assert table, f"{path.name} holds no configs"
        if path.name.endswith("_fp8.json"):
            assert all(128 % c.gate_up.block_k == 0 and 128 % c.down.block_k == 0 for c in table.values())
        assert all(c.fuse_act_quant for c in table.values())  # tables without the field take its default
    tiles = GemmConfig(32, 64), GemmConfig(64, 64)
    for c in (MoEConfig(16, *tiles, pairs="pair"), MoEConfig(64, *tiles, fuse_act_quant=False)):
        assert MoEConfig.from_dict(c.to_dict()) == c
    cfg = {m: MoEConfig(bm, *tiles) for m, bm in ((1, 16), (32, 32), (512, 64))}
    assert nearest(cfg, 1).block_m == 16
    assert nearest(cfg, 5).block_m == 16  # log2 5 is nearer 1 (log 0) than 32 (log 5)
    assert nearest(cfg, 8).block_m == 32
    assert nearest(cfg, 100).block_m == 32
    assert nearest(cfg, 200).block_m == 64
    assert nearest(cfg, 100000).block_m == 64
    with pytest.raises(ValueError, match="power of two"):
        MoEConfig(24, GemmConfig(32, 64), GemmConfig(64, 64))
    with pytest.raises(ValueError, match="warp_specialize needs TMA"):
        MoEConfig(16, GemmConfig(32, 64, warp_specialize=True), GemmConfig(64, 64))
    with pytest.raises(ValueError, match="pointer only"):
        MoEConfig(16, GemmConfig(32, 64, loads="tma"), GemmConfig(64, 64), pairs="pair")


def _compiled_by(m: int, e: int, h: int, i: int, k: int, fp8: bool, sms: int) -> set:
    """What a `fused_moe` call of m rows compiles, as far as it depends on m: its table entry's tiles and, in the
    aligned path, its align (block_m, method, CHUNK), in the pairs path whether gate/up's grid takes PDL."""
    from moeserve.kernels.moe_align import align_plan
    from moeserve.kernels.moe_configs import get_config

    cfg = get_config(m, e, h, i, k, fp8)
    if cfg.pairs:
        return {("tiles", cfg), ("pdl", cfg.gate_up.block_n, m * k * -(-i // cfg.gate_up.block_n) > sms)}
    return {("tiles", cfg), ("align", cfg.block_m, align_plan(m * k))}


@pytest.mark.parametrize("max_tokens", [1, 100, 2048, 16384])
def test_warmup_counts_reach_every_kernel_a_call_takes(max_tokens):
    """For every shipped table at top-k 2, 6 and 8 on an H100 (132 multiprocessors): whatever a call of
    1..max_tokens rows compiles, one of the warm-up's calls compiled already (so a first request of a new size
    waits for no Triton compilation). The GPU test below checks it with Triton's own compile hook."""
    from moeserve.kernels.fused_moe import warmup_token_counts
    from moeserve.kernels.moe_configs import CONFIG_DIR

    sizes = range(1, max_tokens + 1) if max_tokens <= 2048 else sorted(
        {*range(1, 2049), *range(2049, max_tokens + 1, 7), max_tokens})
    for path in sorted(CONFIG_DIR.glob("*.json")):
        e, h, i = (int(part[1:]) for part in path.stem.split("_")[:3])
        fp8 = path.stem.endswith("fp8")
        for k in (2, 6, 8):
            counts = warmup_token_counts(max_tokens, e, h, i, k, fp8, 132)
            assert counts == sorted(set(counts)) and counts[0] == 1 and counts[-1] <= max_tokens
            warmed = set().union(*(_compiled_by(m, e, h, i, k, fp8, 132) for m in counts))
            missed = [m for m in sizes if not _compiled_by(m, e, h, i, k, fp8, 132) <= warmed]
            assert not missed, f"{path.name} top-{k}: calls of {missed[:5]} rows compile after the warm-up"


def test_triton_experts_warmup_counts_follow_the_table_it_looks_up():
    """TritonExperts names the counts of its weights' table (the model's, for an EP rank's share without one);
    the torch kernel compiles nothing and names none."""
    from moeserve.kernels.fused_moe import warmup_token_counts
    from moeserve.moe.experts import TorchExperts
    from moeserve.moe.triton_experts import TritonExperts

    rank_share = torch.empty(64, 2 * 768, 2048, device="meta")  # Qwen3-30B-A3B over EP 2: no E64 table
    model_table = warmup_token_counts(1000, 128, 2048, 768, 8, False, sms=8)  # a meta tensor's device: 8
    assert TritonExperts(global_experts=128).warmup_token_counts(rank_share, 1000, 8) == model_table
    assert TritonExperts().warmup_token_counts(rank_share, 1000, 8) != model_table  # the heuristic's tiles
    assert TorchExperts().warmup_token_counts(rank_share, 1000, 8) == []


def test_ep_rank_without_own_table_takes_global_table(monkeypatch, tmp_path):
    """An EP rank of Qwen3-30B-A3B (64 of 128 experts) has no E64 table: given the global count it takes the
    E128 entry nearest M (all-gather rows: the same pairs per expert as the unsharded call), else the heuristic.
    A table for the local count keeps priority over the global one."""
    from moeserve.kernels import moe_configs as mc

    assert not mc.load_table(mc.table_name(64, 2048, 768, False)), "an E64 table now exists: pick another shape"
    for fp8 in (False, True):
        table = mc.load_table(mc.table_name(128, 2048, 768, fp8))
        for m in (1, 200, 1024, 5000):
            want = mc.nearest(table, m)
            assert mc.get_config(m, 64, 2048, 768, 8, fp8, global_experts=128) == want
            assert mc.get_config(m, 64, 2048, 768, 8, fp8, 2, global_experts=128) == mc.fit_shared_memory(want, 2)
            heuristic = mc.default_config(m, 64, 2048, 768, 8, fp8)
            assert mc.get_config(m, 64, 2048, 768, 8, fp8) == heuristic
            assert mc.get_config(m, 64, 2048, 768, 8, fp8, global_experts=64) == heuristic
    # DeepSeek-V3 EP-8 rank: its own E32 table, whatever the global count.
    deepseek = mc.load_table(mc.table_name(32, 7168, 2048, False))
    assert mc.get_config(700, 32, 7168, 2048, 8, False, global_experts=256) == mc.nearest(deepseek, 700)
    # Priority where both tables exist (written to a scratch table directory; the caches see only it).
    tiles = mc.GemmConfig(32, 64), mc.GemmConfig(64, 64)
    mc.save_table(tmp_path / mc.table_name(4, 64, 32, False), {16: mc.MoEConfig(16, *tiles)}, "local")
    mc.save_table(tmp_path / mc.table_name(8, 64, 32, False), {16: mc.MoEConfig(32, *tiles)}, "global")
    monkeypatch.setattr(mc, "CONFIG_DIR", tmp_path)
    mc.load_table.cache_clear()
    mc.get_config.cache_clear()
    try:
        assert mc.get_config(16, 4, 64, 32, 2, False, global_experts=8).block_m == 16  # the local table
        assert mc.get_config(16, 2, 64, 32, 2, False, global_experts=8).block_m == 32  # no E2: the global one
    finally:
        monkeypatch.undo()
        mc.load_table.cache_clear()
        mc.get_config.cache_clear()


def test_expert_kernel_factory_hands_global_count_to_triton():
    from moeserve.moe.experts import TorchExperts, create_expert_kernel

    kernel = create_expert_kernel("triton", "cuda", num_experts=128)  # constructing it launches nothing
    assert kernel.name == "triton" and kernel.global_experts == 128
    assert create_expert_kernel("triton", "cuda").global_experts is None
    assert isinstance(create_expert_kernel("auto", "cpu", num_experts=128), TorchExperts)


def _benchmark_module(monkeypatch, name: str):
    """benchmarks/{name}.py as a module (a generator for a fixture). The MoE benchmarks import the benchmark
    driver under the top-level name `kernels`, which the repository root's `kernels/` package would shadow:
    sys.modules is restored after."""
    import importlib
    import sys
    from pathlib import Path

    names = ("kernels", "kernels_moe_tune", name)
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        yield importlib.import_module(name)
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


@pytest.fixture
def entries_probe(monkeypatch):
    yield from _benchmark_module(monkeypatch, "moe_entries_probe")


@pytest.fixture
def vendor_baseline(monkeypatch):
    yield from _benchmark_module(monkeypatch, "moe_vendor_baseline")


@pytest.fixture
def moe_tune(monkeypatch):
    yield from _benchmark_module(monkeypatch, "kernels_moe_tune")


def test_retune_keeps_the_table_entries_it_did_not_tune(moe_tune):
    """`kernels.py --tune` rewrites a shipped table: entries at sizes it did not tune (hand-adopted from the
    probes: TMA, tail-tile, Gluon entries) stay, tuned sizes take the tuned entry, and the note keeps its
    history; a table that did not exist is the tuned entries alone."""
    from moeserve.kernels import GemmConfig, MoEConfig

    def cfg(loads: str) -> MoEConfig:
        return MoEConfig(128, GemmConfig(128, 64, loads=loads), GemmConfig(256, 64, loads=loads))

    current = {512: cfg("tma"), 2048: cfg("gluon"), 8192: cfg("gluon")}
    table, note = moe_tune.retuned_table(current, {512: cfg("ptr"), 1024: cfg("ptr")}, "probes adopted", "tuned")
    assert table == {512: cfg("ptr"), 1024: cfg("ptr"), 2048: cfg("gluon"), 8192: cfg("gluon")}
    assert note.startswith("probes adopted;") and "512, 1024" in note and note.endswith("tuned")
    assert moe_tune.retuned_table({}, {512: cfg("ptr")}, "", "tuned") == ({512: cfg("ptr")}, "tuned")


def test_vendor_baseline_groups_are_the_valid_choices_by_expert(vendor_baseline):
    """benchmarks/moe_vendor_baseline.py times torch's grouped GEMMs on the same routing as fused_moe: its rows
    must be exactly each expert's valid choices (ids -1 dropped), in groups padded to 16 rows, so the two GEMMs
    compute what the fused call's GEMMs compute. Checked with torch._grouped_mm on the CPU against one matmul
    per expert."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(3)
    num_experts, hidden, inter, top_k = 5, 32, 16, 2
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(23)]).to(torch.int32)
    ids[ids == 4] = -1  # expert 4 lives on another rank
    x = torch.randn(23, hidden, generator=g).to(torch.bfloat16)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g).to(torch.bfloat16)
    token, offs, rows = vendor_baseline.expert_order(ids, num_experts)
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), offs[:-1]])
    assert rows == int(offs[-1]) and all(int(o) % vendor_baseline.GROUP_ALIGN == 0 for o in offs)
    for e in range(num_experts):
        group = token[int(starts[e]):int(offs[e])]
        want = [m for m in range(23) if e in ids[m].tolist()]
        assert group[:len(want)].tolist() == want and bool((group[len(want):] == -1).all()), e
    shape = SimpleNamespace(num_experts=num_experts, inter=inter)
    v = vendor_baseline.vendor_weights(shape, dict(w13=w13, w2=w13[:, :hidden, :inter].contiguous()), False)
    s = vendor_baseline.vendor_sets(shape, [(x, None, ids)], False)[0]
    got = torch._grouped_mm(s["x"], v["w13"], offs=s["offs"]).float()
    for e in range(num_experts):
        rows_e = token[int(starts[e]):int(offs[e])]
        real = rows_e >= 0
        want = x[rows_e[real]].float() @ w13[e].float().T
        torch.testing.assert_close(got[int(starts[e]):int(offs[e])][real], want, rtol=2e-2, atol=2e-2)


def test_entries_probe_short_variants_are_the_other_short_tiles(entries_probe):
    """`--short`: each aligned table entry is timed beside the same tiles with the other short_m choices (none,
    block_m/2, block_m/4 of at least 16 rows; `kernels_moe_tune.short_candidates`); the pairs path gets none."""
    from moeserve.kernels import GemmConfig, MoEConfig

    tune = entries_probe  # the probe's short_candidates and with_short_m are kernels_moe_tune's
    bm128 = MoEConfig(128, GemmConfig(128, 64, short_m=32), GemmConfig(256, 64, short_m=32))
    assert [(c.gate_up.short_m, c.down.short_m) for c in tune.short_candidates(bm128)] == [(0, 0), (64, 64)]
    assert [c.gate_up.short_m for c in tune.short_candidates(tune.with_short_m(bm128, 0))] == [64, 32]
    bm32 = MoEConfig(32, GemmConfig(64, 64), GemmConfig(64, 64))
    assert [c.down.short_m for c in tune.short_candidates(bm32)] == [16]
    assert tune.short_candidates(MoEConfig(16, GemmConfig(64, 64), GemmConfig(64, 64), pairs="pair")) == []
    plan = entries_probe.build_plan(entries_probe.parse_cases("short") + [("qwen3", "bf16", 1)], memset=False,
                                    short=True)
    for (key, dtype, m), variants in plan.items():
        table = variants["table"][0]
        shorts = {label: cfg for label, (cfg, _) in variants.items() if label.startswith("short_m")}
        want = {f"short_m {c.gate_up.short_m}": c for c in tune.short_candidates(table)}
        assert shorts == want and (bool(shorts) != bool(table.pairs)), (key, dtype, m)


def test_entries_probe_plans_ep_cases_without_gpu(entries_probe):
    """`--cases ep`: each EP case times its entry against the heuristic the rank took before the global-table
    lookup (and against the unsharded table's entry once it has a table of its own); DeepSeek's rank, which
    always had its own table, gets neither. The CLI parses (--help) without a GPU."""
    import subprocess
    import sys
    from pathlib import Path

    from moeserve.kernels.moe_configs import default_config, get_config, load_table, table_name

    probe = entries_probe
    cases = probe.parse_cases("ep")
    assert cases == probe.parse_cases(probe.EP_CASES) and len(cases) == 9
    assert probe.parse_cases("default") == probe.parse_cases(probe.CASES)
    plan = probe.build_plan(cases + [("deepseek", "bf16", 512), ("qwen3", "bf16", 512)], memset=False)
    for (key, dtype, m), variants in plan.items():
        s, fp8 = probe.SHAPES[key], dtype == "fp8"
        args = (s.hidden, s.inter, s.top_k, fp8)
        assert variants["table"] == (get_config(m, s.num_experts, *args, global_experts=s.global_experts), False)
        own = bool(load_table(table_name(s.num_experts, s.hidden, s.inter, fp8)))
        if key.startswith("qwen3-ep"):
            assert variants["heuristic"] == (default_config(m, s.num_experts, *args), False)
            assert ("unsharded table" in variants) == own
            if not own:  # the lookup falls back to the unsharded table
                assert variants["table"] == (get_config(m, s.global_experts, *args), False)
        else:
            assert "heuristic" not in variants and "unsharded table" not in variants
    with_memset = probe.build_plan([("qwen3-ep8", "bf16", 512)], memset=True)[("qwen3-ep8", "bf16", 512)]
    assert {"table", "table, memset", "heuristic", "heuristic, memset"} <= set(with_memset)
    cases = [(k, d == "fp8", c) for (k, d, _), vs in plan.items() for c, _ in vs.values()]
    jobs = [(k, fp8, c.block_m, "whole", c) for k, fp8, c in cases]
    unique = probe.whole_jobs(cases)  # what precompile gets: every config once per dtype
    assert sorted(map(str, {(j[1], j[4]) for j in unique})) == sorted(map(str, {(j[1], j[4]) for j in jobs}))
    assert len(unique) == len({(j[1], j[4]) for j in jobs})  # all cases share k = 8
    with pytest.raises(SystemExit, match="bad case"):
        probe.parse_cases("qwen3-ep3:bf16:512")
    cmd = [sys.executable, "benchmarks/moe_entries_probe.py", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=Path(probe.__file__).parents[1])
    assert proc.returncode == 0 and "--cases" in proc.stdout, proc.stderr[-2000:]


def test_entries_probe_plans_all_to_all_rows_without_gpu(entries_probe, monkeypatch):
    """`--cases ep-a2a`: an all-to-all rank's rows are only the tokens with a choice there, and its cases time
    the entry the code picks now (keyed on the choices: M in expectation) against the entry for the rows'
    expected count (what it picked before); `make_inputs` gives such rows."""
    import importlib

    from moeserve.kernels.moe_configs import lookup_tokens

    probe = entries_probe
    plan = probe.build_plan(probe.parse_cases("ep-a2a"), memset=False)
    assert len(plan) == 5
    for (key, _, m), variants in plan.items():
        s = probe.SHAPES[key]
        assert s.rows == "all_to_all"
        assert probe.expected_rows(s, m) < m
        assert variants["keyed on rows"] == (s.table_config(probe.expected_rows(s, m), False), False)
        # The entry the code picks for the expected choices (m * k * E_local / E) is the table entry.
        choices = m * s.top_k * s.num_experts // s.global_experts
        assert lookup_tokens(choices, s.top_k, s.num_experts, s.global_experts) == m
    bench = importlib.import_module("kernels")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    a2a = probe.SHAPES["qwen3-ep8-a2a"]
    _, _, ids = bench.make_inputs(a2a, 4096, 7)
    _, _, all_rows = bench.make_inputs(probe.SHAPES["qwen3-ep8"], 4096, 7)
    assert bool((ids >= 0).any(dim=1).all()) and torch.equal(ids, all_rows[(all_rows >= 0).any(dim=1)])
    assert abs(ids.shape[0] - probe.expected_rows(a2a, 4096)) < 0.03 * ids.shape[0]  # the rows that arrive


def test_tma_scratch_allocator_is_set_in_every_thread():
    """Triton keeps its scratch allocator in a context variable, which a new thread starts without; the TMA
    kernels set it at every launch, so a launch from the engine's step-loop thread finds it too."""
    from moeserve.kernels import fused_moe_tma

    allocation = pytest.importorskip("triton.runtime._allocation")
    if not fused_moe_tma.HAVE_TMA:
        pytest.skip("this Triton has no in-kernel tensor descriptors")
    fused_moe_tma._set_allocator()  # in this thread first, as a warm-up or graph capture would
    seen = []

    def launch_side() -> None:
        fused_moe_tma._set_allocator()
        seen.append(allocation._allocator.get())

    thread = threading.Thread(target=launch_side)
    thread.start()
    thread.join()
    assert seen == [fused_moe_tma._alloc]


def test_weight_block_quant_roundtrip():
    from moeserve.kernels.fp8 import FP8_MAX, dequant_weight_block_fp8, quant_weight_block_fp8

    w = torch.randn(3, 200, 300) * torch.logspace(-2, 1, 300)  # uneven magnitudes, partial edge blocks
    q, s = quant_weight_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2, 3)
    assert q.float().abs().amax() <= FP8_MAX
    back = dequant_weight_block_fp8(q, s)
    # e4m3 keeps 3 mantissa bits: each element within half an ulp (1/16 relative) or its block's tiny floor.
    bound = w.abs() / 16 + s.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :200, :300] * 2**-9
    assert ((back - w).abs() <= bound + 1e-12).all()


# ---------------------------------------------------------------- CPU, Triton interpreter


@launches_interpreter_run
def test_kernels_under_triton_interpreter():
    """Runs the `test_interp_*` tests below in a subprocess with TRITON_INTERPRET=1."""
    run_interpreter_tests(__file__)


def _check_layout(routing, ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    from moeserve.kernels.moe_align import moe_align_reference

    blocks = [(int(e), int(r)) for e, r in zip(routing.block_expert.tolist(), routing.block_rows.tolist())]
    used = [(b, e, r) for b, (e, r) in enumerate(blocks) if e >= 0]
    assert all(e < 0 and r == 0 for e, r in blocks[len(used):]), "unused blocks must follow the used ones"
    got = [(e, sorted(routing.sorted_ids[b * block_m: b * block_m + r].tolist())) for b, e, r in used]
    want = moe_align_reference(ids, num_experts, block_m)
    # Slot order inside one expert is free; compare each expert's set of pairs and its block structure.
    assert [(e, len(p)) for e, p in got] == [(e, len(p)) for e, p in want]
    for e in range(num_experts):
        assert sorted(p for ge, ps in got if ge == e for p in ps) == sorted(
            p for we, ps in want if we == e for p in ps)
    assert not routing.block_ready.any(), "every block's ready count must start at 0 (MoEConfig.overlap)"


class _JunkInt32Torch:
    """torch, but int32 tensors from empty() start as -7 rather than whatever (often zeros) the allocator hands out:
    the module under test sees it in place of torch."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(-7) if t.dtype == torch.int32 else t


def _check_align_twice(ids: torch.Tensor, num_experts: int, block_m: int, method: str | None):
    """Two layouts in a row, of ids and of another routing with other per-expert counts, are both right, and the
    completion counters (the scatter path's scratch) are all 0 after each. The layout's buffers start as junk
    (not the zeros a fresh allocation may hold), so a table entry the align does not write shows. Returns ids'
    layout."""
    from unittest import mock

    from moeserve.kernels.counters import completion_counters
    from moeserve.kernels.moe_align import moe_align

    align_mod = importlib.import_module("moeserve.kernels.moe_align")
    num_tokens, top_k = ids.shape
    other = random_routing(num_tokens, num_experts, top_k, seed=num_tokens + 1, device=str(ids.device))[1]
    layouts = []
    for routing_ids in (ids, other):
        with mock.patch.object(align_mod, "torch", _JunkInt32Torch()):
            layouts.append(moe_align(routing_ids, num_experts, block_m, method=method))
        _check_layout(layouts[-1], routing_ids.cpu(), num_experts, block_m)
        assert not completion_counters(ids.device, 1).any(), "moe_align left a completion counter nonzero"
    return layouts[0]


@interp
@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m",
                         [(1, 4, 2, 16), (37, 6, 3, 16), (50, 9, 4, 32), (70, 5, 4, 16)])
@pytest.mark.parametrize("method", ["single", "ranked", "scatter"])
def test_interp_align_layout(num_tokens, num_experts, top_k, block_m, method):
    _, ids = random_routing(num_tokens, num_experts, top_k, skip_expert=1, seed=num_tokens)
    routing = _check_align_twice(ids, num_experts, block_m, method)
    # Triton compiles a kernel apart per pointer alignment: the tables' must not change with the call's size.
    assert all(t.data_ptr() % 16 == 0 for t in (routing.block_expert, routing.block_rows, routing.block_ready))
    if method == "ranked":  # no atomics: each expert's slots hold its pairs in increasing order
        for b, r in enumerate(routing.block_rows.tolist()):
            got = routing.sorted_ids[b * block_m: b * block_m + r].tolist()
            assert got == sorted(got)


def test_lookup_tokens_gives_the_token_count_the_tables_were_tuned_on():
    """The tables key on M tokens routed top-k uniformly over the model's experts (M*k/E choices per expert):
    all-gather rows (every token) map back to M, all-to-all rows (only tokens with a choice here) to the M
    their choices stand for, not to their row count; redundant slots share the choices."""
    from moeserve.kernels.moe_configs import lookup_tokens

    # Qwen3-30B-A3B, 128 experts, top-8; EP 8: 16 local. 512 tokens give 512*8*16/128 = 512 local choices,
    # which an all-to-all delivers on ~342 rows.
    assert lookup_tokens(512, 8, 16, 128) == 512
    assert lookup_tokens(512 * 8, 8, 128, None) == 512  # unsharded: choices / k
    # With 32 redundant slots (160 in all, 20 per rank) 512 tokens give each slot 512*8/160 = 25.6 choices,
    # 512 per rank: as many per slot as 512*128/160 ~ 410 tokens give the unsharded model's experts.
    assert lookup_tokens(512, 8, 20, 128) == 410
    assert lookup_tokens(0, 8, 16, 128) == 1


def test_fused_moe_and_triton_experts_key_the_table_on_the_choice_count(monkeypatch):
    """TritonExperts turns the dispatcher's choice count into the lookup's token count, and fused_moe looks
    the table up for it; without a count both key on the rows as before."""
    import importlib

    from moeserve.kernels.moe_configs import lookup_tokens
    from moeserve.moe.triton_experts import TritonExperts

    fm = importlib.import_module("moeserve.kernels.fused_moe")
    keys = []

    class Looked(Exception):
        pass

    def spy(num_tokens, *args, **kwargs):
        keys.append(num_tokens)
        raise Looked

    monkeypatch.setattr(fm, "get_config", spy)
    x, w13, w2, tw, ids = random_moe(30, 64, 32, 4, 3, torch.float32, seed=2)
    experts = TritonExperts(global_experts=16)
    for num_pairs in (None, 70):
        with pytest.raises(Looked):
            experts(x, w13, w2, tw, ids, num_pairs=num_pairs)
    assert keys == [30, lookup_tokens(70, 3, 4, 16)]


INTERP_CASES = {
    # name: (M, H, I, E, k, config (block_m, gate_up (n, k), down (n, k)))
    "decode_m1": (1, 64, 32, 4, 2, (16, (16, 32), (32, 32))),
    "ragged_m_and_k": (21, 80, 40, 6, 3, (16, (16, 32), (32, 32))),  # K, N not multiples of the tiles
    "block32_grouped": (40, 64, 48, 5, 2, (32, (32, 64), (16, 16))),
}


def _interp_config(spec, pairs: str = "", swap_ab: bool = False):
    from moeserve.kernels import GemmConfig, MoEConfig

    bm, (gn, gk), (dn, dk) = spec
    return MoEConfig(bm, GemmConfig(gn, gk, 2, 4, 2, swap_ab=swap_ab), GemmConfig(dn, dk, 2, 4, 2, swap_ab=swap_ab),
                     pairs)


@interp
def test_interp_topk_sum_by_slot_equals_by_pair():
    """The top-k sum over rows stored by slot (the Gluon down's layout) through slot_of_pair gives the sum over
    the same rows stored by pair; dropped choices (-1) are skipped in both."""
    from moeserve.kernels.fused_moe import topk_sum
    from moeserve.kernels.moe_align import moe_align

    _, ids = random_routing(23, 5, 3, skip_expert=2, seed=4)
    routing = moe_align(ids, 5, 16)
    g = torch.Generator().manual_seed(5)
    y_pair = torch.randn(ids.numel(), 48, generator=g)
    y_slot = torch.full((routing.sorted_ids.shape[0], 48), float("nan"))  # padding slots must never be read
    slot_of_pair = torch.full((ids.numel(),), -7, dtype=torch.int32)  # dropped pairs' entries are never read
    for b, rows in enumerate(routing.block_rows.tolist()):
        for s in range(b * 16, b * 16 + rows):
            pair = int(routing.sorted_ids[s])
            y_slot[s], slot_of_pair[pair] = y_pair[pair], s
    by_pair = topk_sum(y_pair, ids, 5, torch.empty(23, 48))
    by_slot = topk_sum(y_slot, ids, 5, torch.empty(23, 48), slot_of_pair)
    assert torch.equal(by_slot, by_pair) and (ids < 0).any()


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(INTERP_CASES))
@pytest.mark.parametrize("pairs", ["", "pair", "one"], ids=["aligned", "pairs", "pairs-one-launch"])
@pytest.mark.parametrize("swap_ab", [False, True], ids=["", "transposed"])
def test_interp_fused_moe_matches_reference(case, dtype, pairs, swap_ab):
    from moeserve.kernels import fused_moe, moe_reference

    m, h, i, e, k, spec = INTERP_CASES[case]
    x, w13, w2, tw, ids = random_moe(m, h, i, e, k, dtype, seed=m, skip_expert=e - 1)
    out = fused_moe(x, w13, w2, tw, ids, config=_interp_config(spec, pairs, swap_ab))
    ref = moe_reference(x.double(), w13.double(), w2.double(), tw, ids)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)


@interp
@pytest.mark.parametrize("pairs", [None, "pair", "one"], ids=["default", "pairs", "pairs-one-launch"])
def test_interp_fused_moe_default_config_and_all_dropped(pairs):
    from moeserve.kernels import fused_moe, moe_reference

    x, w13, w2, tw, ids = random_moe(3, 64, 32, 4, 2, torch.float32, seed=7)
    ids[1] = -1  # a token none of whose experts is on this rank gets zeros
    ids[2, 0] = 9  # out of range: dropped like -1
    cfg = _interp_config((16, (16, 32), (32, 32)), pairs) if pairs else None
    out = fused_moe(x, w13, w2, tw, ids, config=cfg)
    assert rel_err(out, moe_reference(x.double(), w13.double(), w2.double(), tw, ids)) < 1e-5
    assert torch.all(out[1] == 0)


@interp
def test_interp_triton_experts_passes_global_count_to_config_lookup(monkeypatch):
    """TritonExperts(global_experts=...) hands the count to the block-size lookup; the result is unchanged."""
    import importlib

    from moeserve.kernels import moe_reference
    from moeserve.moe.triton_experts import TritonExperts

    fused_moe_mod = importlib.import_module("moeserve.kernels.fused_moe")  # the package exports the function
    real, seen = fused_moe_mod.get_config, []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_moe_mod, "get_config", spy)
    x, w13, w2, tw, ids = random_moe(6, 64, 32, 4, 2, torch.float32, seed=11)
    out = TritonExperts(global_experts=128)(x, w13, w2, tw, ids.long())
    assert [kw.get("global_experts") for kw in seen] == [128]
    assert rel_err(out, moe_reference(x.double(), w13.double(), w2.double(), tw, ids)) < 1e-5
    TritonExperts()(x, w13, w2, tw, ids)
    assert seen[-1].get("global_experts") is None


@interp
@pytest.mark.parametrize("shape", [(5, 300), (1, 128), (17, 256)])
def test_interp_token_group_quant_matches_reference(shape):
    from moeserve.kernels.fp8 import per_token_group_quant_fp8, per_token_group_quant_fp8_reference

    x = torch.randn(*shape) * torch.logspace(-3, 2, shape[1])
    x[0, :7] = 0.0  # zeros and tiny values exercise the subnormal range
    q, s = per_token_group_quant_fp8(x)
    q_ref, s_ref = per_token_group_quant_fp8_reference(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    # Division rounding may differ in the last bit and flip an fp8 tie: allow rare one-step differences.
    diff = (q.float() - q_ref.float()).abs()
    assert (diff > 0).float().mean() < 1e-3 and (diff <= q_ref.float().abs() / 8 + 2**-9).all()


@interp
@pytest.mark.parametrize("pairs", ["", "pair"], ids=["aligned", "pairs"])
@pytest.mark.parametrize("swap_ab", [False, True], ids=["", "transposed"])
def test_interp_fp8_fused_moe_matches_quantised_reference(pairs, swap_ab):
    from moeserve.kernels import fused_moe, moe_reference
    from moeserve.kernels.fp8 import quant_weight_block_fp8

    x, w13, w2, tw, ids = random_moe(6, 256, 192, 4, 2, torch.float32, seed=3, skip_expert=0)
    (q13, s13), (q2, s2) = quant_weight_block_fp8(w13), quant_weight_block_fp8(w2)
    cfg = _interp_config((16, (32, 64), (64, 128)), pairs, swap_ab)
    out = fused_moe(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2, config=cfg)
    assert rel_err(out, moe_reference(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2)) < 1e-4
    assert rel_err(out, moe_reference(x, w13, w2, tw, ids)) < 0.1  # the quantisation error itself


PAIRS_KERNELS = ("_gate_up_pairs_kernel", "_down_pairs_kernel")


def spy_compiled(monkeypatch, module: str, name: str, record=None) -> list:
    """Wraps kernel name of module: each launch appends what the launch returned (the compiled kernel on a GPU)
    to the returned list, or calls record(the launch's keyword arguments, that) instead."""
    mod = importlib.import_module(module)
    kernel, seen = getattr(mod, name), []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                compiled = kernel[grid](*args, **kwargs)
                seen.append(compiled) if record is None else record(kwargs, compiled)
                return compiled

            return launch

    monkeypatch.setattr(mod, name, Spy())
    return seen


def spy_pairs_launches(monkeypatch) -> list[tuple[str, bool, object]]:
    """Wraps the pairs path's two kernels: each launch appends (kernel name, its SWAP constant, what the launch
    returned: the compiled kernel on a GPU) to the returned list."""
    seen = []
    for name in PAIRS_KERNELS:
        spy_compiled(monkeypatch, "moeserve.kernels.fused_moe_pairs", name,
                     record=lambda kwargs, compiled, name=name: seen.append((name, kwargs["SWAP"], compiled)))
    return seen


@interp
@pytest.mark.parametrize("swap_ab", [False, True])
def test_interp_pairs_path_launches_with_the_configured_mma_orientation(swap_ab, monkeypatch):
    """The pairs path hands GemmConfig.swap_ab to both of its kernels (outputs alone cannot tell: every MMA row
    of a pairs program holds the same token; the GPU test below checks the instructions)."""
    from moeserve.kernels import fused_moe

    seen = spy_pairs_launches(monkeypatch)
    x, w13, w2, tw, ids = random_moe(3, 64, 32, 4, 2, torch.float32, seed=5)
    fused_moe(x, w13, w2, tw, ids, config=_interp_config((16, (16, 32), (32, 32)), "pair", swap_ab))
    assert [(name, swap) for name, swap, _ in seen] == [(k, swap_ab) for k in PAIRS_KERNELS]


@interp
@pytest.mark.parametrize("case", ["fp16", "fp16 transposed", "fp8", "fp8 act quantised apart"])
def test_interp_pairs_one_launch_equals_two_launches(case, monkeypatch):
    """MoEConfig.pairs = "one" runs gate/up and down in one launch with the bits of the two-launch pairs path,
    including tokens with dropped choices and a token with none here, and leaves every counter it used (down's
    sums, the ticket, the done count, the pairs' ready counts) at 0 for the next launch or graph replay. With fp8
    it needs act quantised in gate/up's epilogue (whole 128-column N tiles); where act takes its own launch
    the call falls back to two launches."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe, moe_reference
    from moeserve.kernels.counters import completion_counters
    from moeserve.kernels.fp8 import quant_weight_block_fp8

    fp8, swap = case.startswith("fp8"), case.endswith("transposed")
    x, w13, w2, tw, ids = random_moe(5, 256 if fp8 else 80, 192 if fp8 else 40, 6, 3,
                                     torch.float32 if fp8 else torch.float16, seed=17, skip_expert=2)
    ids[1] = -1
    ids[3, 1] = 6  # out of range: dropped like -1
    scales = {}
    if fp8:
        (w13, s13), (w2, s2) = quant_weight_block_fp8(w13), quant_weight_block_fp8(w2)
        scales = dict(w13_scale=s13, w2_scale=s2)
    gn = 64 if case.endswith("apart") else 128 if fp8 else 16
    tiles = (GemmConfig(gn, 64 if fp8 else 32, 1, 4, 2, swap_ab=swap), GemmConfig(64, 128 if fp8 else 32, 1, 4, 2,
                                                                              swap_ab=swap))
    launches = spy_compiled(monkeypatch, "moeserve.kernels.fused_moe_pairs", "_pairs_one_kernel")
    two = fused_moe(x, w13, w2, tw, ids, config=MoEConfig(16, *tiles, pairs="pair"), **scales)
    one = fused_moe(x, w13, w2, tw, ids, config=MoEConfig(16, *tiles, pairs="one"), **scales)
    assert len(launches) == (0 if case.endswith("apart") else 1)
    assert torch.equal(one, two) and torch.all(one[1] == 0)
    ref = moe_reference(x, w13, w2, tw, ids, **scales) if fp8 else moe_reference(x.double(), w13.double(),
                                                                                 w2.double(), tw, ids)
    assert rel_err(one, ref) < (1e-4 if fp8 else 2e-3)
    assert not completion_counters(x.device, 1).any()


@interp
def test_interp_pairs_one_launch_down_waits_for_its_pairs_act():
    """Under the interpreter every gate/up tile of the one launch runs before any down tile (tickets follow the
    program order there), so a down tile whose pair's ready count is whole never sleeps, and one whose count
    is short calls the GPU's nanosleep, which the interpreter cannot run. Each valid pair's count one short
    stops the launch: some down program waits for every gate/up tile of its pair. Dropped pairs (no gate/up
    tile counts them) are not waited for: the whole-count run goes through."""
    from triton.runtime.errors import InterpreterError

    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe
    from moeserve.kernels.counters import completion_counters
    from moeserve.kernels.fused_moe_pairs import one_launch_counters

    x, w13, w2, tw, ids = random_moe(3, 64, 48, 5, 2, torch.float32, seed=21)
    ids[0, 1] = -1
    cfg = MoEConfig(16, GemmConfig(16, 32, 1, 4, 2), GemmConfig(32, 32, 1, 4, 2), pairs="one")
    want = fused_moe(x, w13, w2, tw, ids, config=dataclasses.replace(cfg, pairs="pair"))
    assert torch.equal(fused_moe(x, w13, w2, tw, ids, config=cfg), want)
    ready = one_launch_counters(3, 64, 32, ids.numel())[1]  # pair 0's ready count
    counters = completion_counters(x.device, 1)
    try:
        for pair in (ids.flatten() >= 0).nonzero().flatten().tolist():
            counters[ready + pair] = -1
            with pytest.raises(InterpreterError, match="inline_asm not supported"):  # the sleep between reads
                fused_moe(x, w13, w2, tw, ids, config=cfg)
            counters.zero_()
    finally:
        counters.zero_()


TMA_LOADS = [("tma", False), ("tma", True), ("tma_gathered", False), ("tma_gathered", True)]


def _tma_config(loads: str, ws: bool, bm: int = 16, gate_up=(16, 32), down=(32, 32)):
    from moeserve.kernels import GemmConfig, MoEConfig

    return MoEConfig(bm, GemmConfig(*gate_up, 2, 4, 2, loads, ws), GemmConfig(*down, 2, 4, 2, loads, ws))


@interp
@pytest.mark.parametrize("loads,ws", TMA_LOADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_tma_loads_match_reference(loads, ws, dtype):
    """Tiles by tensor descriptor (weights, down's activations, and gathered token rows) give the reference."""
    from moeserve.kernels import fused_moe, moe_reference
    from moeserve.kernels.fused_moe_tma import tma_ok

    x, w13, w2, tw, ids = random_moe(37, 64, 32, 5, 3, dtype, seed=5, skip_expert=2)
    cfg = _tma_config(loads, ws)
    assert tma_ok(cfg.gate_up, 32, 64, 16, x.device) and tma_ok(cfg.down, 64, 32, 16, x.device)
    out = fused_moe(x, w13, w2, tw, ids, config=cfg)
    ref = moe_reference(x.double(), w13.double(), w2.double(), tw, ids)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)


@interp
def test_interp_tma_config_falls_back_where_tiles_do_not_fit():
    """I = 48 is no multiple of the 32-wide gate/up tile: that GEMM loads by pointer, results unchanged."""
    from moeserve.kernels import fused_moe, moe_reference
    from moeserve.kernels.fused_moe_tma import tma_ok

    x, w13, w2, tw, ids = random_moe(21, 64, 48, 6, 3, torch.float32, seed=21)
    cfg = _tma_config("tma_gathered", True, gate_up=(32, 32), down=(32, 16))
    assert not tma_ok(cfg.gate_up, 48, 64, 16, x.device) and tma_ok(cfg.down, 64, 48, 16, x.device)
    out = fused_moe(x, w13, w2, tw, ids, config=cfg)
    assert rel_err(out, moe_reference(x.double(), w13.double(), w2.double(), tw, ids)) < 1e-5


@interp
@pytest.mark.parametrize("loads", ["tma", "tma_gathered"])
def test_interp_fp8_tma_loads_match_quantised_reference(loads):
    from moeserve.kernels import fused_moe, moe_reference
    from moeserve.kernels.fp8 import quant_weight_block_fp8

    x, w13, w2, tw, ids = random_moe(6, 256, 128, 4, 2, torch.float32, seed=3, skip_expert=0)
    (q13, s13), (q2, s2) = quant_weight_block_fp8(w13), quant_weight_block_fp8(w2)
    cfg = _tma_config(loads, False, gate_up=(32, 64), down=(64, 128))
    out = fused_moe(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2, config=cfg)
    assert rel_err(out, moe_reference(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2)) < 1e-4


def routing_with_counts(counts: list[int], drop: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_weights [M, 1] float32, topk_ids [M, 1] int32 in shuffled order: expert e chosen counts[e] times,
    plus drop choices of -1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([e for e, c in enumerate(counts) for _ in range(c)] + [-1] * drop, dtype=torch.int32)
    ids = ids[torch.randperm(len(ids), generator=g)][:, None]
    return torch.rand(len(ids), 1, generator=g) + 0.1, ids


def tile_height(rows: int, block_m: int, short_m: int, mid_m: bool = False) -> int:
    """The tile height a block of rows valid rows runs (`GemmConfig.short_m`, `GemmConfig.mid_m`)."""
    heights = (short_m, 2 * short_m, 3 * short_m if mid_m else 0, block_m)
    return next(h for h in heights if h and h <= block_m and rows <= h)


def tile_heights(ids: torch.Tensor, num_experts: int, block_m: int, short_m: int, mid_m: bool = False) -> list[int]:
    """The tile height each used block of ids' aligned layout (`moe_align_reference`) runs."""
    from moeserve.kernels.moe_align import moe_align_reference

    return [tile_height(len(pairs), block_m, short_m, mid_m)
            for _, pairs in moe_align_reference(ids, num_experts, block_m)]


# Expert row counts that give blocks of every height at block_m 64, short_m 16: 12 -> 16, 28 -> 32, 50 -> 64,
# 75 -> 64 + 16; with mid_m, 40 -> 48 (32 + 16).
SHORT_COUNTS = [12, 28, 50, 75]
MID_COUNTS = [12, 28, 40, 50, 75]


@pytest.fixture
def nan_act(monkeypatch):
    """gate/up's act buffer starts as NaN instead of whatever torch.empty holds, so a row a tile does not write
    stays NaN, and a padding row that leaked into an output would show."""
    import importlib

    fused_moe_mod = importlib.import_module("moeserve.kernels.fused_moe")  # the package exports the function
    real = fused_moe_mod.new_act

    def poisoned(*args, **kwargs):
        act = real(*args, **kwargs)
        return act.fill_(float("nan")) if act.is_floating_point() and act.element_size() > 1 else act

    monkeypatch.setattr(fused_moe_mod, "new_act", poisoned)


@interp
@pytest.mark.usefixtures("nan_act")
@pytest.mark.parametrize("loads,dtype", [("ptr", torch.float32), ("ptr", torch.float16), ("tma", torch.float16),
                                         ("tma_gathered", torch.float32)])
def test_interp_short_tiles_match_reference(loads, dtype):
    """short_m 16 (tiles of 16, 32 and 64 rows) and 32 (32 and 64) at block_m 64, in each GEMM alone and in
    both: every height runs in one call. act starts as NaN, so down reading rows gate/up's shorter tile left
    unwritten must keep them out of the output."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe, moe_reference

    tw, ids = routing_with_counts(SHORT_COUNTS)
    x, w13, w2, _, _ = random_moe(len(ids), 64, 32, len(SHORT_COUNTS), 1, dtype, seed=1)
    assert set(tile_heights(ids, 4, 64, 16)) == {16, 32, 64} and set(tile_heights(ids, 4, 64, 32)) == {32, 64}
    ref = moe_reference(x.double(), w13.double(), w2.double(), tw, ids)
    for gate_up_short, down_short in ((16, 16), (32, 32), (16, 0), (0, 32)):
        cfg = MoEConfig(64, GemmConfig(16, 32, 2, 4, 2, loads, short_m=gate_up_short),
                        GemmConfig(32, 32, 2, 4, 2, loads, short_m=down_short))
        out = fused_moe(x, w13, w2, tw, ids, config=cfg)
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3), (gate_up_short, down_short)


@interp
@pytest.mark.usefixtures("nan_act")
@pytest.mark.parametrize("short_m", [16, 32])
def test_interp_short_tiles_write_only_their_rows(short_m):
    """Each block's gate/up tile is the smallest height that holds its rows: rows below that height of act are
    written, the rest of the block's rows keep the NaN act started with. Fails if every block ran block_m."""
    from moeserve.kernels import GemmConfig
    from moeserve.kernels.fused_moe import gate_up
    from moeserve.kernels.moe_align import moe_align

    tw, ids = routing_with_counts(SHORT_COUNTS)
    x, w13, _, _, _ = random_moe(len(ids), 64, 32, len(SHORT_COUNTS), 1, torch.float32, seed=3)
    routing = moe_align(ids, len(SHORT_COUNTS), 64)
    act = gate_up(x, w13, routing, 1, GemmConfig(16, 32, 2, 4, 2, short_m=short_m), x.dtype)
    written = act.view(-1, 64, act.shape[1]).isfinite().all(dim=2)  # [blocks, 64]: whole rows written
    ran = []
    for block in (routing.block_expert >= 0).nonzero().flatten().tolist():
        rows = int(routing.block_rows[block])
        ran.append(tile_height(rows, 64, short_m))
        assert written[block, :ran[-1]].all() and not written[block, ran[-1]:].any(), (block, rows, ran[-1])
    assert sorted(ran) == sorted(tile_heights(ids, len(SHORT_COUNTS), 64, short_m)) and short_m in ran


@interp
@pytest.mark.parametrize("swap_ab,mid_m,tail_m", [(False, False, False), (True, False, False), (True, True, False),
                                                  (False, False, True), (True, True, True)])
def test_interp_fp8_short_tiles_match_quantised_reference(swap_ab, mid_m, tail_m):
    """fp8 weights and activations with tiles of every height (per-row scales follow each tile's rows), also
    with the MMAs transposed (the weight-block scales then run along the accumulator's rows), alone and with
    48-row tiles of 32 + 16 rows whose second tile takes its own rows' scales, and with tail tiles (the
    second tile's rows and scales from the next block); gate/up quantises act in its epilogue, for each tile.
    With swap_ab or tail_m, in each GEMM alone and in both."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe, moe_reference
    from moeserve.kernels.fp8 import quant_weight_block_fp8

    counts = TAIL_COUNTS if tail_m else MID_COUNTS if mid_m else SHORT_COUNTS
    tw, ids = routing_with_counts(counts, seed=2)
    if mid_m:
        assert set(tile_heights(ids, len(counts), 64, 16, mid_m=True)) == {16, 32, 48, 64}
    x, w13, w2, _, _ = random_moe(len(ids), 256, 128, len(counts), 1, torch.float32, seed=2)
    (q13, s13), (q2, s2) = quant_weight_block_fp8(w13), quant_weight_block_fp8(w2)
    ref = moe_reference(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2)
    tiles, plain = dict(short_m=16, swap_ab=swap_ab, mid_m=mid_m, tail_m=tail_m), dict(short_m=16)
    combos = [(tiles, tiles), (tiles, plain), (plain, tiles)] if swap_ab or tail_m else [(tiles, tiles)]
    for gu, dn in combos:
        cfg = MoEConfig(64, GemmConfig(128, 64, 2, 4, 2, **gu), GemmConfig(64, 128, 2, 4, 2, **dn))
        out = fused_moe(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2, config=cfg)
        assert rel_err(out, ref) < 1e-4, (gu, dn)


@interp
@pytest.mark.usefixtures("nan_act")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("short_m,mid_m,ragged", [(0, False, False), (16, False, False), (16, True, False),
                                                  (16, True, True)])
def test_interp_swapped_mma_and_mid_tiles_match_reference(dtype, short_m, mid_m, ragged):
    """swap_ab (the MMAs transposed: weight rows on the M side, tokens on the N side), alone, with short tiles,
    and with mid_m at block_m 64, short_m 16, where a block of 33-48 rows runs a 48-row tile as a 32-row and a
    16-row MMA tile sharing each weight tile; ragged: H = 80 and I = 40, no whole tiles (masked loads and
    stores). Outputs equal the reference, in each GEMM alone and in both, and gate/up writes exactly the rows of
    each block's tile."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe, moe_reference
    from moeserve.kernels.fused_moe import gate_up
    from moeserve.kernels.moe_align import moe_align

    tw, ids = routing_with_counts(MID_COUNTS, seed=4)
    h, i = (80, 40) if ragged else (64, 32)
    x, w13, w2, _, _ = random_moe(len(ids), h, i, len(MID_COUNTS), 1, dtype, seed=4)
    if mid_m:
        assert set(tile_heights(ids, len(MID_COUNTS), 64, 16, mid_m=True)) == {16, 32, 48, 64}
    ref = moe_reference(x.double(), w13.double(), w2.double(), tw, ids)
    plain = dict(short_m=short_m)
    swapped = dict(short_m=short_m, swap_ab=True, mid_m=mid_m)
    for gu, dn in ((swapped, swapped), (swapped, plain), (plain, swapped)):
        cfg = MoEConfig(64, GemmConfig(16, 32, 2, 4, 2, **gu), GemmConfig(32, 32, 2, 4, 2, **dn))
        out = fused_moe(x, w13, w2, tw, ids, config=cfg)
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3), (gu, dn)
    if not short_m:
        return
    routing = moe_align(ids, len(MID_COUNTS), 64)
    act = gate_up(x, w13, routing, 1, GemmConfig(16, 32, 2, 4, 2, **swapped), x.dtype)
    written = act.view(-1, 64, act.shape[1]).isfinite().all(dim=2)  # [blocks, 64]: whole rows written
    for block in (routing.block_expert >= 0).nonzero().flatten().tolist():
        ran = tile_height(int(routing.block_rows[block]), 64, 16, mid_m=mid_m)
        assert written[block, :ran].all() and not written[block, ran:].any(), (block, ran)


# Expert row counts at block_m 64, short_m 16, in block order: 70 = 64 + a 6-row tail (the first block takes it),
# 12 (one short block after another expert's tail), 64, 10 (one short block right after another expert's full
# block: not a tail), 140 = 64 + 64 + a 12-row tail, 80 = 64 + a tail of exactly 16 rows, 81 = 64 + 17 (too long
# for a tail: a 32-row tile of its own), 40.
TAIL_COUNTS = [70, 12, 64, 10, 140, 80, 81, 40]


def block_tiles(ids: torch.Tensor, num_experts: int, block_m: int, short_m: int, mid_m: bool = False,
                tail_m: bool = False) -> list[tuple[int, int, int]]:
    """(block, ROWS, ROWS2) of each program of ids' aligned layout that runs a tile, in block order: the
    `tile_height` of its rows (a mid tile as 2 * short_m + short_m); with tail_m, a full block followed by its
    expert's tail of at most short_m rows runs block_m + short_m, and the tail's own program nothing."""
    from moeserve.kernels.moe_align import moe_align_reference

    blocks = moe_align_reference(ids, num_experts, block_m)

    def is_tail(i):
        return 0 < i < len(blocks) and blocks[i - 1][0] == blocks[i][0] and len(blocks[i][1]) <= short_m

    tiles = []
    for b, (_, pairs) in enumerate(blocks):
        height = tile_height(len(pairs), block_m, short_m, mid_m)
        if tail_m and is_tail(b):
            continue
        tiles.append((b, block_m, short_m) if tail_m and is_tail(b + 1) else
                     (b, 2 * short_m, short_m) if height == 3 * short_m else (b, height, 0))
    return tiles


def spy_block_tiles(monkeypatch) -> dict[str, list]:
    """Wraps the aligned pointer-load kernels' per-block functions (the interpreter calls them as Python): each
    program's call appends (block, ROWS, ROWS2) to the list of its GEMM, "gate_up" or "down"."""
    fused_moe_mod = importlib.import_module("moeserve.kernels.fused_moe")
    seen = {"gate_up": [], "down": []}

    def spy(real, calls):
        def block_fn(block, *args):
            calls.append((int(block[0]), int(args[-2]), int(args[-1])))
            return real(block, *args)

        return block_fn

    for gemm, name in (("gate_up", "_gate_up_block"), ("down", "_down_block")):
        monkeypatch.setattr(fused_moe_mod, name, spy(getattr(fused_moe_mod, name), seen[gemm]))
    return seen


@interp
@pytest.mark.usefixtures("nan_act")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("swap_ab,mid_m,ragged", [(False, False, False), (True, False, False), (True, True, False),
                                                  (True, True, True)])
def test_interp_tail_tiles_match_reference(dtype, swap_ab, mid_m, ragged, monkeypatch):
    """tail_m at block_m 64, short_m 16: a full block followed by its expert's tail of at most 16 rows runs
    both as one 80-row tile (64 + 16 rows sharing each weight tile) and the tail's own program does nothing;
    longer tails, single blocks and mid tiles run as without it. Plain and transposed MMAs, with mid tiles, and
    ragged (H = 80, I = 40: masked loads and stores). Outputs equal the reference, in each GEMM alone and in
    both, and the programs ran exactly the expected tiles."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe, moe_reference

    seen = spy_block_tiles(monkeypatch)
    tw, ids = routing_with_counts(TAIL_COUNTS, seed=6)
    h, i = (80, 40) if ragged else (64, 32)
    x, w13, w2, _, _ = random_moe(len(ids), h, i, len(TAIL_COUNTS), 1, dtype, seed=6)
    ref = moe_reference(x.double(), w13.double(), w2.double(), tw, ids)
    tiles = {tail_m: block_tiles(ids, len(TAIL_COUNTS), 64, 16, mid_m, tail_m) for tail_m in (False, True)}
    assert len(tiles[True]) == len(tiles[False]) - 3  # the tails of the 70-, 140- and 80-row experts
    assert sum(t[1:] == (64, 16) for t in tiles[True]) == 3 and (64, 16) not in {t[1:] for t in tiles[False]}
    assert tiles[True][0] == (0, 64, 16)  # block 0 takes block 1 along
    plain = dict(short_m=16, swap_ab=swap_ab, mid_m=mid_m)
    tail = dict(plain, tail_m=True)
    for gu, dn in ((tail, tail), (tail, plain), (plain, tail)):
        seen["gate_up"].clear(), seen["down"].clear()
        cfg = MoEConfig(64, GemmConfig(16, 32, 2, 4, 2, **gu), GemmConfig(32, 32, 2, 4, 2, **dn))
        out = fused_moe(x, w13, w2, tw, ids, config=cfg)
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3), (gu, dn)
        for gemm, g in (("gate_up", gu), ("down", dn)):
            assert sorted(set(seen[gemm])) == tiles[g.get("tail_m", False)], (gemm, gu, dn)  # every N tile


def spy_routing(monkeypatch) -> list:
    """Wraps fused_moe's align: each call's `AlignedRouting` is appended to the returned list."""
    fused_moe_mod = importlib.import_module("moeserve.kernels.fused_moe")
    seen = []
    real = fused_moe_mod.moe_align

    def align(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(fused_moe_mod, "moe_align", align)
    return seen


OVERLAP_TAILS = [(False, False), (True, True), (True, False), (False, True)]


# Every tail combination in fp16; the slower variants (fp8 takes 10-19 s a case in the interpreter) with both
# tails and one other combination each, so that CI keeps its time.
OVERLAP_CASES = ([("fp16", *tails) for tails in OVERLAP_TAILS]
                 + [("fp16 transposed mid", True, True), ("fp16 transposed mid", True, False),
                    ("fp8", True, True), ("fp8", False, True), ("fp8 act quantised apart", True, True)])


@interp
@pytest.mark.usefixtures("nan_act")
@pytest.mark.parametrize("variant,gu_tail,dn_tail", OVERLAP_CASES)
def test_interp_overlap_counts_every_block_and_matches(variant, gu_tail, dn_tail, monkeypatch):
    """MoEConfig.overlap: gate/up counts each block's N tiles as written, down waits for them. Every used block,
    a tail block whose rows its expert's previous block wrote too, ends at gate/up's N-tile count (a block
    short of it would keep down waiting forever on the GPU), unused ones at 0; the outputs are bit-identical to
    the same tiles without overlap. Tail tiles in either GEMM; fp16, also with transposed MMAs and mid tiles;
    fp8 with act quantised in gate/up's epilogue; and fp8 with act quantised by its own launch, where down does
    not follow gate/up directly, so nothing overlaps (no counts)."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe
    from moeserve.kernels.fp8 import quant_weight_block_fp8

    fp8, apart = variant.startswith("fp8"), variant.endswith("apart")
    routings = spy_routing(monkeypatch)
    tw, ids = routing_with_counts(TAIL_COUNTS, seed=8)
    h, i = (128, 384) if fp8 else (64, 96)  # 3 gate/up N tiles of 128 (fp8) or 32 columns
    x, w13, w2, _, _ = random_moe(len(ids), h, i, len(TAIL_COUNTS), 1, torch.float32 if fp8 else torch.float16,
                                  seed=8)
    scales = {}
    if fp8:
        (w13, s13), (w2, s2) = quant_weight_block_fp8(w13), quant_weight_block_fp8(w2)
        scales = dict(w13_scale=s13, w2_scale=s2)
    bn, bk = (128, 64) if fp8 else (32, 32)
    mid = dict(swap_ab=True, mid_m=True) if variant.endswith("mid") else {}
    gu = GemmConfig(bn, bk, 1, 4, 2, short_m=16, tail_m=gu_tail, **mid)
    dn = GemmConfig(32, bk, 2, 4, 2, short_m=16, tail_m=dn_tail, **mid)
    plain = MoEConfig(64, gu, dn, fuse_act_quant=not apart)
    out = fused_moe(x, w13, w2, tw, ids, config=plain, **scales)
    assert not routings[-1].block_ready.any()  # nothing counts without overlap
    overlapped = fused_moe(x, w13, w2, tw, ids, config=dataclasses.replace(plain, overlap=True), **scales)
    assert torch.equal(overlapped, out) and torch.isfinite(out).all()
    used = routings[-1].block_expert >= 0
    assert used.sum() == len(block_tiles(ids, len(TAIL_COUNTS), 64, 16))
    assert routings[-1].block_ready.tolist() == [0 if apart or not u else 3 for u in used.tolist()]


@interp
@pytest.mark.parametrize("gu_tail,dn_tail", OVERLAP_TAILS)
def test_interp_overlapped_down_waits_for_every_block_it_reads(gu_tail, dn_tail):
    """Under the interpreter gate/up has ended before down starts, so an overlapped down program whose counts are
    whole never sleeps, and one whose count is short calls the GPU's nanosleep, which the interpreter cannot
    run. With whole counts down runs through (and equals the reference); with any one used block's count one
    short, down stops: some program waits for the act of every block (its own program, or for a tail tile the
    block before's). A down that waited for fewer tiles, or not for a tail's block, would run through."""
    from triton.runtime.errors import InterpreterError

    from moeserve.kernels import GemmConfig, moe_reference
    from moeserve.kernels.fused_moe import down, gate_up, topk_sum
    from moeserve.kernels.moe_align import moe_align

    e = len(TAIL_COUNTS)
    tw, ids = routing_with_counts(TAIL_COUNTS, seed=9)
    x, w13, w2, _, _ = random_moe(len(ids), 64, 96, e, 1, torch.float32, seed=9)
    gu = GemmConfig(32, 32, 1, 4, 2, short_m=16, tail_m=gu_tail)
    dn = GemmConfig(32, 32, 2, 4, 2, short_m=16, tail_m=dn_tail)
    routing = moe_align(ids, e, 64)
    act = gate_up(x, w13, routing, 1, gu, x.dtype, mark_ready=True)
    whole = routing.block_ready.clone()
    y, slot_of_pair = down(act, w2, tw, routing, dn, x.dtype, after_gate_up=gu)
    assert slot_of_pair is None  # rows by pair
    out = topk_sum(y, ids, e, torch.empty_like(x))
    assert rel_err(out, moe_reference(x.double(), w13.double(), w2.double(), tw, ids)) < 1e-5
    for b in (routing.block_expert >= 0).nonzero().flatten().tolist():
        routing.block_ready.copy_(whole)
        routing.block_ready[b] -= 1
        with pytest.raises(InterpreterError, match="inline_asm not supported"):  # the sleep between reads
            down(act, w2, tw, routing, dn, x.dtype, after_gate_up=gu)


def test_config_overlap_needs_the_aligned_pointer_path():
    from moeserve.kernels import GemmConfig, MoEConfig

    for gate_up, down, pairs in ((GemmConfig(32, 64, loads="tma"), GemmConfig(32, 64), ""),
                                 (GemmConfig(32, 64), GemmConfig(32, 64, loads="tma"), ""),
                                 (GemmConfig(32, 64), GemmConfig(32, 64), "pair")):
        with pytest.raises(ValueError, match="overlap needs the aligned path with pointer loads in both GEMMs"):
            MoEConfig(16, gate_up, down, pairs=pairs, overlap=True)
    ok = MoEConfig(64, GemmConfig(32, 64), GemmConfig(32, 64), overlap=True)
    assert MoEConfig.from_dict(ok.to_dict()) == ok
    assert MoEConfig.from_dict({k: v for k, v in ok.to_dict().items() if k != "overlap"}).overlap is False


def test_config_one_launch_has_one_warp_count_and_pipeline_depth():
    """pairs="one" runs both GEMMs in one launch, so down's warps and stages must be gate/up's; fitting the
    tiles to shared memory (fp32 operands need fewer stages) keeps them equal."""
    from moeserve.kernels import GemmConfig, MoEConfig
    from moeserve.kernels.moe_configs import fit_shared_memory

    for down in (GemmConfig(64, 128, 1, 4, 3), GemmConfig(64, 128, 1, 8, 4)):
        with pytest.raises(ValueError, match=r"pairs='one'.*down's \(num_warps, num_stages\)"):
            MoEConfig(16, GemmConfig(64, 128, 1, 4, 4), down, pairs="one")
    one = MoEConfig(16, GemmConfig(64, 128, 1, 4, 6), GemmConfig(256, 128, 1, 4, 6), pairs="one")
    fitted = fit_shared_memory(one, 4)  # in fp32 gate/up's tiles fit 3 stages, down's 1
    assert fitted.gate_up.num_stages == fitted.down.num_stages == 1
    assert fit_shared_memory(one, 1) == one  # fp8 tiles fit 6 stages


def test_config_tile_options_say_what_they_need():
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe

    for bad, why in ((dict(swap_ab=True, loads="tma"), "swap_ab needs pointer loads"),
                     (dict(short_m=16, mid_m=True), "mid_m needs swap_ab and short_m = block_m / 4"),
                     (dict(short_m=32, swap_ab=True, mid_m=True), "mid_m needs swap_ab and short_m = block_m / 4"),
                     (dict(tail_m=True), "tail_m needs short_m .* and pointer loads; got short_m=0"),
                     (dict(short_m=16, tail_m=True, loads="tma"), "tail_m needs short_m .* loads='tma'"),
                     (dict(dynamic_tiles=True, loads="tma"), "dynamic_tiles is for the persistent Gluon kernel")):
        with pytest.raises(ValueError, match=why):
            MoEConfig(64, GemmConfig(32, 64, **bad), GemmConfig(32, 64))
    MoEConfig(16, GemmConfig(32, 64, swap_ab=True), GemmConfig(32, 64), pairs="pair")  # the pairs path takes it
    ok = MoEConfig(64, GemmConfig(32, 64, short_m=16, swap_ab=True, mid_m=True), GemmConfig(32, 64))
    assert MoEConfig.from_dict(ok.to_dict()) == ok
    old = MoEConfig.from_dict({**ok.to_dict(), "gate_up": {"block_n": 32, "block_k": 64}})  # a table before them
    assert old.gate_up.swap_ab is False and old.gate_up.mid_m is False
    x = torch.randn(4, 128)
    w13, w2 = torch.zeros(2, 256, 128, dtype=torch.float8_e4m3fn), torch.zeros(2, 128, 128, dtype=torch.float8_e4m3fn)
    s13, s2 = torch.ones(2, 2, 1), torch.ones(2, 1, 1)
    ids, tw = torch.zeros(4, 1, dtype=torch.int32), torch.ones(4, 1)
    with pytest.raises(ValueError, match="fp8 needs block_k dividing 128, got"):  # one scale group per k step
        fused_moe(x, w13, w2, tw, ids, w13_scale=s13, w2_scale=s2,
                  config=MoEConfig(64, GemmConfig(32, 256), GemmConfig(32, 64)))
    from moeserve.kernels.moe_tiles import aligned_ptr_meta

    meta = aligned_ptr_meta(ok.gate_up)  # what the aligned pointer-load kernels are given
    assert meta["SWAP"] is True and meta["MID_M"] is True and meta["TAIL_M"] is False
    assert aligned_ptr_meta(GemmConfig(32, 64, short_m=16, tail_m=True))["TAIL_M"] is True


@pytest.mark.parametrize("short_m,block_m,pairs,why", [
    (8, 32, "", r"block_m 32 takes \[16\]"), (24, 64, "", r"block_m 64 takes \[32, 16\]"),
    (16, 128, "", r"block_m 128 takes \[64, 32\]"), (16, 16, "", "block_m 16 takes none"),
    (16.0, 64, "", r"block_m 64 takes \[32, 16\].*got 16\.0"), (16, 32, "pair", "the pairs path takes none")])
def test_config_rejects_short_tiles_it_cannot_build(short_m, block_m, pairs, why):
    from moeserve.kernels import GemmConfig, MoEConfig
    from moeserve.kernels.moe_configs import short_heights

    with pytest.raises(ValueError, match="short_m must be 0 or a short tile height: " + why):
        MoEConfig(block_m, GemmConfig(32, 64, short_m=short_m), GemmConfig(32, 64), pairs=pairs)
    assert short_heights(128) == (64, 32) and short_heights(32) == (16,) and short_heights(16) == ()


FUSED_QUANT_CASES = {
    # id: (I, gate_up and down loads, pairs, gate_up (block_n, block_k)); H = 256, down tile (64, 128)
    "ptr_n128": (256, "ptr", "", (128, 64)),
    "ptr_n256": (256, "ptr", "", (256, 128)),
    "ptr_ragged_i": (320, "ptr", "", (256, 64)),  # last N tile: a part group, then a group wholly past I
    "tma_n128": (256, "tma", "", (128, 64)),
    "tma_gathered_n256": (256, "tma_gathered", "", (256, 64)),
    "pairs_n128": (256, "ptr", "pair", (128, 64)),
    "pairs_ragged_i": (320, "ptr", "pair", (256, 64)),
}


def _fused_vs_separate_act_quant(monkeypatch, args: tuple, scales: dict, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_moe(*args) twice: act quantised in gate/up's epilogue, then by the separate launch (cfg with
    fuse_act_quant=False). Asserts each route ran its own quantisation launches (1 = hidden only, 2 = + act)."""
    from moeserve.kernels import fused_moe
    from moeserve.kernels.moe_tiles import act_quant_fusable

    # Every driver calls the quantisation through its module, so patching it there counts them all.
    fp8_module = importlib.import_module("moeserve.kernels.fp8")
    launches = []
    quant = fp8_module.per_token_group_quant_fp8
    monkeypatch.setattr(fp8_module, "per_token_group_quant_fp8", lambda t: launches.append(t.shape) or quant(t))
    assert act_quant_fusable(cfg)
    fused = fused_moe(*args, config=cfg, **scales)
    assert len(launches) == 1, launches
    separate = fused_moe(*args, config=dataclasses.replace(cfg, fuse_act_quant=False), **scales)
    assert len(launches) == 3, launches
    return fused, separate


@interp
@pytest.mark.parametrize("case", sorted(FUSED_QUANT_CASES))
def test_interp_fp8_act_quant_in_epilogue_equals_separate_launch(case, monkeypatch):
    """gate/up quantising act in its epilogue gives the bits of the separate quantisation launch."""
    from moeserve.kernels import GemmConfig, MoEConfig, moe_reference
    from moeserve.kernels.counters import completion_counters
    from moeserve.kernels.fp8 import quant_weight_block_fp8
    from moeserve.kernels.fused_moe_tma import tma_ok

    inter, loads, pairs, (gn, gk) = FUSED_QUANT_CASES[case]
    x, w13, w2, tw, ids = random_moe(9, 256, inter, 4, 2, torch.float16, seed=inter, skip_expert=0)
    (q13, s13), (q2, s2) = quant_weight_block_fp8(w13), quant_weight_block_fp8(w2)
    scales = dict(w13_scale=s13, w2_scale=s2)
    cfg = MoEConfig(16, GemmConfig(gn, gk, 2, 4, 2, loads), GemmConfig(64, 128, 2, 4, 2, loads), pairs)
    assert tma_ok(cfg.gate_up, inter, 256, 16, x.device) == (loads != "ptr")
    fused, separate = _fused_vs_separate_act_quant(monkeypatch, (x, q13, q2, tw, ids), scales, cfg)
    assert torch.equal(fused, separate)
    # fp16 output and act rounding: this file's fp16 tolerance (the fp32 fp8 tests above hold 1e-4).
    assert rel_err(fused, moe_reference(x, q13, q2, tw, ids, **scales)) < 2e-3
    assert not completion_counters(x.device, 1).any()  # the pairs path leaves its counters at 0


# ---------------------------------------------------------------- GPU

TARGETS = {
    # name: (E on this rank, experts routed over, k, H, I)
    "qwen3": (128, 128, 8, 2048, 768),
    "deepseek_ep8": (32, 256, 8, 7168, 2048),
    "mixtral": (8, 8, 2, 4096, 14336),
}


def skewed_ids(m: int, name: str, seed: int) -> torch.Tensor:
    """[m, k] int32 choices (on the CPU) of a routing skewed across experts, popular and rare ones, so that
    experts' pair counts spread; -1 for experts not on this rank."""
    e, routed, k, _, _ = TARGETS[name]
    g = torch.Generator().manual_seed(seed)
    bias = torch.linspace(0.2, 1.0, routed)[torch.randperm(routed, generator=g)]
    ids = (torch.rand(m, routed, generator=g) * bias).topk(k, dim=1).indices
    return torch.where(ids < e, ids, -1).to(torch.int32)


def _target_inputs(name: str, m: int, fp8: bool, seed: int = 0, ids: torch.Tensor | None = None):
    """x, w13, w2, topk weights, topk ids and (fp8) the weight scales of a target shape on the GPU; ids: the
    choices to use (else uniform top-k, with at least one on this rank)."""
    from moeserve.kernels.fp8 import quant_weight_block_fp8

    e, routed, k, h, i = TARGETS[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, h, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(e, 2 * i, h, device="cuda", generator=g) * h**-0.5).bfloat16()
    w2 = (torch.randn(e, h, i, device="cuda", generator=g) * i**-0.5).bfloat16()
    if ids is not None:
        ids = ids.cuda()
    else:
        ids = torch.rand(m, routed, device="cuda", generator=g).topk(k, dim=1).indices
        ids = torch.where(ids < e, ids, -1).to(torch.int32)
        ids[0, 0] = 3  # at least one choice on this rank, or the output (and the error's denominator) is zero
    tw = torch.softmax(torch.randn(m, k, device="cuda", generator=g), dim=1)
    scales = {}
    if fp8:
        (w13, s13), (w2, s2) = quant_weight_block_fp8(w13), quant_weight_block_fp8(w2)
        scales = dict(w13_scale=s13, w2_scale=s2)
    return x, w13, w2, tw, ids, scales


def _target_ref(x, w13, w2, tw, ids, scales: dict) -> torch.Tensor:
    """fp8 (scales given): the same quantised weights in the reference; bf16: the reference in fp32."""
    from moeserve.kernels import moe_reference

    if scales:
        return moe_reference(x, w13, w2, tw, ids, **scales)
    return moe_reference(x, w13, w2, tw, ids, compute_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("m", [1, 77, 256, 300, 512, 2048, 4096])
def test_gpu_bf16_target_shapes(name, m):
    from moeserve.kernels import fused_moe, moe_reference

    x, w13, w2, tw, ids, _ = _target_inputs(name, m, False, seed=m)
    out = fused_moe(x, w13, w2, tw, ids)
    ref = moe_reference(x, w13, w2, tw, ids, compute_dtype=torch.float32)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("m", [16, 300])
def test_gpu_fp8_target_shapes(name, m):
    from moeserve.kernels import fused_moe, moe_reference

    x, w13, w2, tw, ids, scales = _target_inputs(name, m, True, seed=m)
    out = fused_moe(x, w13, w2, tw, ids, **scales)
    # Same quantisation in the reference: only accumulation order and bf16 rounding of act differ.
    assert rel_err(out, moe_reference(x, w13, w2, tw, ids, **scales)) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name,m,pairs", [("qwen3", 512, False), ("mixtral", 512, False), ("qwen3", 6, True)],
                         ids=["qwen3-m512", "mixtral-m512-tma", "qwen3-pairs"])
def test_gpu_fp8_act_quant_in_epilogue_equals_separate_launch(name, m, pairs, monkeypatch):
    """bf16 hidden, fp8 weights: the Triton kernels' gate/up epilogue (table tiles 128 wide: Qwen3's by pointer,
    Mixtral's by TMA, where its table takes the Gluon kernel, which has no unfused form to compare with; and a
    pairs config) quantises act bit for bit as the separate launch does."""
    from moeserve.kernels import GemmConfig, MoEConfig
    from moeserve.kernels.moe_configs import get_config

    x, w13, w2, tw, ids, scales = _target_inputs(name, m, True, seed=17)
    e, _, k, h, i = TARGETS[name]
    if pairs:
        cfg = MoEConfig(16, GemmConfig(128, 128, 1, 4, 3), GemmConfig(32, 128, 1, 4, 3), pairs="pair")
    else:
        cfg = get_config(m, e, h, i, k, True)
        if cfg.gate_up.loads == "gluon":  # the same tiles in the TMA Triton kernels the Gluon ones fall back to
            cfg = dataclasses.replace(cfg, gate_up=dataclasses.replace(cfg.gate_up, loads="tma"),
                                      down=dataclasses.replace(cfg.down, loads="tma"))
    fused, separate = _fused_vs_separate_act_quant(monkeypatch, (x, w13, w2, tw, ids), scales, cfg)
    assert torch.equal(fused, separate)
    assert rel_err(fused, _target_ref(x, w13, w2, tw, ids, scales)) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m,method", [
    pytest.param(3000, 40, 6, 64, None, id="large-default"),
    *(pytest.param(1500, 128, 8, 32, m, id=m) for m in ("single", "ranked", "scatter")),
])
def test_gpu_large_align_layout(num_tokens, num_experts, top_k, block_m, method):
    _, ids = random_routing(num_tokens, num_experts, top_k, skip_expert=5, device="cuda")
    _check_align_twice(ids, num_experts, block_m, method)


GRAPH_CASES = {
    # id: (M, config: None = the table's, else (block_m, gate_up GemmConfig args, down GemmConfig args, pairs))
    "table": (8, None),
    "pair": (8, (16, (64, 128), (64, 128), "pair")),
    # In-kernel TMA descriptors take their scratch from torch's allocator: capture and replay with them too.
    "tma": (256, (64, (128, 64, 8, 8, 4, "tma_gathered", True), (128, 64, 8, 8, 4, "tma"), "")),
    # More than RANKED_MAX_PAIRS pairs: the count + scatter align, whose scratch must come back to 0 each replay.
    "scatter": (512, None),
    # The persistent Gluon GEMMs (Hopper; elsewhere the TMA Triton kernels): host-built TMA descriptors are
    # captured by value, and down's rows by slot go through slot_of_pair.
    "gluon": (512, (128, (128, 64, 8, 4, 4, "gluon"), (256, 64, 8, 4, 3, "gluon"), "")),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GRAPH_CASES))
def test_gpu_cuda_graph_replay_with_new_routing(case):
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe

    m, spec = GRAPH_CASES[case]
    cfg = None
    if spec is not None:
        bm, gate_up, down, pairs = spec
        cfg = MoEConfig(bm, GemmConfig(*gate_up), GemmConfig(*down), pairs=pairs)
    x, w13, w2, tw, ids, _ = _target_inputs("qwen3", m, False, seed=1)
    fused_moe(x, w13, w2, tw, ids, config=cfg)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, tw, ids, config=cfg)
    for seed in (2, 3):  # twice: the in-kernel counters must come back to a clean state each replay
        x2, _, _, tw2, ids2, _ = _target_inputs("qwen3", m, False, seed=seed)
        for t, new in ((x, x2), (tw, tw2), (ids, ids2)):
            t.copy_(new)
        graph.replay()
        ref = _target_ref(x, w13, w2, tw, ids, {})
        assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
def test_gpu_triton_experts_via_factory():
    from moeserve.moe.experts import create_expert_kernel, torch_experts

    kernel = create_expert_kernel("triton", "cuda")
    x, w13, w2, tw, ids, _ = _target_inputs("mixtral", 5, False)
    assert kernel.name == "triton"
    assert rel_err(kernel(x, w13, w2, tw, ids.long()), torch_experts(x, w13, w2, tw, ids)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("swap_ab", [False, True], ids=["", "transposed"])
def test_gpu_pairs_path_matches_aligned_path(name, fp8, swap_ab):
    """The small-M path (no align, top-k sum in the down kernel), its MMAs also transposed, against the
    reference and the aligned path."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe

    x, w13, w2, tw, ids, scales = _target_inputs(name, 6, fp8, seed=11)
    ids[1, -1] = -1  # a dropped choice inside a token that has valid ones
    tile = GemmConfig(32, 128, 1, 4, 3, swap_ab=swap_ab)
    pairs = MoEConfig(16, tile, tile, pairs="pair")
    aligned = MoEConfig(16, GemmConfig(32, 128, 1, 4, 3), GemmConfig(32, 128, 1, 4, 3))
    out = fused_moe(x, w13, w2, tw, ids, config=pairs, **scales)
    ref = _target_ref(x, w13, w2, tw, ids, scales)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= (2e-2 if fp8 else 1e-2)
    assert rel_err(out, fused_moe(x, w13, w2, tw, ids, config=aligned, **scales)) <= (2e-2 if fp8 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("swap_ab", [False, True])
def test_gpu_pairs_path_mma_orientation_in_the_instructions(swap_ab, monkeypatch):
    """Transposed pairs kernels put the 16 MMA rows of a pair on the tensor cores' N side: Hopper wgmma with
    N = 16 (the 64-wide weight tiles on its M side); untransposed they run M = 16 mma.sync tiles. Fails if SWAP
    stopped reaching the k loops."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("checks Hopper's wgmma instructions")
    seen = spy_pairs_launches(monkeypatch)
    x, w13, w2, tw, ids, _ = _target_inputs("qwen3", 2, False, seed=3)
    tile = GemmConfig(64, 128, 1, 4, 3, swap_ab=swap_ab)
    fused_moe(x, w13, w2, tw, ids, config=MoEConfig(16, tile, tile, pairs="pair"))
    for name, _, compiled in seen:
        ptx = compiled.asm["ptx"]
        assert ("wgmma.mma_async.sync.aligned.m64n16k16" in ptx) == swap_ab, name
        assert ("mma.sync.aligned.m16n8k16" in ptx) != swap_ab, name


@pytest.mark.gpu
def test_gpu_fp8_down_reads_act_scales_past_l1_only_where_it_overlaps_gate_up(monkeypatch):
    """fp8 down loads its rows' act scales every k step. From L1 (the default) they mostly hit; past it (".cg")
    each is an L2 round trip the MMA waits for, which cost small-M fp8 calls up to a fifth of their time
    (benchmarks/RESULTS.md, session 17). Only a down that may read act while gate/up writes it reads past L1
    (where it must: a line of scales spans several rows): the aligned down kernel has ".cg" loads with overlap
    (MoEConfig.overlap) and none without; the pairs path's one launch has more of them than its two-launch
    down, whose last program per tile reads the others' rows ".cg" too."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe

    aligned = spy_compiled(monkeypatch, "moeserve.kernels.fused_moe", "_down_kernel")
    pairs = spy_compiled(monkeypatch, "moeserve.kernels.fused_moe_pairs", "_down_pairs_kernel")
    one = spy_compiled(monkeypatch, "moeserve.kernels.fused_moe_pairs", "_pairs_one_kernel")
    x, w13, w2, tw, ids, scales = _target_inputs("qwen3", 8, True, seed=5)
    plain = MoEConfig(16, GemmConfig(128, 128, 1, 4, 3, swap_ab=True), GemmConfig(128, 128, 1, 4, 3, swap_ab=True))
    for cfg in (plain, dataclasses.replace(plain, overlap=True), dataclasses.replace(plain, pairs="pair"),
                dataclasses.replace(plain, pairs="one")):
        fused_moe(x, w13, w2, tw, ids, config=cfg, **scales)
    assert ["ld.global.cg" in compiled.asm["ptx"] for compiled in aligned] == [False, True]
    cg = [compiled.asm["ptx"].count("ld.global.cg") for compiled in (*pairs, *one)]
    assert len(cg) == 2 and cg[1] > cg[0] > 0, cg


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("m,mode", [(1, None), (8, None), (24, "pair"), (512, None), (2048, None)])
def test_gpu_results_identical_run_to_run(m, mode, fp8):
    """The table entries (and a pairs config) give bit-identical outputs call after call: no float atomics, and no
    fp8 entry takes the untransposed short tiles that did not (`GemmConfig.swap_ab`)."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe

    cfg = MoEConfig(16, GemmConfig(32, 128), GemmConfig(32, 128), pairs=mode) if mode else None
    x, w13, w2, tw, ids, scales = _target_inputs("qwen3", m, fp8, seed=5)
    first = fused_moe(x, w13, w2, tw, ids, config=cfg, **scales)
    for _ in range(5):
        assert torch.equal(fused_moe(x, w13, w2, tw, ids, config=cfg, **scales), first)


def test_fp8_tables_take_no_untransposed_short_tiles():
    """Untransposed fp8 short tiles gave run-to-run different results on the H100 (`GemmConfig.swap_ab`): every fp8
    table entry with short tiles runs them transposed."""
    from moeserve.kernels.moe_configs import CONFIG_DIR, load_table

    tables = sorted(p.name for p in CONFIG_DIR.glob("*_fp8.json"))
    assert tables
    for name in tables:
        for m, cfg in load_table(name).items():
            for gemm in (cfg.gate_up, cfg.down):
                assert not gemm.short_m or gemm.swap_ab, (name, m, gemm)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("loads,ws", TMA_LOADS)
def test_gpu_tma_loads_match_reference(name, fp8, loads, ws):
    """Every TMA load mode, with and without warp specialisation, at the target shapes (compute-bound tiles)."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe

    x, w13, w2, tw, ids, scales = _target_inputs(name, 300, fp8, seed=13)
    bk, stages = (128, 3) if fp8 else (64, 4)
    cfg = MoEConfig(64, GemmConfig(128, bk, 8, 8, stages, loads, ws), GemmConfig(128, bk, 8, 8, stages, loads, ws))
    out = fused_moe(x, w13, w2, tw, ids, config=cfg, **scales)
    ref = _target_ref(x, w13, w2, tw, ids, scales)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= (2e-2 if fp8 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_gpu_tail_tiles_match_reference(name, fp8, swap_ab):
    """tail_m at the target shapes (block_m / 4 tails; with swap_ab, mid tiles too), in each GEMM alone and in
    both, on expert row counts where some full blocks take their expert's tail and some tails are too long."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe

    e = TARGETS[name][0]
    bm, bk, stages = (64, 128, 3) if fp8 else (128, 64, 4)
    short = bm // 4
    # Experts 0-6 (each shape has 8 or more); the last, short_m / 2 rows in one block right after expert 5's full
    # block, is no tail.
    counts = [bm + 3, bm + short, 2 * bm + 1, bm + short + 1, bm // 2, bm, short // 2]
    tw, ids = routing_with_counts(counts, seed=7)
    assert sum(t[1:] == (bm, short) for t in block_tiles(ids, e, bm, short, swap_ab, tail_m=True)) == 3
    x, w13, w2, _, ids, scales = _target_inputs(name, ids.shape[0], fp8, seed=19, ids=ids)
    tw = tw.cuda()
    ref = _target_ref(x, w13, w2, tw, ids, scales)
    tiles = {tail_m: (GemmConfig(64, bk, 8, 8, stages, short_m=short, mid_m=swap_ab, swap_ab=swap_ab, tail_m=tail_m),
                      GemmConfig(128, bk, 8, 8, stages, short_m=short, mid_m=swap_ab, swap_ab=swap_ab, tail_m=tail_m))
             for tail_m in (False, True)}
    for gu_tail, dn_tail in ((True, True), (True, False), (False, True)):
        cfg = MoEConfig(bm, tiles[gu_tail][0], tiles[dn_tail][1])
        out = fused_moe(x, w13, w2, tw, ids, config=cfg, **scales)
        assert torch.isfinite(out).all() and rel_err(out, ref) <= (2e-2 if fp8 else 1e-2), (gu_tail, dn_tail)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("tail_m", [False, True], ids=["", "tail"])
def test_gpu_overlap_equals_without_under_graph_replay(name, fp8, tail_m):
    """MoEConfig.overlap at the target shapes: down's programs start on a block as soon as gate/up has written
    its act, while gate/up still runs. One CUDA graph replayed over three inputs in turn, 12 times, so a down
    program that read a row before gate/up wrote it would read the previous replay's act (another input's) and
    differ: every replay is bit-identical to the same tiles without overlap, called eagerly, and near the
    reference. Block-major gate/up (group_m 1), 512 tokens on a skewed routing, with tail tiles or without (fp8:
    transposed; untransposed fp8 short tiles differ run to run by themselves, see `GemmConfig.swap_ab`)."""
    from moeserve.kernels import GemmConfig, MoEConfig

    bm, bk, stages = (64, 128, 3) if fp8 else (128, 64, 4)
    g = dict(short_m=bm // 4, tail_m=tail_m, swap_ab=fp8)
    plain = MoEConfig(bm, GemmConfig(128, bk, 1, 8, stages, **g), GemmConfig(128, bk, 8, 8, stages, **g))
    overlap = dataclasses.replace(plain, overlap=True)
    inputs = [_target_inputs(name, 512, fp8, seed=seed, ids=skewed_ids(512, name, seed=seed)) for seed in (21, 22, 23)]
    out, last = _replays_equal_eager(inputs, plain, overlap)
    assert rel_err(out, _target_ref(*last)) <= (2e-2 if fp8 else 1e-2)


def _replays_equal_eager(inputs: list, eager_cfg, graph_cfg):
    """One CUDA graph of fused_moe(config=graph_cfg) on the first input's weights, replayed 12 times over the
    inputs' x, topk weights and ids in turn: each replay must equal, bit for bit, fused_moe(config=eager_cfg)
    called eagerly on that input (as must an eager call with graph_cfg). Returns the last replay's output and
    its input (x, w13, w2, tw, ids, scales)."""
    from moeserve.kernels import fused_moe

    _, w13, w2, _, _, scales = inputs[0]  # one set of weights; the graph's own x, tw and ids buffers
    x, tw, ids = (inputs[0][j].clone() for j in (0, 3, 4))
    want = [fused_moe(xi, w13, w2, twi, idsi, config=eager_cfg, **scales) for xi, _, _, twi, idsi, _ in inputs]
    assert torch.equal(fused_moe(x, w13, w2, tw, ids, config=graph_cfg, **scales), want[0])  # eager, and compiled
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, tw, ids, config=graph_cfg, **scales)
    for r in range(12):
        xi, _, _, twi, idsi, _ = inputs[r % 3]
        x.copy_(xi), tw.copy_(twi), ids.copy_(idsi)
        graph.replay()
        assert torch.equal(out, want[r % 3]), f"replay {r}"
    return out, (x, w13, w2, tw, ids, scales)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_pairs_one_launch_equals_two_under_graph_replay(name, fp8, m, monkeypatch):
    """MoEConfig.pairs = "one" at the target shapes: down's programs start on a pair as soon as gate/up has
    written its act, in the same launch. One CUDA graph replayed over three inputs in turn, 12 times, so a down
    program that read act before gate/up wrote it would read another input's and differ: every replay is
    bit-identical to the two-launch pairs path called eagerly (the same tiles), and near the reference. The
    tables' M=1 tiles, transposed; fp8 with 128-column gate/up tiles (act quantised in the epilogue)."""
    from moeserve.kernels import GemmConfig, MoEConfig
    from moeserve.kernels.counters import completion_counters

    launches = spy_compiled(monkeypatch, "moeserve.kernels.fused_moe_pairs", "_pairs_one_kernel")
    gu = GemmConfig(128 if fp8 else 64, 128, 1, 4, 4, swap_ab=True)
    two = MoEConfig(16, gu, GemmConfig(64, 128, 1, 4, 4, swap_ab=True), pairs="pair")
    one = dataclasses.replace(two, pairs="one")
    out, last = _replays_equal_eager([_target_inputs(name, m, fp8, seed=seed) for seed in (31, 32, 33)], two, one)
    assert len(launches) == 2  # the eager call and the capture: no fallback to two launches
    assert not completion_counters(out.device, 1).any()  # ticket, done and ready counts back at 0 each time
    assert rel_err(out, _target_ref(*last)) <= (2e-2 if fp8 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("loads,ws,swap_ab", [("ptr", False, False), ("ptr", False, True), ("tma", False, False),
                                              ("tma", True, False), ("tma_gathered", True, False)])
def test_gpu_short_tiles_match_reference(name, fp8, loads, ws, swap_ab):
    """short_m of block_m/2 and block_m/4 at the target shapes, in every load mode the tables use, and with
    transposed MMAs (with mid tiles at block_m/4), on a routing skewed across experts so that tiles of every
    height run in each call."""
    from moeserve.kernels import GemmConfig, MoEConfig, fused_moe

    e, routed, k, _, _ = TARGETS[name]
    bm, bk, stages = (64, 128, 3) if fp8 else (128, 64, 4)
    ids = skewed_ids(bm * routed // k, name, seed=0)
    assert set(tile_heights(ids, e, bm, bm // 4)) == {bm // 4, bm // 2, bm}
    x, w13, w2, tw, ids, scales = _target_inputs(name, ids.shape[0], fp8, seed=17, ids=ids)
    ref = _target_ref(x, w13, w2, tw, ids, scales)
    for short_m in (bm // 2, bm // 4):
        tile = GemmConfig(128, bk, 8, 8, stages, loads, ws, short_m, mid_m=swap_ab and short_m == bm // 4,
                          swap_ab=swap_ab)
        cfg = MoEConfig(bm, tile, tile)
        out = fused_moe(x, w13, w2, tw, ids, config=cfg, **scales)
        assert torch.isfinite(out).all() and rel_err(out, ref) <= (2e-2 if fp8 else 1e-2), short_m


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3", "mixtral"])
def test_gpu_no_compilation_after_the_warm_up_counts(name):
    """After one `fused_moe` call at each of `warmup_token_counts`' counts (what `MoELayer.warm_up` runs at
    engine start-up), calls of other sizes up to the limit compile no Triton kernel (Triton's JIT hook)."""
    from moeserve.kernels import fused_moe
    from moeserve.kernels.fused_moe import warmup_token_counts

    e, routed, k, h, i = TARGETS[name]
    max_tokens = 2048
    x, w13, w2, _, _, _ = _target_inputs(name, max_tokens, False, seed=3)
    g = torch.Generator().manual_seed(4)

    def call(m: int) -> None:
        ids = torch.rand(m, e, generator=g).topk(k, dim=1).indices.to(torch.int32).cuda()
        fused_moe(x[:m], w13, w2, torch.rand(m, k, generator=g).cuda(), ids)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in warmup_token_counts(max_tokens, e, h, i, k, False, sms):
        call(m)
    torch.cuda.synchronize()
    with recorded_compilations() as compiled:
        sizes = [3, 5, 7, 24, 40, 63, 100, 129, 200, 257, 300, 450, 600, 700, 999, 1300, 1500, 2047, max_tokens]
        for m in sizes + torch.randint(1, max_tokens + 1, (20,), generator=g).tolist():
            call(m)
        torch.cuda.synchronize()
    assert not compiled, f"compiled after the warm-up: {compiled[:4]}"


def _gluon_config(down_n: int = 256, gate_up_stages: int = 4, down_stages: int = 3, fp8: bool = False):
    """Gluon tiles for both GEMMs: bf16 64 deep (gate/up 128 wide, down down_n); fp8 one 128 x 128 scale block."""
    from moeserve.kernels import GemmConfig, MoEConfig

    gate_up_n, block_k = 128, (128 if fp8 else 64)
    return MoEConfig(128, GemmConfig(gate_up_n, block_k, 8, 4, gate_up_stages, loads="gluon"),
                     GemmConfig(128 if fp8 else down_n, block_k, 8, 4, down_stages, loads="gluon"))


def test_gluon_gemm_support_reasons(monkeypatch):
    """What the Gluon grouped GEMM takes, on any machine (the platform check patched out): 16-bit weights in tiles
    that fit, fp8 only in 128 x 128 tiles, 16-bit or e4m3 outputs (an fp32 output, as from fp32 hidden with fp8
    weights, falls back to the Triton kernels); each refusal says why."""
    from moeserve.kernels import gluon_support, moe_gemm_gluon

    monkeypatch.setattr(gluon_support, "gluon_platform_problem", lambda device, what: None)
    e, i, h = 8, 512, 1024
    bf16 = torch.empty(e, 2 * i, h, dtype=torch.bfloat16)
    fp8 = torch.empty(e, 2 * i, h, dtype=torch.float8_e4m3fn)
    check = moe_gemm_gluon.gluon_gemm_unsupported
    assert check(bf16, i, h, 128, 128, 64, 4, 2) is None
    assert check(fp8, i, h, 128, 128, 128, 4, 2, torch.float8_e4m3fn) is None
    assert check(fp8, h, i, 128, 128, 128, 5, 1, torch.bfloat16) is None
    assert "128 wide and deep" in check(fp8, i, h, 128, 128, 64, 4, 2, torch.float8_e4m3fn)
    assert "float32" in check(fp8, h, i, 128, 128, 128, 5, 1, torch.float32)
    assert "float32" in check(torch.empty(e, 2 * i, h), i, h, 128, 128, 64)
    assert "block_m 128" in check(bf16, i, h, 64, 128, 64)
    assert "shared memory" in check(bf16, i, h, 128, 256, 64, 4, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("m", [5, 300, 2048])
@pytest.mark.parametrize("skewed", [False, True], ids=["uniform", "skewed"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_gluon_grouped_gemms_match_reference(name, m, skewed, fp8, monkeypatch):
    """The persistent Gluon GEMMs (loads="gluon") on the target shapes, bf16 and fp8 (block scales, act
    quantised in gate/up's epilogue): blocks of every fill (a few rows, at most 64 rows: the second warpgroup
    idle, full), experts off this rank (-1), against the reference (fp8: on the same quantised weights)."""
    from moeserve.kernels import fused_moe, moe_gemm_gluon
    from moeserve.kernels.counters import completion_counters

    ids = skewed_ids(m, name, seed=m) if skewed else None
    x, w13, w2, tw, ids, scales = _target_inputs(name, m, fp8, seed=m, ids=ids)
    e, _, k, h, i = TARGETS[name]
    why = moe_gemm_gluon.gluon_gemm_unsupported(w13, i, h, 128, 128, 128 if fp8 else 64, 4, 2,
                                                torch.float8_e4m3fn if fp8 else torch.bfloat16)
    if why is not None:
        pytest.skip(why)
    launches = []  # gate_up flag of each Gluon launch: the config must not fall back to the Triton kernels
    launch = moe_gemm_gluon._launch
    monkeypatch.setattr(moe_gemm_gluon, "_launch",
                        lambda *args, **kw: launches.append(args[14]) or launch(*args, **kw))
    cfg = _gluon_config(fp8=fp8, down_stages=5 if fp8 else 3)
    out = fused_moe(x, w13, w2, tw, ids, config=cfg, **scales)
    assert launches == [True, False]
    # Blocks of at most 64 rows load 64 activation rows a step (HALF_A): the same operands, the same bits.
    monkeypatch.setattr(moe_gemm_gluon, "HALF_A", False)
    assert torch.equal(fused_moe(x, w13, w2, tw, ids, config=cfg, **scales), out)
    monkeypatch.setattr(moe_gemm_gluon, "HALF_A", True)
    # Tiles drawn from a counter rather than strided by the grid: each tile computed alike, the same bits; the
    # counter is back to 0 for the next launch (twice: graph replays rely on it).
    drawn = dataclasses.replace(cfg, gate_up=dataclasses.replace(cfg.gate_up, dynamic_tiles=True),
                                down=dataclasses.replace(cfg.down, dynamic_tiles=True))
    for _ in range(2):
        assert torch.equal(fused_moe(x, w13, w2, tw, ids, config=drawn, **scales), out)
        assert not completion_counters(x.device, 1).any()
    ref = _target_ref(x, w13, w2, tw, ids, scales)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= (2e-2 if fp8 else 1e-2)
    if fp8:  # the Triton kernels' tiles on the same quantised operands
        tma = dataclasses.replace(cfg, gate_up=dataclasses.replace(cfg.gate_up, loads="tma"),
                                  down=dataclasses.replace(cfg.down, loads="tma"))
        assert rel_err(out, fused_moe(x, w13, w2, tw, ids, config=tma, **scales)) <= 1e-2
        return
    # Same tiles, another ring depth and down width: the same result up to accumulation order.
    other = fused_moe(x, w13, w2, tw, ids, config=_gluon_config(down_n=128, gate_up_stages=3, down_stages=5))
    assert rel_err(other, out) <= 1e-2
