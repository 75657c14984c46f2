"""Expert-parallel dispatch/combine (the all-to-all and all-gather backends) equals every rank computing all
experts locally.

Ranks are spawned processes on gloo (CPU). Every rank builds the same global expert weights from a seed and
can regenerate every other rank's inputs (seeded by rank), so it also checks exactly which rows it received.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeserve.cluster.dist import destroy_distributed, init_distributed
from moeserve.forward_batch import ForwardMode
from moeserve.moe.all_gather import AllGatherDispatcher
from moeserve.moe.all_to_all import TorchAllToAllDispatcher
from moeserve.moe.by_mode import ByModeDispatcher
from moeserve.moe.experts import torch_experts
from moeserve.moe.placement import ExpertPlacement

NUM_EXPERTS, HIDDEN, INTER, TOP_K = 8, 16, 24, 3


# ---- harness shared with test_ep_tbo.py ----------------------------------------------------------------
def spawn_ranks(fn: Callable, world_size: int, *args) -> None:
    """Run fn(rank, world_size, groups, *args) on world_size gloo ranks; a failure on any rank fails here."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'store')}"
        mp.spawn(_rank_main, args=(world_size, init, fn, args), nprocs=world_size, join=True)


def _rank_main(rank: int, world_size: int, init: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    groups = init_distributed(rank, world_size, init, backend="gloo", timeout_s=60)
    try:
        fn(rank, world_size, groups, *args)
    finally:
        destroy_distributed()


def expert_weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Global weights: w13 [E, 2I, H], w2 [E, H, I] — identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(NUM_EXPERTS, HIDDEN, INTER, generator=gen) / INTER**0.5
    return w13.to(dtype), w2.to(dtype)


def random_routing(num_tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct logical ids [T, k] int64 and softmax weights [T, k] float32."""
    scores = torch.randn(num_tokens, NUM_EXPERTS, generator=gen)
    weights, ids = scores.softmax(dim=1).topk(TOP_K, dim=1)
    return ids, weights


def local_expert_weights(placement: ExpertPlacement, w13, w2, layer: int = 0):
    """This rank's slots: w13 [S, 2I, H], w2 [S, H, I], gathered from the global weights by phy2log."""
    held = torch.tensor(placement.local_logical_experts(layer))
    return w13[held], w2[held]


def ep_moe(dispatcher, placement, layer, x, logical_ids, weights, w13_local, w2_local, mode=None):
    """The expert-parallel MoE: to_physical -> dispatch -> local experts -> combine. Returns (y, received)."""
    if mode is None:
        mode = ForwardMode.EXTEND if x.shape[0] else ForwardMode.IDLE
    phys = placement.to_physical(layer, logical_ids)
    received = dispatcher.dispatch(x, phys, weights, mode)
    y = torch_experts(received.hidden, w13_local, w2_local, received.topk_weights, received.topk_ids)
    return dispatcher.combine(y, received.handle), received


# ---- scenarios -----------------------------------------------------------------------------------------
def placement_for(kind: str, rank: int, world_size: int) -> ExpertPlacement:
    pad = -NUM_EXPERTS % world_size
    if kind == "redundant":
        # Every expert once plus one extra replica per rank, shuffled: real multi-replica routing.
        num_physical = NUM_EXPERTS + pad + world_size
        gen = torch.Generator().manual_seed(100 + world_size)
        extra = torch.randint(0, NUM_EXPERTS, (num_physical - NUM_EXPERTS,), generator=gen)
        row = torch.cat([torch.arange(NUM_EXPERTS), extra])
        row = row[torch.randperm(num_physical, generator=gen)]
        return ExpertPlacement(row[None], NUM_EXPERTS, rank, world_size)
    return ExpertPlacement.default(1, NUM_EXPERTS, pad, rank, world_size)


def scenario_inputs(kind: str, rank: int, world_size: int, dtype: torch.dtype):
    """This rank's tokens for a scenario: x [T, H], logical ids [T, k] (-1 allowed), weights [T, k]."""
    gen = torch.Generator().manual_seed(1000 * rank + sum(map(ord, kind)))
    num_tokens = int(torch.randint(1, 12, (1,), generator=gen))
    if kind == "idle" and rank % 2 == 1:
        num_tokens = 0  # odd ranks have nothing to do but still enter every collective
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype)
    ids, weights = random_routing(num_tokens, gen)
    if kind == "skewed":
        # Every token's choices live on rank 0 (duplicates and overflow become -1).
        rank0 = torch.tensor(placement_for(kind, 0, world_size).local_logical_experts(0))
        pick = rank0[torch.randint(0, len(rank0), ids.shape, generator=gen)]
        ids = torch.where(torch.arange(TOP_K) < len(rank0), pick, -1)
        ids = torch.stack([_dedup(row) for row in ids]) if num_tokens else ids
    if kind == "minus_one":
        ids = torch.where(torch.rand(ids.shape, generator=gen) < 0.4, -1, ids)
        if num_tokens:
            ids[0] = -1  # a token with no expert at all
    return x, ids, weights


def _dedup(row: torch.Tensor) -> torch.Tensor:
    seen, out = set(), []
    for v in row.tolist():
        out.append(-1 if v in seen or v < 0 else v)
        seen.add(v)
    return torch.tensor(out)


def expected_received(kind, rank, world_size, all_inputs) -> torch.Tensor:
    """Rows this rank must receive: each source rank's tokens with a choice here, in (source, token) order.
    all_inputs: every rank's `scenario_inputs`, by rank."""
    rows = []
    for src, (x, ids, _) in enumerate(all_inputs):
        pl = placement_for(kind, src, world_size)
        phys = pl.to_physical(0, ids).long()
        here = ((phys // pl.num_local_slots == rank) & (phys >= 0)).any(dim=1)
        rows.append(x[here])
    return torch.cat(rows)


def run_scenarios(rank: int, world_size: int, ep_group) -> None:
    for kind, dtype, tol in [
        ("random", torch.float32, 1e-5),
        ("redundant", torch.float32, 1e-5),
        ("idle", torch.float32, 1e-5),
        ("skewed", torch.float32, 1e-5),
        ("minus_one", torch.float32, 1e-5),
        ("random", torch.bfloat16, 2e-2),
    ]:
        w13, w2 = expert_weights(dtype=dtype)
        placement = placement_for(kind, rank, world_size)
        all_inputs = [scenario_inputs(kind, src, world_size, dtype) for src in range(world_size)]
        x, ids, weights = all_inputs[rank]
        ref = torch_experts(x, w13, w2, weights, ids)
        w13_local, w2_local = local_expert_weights(placement, w13, w2)
        where = f"scenario {kind}/{dtype} on rank {rank} of {world_size}"
        check_all_gather(ep_group, placement, all_inputs, (w13_local, w2_local), ref, tol, where)
        dispatcher = TorchAllToAllDispatcher(ep_group, placement.num_local_slots)
        y, received = ep_moe(dispatcher, placement, 0, x, ids, weights, w13_local, w2_local)
        assert y.shape == ref.shape and y.dtype == dtype, where
        torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol, msg=where)
        # Each token arrives at most once per rank, and only where one of its choices lives.
        arrived = expected_received(kind, rank, world_size, all_inputs)
        assert torch.equal(received.hidden, arrived), where
        assert_local_slots(received.topk_ids, placement, where)
        assert bool((received.topk_ids >= 0).any(dim=1).all()), where
        # The choice count came with the row counts, for the expert kernel's tile lookup.
        assert received.num_pairs == int((received.topk_ids >= 0).sum()), where
        check_by_mode(ep_group, placement, all_inputs, arrived, (w13_local, w2_local), ref, tol, f"{where}, by_mode")
        if kind == "redundant":
            held = set(placement.local_logical_experts(0))
            phys = placement.to_physical(0, ids).long()
            mine = torch.isin(ids, torch.tensor(sorted(held))) & (ids >= 0)
            assert bool((phys[mine] // placement.num_local_slots == rank).all()), where


def check_by_mode(ep_group, placement, all_inputs, arrived, local_weights, ref, tol, where) -> None:
    """ByModeDispatcher gives the reference in every mode, through the all-gather at decode (every rank's tokens,
    padded to the capacity, arrive) and the all-to-all otherwise (only tokens with a choice here arrive: the
    rows `arrived`), also when the mode changes from step to step; the step's mode decides, not the one a call
    names (IDLE)."""
    rank, world_size = dist.get_rank(ep_group), len(all_inputs)
    x, ids, weights = all_inputs[rank]
    capacity = max(inputs[0].shape[0] for inputs in all_inputs)
    dispatcher = ByModeDispatcher(AllGatherDispatcher(ep_group, placement.num_local_slots),
                                  TorchAllToAllDispatcher(ep_group, placement.num_local_slots))
    steps = [(ForwardMode.DECODE, ForwardMode.DECODE), (ForwardMode.EXTEND, ForwardMode.EXTEND),
             (ForwardMode.DECODE, ForwardMode.IDLE)]  # (the step's mode, the mode the call names)
    for mode, named in steps:
        dispatcher.begin_step(mode, capacity)
        y, received = ep_moe(dispatcher, placement, 0, x, ids, weights, *local_weights, named)
        torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol, msg=f"{where}, {mode}")
        if mode == ForwardMode.DECODE:
            assert received.hidden.shape[0] == world_size * capacity, where
            assert received.num_pairs is None, where  # the all-gather's rows are every token
        else:
            assert torch.equal(received.hidden, arrived), where
            assert received.num_pairs == int((received.topk_ids >= 0).sum()), where


def assert_local_slots(local: torch.Tensor, placement: ExpertPlacement, where: str) -> None:
    """Received choices are int32 local slots of this rank, or -1."""
    assert local.dtype == torch.int32, where
    assert bool(((local >= -1) & (local < placement.num_local_slots)).all()), where


def check_all_gather(ep_group, placement, all_inputs, local_weights, ref, tol, where) -> None:
    """AllGatherDispatcher gives the reference, with the step's capacity set (as the engine's runner does)
    and agreed by the dispatcher itself; every rank receives every rank's tokens, padded to the capacity.
    all_inputs: every rank's (x, logical ids, weights); local_weights: (w13, w2) of this rank's slots."""
    x, ids, weights = all_inputs[dist.get_rank(ep_group)]
    sources = [inputs[0] for inputs in all_inputs]
    counts = [src.shape[0] for src in sources]
    capacity = max(counts)
    dispatcher = AllGatherDispatcher(ep_group, placement.num_local_slots)
    for step_capacity in (capacity, None, capacity + 3):
        dispatcher.begin_step(ForwardMode.EXTEND, step_capacity)
        y, received = ep_moe(dispatcher, placement, 0, x, ids, weights, *local_weights)
        torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol, msg=f"{where}, all_gather")
        rows = step_capacity or capacity
        assert received.hidden.shape[0] == len(sources) * rows, where
        for src, n in enumerate(counts):
            block = received.hidden[src * rows:(src + 1) * rows]
            assert torch.equal(block[:n], sources[src]), where
            assert not block[n:].any() and bool((received.topk_ids[src * rows + n:(src + 1) * rows] == -1).all())
        assert_local_slots(received.topk_ids, placement, where)
    if dist.get_rank(ep_group) == 0 and counts[0]:
        dispatcher.begin_step(ForwardMode.EXTEND, counts[0] - 1)
        with pytest.raises(ValueError, match="capacity"):
            dispatcher.dispatch_begin(x, placement.to_physical(0, ids), weights, ForwardMode.EXTEND)


def run_all_world_sizes(rank: int, world_size: int, groups) -> None:
    """EP groups of 2, 3 and 4 ranks carved out of one 4-process world (one spawn, fewer start-ups)."""
    for size in (2, 3, 4):
        sub = dist.new_group(ranks=list(range(size)), backend="gloo")  # collective: every rank calls it
        if rank < size:
            run_scenarios(rank, size, sub)
            if size == 2:
                check_factory_on_rank(rank, size, sub)
        dist.barrier(groups.cpu_group)


def test_all_to_all_and_all_gather_match_local_reference_on_2_3_4_ranks():
    spawn_ranks(run_all_world_sizes, 4)


# ---- DeepEP against the all-to-all reference (needs >= 2 GPUs and deep_ep) -----------------------------
def _deepep_available() -> bool:
    try:
        import deep_ep  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


def run_deepep_vs_all_to_all(rank: int, world_size: int, init: str) -> None:
    from moeserve.moe.deepep import DeepEPDispatcher

    groups = init_distributed(rank, world_size, init, backend="nccl", device_index=rank)
    try:
        hidden, num_experts, top_k, inter = 2048, 8 * world_size, 4, 256
        gen = torch.Generator().manual_seed(0)
        w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).bfloat16().cuda()
        w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).bfloat16().cuda()
        placement = ExpertPlacement.trivial(1, num_experts, rank, world_size)
        a2a = TorchAllToAllDispatcher(groups.ep_group, placement.num_local_slots)
        deepep = DeepEPDispatcher(
            groups.ep_group, placement.num_local_slots, hidden=hidden, max_tokens_per_rank=64
        )
        held = torch.tensor(placement.local_logical_experts(0))
        w13_local, w2_local = w13[held.cuda()], w2[held.cuda()]
        for mode, num_tokens in [(ForwardMode.EXTEND, 100), (ForwardMode.DECODE, 40), (ForwardMode.EXTEND, 0),
                                 (ForwardMode.DECODE, 0), (ForwardMode.DECODE, 64)]:
            gen_r = torch.Generator().manual_seed(rank * 97 + num_tokens)
            x = torch.randn(num_tokens, hidden, generator=gen_r).bfloat16().cuda()
            weights, ids = torch.randn(num_tokens, num_experts, generator=gen_r).softmax(1).topk(top_k, dim=1)
            ids, weights = ids.cuda(), weights.cuda()
            ref, a2a_recv = ep_moe(a2a, placement, 0, x, ids, weights, w13_local, w2_local, mode)
            out, deepep_recv = ep_moe(deepep, placement, 0, x, ids, weights, w13_local, w2_local, mode)
            where = f"{mode} T={num_tokens}"
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2, msg=where)
            if mode == ForwardMode.EXTEND:  # DeepEP's per-expert receive counts against the all-to-all's
                assert deepep_recv.num_pairs == a2a_recv.num_pairs, where
        torch.cuda.synchronize()
        dist.barrier(groups.cpu_group)
    finally:
        destroy_distributed()


