"""CUDA graphs for decode steps: capture the model's forward and LM head once per batch size, replay them every
decode step.

A decode step launches hundreds of small kernels (a few per layer per op) whose launch cost, not their run
time, dominates at small batches. Captured once at start-up, the whole forward replays as one graph launch.

Invariants a replay relies on:
- Every per-step input lives in a static device buffer (`DecodeBuffers`) that is updated in place; the graph
  captured the buffers' addresses, never their values.
- A batch of n requests runs in the graph of the next captured size b >= n. The b - n padding rows read and
  write only the scratch KV block (one block the scheduler never hands out): token 0 at position 0, one
  cached token, block table all scratch. Real requests' rows and KV blocks are untouched by them, and their
  router choices are masked to "no expert" (`ForwardBatch.num_real_tokens`), so they read no expert weights.
- Shapes that kernels derive on the host are fixed at capture: ``max_query_len`` is 1 and ``max_seq_len`` is
  the model's context limit (the split-KV decode kernel sizes its grid from it; any shorter context is
  handled inside the kernel).
- Only graph-safe kernels are captured: no host syncs, no data-dependent shapes. The torch reference attention
  and expert kernels loop over Python lists and are not; `graph_unsupported_reason` says so.
- Under expert parallelism the graphs hold the MoE layers' collectives (the all-gather dispatcher: fixed-size
  buffers, no host sync). Every EP rank then replays the same size in the same step, the size for the most
  requests any rank has (`StepPlan`), a rank without requests included: its rows are all padding. The
  dispatchers' capacity is that size (`begin_step`, before capture and before each replay). NCCL's
  collectives are captured after an eager warm-up of the same size (which also creates the communicator);
  `TORCH_NCCL_BLOCKING_WAIT=1` cannot be used with them (its wait syncs the host, which capture forbids).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from moeserve.attention.base import AttentionBackend
from moeserve.forward_batch import (
    AttentionMetadata,
    BlockTableRows,
    ForwardBatch,
    ForwardMode,
    pack_block_tables,
)
from moeserve.scheduler.output import ScheduledRequest

logger = logging.getLogger("moeserve")

# Fine steps at small sizes (padding a batch of 10 to 16 wastes little), coarser ones above.
_BASE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)

# Backends known to be free of host syncs and data-dependent shapes in decode.
GRAPH_SAFE_ATTENTION = frozenset({"triton", "flashinfer"})
GRAPH_SAFE_EXPERTS = frozenset({"triton"})
# The all-gather's buffers have the step's capacity (the graph's size on every rank) and it never syncs the host;
# the all-to-all reads its row counts on the host, and DeepEP's normal mode sizes buffers from the routing.
GRAPH_SAFE_DISPATCHERS = frozenset({"local", "all_gather"})


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture, ascending, ending at max_batch: the base list, then steps of 64 beyond 256."""
    sizes = [s for s in _BASE_SIZES if s <= max_batch]
    sizes += list(range(_BASE_SIZES[-1] + 64, max_batch + 1, 64))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def graph_unsupported_reason(
    device: torch.device, attention: str, experts: str, dispatcher: str
) -> str | None:
    """Why decode steps cannot run in CUDA graphs on this set-up, or None when they can."""
    if device.type != "cuda":
        return f"device is {device.type}"
    if attention not in GRAPH_SAFE_ATTENTION:
        return f"attention backend {attention!r} is not graph-safe (safe: {sorted(GRAPH_SAFE_ATTENTION)})"
    if experts not in GRAPH_SAFE_EXPERTS:
        return f"expert kernel {experts!r} is not graph-safe (safe: {sorted(GRAPH_SAFE_EXPERTS)})"
    if dispatcher not in GRAPH_SAFE_DISPATCHERS:
        return f"MoE dispatcher {dispatcher!r} is not captured (only {sorted(GRAPH_SAFE_DISPATCHERS)})"
    return None


