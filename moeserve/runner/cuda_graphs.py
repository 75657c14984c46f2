"""CUDA graphs for decode steps: capture the model's forward, LM head and greedy argmax once per batch size, replay
them every decode step.

A decode step launches hundreds of small kernels (a few per layer per op) whose launch cost, not their run
time, dominates at small batches. Captured once at start-up, the whole forward replays as one graph launch.

Invariants a replay relies on:
- Every per-step input lives in a static device buffer (`DecodeBuffers`); the graph captured the buffers'
  addresses, never their values. The host writes a step's inputs to pinned staging, and the graph's first kernel
  copies them to those buffers (taking placeholders' tokens from the step before's, on the device); its last
  writes the greedy tokens to the device and to pinned memory. A replay puts nothing else on the stream.
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
from moeserve.runner.sampler import greedy_argmax
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


_TOKEN_ROWS = 4  # the staging's token rows: ids, positions, slots, sources


@dataclass(frozen=True)
class StepStaging:
    """The host side of a decode step's inputs (views of one buffer; pinned on CUDA, where the graph's first
    kernel reads it in place, `kernels/step_inputs.py`).

    meta [3] int64: the step's number, its real (non-padding) rows, the block tables' width this step.
    tokens [4, max_batch] int64: input ids, positions, KV slots, and sources: the row of the device's `sampled`
        tokens that holds a placeholder's input, or -1 (the id row's value is the input).
    seq_lens [max_batch] int32; tables [max_batch, max_blocks] int32 (columns past the width are not read).
    consumed [1] int64: the number of the last step whose inputs the graph has read.
    sampled [2, max_batch] int64: the graph's greedy tokens, row (step number % 2), for the host to read.
    """

    meta: torch.Tensor
    tokens: torch.Tensor
    seq_lens: torch.Tensor
    tables: torch.Tensor
    consumed: torch.Tensor
    sampled: torch.Tensor

    @classmethod
    def allocate(cls, max_batch: int, max_blocks: int, pinned: bool) -> StepStaging:
        sizes = [("meta", 8, 3), ("tokens", 8, _TOKEN_ROWS * max_batch), ("consumed", 8, 1),
                 ("sampled", 8, 2 * max_batch), ("seq_lens", 4, max_batch), ("tables", 4, max_batch * max_blocks)]
        raw = torch.zeros(sum(width * n for _, width, n in sizes), dtype=torch.uint8, pin_memory=pinned)
        views, at = {}, 0
        for name, width, n in sizes:  # the int64 views first, so that every view is aligned
            views[name] = raw[at : at + width * n].view(torch.int64 if width == 8 else torch.int32)
            at += width * n
        views["tokens"] = views["tokens"].view(_TOKEN_ROWS, max_batch)
        views["sampled"] = views["sampled"].view(2, max_batch)
        views["tables"] = views["tables"].view(max_batch, max_blocks)
        views["consumed"].fill_(-1)
        return cls(**views)


@dataclass(frozen=True)
class StepTargets:
    """The device buffers a step's inputs go to (`DecodeBuffers`' own): tokens [3, max_batch] int64, seq_lens
    [max_batch] int32, num_real [1] int32, tables [max_batch, max_blocks] int32, step [1] int64, sampled [S]
    int64 (the placeholders' source)."""

    tokens: torch.Tensor
    seq_lens: torch.Tensor
    num_real: torch.Tensor
    tables: torch.Tensor
    step: torch.Tensor
    sampled: torch.Tensor


def load_step_inputs(staging: StepStaging, dev: StepTargets, rows: int) -> None:
    """Rows [0, rows) of the staging to the device buffers, each placeholder's input from dev.sampled, then the
    step's number to staging.consumed: one Triton launch on CUDA (`kernels/step_inputs.py`), torch elsewhere
    (which is also the kernel's reference)."""
    if dev.tokens.device.type == "cuda":
        from moeserve.kernels.step_inputs import load_step_inputs as launch

        launch(staging, dev, rows)
        return
    step, num_real, width = staging.meta.tolist()
    ids, positions, slots, sources = (t[:rows].to(dev.tokens.device) for t in staging.tokens)
    ids = torch.where(sources >= 0, dev.sampled[sources.clamp(min=0)], ids)
    dev.tokens[:, :rows] = torch.stack([ids, positions, slots])
    dev.seq_lens[:rows] = staging.seq_lens[:rows]
    dev.tables[:rows, :width] = staging.tables[:rows, :width]
    dev.num_real.fill_(num_real)
    dev.step.fill_(step)
    staging.consumed.fill_(step)


class DecodeBuffers:
    """Static inputs of a decode batch of up to `max_batch` requests, and their host staging.

    Device (addresses fixed for the buffers' lifetime; the captured kernels read them):
      tokens:       [3, max_batch] int64 — rows: input_ids, positions, slot_mapping.
      seq_lens:     [max_batch] int32; num_real: [1] int32, the number of real (non-padding) rows.
      block_tables: [max_batch, max_blocks] int32.
      query_start_loc [max_batch + 1] int32, sample_indices [max_batch] int64: constant (one token each).
      step:         [1] int64, the number of the step the graph runs (`fill` counts them).
      sampled:      [max_sampled] int64, the tokens placeholders come from (the step before's), then the graph's
                    greedy tokens.
    Host: `staging` (`StepStaging`, pinned on CUDA). `fill` writes a step's values there and
    the graph's first kernel (`load`) copies them to the device buffers, each placeholder's token from `sampled`,
    so a replay puts no copy on the stream. The next `fill` first waits until the graph has read the staging.
    """

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, scratch_block: int,
                 device: torch.device, max_sampled: int | None = None) -> None:
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size
        self.scratch_block, self.device = scratch_block, device
        i32, i64 = torch.int32, torch.int64
        self.tokens = torch.zeros(3, max_batch, dtype=i64, device=device)
        self.tokens[2].fill_(scratch_block * block_size)  # every row starts as padding
        self.seq_lens = torch.ones(max_batch, dtype=i32, device=device)
        self.num_real = torch.zeros(1, dtype=i32, device=device)
        self.block_tables = torch.full((max_batch, max_blocks), scratch_block, dtype=i32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=i32, device=device)
        self.sample_indices = torch.arange(max_batch, dtype=i64, device=device)
        self.step = torch.zeros(1, dtype=i64, device=device)
        self.sampled = torch.zeros(max(max_batch, max_sampled or 0), dtype=i64, device=device)
        self.targets = StepTargets(self.tokens, self.seq_lens, self.num_real, self.block_tables, self.step,
                                   self.sampled)
        self.staging = StepStaging.allocate(max_batch, max_blocks, pinned=device.type == "cuda")
        self._consumed = self.staging.consumed.numpy()  # polled by `fill`
        self._filled = 0  # the number of the last step filled
        self._queued = -1  # the number of the last step whose load is queued

    def fill(self, reqs: Sequence[ScheduledRequest], padded: int, table_rows: BlockTableRows | None = None,
             sources: Sequence[int] | None = None) -> list[int]:
        """Write the decode inputs of `reqs` (one token each) into staging rows [0, n) and padding into [n, padded).
        table_rows: the runner's kept block tables, which write reqs' tables straight into the staging (and are
        updated); None packs them from the lists. sources: for each of reqs, the row of `sampled` holding its
        input token (a placeholder), or -1 (its token_ids[0]); None: all -1. Returns seq_lens of the padded batch
        as a host list."""
        n, bs = len(reqs), self.block_size
        assert n <= padded <= self.max_batch and (sources is None or len(sources) == n)
        self._wait_read()
        positions = [r.start_position for r in reqs]
        slots = [r.block_ids[p // bs] * bs + p % bs for r, p in zip(reqs, positions)]
        seq_lens = [p + 1 for p in positions] + [1] * (padded - n)
        pad = [0] * (padded - n)
        staging = self.staging
        host = staging.tokens.numpy()
        host[0, :padded] = [r.token_ids[0] for r in reqs] + pad
        host[1, :padded] = positions + pad
        host[2, :padded] = slots + [self.scratch_block * bs] * (padded - n)
        host[3, :padded] = (list(sources) if sources is not None else [-1] * n) + [-1] * (padded - n)
        staging.seq_lens.numpy()[:padded] = seq_lens
        width = max([1, *(len(r.block_ids) for r in reqs)])  # the tables' width this step
        assert width <= self.max_blocks, "a request's block table is longer than the context limit allows"
        tables = staging.tables[:padded, :width]
        # Past a row's real blocks the kernels read nothing (seq_lens bound them); padding rows: scratch.
        if table_rows is None:
            tables[:n] = pack_block_tables([r.block_ids for r in reqs]).table
        else:
            table_rows.gather([r.request_id for r in reqs], [r.block_ids for r in reqs], out=tables[:n])
        tables[n:] = self.scratch_block
        self._filled += 1
        staging.meta.numpy()[:] = (self._filled, n, width)
        return seq_lens

    def load(self, size: int) -> None:
        """Queue the graph's first kernel: the last `fill`'s rows [0, size) to the device buffers."""
        load_step_inputs(self.staging, self.targets, size)
        self.queued()

    def queued(self) -> None:
        """Note that a load of the last `fill` is queued (a replay runs one): the next `fill` waits for it."""
        self._queued = self._filled

    def greedy_tokens(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last filled step's greedy tokens of rows [0, n): on the device, and in the staging (valid once the
        step has run, until the step after next runs)."""
        return self.sampled[:n], self.staging.sampled[self._filled % 2, :n]

    def _wait_read(self, timeout_s: float = 60.0) -> None:
        """Wait until the graph has read the staging of the last queued step. In a decode loop it has, or does
        within microseconds: that step is next on the stream once the step before it is resolved. The wait
        yields the GIL while it polls."""
        if self._consumed[0] >= self._queued:
            return
        deadline = time.monotonic() + timeout_s
        while self._consumed[0] < self._queued:
            time.sleep(0)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the decode graph of step {self._queued} did not read its inputs in "
                                   f"{timeout_s:.0f} s (read: step {self._consumed[0]})")

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
    max_sampled: the most rows a step samples (the placeholders' source holds that many; at least max_batch).
    """

    def __init__(self, model: nn.Module, *, max_batch: int, max_seq_len: int, block_size: int,
                 scratch_block: int, device: torch.device, use_graphs: bool = True,
                 attention: AttentionBackend | None = None, begin_step: Callable[[int], None] | None = None,
                 extras: dict[str, torch.Tensor] | None = None, max_sampled: int | None = None) -> None:
        self.model = model
        self.attention = attention
        self.begin_step = begin_step
        self.extras = extras or {}
        self.max_seq_len = max_seq_len
        self.sizes = graph_batch_sizes(max_batch)
        max_blocks = -(-max_seq_len // block_size)
        self.buffers = DecodeBuffers(self.sizes[-1], max_blocks, block_size, scratch_block, device, max_sampled)
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
            self.buffers.fill([], size)
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
        sources: Sequence[int] | None = None,
        size: int | None = None,
    ) -> torch.Tensor:
        """Forward of a decode batch, its LM head and its greedy tokens (`greedy_tokens`). Returns logits
        [len(reqs), vocab] in the model dtype, rows in request order. The tensor is the graph's own output: read
        it before the next `run`. table_rows, sources: as `DecodeBuffers.fill` (sources index the tokens last
        given to `take_tokens`, or the last run's greedy tokens). size: the captured size to replay (with
        collectives, the one every EP rank agreed on); default the smallest that holds reqs."""
        n = len(reqs)
        size = self.padded_size(n) if size is None else size
        assert size in self.sizes and n <= size, f"{n} requests cannot replay the graph of size {size}"
        if self.begin_step is not None:
            self.begin_step(size)
        seq_lens = self.buffers.fill(reqs, size, table_rows, sources)
        if not self.use_graphs:
            return self._forward(self.buffers.batch(size, seq_lens, self.max_seq_len, self.extras))[:n]
        if self.attention is not None and self.attention.plans_graph_replays:
            self.attention.before_graph_replay(self.buffers.batch(size, seq_lens, self.max_seq_len).attn)
        self.graphs[size].replay()
        self.buffers.queued()
        return self.outputs[size][:n]

    def greedy_tokens(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last run's greedy tokens of its n requests: on the device, and in pinned host memory (valid once
        the run has ended, until the run after next ends)."""
        return self.buffers.greedy_tokens(n)

    def take_tokens(self, tokens: torch.Tensor) -> None:
        """Make tokens ([k] int64 on the device: a step's sampled tokens, row i for its i-th sampling request) the
        source of the next run's placeholders, unless they are already (the last run's greedy tokens)."""
        sampled = self.buffers.sampled
        if tokens.data_ptr() != sampled.data_ptr():
            assert tokens.shape[0] <= sampled.shape[0], f"{tokens.shape[0]} sampled rows, room for {sampled.shape[0]}"
            sampled[: tokens.shape[0]].copy_(tokens)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        """What a graph holds: the step's inputs from the staging (`DecodeBuffers.load`), the forward, the LM head
        (every row of a decode batch samples), and the greedy tokens into `sampled` and the staging."""
        buffers = self.buffers
        buffers.load(batch.num_tokens)
        logits = self.model.compute_logits(self.model(batch))
        greedy_argmax(logits, out=buffers.sampled, host_out=buffers.staging.sampled, step=buffers.step)
        return logits