@pytest.mark.multigpu
@pytest.mark.skipif(not _deepep_available(), reason="needs >= 2 CUDA GPUs and deep_ep")
def test_deepep_matches_all_to_all():
    world_size = 2
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'store')}"
        mp.spawn(run_deepep_vs_all_to_all, args=(world_size, init), nprocs=world_size, join=True)


# ---- backend choice ------------------------------------------------------------------------------------
def check_factory_on_rank(rank: int, world_size: int, ep_group) -> None:
    import logging

    from moeserve.moe.factory import create_dispatcher

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("moeserve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    d = create_dispatcher(group=ep_group, ep_size=world_size, num_local_slots=4, device="cpu")
    assert isinstance(d, TorchAllToAllDispatcher) and d.num_local_slots == 4
    assert records == ["MoE dispatcher: all_to_all (device is cpu, DeepEP needs CUDA)"]
    gathered = create_dispatcher("all_gather", group=ep_group, ep_size=world_size, num_local_slots=4, device="cpu")
    assert gathered.name == "all_gather" and records[-1] == "MoE dispatcher: all_gather (requested)"
    by_mode = create_dispatcher("by_mode", group=ep_group, ep_size=world_size, num_local_slots=4, device="cpu")
    assert isinstance(by_mode, ByModeDispatcher) and records[-1] == "MoE dispatcher: by_mode (requested)"
    assert by_mode.for_mode(ForwardMode.DECODE).name == "all_gather"
    assert by_mode.for_mode(ForwardMode.EXTEND).name == "all_to_all"
    with pytest.raises(ValueError, match="ep_size=3 but the EP process group has 2 ranks"):
        create_dispatcher("all_to_all", group=ep_group, ep_size=3, num_local_slots=4, device="cpu")


def test_ep_group_options_only_for_nccl():
    """gloo groups take no options (and a CPU-only torch has no ProcessGroupNCCL); NCCL's EP group is told its
    timeout, which torch warns about when it differs from new_group's."""
    from datetime import timedelta

    from moeserve.cluster.dist import ep_group_options

    assert ep_group_options("gloo", timedelta(seconds=5)) is None
    if dist.is_nccl_available():
        options = ep_group_options("nccl", timedelta(seconds=5))
        assert options.is_high_priority_stream and options._timeout == timedelta(seconds=5)


def test_create_dispatcher_picks_a_backend_and_says_why(caplog):
    from moeserve.moe.dispatcher import LocalDispatcher
    from moeserve.moe.factory import _choose, create_dispatcher

    with caplog.at_level("INFO", logger="moeserve"):
        d = create_dispatcher(group=None, ep_size=1, num_local_slots=8, device="cpu")
    assert isinstance(d, LocalDispatcher)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["MoE dispatcher: local (ep_size == 1, no communication)"]
    with pytest.raises(ValueError, match="allowed: 'auto', 'local', 'all_to_all', 'all_gather', 'by_mode', 'deepep'"):
        create_dispatcher("nccl", group=None, ep_size=2, num_local_slots=8, device="cpu")
    if not _deepep_available():
        with pytest.raises(ValueError, match="dispatcher 'deepep' requested but deep_ep not importable"):
            create_dispatcher("deepep", group=None, ep_size=2, num_local_slots=8, device="cpu")
    # Without deep_ep a CUDA rank takes by_mode (the all-gather's decode graphs); CPU ranks the all-to-all (no
    # graphs there), with one log line: checked on gloo ranks (run_all_world_sizes).
    if not _deepep_available():
        backend, reason = _choose("auto", 2, torch.device("cuda"))
        assert backend == "by_mode" and "all_gather for decode" in reason


# ---- DeepEP adapter logic against a one-rank stand-in for deep_ep (runs anywhere) ----------------------
class _FakeEvent:
    def current_stream_wait(self) -> None:
        pass


class _FakeConfig:
    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 1 << 20

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0


class _FakeBuffer:
    """Single-rank stand-in with DeepEP's documented semantics. Low-latency results only become valid when
    the receive hook runs, and unused packed rows hold garbage, so the adapter must respect both."""

    num_sms = 20
    cleaned = 0

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=1):
        assert low_latency_mode and num_rdma_bytes > 0

    set_num_sms = staticmethod(lambda n: None)
    get_dispatch_config = get_combine_config = staticmethod(lambda n: _FakeConfig())
    get_low_latency_rdma_size_hint = staticmethod(lambda tokens, hidden, ranks, experts: 1 << 20)
    capture = staticmethod(lambda: _FakeEvent())

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        assert topk_idx.dtype == torch.int64
        in_rank = (topk_idx >= 0).any(dim=1, keepdim=True)
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
        return in_rank.sum(0).int(), None, per_expert, in_rank, _FakeEvent()

    def dispatch(self, x, topk_idx=None, topk_weights=None, is_token_in_rank=None, **kwargs):
        rows = is_token_in_rank[:, 0].nonzero()[:, 0]
        handle = (rows, x.shape[0])
        recv_idx = topk_idx[rows]
        per_expert = torch.bincount(recv_idx[recv_idx >= 0], minlength=NUM_EXPERTS).tolist()  # on the host
        return x[rows], recv_idx, topk_weights[rows], per_expert, handle, _FakeEvent()

    def combine(self, x, handle, **kwargs):
        rows, num_tokens = handle
        out = torch.zeros(num_tokens, x.shape[1], dtype=x.dtype).index_add_(0, rows, x)
        return out, None, _FakeEvent()

    def clean_low_latency_buffer(self, max_tokens, hidden, num_experts):
        _FakeBuffer.cleaned += 1

    def low_latency_dispatch(self, x, topk_idx, max_tokens, num_experts, use_fp8=True, async_finish=False,
                             return_recv_hook=False):
        assert not use_fp8 and return_recv_hook and x.shape[0] <= max_tokens
        packed = torch.randn(num_experts, max_tokens, x.shape[1]).to(x.dtype)  # garbage until the hook runs
        count = torch.zeros(num_experts, dtype=torch.int32)
        slot = torch.full(topk_idx.shape, -1)  # where each (token, choice) lands in its expert's rows

        def hook():
            for t, j in (topk_idx >= 0).nonzero().tolist():
                e = int(topk_idx[t, j])
                packed[e, count[e]] = x[t]
                slot[t, j] = int(count[e])
                count[e] += 1

        return packed, count, (slot, max_tokens), _FakeEvent(), hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, async_finish=False,
                            return_recv_hook=False):
        slot, _ = handle
        out = torch.zeros(topk_idx.shape[0], x.shape[2], dtype=x.dtype)

        def hook():
            for t, j in (topk_idx >= 0).nonzero().tolist():
                out[t] += topk_weights[t, j] * x[topk_idx[t, j], slot[t, j]]

        return out, _FakeEvent(), hook


