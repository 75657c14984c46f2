"""FlashInfer decode attention behind the `AttentionBackend` interface (optional; CUDA only).

Decode steps (every request computes one token, ``meta.max_query_len == 1``) run FlashInfer's paged kernels on
our cache layout as it is, without copies:
- MLA latent cache (``kv [num_blocks, block_size, 1, rank + rope]``, ``v_cache`` its first ``rank`` columns):
  `flashinfer.mla.BatchMLAPagedAttentionWrapper` over the view ``kv[:, :, 0]`` (its "packed" layout);
- GQA/MHA cache (``k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]``, equal strides):
  `flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper` in its NHD layout, on tensor cores (its fa2
  prefill kernels; on an H100 at B64 / ctx 4096 / 32-4 heads: 188 us, against 352 us for its CUDA-core
  decode kernel and 188-203 us for ours; see benchmarks/flashinfer_probe.py).
Everything else (prefill, extend, mixed steps, write_kv, shapes FlashInfer does not take) runs the inherited
Triton paths, so results agree with `TritonAttentionBackend` wherever FlashInfer is not used.

FlashInfer addresses pages in CSR form (``kv_indptr [R + 1]``, ``kv_indices [total_pages]``) rather than our
padded ``block_tables [R, max_blocks]``. The page ids are gathered on the device by one small Triton kernel
(`pages_to_indices`), so no per-step host sync reads device data; the host-side arrays FlashInfer's ``plan()``
wants (``qo_indptr``, ``kv_indptr``, ``kv_len``, ``last_page_len``) come from ``meta.seq_lens_cpu``.

Host work per decode step (eager): one ``plan()`` per layout at the step's first attention layer, i.e. the
CSR arrays above (O(num_reqs) CPU tensor ops), FlashInfer's Python validation and C++ scheduler, and one
async copy of the plan into device memory; one wait on the previous plan's event first (see `_wait_plan`);
then one `pages_to_indices` launch. Every layer then costs one ``run()`` (Python checks + one or two kernel
launches). Measured on an H100 host (benchmarks/flashinfer_probe.py): the first layer of a step 0.55 ms (GQA)
and 1.5-2.2 ms (MLA: FlashInfer's MLA plan() is mostly Python validation), each further layer 60-140 us.
Workspace buffers are allocated once: one float workspace shared by all wrappers, and FlashInfer's 8 MiB
device + 8 MiB pinned integer workspace per wrapper (up to two eager wrappers per layout, one per TBO
micro-batch, plus one per captured batch size); only FlashInfer's eager MLA plan takes a fresh integer pair from
torch's caching allocators each time.

CUDA graphs: `CudaGraphRunner` calls `before_graph_replay` before each capture's warm-up run and before every
replay (see there); the captured graph gathers the page ids and runs FlashInfer's kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeserve.attention.triton_backend import TritonAttentionBackend, mla_lora_rank
from moeserve.forward_batch import AttentionMetadata

_HALF = (torch.float16, torch.bfloat16)


def flashinfer_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the "flashinfer" backend cannot run on ``device`` (None when it can): it needs a CUDA device and
    an importable ``flashinfer`` package."""
    if torch.device(device).type != "cuda":
        return f"it needs a CUDA device, got {str(device)!r}"
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing at import
        return f"the flashinfer package does not import ({type(exc).__name__}: {exc})"
    return None


