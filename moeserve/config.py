"""Engine configuration: built once, validated, frozen. Derived values come from `resolve()` only."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moeserve.backend_choice import DISPATCHERS

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Options of one engine (one rank). Every field has a safe default for the CPU demo.

    model: path of an HF-layout checkpoint directory; None means the built-in demo model.
    dtype: "auto" (the checkpoint's dtype on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
    device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
    num_kv_blocks: KV cache size in blocks; None sizes it from kv_cache_memory_gib (CPU) or
        gpu_memory_utilization (CUDA).
    max_num_batched_tokens: the per-step token budget (prefill chunks and decodes share it).
    max_num_seqs: most requests running at once.
    max_model_len: longest context; None means the model's max_position_embeddings.
    enable_cuda_graphs: capture the decode forward in CUDA graphs at start-up and replay them for decode-only
        steps (CUDA with graph-safe attention and expert kernels only; otherwise start-up logs why not).
    cuda_graph_max_batch: largest decode batch (requests) run through a graph; larger ones run eagerly.
    decode_stack: run one-request decode steps through every decoder layer in one persistent kernel
        (`kernels/decode_stack_gluon.py`) where the model, GPU and Triton allow; start-up logs whether it runs.
    warmup_kernels: at start-up on CUDA, run the router and the expert kernel once at each token count that
        takes other kernels, up to the largest a step can bring (`MoELayer.warm_up`), so that Triton compiles
        them then rather than inside the first request of that size (1-3 s a fused-MoE table entry on a fresh
        machine; Triton's cache on disk makes later start-ups quick); then, on a rank without an EP dispatcher,
        run two short prompts, which compile the prefill attention, the argmax and the prefill-size kernels.
    async_scheduling: schedule and launch step N+1 before waiting for step N's sampled tokens, so host work
        overlaps device work. None (auto): on for a lone CUDA rank; off on CPU, where the forward runs in
        the caller's thread and nothing would overlap, and off for lockstep DP/EP ranks unless set True.
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gib: float = 1.0
    gpu_memory_utilization: float = 0.85
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    expert_kernel: str = "auto"
    # Parallelism (one rank per GPU, or per CPU slot): DP attention, EP MoE. ep is 1 (every rank holds every
    # expert) or equal to dp (experts spread over the DP ranks).
    data_parallel_size: int = 1
    expert_parallel_size: int = 1
    num_redundant_experts: int = 0
    enable_tbo: bool = False
    moe_dispatcher: str = "auto"
    eplb_window_steps: int = 1000  # steps of expert load kept for rebalancing
    enable_cuda_graphs: bool = True
    cuda_graph_max_batch: int = 256
    decode_stack: bool = True
    warmup_kernels: bool = True
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(
                f"dtype={self.dtype!r} is not supported; allowed: 'auto', {', '.join(map(repr, _DTYPES))}"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(
                f"device={self.device!r} is not supported; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'"
            )
        _positive(
            self,
            "block_size",
            "max_num_batched_tokens",
            "max_num_seqs",
            "data_parallel_size",
            "expert_parallel_size",
            "cuda_graph_max_batch",
        )
        if self.cuda_graph_max_batch > 1024:
            raise ValueError(
                f"cuda_graph_max_batch={self.cuda_graph_max_batch} is too large; allowed: 1..1024"
            )
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling={self.async_scheduling!r} must be None (auto), True or False")
        for flag in ("enable_cuda_graphs", "decode_stack", "warmup_kernels"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} must be True or False")
        if self.expert_parallel_size not in (1, self.data_parallel_size):
            raise ValueError(
                f"expert_parallel_size={self.expert_parallel_size} is not supported with data_parallel_size="
                f"{self.data_parallel_size}; allowed: 1 or equal to data_parallel_size"
            )
        if self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts={self.num_redundant_experts} must be >= 0")
        if self.moe_dispatcher not in DISPATCHERS:
            raise ValueError(
                f"moe_dispatcher={self.moe_dispatcher!r}; allowed: {', '.join(map(repr, DISPATCHERS))}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} is too small; allowed: None or >= 2")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib={self.kv_cache_memory_gib} must be > 0")

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Build from keyword options, naming unknown ones and what is allowed."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; allowed: {sorted(names)}")
        return cls(**kwargs)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.torch_device().type == "cpu" or checkpoint_dtype is None:
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in _DTYPES.values() else torch.bfloat16


def _positive(cfg: EngineConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