class _OneRankGroup:
    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def test_deepep_adapter_matches_reference_with_a_stand_in(monkeypatch):
    import types

    from moeserve.moe.deepep import DeepEPDispatcher
    from moeserve.moe.factory import _choose

    monkeypatch.setitem(sys.modules, "deep_ep", types.SimpleNamespace(Buffer=_FakeBuffer))
    assert _choose("auto", 2, torch.device("cuda")) == ("deepep", "deep_ep importable and device is CUDA")
    w13, w2 = expert_weights()
    d = DeepEPDispatcher(_OneRankGroup(), NUM_EXPERTS, hidden=HIDDEN, max_tokens_per_rank=16)
    twin = d.sibling()
    assert twin.shared is d.shared
    gen = torch.Generator().manual_seed(3)
    extend, decode = ForwardMode.EXTEND, ForwardMode.DECODE
    modes = [extend, decode, decode, extend, decode]
    for step, mode in enumerate(modes):
        num_tokens = 0 if step == 2 else 9
        x = torch.randn(num_tokens, HIDDEN, generator=gen)
        ids, weights = random_routing(num_tokens, gen)
        if num_tokens:
            ids[0, 1] = -1
        ref = torch_experts(x, w13, w2, weights, ids)
        received = d.dispatch(x, ids.int(), weights, mode)
        # Normal mode passes DeepEP's per-expert receive counts on as the choice count; low-latency has none.
        want_pairs = int((received.topk_ids >= 0).sum()) if mode == extend else None
        assert received.num_pairs == want_pairs, f"step {step} ({mode})"
        y = torch_experts(received.hidden, w13, w2, received.topk_weights, received.topk_ids)
        out = d.combine(y, received.handle)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"step {step} ({mode})")
    # Low-latency mode after normal mode cleans the buffer: steps 1 and 4, not step 2.
    assert _FakeBuffer.cleaned == 2
