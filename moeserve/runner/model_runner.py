"""The model runner: turns a `SchedulerOutput` into one forward pass and a `ModelOutput`.

It owns the model, the paged KV cache tensors and the sampler; it knows nothing of scheduling policy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from moeserve.attention import create_attention_backend
from moeserve.config import EngineConfig
from moeserve.engine.dp_sync import StepPlan
from moeserve.forward_batch import ForwardBatch, build_forward_batch
from moeserve.moe.dispatcher import Dispatcher, LocalDispatcher
from moeserve.moe.experts import create_expert_kernel
from moeserve.moe.placement import ExpertPlacement
from moeserve.runner.sampler import Sampler, SamplingRow
from moeserve.scheduler.output import ModelOutput, SchedulerOutput

logger = logging.getLogger("moeserve")


@dataclass(slots=True)
class RankSetup:
    """How this runner sits in an expert-parallel group (defaults: one rank, nothing shared)."""

    placement: ExpertPlacement | None = None
    dispatcher: Dispatcher | None = None


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
            expert_kernel=create_expert_kernel(config.expert_kernel, self.device),
            dispatcher=dispatcher,
            placement=placement,
        )
        self.model, _ = load_model(model_path, self.ctx)
        self.model.eval()
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        self.num_blocks = self._allocate_kv_cache()
        self.sampler = Sampler(config.seed)
        logger.info(
            "model %s on %s (%s); attention=%s experts=%s dispatcher=%s; %d KV blocks of %d tokens",
            mc.architecture, self.device, str(self.dtype).replace("torch.", ""), self.ctx.attention.name,
            self.ctx.expert_kernel.name, dispatcher.name, self.num_blocks, config.block_size,
        )

    def _allocate_kv_cache(self) -> int:
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
        caches = []
        for s in specs:
            k = torch.zeros(num_blocks, bs, s.num_kv_heads, s.k_dim, dtype=self.dtype, device=self.device)
            if s.v_is_k_prefix:
                v = k[..., : s.v_dim]
            else:
                v = torch.zeros(num_blocks, bs, s.num_kv_heads, s.v_dim, dtype=self.dtype, device=self.device)
            caches.append((k, v))
        self.model.bind_kv_caches(caches)
        return num_blocks

    def build_batch(self, sched: SchedulerOutput) -> ForwardBatch:
        reqs = sched.requests
        return build_forward_batch(
            [r.token_ids for r in reqs],
            [r.start_position for r in reqs],
            [r.block_ids for r in reqs],
            self.config.block_size,
            sample_rows=[[len(r.token_ids) - 1] if r.sample else [] for r in reqs],
            device=self.device,
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, plan: StepPlan | None = None) -> ModelOutput:
        """Run one step: forward over every scheduled token, sample for the requests that asked.

        plan: the step all DP ranks agreed on (None on a lone rank). With a plan, a rank with no requests
        still runs the model on zero tokens so that it enters every MoE collective.
        """
        batch = self.build_batch(sched)
        if plan is not None:
            batch.mode = plan.mode
        hidden = self.model(batch)
        sampling = [r for r in sched.requests if r.sample]
        if not sampling:
            return ModelOutput(sampled={})
        logits = self.model.compute_logits(hidden[batch.sample_indices])
        rows = [SamplingRow(r.sampling_params, r.num_output_tokens) for r in sampling]
        tokens, logprobs = self.sampler(logits, rows)
        out = ModelOutput(sampled={r.request_id: [t] for r, t in zip(sampling, tokens)})
        for r, lp in zip(sampling, logprobs):
            if lp is not None:
                out.logprobs[r.request_id] = [lp]
        return out
