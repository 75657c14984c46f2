"""Every architecture against transformers' own implementation, on tiny random checkpoints (float32, CPU).

For each family: a batched prefill over the paged cache gives transformers' logits at every position; greedy
decoding through the cache gives transformers' `generate` tokens; chunked prefill gives the one-shot logits.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.attention.torch_backend import TorchAttentionBackend
from moeserve.forward_batch import build_forward_batch
from moeserve.loader.checkpoint import read_hf_config
from moeserve.loader.model_loader import load_model
from moeserve.models.base import ModelContext
from moeserve.models.config import ModelConfig
from moeserve.moe.dispatcher import LocalDispatcher
from moeserve.moe.experts import TorchExperts
from moeserve.moe.placement import ExpertPlacement
from moeserve.testing.tiny_checkpoints import ARCHITECTURES, build_tiny_checkpoint

transformers = pytest.importorskip("transformers")

CASES = [(arch, {}) for arch in ARCHITECTURES] + [
    (
        "deepseek_v2",
        dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5),
    ),
]
CASE_IDS = [arch + ("-grouped" if overrides else "") for arch, overrides in CASES]
BLOCK_SIZE = 4
NEW_TOKENS = 32


def torch_context(cfg: ModelConfig) -> ModelContext:
    return ModelContext(
        dtype=torch.float32,
        device=torch.device("cpu"),
        attention=TorchAttentionBackend(),
        expert_kernel=TorchExperts(),
        dispatcher=LocalDispatcher(num_local_slots=cfg.num_experts),
        placement=ExpertPlacement.trivial(cfg.num_moe_layers, cfg.num_experts),
    )


class PagedCache:
    """KV caches full of garbage (unwritten slots must never be read); block ids handed out at random."""

    def __init__(self, model, num_blocks: int = 96, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        caches = []
        for s in model.kv_cache_specs():
            k = torch.randn(num_blocks, BLOCK_SIZE, s.num_kv_heads, s.k_dim, generator=g)
            v = (
                k[..., : s.v_dim]
                if s.v_is_k_prefix
                else torch.randn(num_blocks, BLOCK_SIZE, s.num_kv_heads, s.v_dim, generator=g)
            )
            caches.append((k, v))
        model.bind_kv_caches(caches)
        self.model = model
        self.free = torch.randperm(num_blocks, generator=g).tolist()

    def blocks_for(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // BLOCK_SIZE)
        table, self.free = self.free[:n], self.free[n:]
        return table

    @torch.inference_mode()
    def step(self, tokens, starts, tables, sample_rows=None) -> torch.Tensor:
        batch = build_forward_batch(tokens, starts, tables, BLOCK_SIZE, sample_rows=sample_rows)
        hidden = self.model(batch)
        return self.model.compute_logits(hidden[batch.sample_indices])


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def models(request, tmp_path_factory):
    arch, overrides = request.param
    path = build_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch), seed=7, **overrides)
    cfg = ModelConfig.from_hf(read_hf_config(path))
    ours, cfg = load_model(path, torch_context(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # generate exactly NEW_TOKENS on both sides
    return ours, hf, cfg


def prompts(lengths=(5, 11, 3, 17), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def assert_close_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-4 * scale, f"max |diff| {err:.3g} > 1e-4 x max |logit| {scale:.3g}"


@torch.inference_mode()
def hf_logits(hf, prompt: list[int]) -> torch.Tensor:
    return hf(torch.tensor([prompt])).logits[0].float()


def test_batched_prefill_matches_transformers(models):
    ours, hf, _ = models
    ps = prompts()
    cache = PagedCache(ours)
    tables = [cache.blocks_for(len(p)) for p in ps]
    logits = cache.step(ps, [0] * len(ps), tables, sample_rows=[list(range(len(p))) for p in ps])
    ref = torch.cat([hf_logits(hf, p) for p in ps])
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert_close_logits(logits, ref)


def test_greedy_decode_matches_transformers_generate(models):
    ours, hf, _ = models
    ps = prompts(seed=1)
    cache = PagedCache(ours, seed=1)
    tables = [cache.blocks_for(len(p) + NEW_TOKENS) for p in ps]
    generated = [[] for _ in ps]
    logits = cache.step(ps, [0] * len(ps), tables)
    for _ in range(NEW_TOKENS):
        for out, tok in zip(generated, logits.argmax(-1).tolist()):
            out.append(tok)
        if len(generated[0]) == NEW_TOKENS:
            break
        starts = [len(p) + len(out) - 1 for p, out in zip(ps, generated)]
        logits = cache.step([[out[-1]] for out in generated], starts, tables)
    for p, out in zip(ps, generated):
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([p]), do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None
            )
        assert ref.shape[1] == len(p) + NEW_TOKENS
        assert out == ref[0, len(p) :].tolist()


def test_chunked_prefill_matches_one_shot(models):
    """A prompt fed in three chunks (next to another request decoding) gives the one-shot prefill's logits."""
    ours, hf, _ = models
    long, short = prompts(lengths=(14, 4), seed=2)
    cache = PagedCache(ours, seed=2)
    table_long, table_short = cache.blocks_for(len(long)), cache.blocks_for(len(short) + 2)
    chunks = [long[:5], long[5:9], long[9:]]
    # Step 1: first chunk + the short prompt; steps 2-3: next chunks + one decode step of the short request.
    out = [cache.step([chunks[0], short], [0, 0], [table_long, table_short], [list(range(5)), [3]])]
    next_tok = out[0][-1].argmax().item()
    for i, chunk in enumerate(chunks[1:], start=1):
        start = sum(len(c) for c in chunks[:i])
        logits = cache.step(
            [chunk, [next_tok]],
            [start, len(short) + i - 1],
            [table_long, table_short],
            [list(range(len(chunk))), [0]],
        )
        out.append(logits)
        next_tok = logits[-1].argmax().item()
    chunked = torch.cat([o[:-1] for o in out])
    assert_close_logits(chunked, hf_logits(hf, long))
    one_shot = PagedCache(ours, seed=3)
    ref = one_shot.step([long], [0], [one_shot.blocks_for(len(long))], [list(range(len(long)))])
    assert_close_logits(chunked, ref)
