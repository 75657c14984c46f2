"""The optional FlashInfer attention backend: selection, its page-id conversion, and decode results.

CPU: choosing "flashinfer" without CUDA or without the package fails with a message naming the choices;
"auto" never picks it; the host CSR arrays and the device page-id gather (`pages_to_indices`, under the Triton
interpreter) match simple references. None of these import flashinfer.
GPU (`gpu` mark, skipped unless flashinfer imports): `FlashInferAttentionBackend.attend` equals the fp32
reference and `TritonAttentionBackend` for MLA and GQA decode (several batch sizes, ragged lengths, pages 16
and 64, successive steps on one backend), and under CUDA-graph capture and replay via `before_graph_replay`.
"""

from __future__ import annotations

import sys

import pytest
import torch

from moeserve.attention import create_attention_backend
from moeserve.forward_batch import AttentionMetadata
from moeserve.kernels.attention_reference import (
    make_paged_cache,
    mla_decode_attention_ref,
    paged_decode_attention_ref,
    rel_err,
)
from tests.interp import interp, launches_interpreter_run, run_interpreter_tests

# ---------------------------------------------------------------- selection (CPU)


def test_flashinfer_on_cpu_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="CUDA device.*'auto', 'torch' and 'triton'"):
        create_attention_backend("flashinfer", "cpu")


def test_flashinfer_without_the_package_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # `import flashinfer` now raises ImportError
    with pytest.raises(ValueError, match="flashinfer package does not import"):
        create_attention_backend("flashinfer", "cuda")


def test_unknown_backend_lists_flashinfer() -> None:
    with pytest.raises(ValueError, match="'auto', 'torch', 'triton', 'flashinfer'"):
        create_attention_backend("flashattn", "cpu")


def test_auto_and_the_others_still_work_on_cpu() -> None:
    assert create_attention_backend("auto", "cpu").name == "torch"
    assert create_attention_backend("torch", "cpu").name == "torch"


def test_flashinfer_decode_runs_in_cuda_graphs() -> None:
    from moeserve.runner.cuda_graphs import graph_unsupported_reason

    assert graph_unsupported_reason(torch.device("cuda"), "flashinfer", "triton", "local") is None


# ---------------------------------------------------------------- page ids (CPU)


def test_eager_wrappers_keep_one_plan_per_tbo_micro_batch() -> None:
    """With two-batch overlap the two micro-batches' attention layers alternate within a step: each must keep
    its own planned wrapper (one plan per micro-batch per step), not evict the other's at every layer."""
    from moeserve.attention.flashinfer_backend import EAGER_SLOTS_PER_LAYOUT, _Slot, pick_slot

    slots: list[_Slot] = []
    made, plans = [], []

    def make() -> _Slot:
        made.append(_Slot(object(), torch.empty(0)))
        return made[-1]

    def attend(meta) -> _Slot:  # what _eager_slot does, with the plan reduced to booking it
        slot, needs_plan = pick_slot(slots, meta, make)
        if needs_plan:
            slot.planned_for = meta
            plans.append(meta)
        return slot

    for step in range(3):  # TBO steps: micro-batches a and b alternate over 4 layers
        a, b = object(), object()
        used = {"a": set(), "b": set()}
        for _layer in range(4):
            used["a"].add(id(attend(a)))
            used["b"].add(id(attend(b)))
        assert len(used["a"]) == len(used["b"]) == 1 and used["a"] != used["b"]
        assert plans[-2:] == [a, b] and len(plans) == 2 * (step + 1)
    for _step in range(3):  # steps without TBO: one plan per step, no new wrappers
        meta = object()
        assert all(attend(meta) is attend(meta) for _layer in range(4))
    assert len(plans) == 6 + 3 and len(made) == EAGER_SLOTS_PER_LAYOUT == 2


