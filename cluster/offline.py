"""The offline API over Ray: `LLM(model, data_parallel_size=N, expert_parallel_size=N)` runs one
`EngineWorker` per rank (a local Ray is started when none is running)."""

from __future__ import annotations

import dataclasses
import logging
import os

import ray

from moeserve.cluster.worker import EngineWorker
from moeserve.cluster.worker_group import WorkerGroup
from moeserve.config import EngineConfig
from moeserve.engine.prompts import PromptChecker
from moeserve.outputs import StreamChunk
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer

logger = logging.getLogger("moeserve")

Job = tuple[str, list[int], SamplingParams]


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at RAY_ADDRESS, or start a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def resolve_model(config: EngineConfig) -> EngineConfig:
    """Pin the model path (the demo model is built here, once, not on every rank) and the device kind."""
    model = config.model
    if model is None:
        from moeserve.testing.tiny_checkpoints import demo_checkpoint

        model = str(demo_checkpoint())
    return dataclasses.replace(config, model=model)


def ranks_use_gpu(config: EngineConfig) -> bool:
    if config.device == "auto":
        return ray.cluster_resources().get("GPU", 0) >= config.data_parallel_size
    return config.device.startswith("cuda")


class RayEngineGroup:
    """One engine per rank in a `WorkerGroup`; offline jobs are spread over the ranks."""

    def __init__(self, config: EngineConfig, name: str = "moeserve-offline") -> None:
        from moeserve.loader.checkpoint import read_hf_config
        from moeserve.models.config import ModelConfig

        ensure_ray(num_cpus=max(config.data_parallel_size, os.cpu_count() or 1))
        config = resolve_model(config)
        use_gpu = ranks_use_gpu(config)
        self.config = dataclasses.replace(config, device="cuda" if use_gpu else "cpu")
        mc = ModelConfig.from_hf(read_hf_config(config.model))
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        self.check_prompt = PromptChecker(
            self.tokenizer, mc.vocab_size, config.max_model_len or mc.max_position_embeddings
        )
        self.group = WorkerGroup(
            config.data_parallel_size,
            EngineWorker,
            {"config": self.config},
            use_gpu=use_gpu,
            name=name,
            actor_options={"max_concurrency": 1000},
        )

    @property
    def num_ranks(self) -> int:
        return self.group.num_ranks

    def run(self, jobs: list[list[Job]], ranks: list[int] | None = None) -> dict[str, StreamChunk]:
        """Run every sequence to completion. jobs[i] are the sequences of prompt i; they go to rank
        ranks[i] (default: round-robin by prompt, so the n samples of one prompt share its prefix cache)."""
        if ranks is None:
            ranks = [i % self.num_ranks for i in range(len(jobs))]
        per_rank: list[list[Job]] = [[] for _ in range(self.num_ranks)]
        for prompt_jobs, rank in zip(jobs, ranks):
            per_rank[rank].extend(prompt_jobs)
        refs = [
            actor.generate_batch.remote(batch) for actor, batch in zip(self.group.actors, per_rank) if batch
        ]
        return {chunk.request_id: chunk for chunks in ray.get(refs) for chunk in chunks}

    def stats(self) -> list[dict]:
        return self.group.call_all("stats")

    def shutdown(self) -> None:
        self.group.shutdown()