def _input_views(max_batch: int, device: torch.device,
                 pinned: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One byte buffer (on device, or pinned host memory) and its views: tokens [3, max_batch] int64 and
    lens [max_batch + 1] int32 (seq_lens, then num_real)."""
    tokens_bytes = 3 * max_batch * 8
    raw = torch.empty(tokens_bytes + (max_batch + 1) * 4, dtype=torch.uint8,
                      device="cpu" if pinned else device, pin_memory=pinned)
    return raw, raw[:tokens_bytes].view(torch.int64).view(3, max_batch), raw[tokens_bytes:].view(torch.int32)


class DecodeBuffers:
    """Static inputs of a decode batch of up to `max_batch` requests, plus pinned host staging.

    Device (addresses fixed for the buffers' lifetime):
      tokens:       [3, max_batch] int64 — rows: input_ids, positions, slot_mapping.
      seq_lens:     [max_batch] int32; num_real: [1] int32, the number of real (non-padding) rows.
      tokens, seq_lens and num_real are views of one buffer, so one copy moves them.
      block_tables: [max_batch, max_blocks] int32.
      query_start_loc [max_batch + 1] int32, sample_indices [max_batch] int64: constant (one token each).
    `fill` writes a step's values into pinned host memory and copies them with non_blocking copies; the next
    `fill` first waits for the previous copy (an event), so the host never overwrites memory still in flight.
    """

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, scratch_block: int,
                 device: torch.device) -> None:
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size
        self.scratch_block, self.device = scratch_block, device
        i32, i64 = torch.int32, torch.int64
        self._inputs, self.tokens, lens = _input_views(max_batch, device, pinned=False)
        self.tokens.zero_()
        lens.fill_(1)
        self.seq_lens, self.num_real = lens[:max_batch], lens[max_batch:]
        self.block_tables = torch.full((max_batch, max_blocks), scratch_block, dtype=i32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=i32, device=device)
        self.sample_indices = torch.arange(max_batch, dtype=i64, device=device)
        self.tokens[2].fill_(scratch_block * block_size)  # every row starts as padding
        pinned = device.type == "cuda"
        if pinned:
            self._host_inputs, self._host_tokens, self._host_lens = _input_views(max_batch, device, pinned=True)
            self._host_tables = torch.empty(max_batch * max_blocks, dtype=i32, pin_memory=True)
        else:  # CPU: the device buffers are host memory already
            self._host_tokens, self._host_lens = self.tokens, lens
            self._host_tables = None
        self._copied: torch.cuda.Event | None = None

    def fill(
        self, reqs: Sequence[ScheduledRequest], padded: int, table_rows: BlockTableRows | None = None
    ) -> list[int]:
        """Write the decode inputs of `reqs` (one token each) into rows [0, n) and padding into [n, padded).
        table_rows: the runner's kept block tables, which write reqs' tables straight into the staging memory
        (and are updated); None packs them from the lists. Returns seq_lens of the padded batch as a host
        list."""
        n, bs = len(reqs), self.block_size
        assert n <= padded <= self.max_batch
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have left the pinned buffers
        positions = [r.start_position for r in reqs]
        slots = [r.block_ids[p // bs] * bs + p % bs for r, p in zip(reqs, positions)]
        seq_lens = [p + 1 for p in positions] + [1] * (padded - n)
        pad_slot = self.scratch_block * bs
        host = self._host_tokens.numpy()
        host[0, :padded] = [r.token_ids[0] for r in reqs] + [0] * (padded - n)
        host[1, :padded] = positions + [0] * (padded - n)
        host[2, :padded] = slots + [pad_slot] * (padded - n)
        host_lens = self._host_lens.numpy()
        host_lens[:padded] = seq_lens
        host_lens[self.max_batch] = n
        width = max([1, *(len(r.block_ids) for r in reqs)])  # the packed tables' width
        assert width <= self.max_blocks, "a request's block table is longer than the context limit allows"
        if self._host_tables is None:
            host_tables = self.block_tables[:padded, :width]
        else:
            host_tables = self._host_tables[: padded * width].view(padded, width)
        # Past a row's real blocks the kernels read nothing (seq_lens bound them); padding rows: scratch.
        if table_rows is None:
            host_tables[:n] = pack_block_tables([r.block_ids for r in reqs]).table
        else:
            table_rows.gather([r.request_id for r in reqs], [r.block_ids for r in reqs], out=host_tables[:n])
        host_tables[n:] = self.scratch_block
        if self._host_tables is not None:
            self._inputs.copy_(self._host_inputs, non_blocking=True)
            self.block_tables[:padded, :width].copy_(host_tables, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return seq_lens

    def batch(self, size: int, seq_lens_cpu: list[int], max_seq_len: int,
              extras: dict[str, torch.Tensor] | None = None) -> ForwardBatch:
        """The ForwardBatch over rows [0, size): views of the static buffers. extras: `ForwardBatch.extras`
        (static tensors the graph writes, e.g. the expert-load counts)."""
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.tokens[2, :size],
            query_start_loc_cpu=list(range(size + 1)),
            seq_lens_cpu=seq_lens_cpu,
            block_size=self.block_size,
            max_query_len=1,
            max_seq_len=max_seq_len,
        )
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.tokens[0, :size],
            positions=self.tokens[1, :size],
            attn=meta,
            sample_indices=self.sample_indices[:size],
            num_real_tokens=self.num_real,
            extras=dict(extras or {}),
        )


class CudaGraphRunner:
    """Runs decode batches of up to `max_batch` requests through graphs captured per padded size.

    model: the loaded model (its KV caches bound, with `scratch_block` allocated but never scheduled).
    attention: the model's attention backend; its `before_graph_replay` runs before each capture and replay.
    max_seq_len: the context limit; fixes the decode kernels' host-side launch shapes.
    use_graphs: False runs the same padded static batch eagerly (CPU tests of the padding logic).
    begin_step(size): with expert parallelism, tells the dispatchers the step's capacity (the size) before each
        capture and replay; its presence marks the graphs as holding collectives (see the module docstring).
    extras: `ForwardBatch.extras` the captured batches carry (static tensors, e.g. the expert-load counts).
    """

    def __init__(self, model: nn.Module, *, max_batch: int, max_seq_len: int, block_size: int,
                 scratch_block: int, device: torch.device, use_graphs: bool = True,
                 attention: AttentionBackend | None = None, begin_step: Callable[[int], None] | None = None,
                 extras: dict[str, torch.Tensor] | None = None) -> None:
        self.model = model
        self.attention = attention
        self.begin_step = begin_step
        self.extras = extras or {}
        self.max_seq_len = max_seq_len
        self.sizes = graph_batch_sizes(max_batch)
        max_blocks = -(-max_seq_len // block_size)
        self.buffers = DecodeBuffers(self.sizes[-1], max_blocks, block_size, scratch_block, device)
        self.use_graphs = use_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def padded_size(self, n: int) -> int:
        """The smallest captured size >= n (n <= max_batch)."""
        return next(s for s in self.sizes if s >= n)

    @property
    def collective(self) -> bool:
        """Whether the graphs hold EP collectives (every EP rank must replay the same size each step)."""
        return self.begin_step is not None

    def fits(self, reqs: Sequence[ScheduledRequest]) -> bool:
        """Whether this step can replay a graph: 1..max_batch requests (0 too, with collectives: an idle EP
        rank replays padding rows only), each computing and sampling one token. (The caller also checks the
        step plan: decode mode, no two-batch overlap.)"""
        lowest = 0 if self.collective else 1
        if not lowest <= len(reqs) <= self.max_batch:
            return False
        return all(len(r.token_ids) == 1 and r.sample for r in reqs)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per size, largest first so smaller ones reuse the shared memory pool.

        Each size runs once eagerly first (on the capture stream) so Triton compiles and caches its kernels
        outside the capture. Every row is padding here: the runs write only the scratch block. With collectives
        every EP rank captures the same sizes in the same order, so each warm-up and capture meets its peers'.
        """
        assert self.use_graphs and self.buffers.device.type == "cuda"
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.buffers.device)
        # Collectives: other threads (the process group's watchdog) may query streams while this one captures.
        mode = "thread_local" if self.collective else "global"
        for size in reversed(self.sizes):
            if self.begin_step is not None:
                self.begin_step(size)
            self.buffers.fill([], size)  # copies on the current stream: the capture stream waits for them
            stream.wait_stream(torch.cuda.current_stream())
            batch = self.buffers.batch(size, [1] * size, self.max_seq_len, self.extras)
            if self.attention is not None:
                self.attention.before_graph_replay(batch.attn)
            with torch.cuda.stream(stream):
                self._forward(batch)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=mode):
                self.outputs[size] = self._forward(batch)
            self.graphs[size] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize(self.buffers.device)

    def run(
        self,
        reqs: Sequence[ScheduledRequest],
        table_rows: BlockTableRows | None = None,
        fill_inputs: Callable[[torch.Tensor], None] | None = None,
        size: int | None = None,
    ) -> torch.Tensor:
        """Forward of a decode batch and its LM head. Returns logits [len(reqs), vocab] in the model dtype,
        rows in request order. The tensor is the graph's own output: read it before the next `run`.
        table_rows: as `DecodeBuffers.fill`. fill_inputs(input_ids [len(reqs)] int64, on the device) may
        rewrite inputs on the device before the replay (placeholders). size: the captured size to replay
        (with collectives, the one every EP rank agreed on); default the smallest that holds reqs."""
        n = len(reqs)
        size = self.padded_size(n) if size is None else size
        assert size in self.sizes and n <= size, f"{n} requests cannot replay the graph of size {size}"
        if self.begin_step is not None:
            self.begin_step(size)
        seq_lens = self.buffers.fill(reqs, size, table_rows)
        if fill_inputs is not None and n:
            fill_inputs(self.buffers.tokens[0, :n])
        if not self.use_graphs:
            return self._forward(self.buffers.batch(size, seq_lens, self.max_seq_len, self.extras))[:n]
        if self.attention is not None and self.attention.plans_graph_replays:
            self.attention.before_graph_replay(self.buffers.batch(size, seq_lens, self.max_seq_len).attn)
        self.graphs[size].replay()
        return self.outputs[size][:n]

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        """What a graph holds: the forward and the LM head (every row of a decode batch samples)."""
        return self.model.compute_logits(self.model(batch))