def _indices_ref(block_tables: torch.Tensor, seq_lens: list[int], page: int) -> torch.Tensor:
    rows = [block_tables[i, : (n + page - 1) // page] for i, n in enumerate(seq_lens)]
    return torch.cat(rows).to(torch.int32)


@pytest.mark.parametrize("page", [1, 16, 64])
def test_host_csr_matches_definition(page: int) -> None:
    from moeserve.attention.flashinfer_backend import HostCsr

    g = torch.Generator().manual_seed(page)
    lens = torch.randint(1, 300, (11,), generator=g).tolist()
    csr = HostCsr.from_seq_lens(lens, page)
    pages = [(n + page - 1) // page for n in lens]
    assert csr.qo_indptr.tolist() == list(range(12))
    assert csr.kv_indptr.tolist() == [sum(pages[:i]) for i in range(12)]
    assert csr.kv_len.tolist() == lens and csr.total_pages == sum(pages)
    assert csr.last_page_len.tolist() == [n - (p - 1) * page for n, p in zip(lens, pages)]
    assert all(1 <= x <= page for x in csr.last_page_len.tolist())
    assert all(t.dtype == torch.int32 for t in (csr.qo_indptr, csr.kv_indptr, csr.kv_len, csr.last_page_len))


def _check_pages_to_indices(device: str, num_reqs: int, page: int, seed: int) -> None:
    from moeserve.attention.flashinfer_backend import pages_to_indices

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 40 * page, (num_reqs,), generator=g).tolist()
    width = max((n + page - 1) // page for n in lens) + 3  # rows padded past the real pages
    tables = torch.randint(0, 10_000, (num_reqs, width), generator=g, dtype=torch.int32)
    ref = _indices_ref(tables, lens, page)
    out = torch.full((ref.numel() + 5,), -7, dtype=torch.int32)
    out, tables = out.to(device), tables.to(device)
    pages_to_indices(tables, torch.tensor(lens, dtype=torch.int32, device=device), page, out)
    assert torch.equal(out[: ref.numel()].cpu(), ref)
    assert (out[ref.numel():] == -7).all(), "entries past the last page must stay untouched"


@interp
@pytest.mark.parametrize(("num_reqs", "page"), [(1, 16), (5, 1), (7, 16), (300, 4)])
def test_interp_pages_to_indices(num_reqs: int, page: int) -> None:
    _check_pages_to_indices("cpu", num_reqs, page, seed=num_reqs)


@launches_interpreter_run
def test_pages_to_indices_under_interpreter() -> None:
    run_interpreter_tests(__file__)


# ---------------------------------------------------------------- decode on the GPU

BF16 = torch.bfloat16


def _problem(layout: str, lens: list[int], page: int, seed: int):
    """(q, k_cache, v_cache, block_tables, seq_lens, scale, fp32 reference) on the GPU, random."""
    torch.manual_seed(seed)
    if layout == "mla":
        kv, _, bt, sl = make_paged_cache(lens, page, 1, 576, None, BF16, "cuda", seed=seed)
        q = torch.randn(len(lens), 16, 576, device="cuda", dtype=BF16)
        return q, kv, kv[..., :512], bt, sl, 0.07, mla_decode_attention_ref(q, kv, bt, sl, 0.07, 512)
    k, v, bt, sl = make_paged_cache(lens, page, 4, 128, 128, BF16, "cuda", seed=seed)
    q = torch.randn(len(lens), 32, 128, device="cuda", dtype=BF16)
    return q, k, v, bt, sl, 128**-0.5, paged_decode_attention_ref(q, k, v, bt, sl, 128**-0.5)


@pytest.fixture(scope="module")
def fi_backend():
    pytest.importorskip("flashinfer")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from moeserve.attention.flashinfer_backend import FlashInferAttentionBackend

    return FlashInferAttentionBackend("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("layout", ["mla", "gqa"])
def test_gpu_decode_matches_reference_and_triton(fi_backend, layout: str, page: int) -> None:
    from moeserve.attention.triton_backend import TritonAttentionBackend

    triton_backend = TritonAttentionBackend()
    for step, batch in enumerate([1, 7, 33]):  # successive steps on one backend: each re-plans
        g = torch.Generator().manual_seed(100 * step + page)
        lens = torch.randint(1, 700, (batch,), generator=g).tolist()
        q, k, v, bt, sl, scale, ref = _problem(layout, lens, page, seed=step)
        meta = AttentionMetadata.for_decode(bt, sl, page)
        out = fi_backend.attend(q, k, v, meta, scale)
        assert out.shape == ref.shape and out.dtype == BF16
        assert rel_err(out, ref) <= 1e-2, (layout, page, batch)
        assert rel_err(out, triton_backend.attend(q, k, v, meta, scale)) <= 1e-2
        assert torch.equal(fi_backend.attend(q, k, v, meta, scale), out), "layers 2..L reuse the plan"


@pytest.mark.gpu
def test_gpu_prefill_steps_run_the_triton_path(fi_backend) -> None:
    from moeserve.attention.triton_backend import TritonAttentionBackend
    from moeserve.kernels.attention_reference import query_start_loc

    lens, new = [40, 17], [5, 17]
    k, v, bt, sl = make_paged_cache(lens, 16, 4, 128, 128, BF16, "cuda")
    q = torch.randn(sum(new), 32, 128, device="cuda", dtype=BF16)
    qsl = query_start_loc(new, "cuda")
    meta = AttentionMetadata(qsl, sl, bt, torch.zeros(sum(new), dtype=torch.int64, device="cuda"), qsl.tolist(),
                             lens, 16, max(new), max(lens))
    out = fi_backend.attend(q, k, v, meta, 0.1)
    assert torch.equal(out, TritonAttentionBackend().attend(q, k, v, meta, 0.1))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["mla", "gqa"])
def test_gpu_graph_replay_after_before_graph_replay(fi_backend, layout: str) -> None:
    """Emulates the graph runner: static buffers, warm-up, capture, then replays of new batches."""
    padded, page, max_blocks = 8, 16, 40
    q0, k, v, _, _, scale, _ = _problem(layout, [page * max_blocks] * padded, page, seed=1)
    static_q = q0.clone()
    static_lens = torch.ones(padded, dtype=torch.int32, device="cuda")
    static_tables = torch.zeros(padded, max_blocks, dtype=torch.int32, device="cuda")

    def batch_meta(lens: list[int]) -> AttentionMetadata:
        return AttentionMetadata(
            torch.arange(padded + 1, dtype=torch.int32, device="cuda"), static_lens, static_tables,
            torch.zeros(padded, dtype=torch.int64, device="cuda"), list(range(padded + 1)), lens, page, 1,
            page * max_blocks)

    meta = batch_meta([1] * padded)
    fi_backend.before_graph_replay(meta)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fi_backend.attend(static_q, k, v, meta, scale)  # warm-up: creates and plans this size's wrapper
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        static_out = fi_backend.attend(static_q, k, v, meta, scale)
    torch.cuda.synchronize()
    num_blocks = k.shape[0]
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        lens = torch.randint(1, page * max_blocks, (padded,), generator=g).tolist()
        tables = torch.randint(0, num_blocks, (padded, max_blocks), generator=g, dtype=torch.int32)
        static_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        static_tables.copy_(tables)
        static_q.copy_(torch.randn_like(static_q))
        fi_backend.before_graph_replay(batch_meta(lens))
        graph.replay()
        if layout == "mla":
            ref = mla_decode_attention_ref(static_q, k, static_tables, static_lens, scale, 512)
        else:
            ref = paged_decode_attention_ref(static_q, k, v, static_tables, static_lens, scale)
        assert rel_err(static_out, ref) <= 1e-2, (layout, step)


@pytest.mark.gpu
def test_gpu_pages_to_indices() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for num_reqs, page in [(1, 16), (33, 16), (257, 64), (64, 1)]:
        _check_pages_to_indices("cuda", num_reqs, page, seed=num_reqs)


# ---------------------------------------------------------------- the engine on FlashInfer (GPU)

# Tiny checkpoints with the head shapes FlashInfer's compiled kernels take: MLA latent 512 + rope 64, GQA d128.
ENGINE_SHAPES = {
    "deepseek_v2": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
                        num_attention_heads=16, num_key_value_heads=16),
    "qwen3_moe": dict(head_dim=128),
}


@pytest.mark.gpu
@pytest.mark.parametrize("arch", sorted(ENGINE_SHAPES))
def test_gpu_engine_on_flashinfer_matches_triton(arch: str, tiny_checkpoint) -> None:
    """The engine with attention_backend="flashinfer" (decode through FlashInfer, in CUDA graphs planned by
    before_graph_replay) generates what the Triton backend generates, up to bf16 near-ties: where the two
    greedy sequences part, FlashInfer's token is within 0.1 nats of the Triton run's best at that step."""
    pytest.importorskip("flashinfer")
    from tests.test_gpu_engine import assert_greedy_agree_up_to_ties, engine_greedy_outputs

    def runs_backend(name: str):
        def check(llm) -> None:
            assert llm.engine.runner.ctx.attention.name == name and llm.engine.runner.graphs is not None
        return check

    path = str(tiny_checkpoint(arch, **ENGINE_SHAPES[arch]))
    outs = {b: engine_greedy_outputs(path, 3, runs_backend(b), attention_backend=b)
            for b in ("triton", "flashinfer")}
    assert_greedy_agree_up_to_ties(outs["flashinfer"], outs["triton"], min_identical=3)  # half the prompts
