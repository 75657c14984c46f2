"""The model runner: turns a `SchedulerOutput` into one forward pass and a `ModelOutput`.

It owns the model, the paged KV cache tensors and the sampler; it knows nothing of scheduling policy.

A step is launched, then resolved. `launch` queues the whole step on the device without waiting for it:
batch tensors go up through pinned memory with non_blocking copies, or, for decode-only steps, into a captured
CUDA graph's pinned staging, which the graph reads itself (`runner/cuda_graphs.py`); the forward and the sampler
have no host syncs. `PendingStep.resolve()` waits
for that step's sampled ids only. Between the two the engine schedules and launches the next step, whose
decode inputs are placeholders (see `moeserve.request.PLACEHOLDER`): they are filled on the device from the
previous launch's sampled tokens (by a copy, or inside the graph), so the CPU work of step N+1 overlaps the GPU
work of step N.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from moeserve.attention import create_attention_backend
from moeserve.config import EngineConfig
from moeserve.engine.dp_sync import StepPlan
from moeserve.forward_batch import BlockTableRows, ForwardBatch, ForwardMode, build_forward_batch
from moeserve.moe.dispatcher import Dispatcher, LocalDispatcher
from moeserve.moe.experts import create_expert_kernel
from moeserve.moe.layer import MoELayer
from moeserve.moe.placement import ExpertPlacement
from moeserve.moe.tbo import run_overlapped
from moeserve.request import PLACEHOLDER
from moeserve.runner.cuda_graphs import CudaGraphRunner, graph_unsupported_reason
from moeserve.runner.sampler import SampledTokens, Sampler, SamplingRow, host_to_device
from moeserve.sampling_params import SamplingParams
from moeserve.scheduler.output import ModelOutput, ScheduledRequest, SchedulerOutput

logger = logging.getLogger("moeserve")


@dataclass(slots=True)
class RankSetup:
    """How this runner sits in an expert-parallel group (defaults: one rank, nothing shared)."""

    placement: ExpertPlacement | None = None
    dispatcher: Dispatcher | None = None
    tbo_dispatcher: Dispatcher | None = None  # the second micro-batch's instance when TBO is on


class PendingStep:
    """A launched step. `resolve()` waits for its sampled tokens and returns them as a ModelOutput."""

    def __init__(self, request_ids: list[str], sampled: SampledTokens | None) -> None:
        self.request_ids = request_ids  # the requests that sample, in the order of sampled's rows
        self.sampled = sampled

    def resolve(self) -> ModelOutput:
        if self.sampled is None:
            return ModelOutput(sampled={})
        tokens, logprobs = self.sampled.resolve()
        out = ModelOutput(sampled={rid: [t] for rid, t in zip(self.request_ids, tokens)})
        for rid, lp in zip(self.request_ids, logprobs):
            if lp is not None:
                out.logprobs[rid] = [lp]
        return out


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str, setup: RankSetup | None = None) -> None:
        from moeserve.loader.checkpoint import checkpoint_dtype, read_hf_config
        from moeserve.loader.model_loader import load_model
        from moeserve.models.base import ModelContext
        from moeserve.models.config import ModelConfig

        setup = setup or RankSetup()
        self.config = config
        self.device = config.torch_device()
        hf_config = read_hf_config(model_path)
        self.model_config = ModelConfig.from_hf(hf_config)
        self.dtype = config.torch_dtype(checkpoint_dtype(hf_config))
        mc = self.model_config
        num_experts = mc.num_experts or 1
        placement = setup.placement or ExpertPlacement.trivial(max(mc.num_moe_layers, 1), num_experts)
        dispatcher = setup.dispatcher or LocalDispatcher(placement.num_local_slots)
        self.ctx = ModelContext(
            dtype=self.dtype,
            device=self.device,
            attention=create_attention_backend(config.attention_backend, self.device),
            expert_kernel=create_expert_kernel(config.expert_kernel, self.device, num_experts=num_experts),
            dispatcher=dispatcher,
            placement=placement,
            tbo_dispatcher=setup.tbo_dispatcher,
        )
        self.model, _ = load_model(model_path, self.ctx)
        self.model.eval()
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        graph_reason = (
            graph_unsupported_reason(self.device, self.ctx.attention.name, self.ctx.expert_kernel.name,
                                     dispatcher.for_mode(ForwardMode.DECODE).name)
            if config.enable_cuda_graphs else "enable_cuda_graphs=False"
        )
        warm_up = config.warmup_kernels and self.device.type == "cuda"
        if warm_up:
            # Before the KV cache takes its share of free memory, which then leaves this peak out.
            self._warm_up_kernels()
        # With graphs, one extra KV block (id num_blocks, never scheduled) absorbs the padding rows' writes.
        self.num_blocks = self._allocate_kv_cache(scratch_blocks=1 if graph_reason is None else 0)
        self._set_up_decode_stack()
        self.sampler = Sampler(config.seed)
        self.graphs = self._capture_graphs(graph_reason)
        self.num_tbo_steps = 0
        self.num_graph_steps = 0
        self.block_tables = BlockTableRows()  # host copies of running requests' tables, kept across steps
        # The last launch that sampled (None when the last launch did not): placeholders come from its tokens.
        self._last_step: PendingStep | None = None
        self.expert_load: torch.Tensor | None = None  # [num_moe_layers, num_physical] int64 when EPLB records
        if warm_up and isinstance(dispatcher, LocalDispatcher):
            self._warm_up_prefill()
        logger.info(
            "model %s on %s (%s); attention=%s experts=%s dispatcher=%s; %d KV blocks of %d tokens",
            mc.architecture, self.device, str(self.dtype).replace("torch.", ""), self.ctx.attention.name,
            self.ctx.expert_kernel.name, dispatcher.name, self.num_blocks, config.block_size,
        )

    def _set_up_decode_stack(self) -> None:
        """Give the model the one-kernel decode stack for one-request decode steps where it can run, and log
        which way those steps run."""
        if not self.config.decode_stack or self.device.type != "cuda":
            return
        from moeserve.kernels.decode_stack_gluon import DecodeStack

        reason = DecodeStack.reason(self.model, self.config.block_size)
        if reason is None:
            try:
                stack = DecodeStack.for_model(self.model)
            except ValueError as exc:  # weights or caches not one tensor a kind, or an input-norm weight zero
                reason = str(exc)
            else:
                reason = self._try_decode_stack(stack)
        if reason is None:
            logger.info("one-request decode steps: every layer in one kernel (decode stack, %d programs)",
                        self.model.decode_stack.programs)
        else:
            logger.info("one-request decode steps: the per-op kernels (decode stack off: %s)", reason)

    def _try_decode_stack(self, stack) -> str | None:
        """Compile and run the decode stack once (a token at position 0 whose K and V go to slot 0, which no
        request reads before writing it, as `_warm_up_prefill`'s prompts); on success the model takes it, else
        the reason (a compile or launch error turns the stack off rather than failing the first request)."""
        try:
            with torch.inference_mode():
                zeros = torch.zeros(1, dtype=torch.int64, device=self.device)
                x0 = torch.zeros(self.model_config.hidden_size, dtype=self.dtype, device=self.device)
                stack.launch(x0, zeros, zeros, torch.zeros(1, 1, dtype=torch.int32, device=self.device))
            torch.cuda.synchronize(self.device)
        except Exception as exc:  # noqa: BLE001 - any failure of the kernel means the per-op path
            return f"its first launch failed ({type(exc).__name__}: {exc})"
        self.model.decode_stack = stack
        return None

    def _warm_up_kernels(self) -> None:
        """Compile the MoE kernels of every step size now (`MoELayer.warm_up` on the first MoE layer: the others
        have its shapes). Local to this rank: expert-parallel peers need not be in step."""
        layer = next((m for m in self.model.modules() if isinstance(m, MoELayer)), None)
        if layer is None:
            return
        t0 = time.perf_counter()
        counts = layer.warm_up(max_expert_rows(self.config))
        torch.cuda.synchronize(self.device)
        if counts:
            logger.info("MoE kernels warmed up for %d token counts (%d..%d) in %.1f s", len(counts), counts[0],
                        counts[-1], time.perf_counter() - t0)

    def _warm_up_prefill(self) -> None:
        """Compile what a first prompt would still compile after the decode graphs' capture (the prefill
        attention, greedy sampling's argmax, and with few or no graphs the kernels of steps over 16 rows, where
        the projections leave their decode-size kernels): two greedy prompts, of 2 and 33 tokens, each run
        eagerly as one step from the first KV block. The KV they leave there is never read: a request reads
        only slots that it, or the prefix it shares, wrote. With an EP dispatcher the forward would enter
        collectives, so EP ranks compile these on their first prompts instead."""
        t0 = time.perf_counter()
        greedy = SamplingParams(temperature=0.0)
        for n in (2, 33):
            blocks = list(range(math.ceil(n / self.config.block_size)))
            if len(blocks) > self.num_blocks:
                continue
            req = ScheduledRequest("warm-up", [0] * n, 0, blocks, sample=True, sampling_params=greedy)
            self.execute(SchedulerOutput(0, [req]))
            self.block_tables.drop([req.request_id])
        self._last_step = None
        logger.info("prefill kernels warmed up in %.1f s", time.perf_counter() - t0)

    def _allocate_kv_cache(self, scratch_blocks: int = 0) -> int:
        """Allocate and bind the paged KV cache; returns the number of blocks the scheduler may use
        (scratch_blocks more are allocated after them)."""
        specs = self.model.kv_cache_specs()
        bs = self.config.block_size
        elem = torch.tensor([], dtype=self.dtype).element_size()
        per_block = sum(
            bs * s.num_kv_heads * (s.k_dim + (0 if s.v_is_k_prefix else s.v_dim)) * elem for s in specs
        )
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        else:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = free * self.config.gpu_memory_utilization
            else:
                budget = self.config.kv_cache_memory_gib * 2**30
            needed = self.config.max_num_seqs * math.ceil(self.max_model_len / bs) + 1
            num_blocks = max(2, min(int(budget // per_block), needed))
        total = num_blocks + scratch_blocks
        # One tensor a cache kind for all layers where their specs agree (each layer's cache a view of it), so
        # that one kernel can address every layer's cache (the decode stack); else one tensor a layer.
        groups = [specs] if all(s == specs[0] for s in specs) else [[s] for s in specs]
        caches = []
        for group in groups:
            s = group[0]
            k = torch.zeros(len(group), total, bs, s.num_kv_heads, s.k_dim, dtype=self.dtype, device=self.device)
            if s.v_is_k_prefix:
                v = k[..., : s.v_dim]
            else:
                v = torch.zeros(len(group), total, bs, s.num_kv_heads, s.v_dim, dtype=self.dtype, device=self.device)
            caches += list(zip(k, v))
        self.model.bind_kv_caches(caches)
        return num_blocks

    def _capture_graphs(self, reason: str | None) -> CudaGraphRunner | None:
        """Capture the decode graphs (after the KV cache exists), or log why decode runs eagerly."""
        if reason is not None:
            logger.info("CUDA graphs off: %s", reason)
            return None
        runner = self.graph_runner(self.num_blocks)
        try:
            runner.capture()
        except Exception as exc:
            if runner.collective:  # the EP peers capture too: a rank that went on without graphs would not meet them
                raise
            # On one rank, a kernel that cannot be captured must not stop the engine.
            logger.warning("CUDA graphs off: capture failed (%s: %s)", type(exc).__name__, exc)
            torch.cuda.synchronize(self.device)
            return None
        logger.info("CUDA graphs captured for decode batch sizes %s", runner.sizes)
        return runner

    def graph_runner(self, scratch_block: int, use_graphs: bool = True) -> CudaGraphRunner:
        """A decode-graph runner for this model (not captured yet). With a collective dispatcher (EP) its graphs
        hold the dispatch, and count expert load into their own buffer, `extras["expert_load"]` (see `_replay`).
        use_graphs=False runs the same static batches eagerly (CPU tests)."""
        extras = {}
        collective = not isinstance(self.ctx.dispatcher, LocalDispatcher)
        if collective:
            p = self.ctx.placement
            extras["expert_load"] = torch.zeros(p.num_layers, p.num_physical, dtype=torch.int64, device=self.device)
        return CudaGraphRunner(
            self.model, max_batch=min(self.config.cuda_graph_max_batch, self.config.max_num_seqs),
            max_seq_len=self.max_model_len, block_size=self.config.block_size, scratch_block=scratch_block,
            device=self.device, use_graphs=use_graphs, attention=self.ctx.attention,
            begin_step=self._begin_graph_step if collective else None, extras=extras,
            max_sampled=self.config.max_num_seqs,
        )

    def build_batch(self, reqs: list[ScheduledRequest]) -> ForwardBatch:
        on_cuda = self.device.type == "cuda"
        batch = build_forward_batch(
            [r.token_ids for r in reqs],
            [r.start_position for r in reqs],
            self.block_tables.pack([r.request_id for r in reqs], [r.block_ids for r in reqs]),
            self.config.block_size,
            sample_rows=[[len(r.token_ids) - 1] if r.sample else [] for r in reqs],
            device="cpu" if on_cuda else self.device,
        )
        if on_cuda:
            batch = _to_device_async(batch, self.device)
        self._fill_placeholders(reqs, batch.input_ids)
        return batch

    def _fill_placeholders(self, reqs: list[ScheduledRequest], input_ids: torch.Tensor) -> None:
        """Replace placeholder inputs by the tokens the previous launch sampled, on the device.

        input_ids: [>= num tokens of reqs] int64 on the device, reqs' tokens in order.
        """
        dst, src = self._placeholders(reqs)
        if not dst:
            return
        last = self._last_step.sampled.tokens
        if _is_run(dst) and _is_run(src):  # the usual decode step: one copy, no index upload
            input_ids[dst[0] : dst[-1] + 1] = last[src[0] : src[-1] + 1]
        else:
            rows = host_to_device([dst, src], self.device, torch.int64)
            input_ids[rows[0]] = last[rows[1]]

    def _placeholders(self, reqs: list[ScheduledRequest]) -> tuple[list[int], list[int]]:
        """(dst, src): for each placeholder input of reqs, its index among reqs' tokens (in order) and the row of
        the previous launch's sampled tokens that holds it. A placeholder is always a decode step's single token,
        sampled by the launch just before this one."""
        last = self._last_step
        dst, src, offset = [], [], 0
        row_of: dict[str, int] | None = None  # request id -> row of last.sampled, built on first need
        for r in reqs:
            offset += len(r.token_ids)
            if r.token_ids[-1] == PLACEHOLDER:
                assert last is not None and last.sampled is not None, "a placeholder with no launch before it"
                if row_of is None:
                    row_of = {rid: i for i, rid in enumerate(last.request_ids)}
                dst.append(offset - 1)
                src.append(row_of[r.request_id])
        return dst, src

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, plan: StepPlan | None = None) -> ModelOutput:
        """Run one step to the end: `launch` then resolve."""
        return self.launch(sched, plan).resolve()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, plan: StepPlan | None = None,
               tbo_cut: int | None = None) -> PendingStep:
        """Queue one step: forward over every scheduled token, sample for the requests that asked.

        plan: the step all DP ranks agreed on (None on a lone rank). With a plan, a rank with no requests
        still runs the model on zero tokens so that it enters every MoE collective.
        tbo_cut: with plan.use_tbo, the request index splitting the two micro-batches (`moe/tbo.py: tbo_cut`,
        the split the engine announced in the step agreement).
        """
        self.block_tables.drop(sched.dropped_request_ids)
        size = self._graph_size(sched.requests, plan)
        if size is not None:
            return self._replay(sched.requests, size)
        extras = {}
        if self.expert_load is not None:  # EPLB: the MoE layers add this step's tokens per expert
            self.expert_load.zero_()
            extras["expert_load"] = self.expert_load
        most = max(plan.tokens_per_rank) if plan is not None else None
        if plan is not None and plan.use_tbo:
            self._begin_dispatch_step(plan.mode, most, plan.micro_batch_tokens)
            hidden, sample_indices = self._forward_two_batches(sched.requests, plan.mode, extras, tbo_cut)
        else:
            batch = self.build_batch(sched.requests)
            batch.extras.update(extras)
            if plan is not None:
                batch.mode = plan.mode
            self._begin_dispatch_step(batch.mode, most)
            hidden, sample_indices = self.model(batch), batch.sample_indices
        sampling = [r for r in sched.requests if r.sample]
        if not sampling:
            self._last_step = None
            return PendingStep([], None)
        return self._sample(sampling, self.model.compute_logits(hidden[sample_indices]))

    def _graph_size(self, reqs: list[ScheduledRequest], plan: StepPlan | None) -> int | None:
        """The captured decode graph this step replays, or None for an eager step."""
        graphs = self.graphs
        if graphs is None:
            return None
        if graphs.collective:
            size = self._ep_graph_size(plan)
            # A decode plan means one sampling token per request on every rank (the engine's has_extend), so
            # every rank replays: a rank running eagerly would pair its collectives with its peers' graphs.
            if size is not None and not graphs.fits(reqs):
                raise RuntimeError(f"decode plan {plan}, but this rank's {len(reqs)} requests cannot replay a graph")
            return size
        if plan is not None and plan.mode != ForwardMode.DECODE:  # (decode steps never split for TBO)
            return None
        return graphs.padded_size(len(reqs)) if graphs.fits(reqs) else None

    def _ep_graph_size(self, plan: StepPlan | None) -> int | None:
        """With EP collectives in the graphs: the size every EP rank replays this step (for the most requests any
        rank has; it depends on the plan alone, so all ranks agree), or None when every rank runs eagerly (not
        a decode step, or more requests than the largest graph)."""
        if plan is None or plan.mode != ForwardMode.DECODE:
            return None
        most = max(plan.tokens_per_rank)
        return self.graphs.padded_size(most) if most <= self.graphs.max_batch else None

    def _begin_graph_step(self, size: int) -> None:
        self._begin_dispatch_step(ForwardMode.DECODE, size)

    def _replay(self, reqs: list[ScheduledRequest], size: int) -> PendingStep:
        """A decode step by graph replay. Every request samples here, so the graph's rows are the sample rows.
        Placeholders take their tokens inside the graph (`CudaGraphRunner.take_tokens`), and an all-greedy step
        takes the graph's own argmax."""
        graph_load = self.graphs.extras.get("expert_load")
        if graph_load is not None:  # EP: the graph adds this step's counts to its own buffer
            graph_load.zero_()
        dst, src = self._placeholders(reqs)
        sources = None
        if dst:  # one token a request: dst are request indices
            self.graphs.take_tokens(self._last_step.sampled.tokens)
            sources = [-1] * len(reqs)
            for d, s in zip(dst, src):
                sources[d] = s
        logits = self.graphs.run(reqs, self.block_tables, sources=sources, size=size)
        self.num_graph_steps += 1
        if self.expert_load is not None:  # EPLB (attached after capture) reads its own buffer
            assert graph_load is not None, "expert load is recorded under expert parallelism only"
            self.expert_load.copy_(graph_load)
        if not reqs:  # an idle EP rank: it replayed for its peers' collectives
            self._last_step = None
            return PendingStep([], None)
        return self._sample(reqs, logits, self.graphs.greedy_tokens(len(reqs)))

    def _sample(self, sampling: list[ScheduledRequest], logits: torch.Tensor,
                argmax: tuple[torch.Tensor, torch.Tensor] | None = None) -> PendingStep:
        """logits: [len(sampling), vocab] (model dtype), row i for sampling[i]; argmax: as `Sampler.launch`.
        Queued, not waited for."""
        rows = [SamplingRow(r.sampling_params, r.num_output_tokens) for r in sampling]
        sampled = self.sampler.launch(logits, rows, argmax=argmax)
        self._last_step = PendingStep([r.request_id for r in sampling], sampled)
        return self._last_step

    def _begin_dispatch_step(self, mode: ForwardMode, most: int | None,
                             micro_batch_tokens: tuple[int, int] | None = None) -> None:
        """Tell the dispatchers this step's mode and the most tokens any rank sends through each: `most` (the
        largest rank's count; None off the lockstep path), or with TBO and a second instance, each micro-batch's
        largest (micro-batch k uses the k-th instance; without a second instance both use the first, as
        `MoELayer` does)."""
        first, second = self.ctx.dispatchers
        if second is first:
            first.begin_step(mode, most)
            return
        for dispatcher, size in zip((first, second), micro_batch_tokens or (most, most)):
            dispatcher.begin_step(mode, size)

    def _forward_two_batches(self, reqs: list[ScheduledRequest], mode: ForwardMode, extras: dict,
                             cut: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two-batch overlap: split the requests at `cut` into two micro-batches of near-equal tokens and
        interleave their forward passes, so one's MoE communication runs while the other computes. Every rank
        runs two micro-batches (the second may be empty), so collectives meet in the same order everywhere.
        Returns the hidden states of reqs' tokens in order, and the rows to sample ([num_samples] int64)."""
        assert cut is not None, "a TBO step needs the split the engine announced (launch(tbo_cut=...))"
        self.num_tbo_steps += 1
        micro = []
        for k, part in enumerate((reqs[:cut], reqs[cut:])):
            mb = self.build_batch(part)
            mb.mode, mb.micro_batch, mb.extras = mode, k, extras
            micro.append(mb)
        first_rows = sum(len(r.token_ids) for r in reqs[:cut])
        sample_indices = torch.cat([micro[0].sample_indices, micro[1].sample_indices + first_rows])
        return torch.cat(run_overlapped([self.model.forward_stages(mb) for mb in micro])), sample_indices


def max_expert_rows(config: EngineConfig) -> int:
    """The most rows an expert-kernel call can get in a step: the step's token budget (or its decode batch if
    that is larger), times the ranks whose tokens an expert-parallel rank may receive."""
    tokens = max(config.max_num_batched_tokens, config.max_num_seqs)
    return tokens * (config.data_parallel_size if config.expert_parallel_size > 1 else 1)


def _is_run(rows: list[int]) -> bool:
    """Whether rows are consecutive and increasing (a slice)."""
    return rows[-1] - rows[0] == len(rows) - 1 and all(b == a + 1 for a, b in zip(rows, rows[1:]))


def _to_device_async(batch: ForwardBatch, device: torch.device) -> ForwardBatch:
    """Move a batch built on the host to `device` through pinned memory with non_blocking copies, so that
    building the batch never waits for the GPU. (PyTorch's pinned allocator keeps each staging block until
    its copy has run.)"""
    meta = batch.attn
    if meta is not None:
        meta.query_start_loc = host_to_device(meta.query_start_loc, device)
        meta.seq_lens = host_to_device(meta.seq_lens, device)
        meta.block_tables = host_to_device(meta.block_tables, device)
        meta.slot_mapping = host_to_device(meta.slot_mapping, device)
    batch.input_ids = host_to_device(batch.input_ids, device)
    batch.positions = host_to_device(batch.positions, device)
    batch.sample_indices = host_to_device(batch.sample_indices, device)
    return batch

