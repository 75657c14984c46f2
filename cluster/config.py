"""The deployment configuration (deploy.yaml, `serve run` arguments, CLI flags), validated once with pydantic.

Example deploy.yaml:

    app_name: moeserve
    model: /models/Qwen3-30B-A3B      # omit for the built-in demo model
    parallel: {dp: 4, ep: 4, redundant_experts: 0, tbo: false}
    engine: {max_num_seqs: 256, max_model_len: 8192}
    ingress: {replicas: 2}
    http: {host: 0.0.0.0, port: 8000}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeserve.backend_choice import ATTENTION_BACKENDS, DISPATCHERS, KERNEL_BACKENDS
from moeserve.config import EngineConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParallelConfig(_Strict):
    dp: int = Field(1, ge=1, description="data-parallel ranks (one worker actor per GPU or CPU slot)")
    ep: int = Field(1, ge=1, description="expert-parallel size: 1, or equal to dp")
    redundant_experts: int = Field(0, ge=0)
    tbo: bool = False
    dispatcher: Literal[DISPATCHERS] = "auto"

    @model_validator(mode="after")
    def _ep_matches_dp(self) -> ParallelConfig:
        if self.ep not in (1, self.dp):
            raise ValueError(f"parallel.ep={self.ep} must be 1 or equal to parallel.dp={self.dp}")
        return self


class EngineLimits(_Strict):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=2)
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=2)
    kv_cache_memory_gib: float = Field(1.0, gt=0)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enable_prefix_caching: bool = True
    seed: int = 0
    async_scheduling: bool | None = Field(
        None, description="schedule step N+1 while step N runs; null: on for one CUDA rank, off for DP/EP ranks"
    )
    enable_cuda_graphs: bool = True
    cuda_graph_max_batch: int = Field(256, ge=1, le=1024)
    warmup_kernels: bool = Field(
        True, description="compile the kernels of every step size at start-up (the MoE kernels; without EP also "
        "the prefill path, through two short prompts), not in first requests (CUDA)"
    )
    attention_backend: Literal[ATTENTION_BACKENDS] = Field(
        "auto", description="auto: Triton on CUDA, torch elsewhere; flashinfer: decode through FlashInfer (CUDA, "
        "needs the flashinfer package)"
    )
    expert_kernel: Literal[KERNEL_BACKENDS] = "auto"


class IngressConfig(_Strict):
    replicas: int = Field(1, ge=1, description="HTTP ingress replicas (they route consistently)")
    num_cpus: float = Field(0.5, gt=0)
    max_ongoing_requests: int = Field(1024, ge=1, description="HTTP requests one replica serves at once")


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class HealthConfig(_Strict):
    interval_s: float = Field(1.0, gt=0, description="how often the controller pings every rank")
    ping_timeout_s: float = Field(10.0, gt=0, description="a rank not answering a ping this fast is dead")


class EplbConfig(_Strict):
    enabled: bool = False
    interval_s: float = Field(60.0, gt=0)
    window_steps: int = Field(1000, ge=1)
    threshold: float = Field(0.05, ge=0, description="rebalance when balancedness would rise more than this")
    layers_per_chunk: int = Field(4, ge=1)


class DeployConfig(_Strict):
    """Everything one deployment needs. `model: null` serves the built-in demo model."""

    app_name: str = "moeserve"
    route_prefix: str = Field("/", pattern=r"^/", description="the app's URL prefix")
    model: str | None = None
    served_model_name: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: ParallelConfig = ParallelConfig()
    engine: EngineLimits = EngineLimits()
    ingress: IngressConfig = IngressConfig()
    http: HttpConfig = HttpConfig()
    eplb: EplbConfig = EplbConfig()
    health: HealthConfig = HealthConfig()
    api_key: str | None = Field(None, description="Bearer key; default: $MOESERVE_API_KEY when set")
    runtime_env: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_model(self) -> DeployConfig:
        if self.model is not None and not Path(self.model).is_dir():
            raise ValueError(
                f"model={self.model!r} is not a directory; give an HF-layout checkpoint directory "
                "or omit model for the demo model"
            )
        return self

    @property
    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("MOESERVE_API_KEY") or None

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if self.model else "moeserve-demo"

    def use_gpu(self) -> bool:
        """Whether ranks run on GPUs; "auto" asks the Ray cluster (when connected), else this machine."""
        if self.device != "auto":
            return self.device == "cuda"
        try:
            import ray

            if ray.is_initialized():
                return ray.cluster_resources().get("GPU", 0) >= self.parallel.dp
        except ImportError:
            pass
        import torch

        return torch.cuda.is_available()

    def resolved(self, model_path: str) -> DeployConfig:
        """This config with everything pinned that every process must agree on: the model path (the caller
        builds the demo model once), the device ("auto" is decided here, where the Ray cluster is seen), the
        served name (the demo model keeps its name) and the API key (read from $MOESERVE_API_KEY here)."""
        pinned = {
            "model": model_path, "device": "cuda" if self.use_gpu() else "cpu",
            "served_model_name": self.model_name, "api_key": self.resolved_api_key,
        }
        return self.model_copy(update=pinned)

    def engine_config(self, model_path: str) -> EngineConfig:
        e = self.engine
        return EngineConfig(
            model=model_path, dtype=e.dtype, device="cuda" if self.use_gpu() else "cpu", seed=e.seed,
            block_size=e.block_size, num_kv_blocks=e.num_kv_blocks, kv_cache_memory_gib=e.kv_cache_memory_gib,
            gpu_memory_utilization=e.gpu_memory_utilization, max_num_batched_tokens=e.max_num_batched_tokens,
            max_num_seqs=e.max_num_seqs, max_model_len=e.max_model_len,
            enable_prefix_caching=e.enable_prefix_caching, data_parallel_size=self.parallel.dp,
            expert_parallel_size=self.parallel.ep, num_redundant_experts=self.parallel.redundant_experts,
            enable_tbo=self.parallel.tbo, moe_dispatcher=self.parallel.dispatcher,
            async_scheduling=e.async_scheduling, enable_cuda_graphs=e.enable_cuda_graphs,
            cuda_graph_max_batch=e.cuda_graph_max_batch, warmup_kernels=e.warmup_kernels,
            attention_backend=e.attention_backend,
            expert_kernel=e.expert_kernel,
        )


def load_deploy_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DeployConfig:
    """Read deploy.yaml; errors name the file and every field that is wrong."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    data.update(overrides or {})
    return parse_deploy_config(data, source=str(path))


def parse_deploy_config(data: dict[str, Any], source: str = "config") -> DeployConfig:
    """Validate settings; keys may be dotted ("parallel.dp": 2), as `serve run ... parallel.dp=2` passes."""
    try:
        return DeployConfig.model_validate(_expand_dotted(data))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"invalid {source}: {problems}") from None


def _expand_dotted(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        *parents, leaf = str(key).split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"setting {key!r} conflicts with {part!r}={child!r}")
            node = child
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = {**node[leaf], **_expand_dotted(value)}
        else:
            node[leaf] = _expand_dotted(value) if isinstance(value, dict) and leaf != "runtime_env" else value
    return out