@triton.jit
def _pages_to_indices_kernel(BlockTables, SeqLens, Indices, stride_bt, PAGE: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    req = tl.program_id(0)
    # Where this request's pages start: the pages of all earlier requests (each program sums them itself,
    # so the conversion is one launch with no separate prefix-sum pass).
    start = 0
    for r0 in range(0, req, BLOCK_R):
        offs = r0 + tl.arange(0, BLOCK_R)
        lens = tl.load(SeqLens + offs, mask=offs < req, other=0)
        start += tl.sum((lens + PAGE - 1) // PAGE)
    num_pages = (tl.load(SeqLens + req) + PAGE - 1) // PAGE
    for c0 in range(0, num_pages, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = cols < num_pages
        ids = tl.load(BlockTables + req * stride_bt + cols, mask=ok)
        tl.store(Indices + start + cols, ids, mask=ok)


def pages_to_indices(block_tables: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                     out: torch.Tensor) -> None:
    """Write each request's page ids back to back (FlashInfer's ``kv_indices``), on the device, no sync.

    block_tables: [R, max_blocks] int32 (row stride any, unit column stride); seq_lens: [R] int32;
    out: [>= total_pages] int32, where total_pages = sum(ceil(seq_lens / page_size)). Entries past
    total_pages are left as they were. Graph-safe: the launch shape depends on R only.
    """
    num_reqs = seq_lens.shape[0]
    assert block_tables.shape[0] >= num_reqs and block_tables.stride(1) == 1
    assert block_tables.dtype == seq_lens.dtype == out.dtype == torch.int32
    if num_reqs == 0:
        return
    block_c = min(1024, triton.next_power_of_2(max(block_tables.shape[1], 16)))
    _pages_to_indices_kernel[(num_reqs,)](
        block_tables, seq_lens, out, block_tables.stride(0), PAGE=page_size, BLOCK_R=256, BLOCK_C=block_c,
    )


@dataclass(slots=True)
class HostCsr:
    """FlashInfer's host-side metadata of one decode batch (CPU int32 tensors).

    qo_indptr [R + 1] = 0..R (one query each); kv_indptr [R + 1] prefix sums of pages per request;
    kv_len [R] = seq_lens; last_page_len [R] in 1..page_size; total_pages = kv_indptr[-1].
    """

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_len: torch.Tensor
    last_page_len: torch.Tensor
    total_pages: int

    @classmethod
    def from_seq_lens(cls, seq_lens: list[int], page_size: int) -> HostCsr:
        """seq_lens: each request's context length (>= 1), host ints."""
        kv_len = torch.tensor(seq_lens, dtype=torch.int32)
        pages = (kv_len + page_size - 1) // page_size
        kv_indptr = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        torch.cumsum(pages, 0, out=kv_indptr[1:])
        last = kv_len - (pages - 1) * page_size
        qo_indptr = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
        return cls(qo_indptr, kv_indptr, kv_len, last, int(kv_indptr[-1]))


@dataclass(slots=True, frozen=True)
class _Key:
    """What a plan depends on besides the batch: layout ("mla" / "gqa") and the attention shapes."""

    layout: str
    num_heads: int
    page_size: int
    num_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    scale: float


@dataclass(slots=True, eq=False)
class _Slot:
    """One FlashInfer wrapper and the step it was last planned for.

    indices: its page-id buffer (eager: grown on demand; graph: fixed capacity, read by the captured graph).
    graph: whether the wrapper is in FlashInfer's CUDA-graph mode (fixed-address metadata buffers).
    planned_for: the step metadata object of the last plan (each step brings a new object).
    converted_for / converted_capturing: the forward of the last `pages_to_indices` (graph slots).
    """

    wrapper: object
    indices: torch.Tensor
    graph: bool = False
    planned_for: AttentionMetadata | None = None
    converted_for: AttentionMetadata | None = None
    converted_capturing: bool = False


# Eager wrappers kept per layout: one per TBO micro-batch, so each keeps its plan for the whole step while the
# two micro-batches' layers alternate (with one, every layer re-planned and waited for the previous plan).
EAGER_SLOTS_PER_LAYOUT = 2


def pick_slot(slots: list[_Slot], meta: AttentionMetadata, make: Callable[[], _Slot]) -> tuple[_Slot, bool]:
    """(slot, needs_plan) for a forward with metadata ``meta``: the slot last planned for it, else a new one
    from ``make()`` while there are fewer than EAGER_SLOTS_PER_LAYOUT, else the one planned longest ago.
    ``slots`` is kept in plan order (oldest first); a slot returned with needs_plan moves to its end."""
    for slot in slots:
        if slot.planned_for is meta:
            return slot, False
    slot = make() if len(slots) < EAGER_SLOTS_PER_LAYOUT else slots.pop(0)
    slots.append(slot)
    return slot, True


class FlashInferAttentionBackend(TritonAttentionBackend):
    """Decode through FlashInfer (MLA and GQA layouts); prefill, extend and KV writes through Triton.

    device: the CUDA device. workspace_bytes: FlashInfer's float workspace (split-KV partial results),
    shared by all wrappers since they run one after another on one stream. mla_backend: FlashInfer's MLA
    implementation ("auto" picks fa3 on Hopper, else fa2; or "fa2" / "fa3").
    Raises ImportError when flashinfer does not import, ValueError on a non-CUDA device.
    """

    name = "flashinfer"
    plans_graph_replays = True

    def __init__(self, device: torch.device | str = "cuda", workspace_bytes: int = 128 << 20,
                 mla_backend: str = "auto") -> None:
        reason = flashinfer_unavailable_reason(device)
        if reason is not None:
            error = ValueError if torch.device(device).type != "cuda" else ImportError
            raise error(f"attention backend 'flashinfer' is unavailable: {reason}")
        import flashinfer

        self._fi = flashinfer
        self.device = torch.device(device)
        self.mla_backend = mla_backend
        self._workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._eager: dict[_Key, list[_Slot]] = {}  # oldest plan first (`pick_slot`)
        self._graph: dict[tuple[_Key, int], _Slot] = {}  # keyed by (shapes, padded batch size)
        self._graph_meta: AttentionMetadata | None = None
        self._last_plan: torch.cuda.Event | None = None

    def attend(self, q, k_cache, v_cache, meta, scale):
        """As `AttentionBackend.attend`. Decode steps in a layout FlashInfer takes run FlashInfer's kernel
        (q: [R, Hq, Dk] -> [R, Hq, Dv] in q's dtype); the rest runs `TritonAttentionBackend.attend`."""
        layout = _layout(q, k_cache, v_cache) if meta.max_query_len == 1 and q.shape[0] > 0 else None
        if layout is None:
            return super().attend(q, k_cache, v_cache, meta, scale)
        assert q.shape[0] == meta.num_reqs, "a decode step has exactly one query per request"
        q = q if q.stride(-1) == 1 else q.contiguous()
        key = _Key(layout, q.shape[1], k_cache.shape[1], k_cache.shape[2], k_cache.shape[-1],
                   v_cache.shape[-1], q.dtype, k_cache.dtype, float(scale))
        slot = self._graph_slot(key, meta) if meta is self._graph_meta else self._eager_slot(key, meta)
        if layout == "mla":
            out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
            return slot.wrapper.run(query=q, kv_cache=k_cache[:, :, 0], out=out)
        return slot.wrapper.run(q, (k_cache, v_cache))

    def before_graph_replay(self, meta: AttentionMetadata) -> None:
        """Plan the decode batch a CUDA graph is about to run: call it before the warm-up run that precedes
        each capture, and before every replay.

        meta: the graph's batch (static device buffers: seq_lens, block_tables [padded, max_blocks]; host:
        seq_lens_cpu of the padded batch, padding rows included). At the warm-up, attention creates this batch
        size's wrappers with fixed-address buffers and plans them; the captured forward then gathers the page
        ids from the static block tables (`pages_to_indices`) and runs FlashInfer's kernels. Before a replay
        this rewrites, outside the graph, what those kernels read besides the cache: FlashInfer's schedule
        and its indptr / length buffers. Host work: one plan per layout, as in eager mode.
        """
        self._graph_meta = meta
        for (key, batch), slot in self._graph.items():
            if batch == meta.num_reqs:
                self._plan(slot, key, meta)

    # ------------------------------------------------------------------ planning

    def _eager_slot(self, key: _Key, meta: AttentionMetadata) -> _Slot:
        """The eager wrapper for ``key``, planned for this step (plan and page gathering: first layer only)."""
        assert not torch.cuda.is_current_stream_capturing(), (
            "FlashInfer attention under CUDA-graph capture needs before_graph_replay(meta) first"
        )
        slot, needs_plan = pick_slot(self._eager.setdefault(key, []), meta, lambda: self._new_slot(key.layout))
        if needs_plan:
            self._plan(slot, key, meta)
            pages_to_indices(meta.block_tables, meta.seq_lens, key.page_size, slot.indices)
        return slot

    def _graph_slot(self, key: _Key, meta: AttentionMetadata) -> _Slot:
        """The CUDA-graph wrapper of this padded batch size (created and planned at the warm-up run)."""
        capturing = torch.cuda.is_current_stream_capturing()
        slot = self._graph.get((key, meta.num_reqs))
        if slot is None:
            assert not capturing, "run the graph batch once eagerly (after before_graph_replay) before capture"
            slot = self._new_slot(key.layout, graph=(meta.num_reqs, meta.block_tables.shape[1]))
            self._graph[(key, meta.num_reqs)] = slot
        if slot.planned_for is not meta:
            assert not capturing, "a captured FlashInfer batch must be planned by before_graph_replay(meta)"
            self._plan(slot, key, meta)
        # Once per forward (the warm-up, then again inside the capture, so the graph holds it).
        if slot.converted_for is not meta or slot.converted_capturing != capturing:
            pages_to_indices(meta.block_tables, meta.seq_lens, key.page_size, slot.indices)
            slot.converted_for, slot.converted_capturing = meta, capturing
        return slot

    def _new_slot(self, layout: str, graph: tuple[int, int] | None = None) -> _Slot:
        """A wrapper for ``layout``. graph = (batch size, max blocks per request) of a captured batch: the
        wrapper then gets the fixed-address metadata buffers FlashInfer's CUDA-graph mode reads."""
        fi, ws = self._fi, self._workspace
        if graph is None:
            indices = torch.empty(0, dtype=torch.int32, device=self.device)
            if layout == "mla":
                return _Slot(fi.mla.BatchMLAPagedAttentionWrapper(ws, backend=self.mla_backend), indices)
            return _Slot(fi.decode.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True,
                                                                      backend="fa2"), indices)
        batch, max_blocks = graph

        def buf(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int32, device=self.device)

        indices = buf(batch * max_blocks)
        if layout == "mla":
            wrapper = fi.mla.BatchMLAPagedAttentionWrapper(
                ws, use_cuda_graph=True, qo_indptr=buf(batch + 1), kv_indptr=buf(batch + 1),
                kv_indices=indices, kv_len_arr=buf(batch), backend=self.mla_backend,
            )
        else:
            wrapper = fi.decode.BatchDecodeWithPagedKVCacheWrapper(
                ws, "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=buf(batch + 1),
                paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=buf(batch), backend="fa2",
            )
        return _Slot(wrapper, indices, graph=True)

    def _plan(self, slot: _Slot, key: _Key, meta: AttentionMetadata) -> None:
        """FlashInfer's plan() for this step's batch (host work; see the module docstring).

        An eager slot grows its page-id buffer here. A graph slot's buffer is fixed and filled inside the
        graph, so its ``kv_indices`` argument is that buffer itself (MLA: FlashInfer copies it onto itself)
        or an empty slice of it (GQA: nothing to copy).
        """
        csr = HostCsr.from_seq_lens(meta.seq_lens_cpu, key.page_size)
        if slot.graph:
            indices = slot.indices if key.layout == "mla" else slot.indices[:0]
        else:
            if slot.indices.numel() < csr.total_pages:
                size = max(csr.total_pages, 2 * slot.indices.numel())
                slot.indices = torch.empty(size, dtype=torch.int32, device=self.device)
            indices = slot.indices[: csr.total_pages]
        self._wait_plan()
        if key.layout == "mla":
            slot.wrapper.plan(
                metadata=self._fi.mla.MLAPlanMetadata.csr(csr.qo_indptr, csr.kv_indptr, indices, csr.kv_len),
                num_heads=key.num_heads, head_dim_ckv=key.head_dim_v, head_dim_kpe=key.head_dim_k - key.head_dim_v,
                page_size=key.page_size, causal=False, sm_scale=key.scale, q_data_type=key.q_dtype,
                kv_data_type=key.kv_dtype,
            )
        else:
            slot.wrapper.plan(
                csr.kv_indptr, indices, csr.last_page_len, key.num_heads, key.num_kv_heads, key.head_dim_k,
                key.page_size, q_data_type=key.q_dtype, kv_data_type=key.kv_dtype, sm_scale=key.scale,
            )
        self._last_plan = torch.cuda.Event()
        self._last_plan.record()
        slot.planned_for = meta

    def _wait_plan(self) -> None:
        """Wait until the GPU has reached the previous plan's copy (normally long done).

        plan() stages its schedule in pinned host memory and copies it to the device asynchronously without
        waiting; the next plan() reuses that host memory (the same buffer, or a freed one the pinned
        allocator hands out again). Were the host a step ahead of the GPU, the pending copy would read the
        new plan.
        """
        if self._last_plan is not None:
            self._last_plan.synchronize()


def _layout(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """"mla", "gqa", or None when FlashInfer's decode kernels do not take these shapes and dtypes.

    MLA: latent rank a multiple of 128 (fa3: 128, 256 or 512) and rope width a multiple of 64.
    GQA: head_dim 64, 128 or 256, equal for K and V, and K/V caches with identical strides.
    Both: q, K and V in one dtype, fp16 or bf16.
    """
    if q.dtype not in _HALF or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return None
    rank = mla_lora_rank(k_cache, v_cache)
    if rank is not None:
        rope = k_cache.shape[-1] - rank
        return "mla" if rank in (128, 256, 512) and rope % 64 == 0 else None
    if v_cache.data_ptr() == k_cache.data_ptr() or k_cache.stride() != v_cache.stride():
        return None
    if k_cache.shape[-1] != v_cache.shape[-1] or k_cache.shape[-1] not in (64, 128, 256):
        return None
    return "gqa" if q.shape[1] % k_cache.shape[2] == 0 else None
