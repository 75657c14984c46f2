"""The engine on CUDA: greedy parity with transformers for every architecture and backend, CUDA graphs on
equal off, bf16 close to fp32. The padding logic of the decode graphs (static buffers, scratch KV block) is
also checked on the CPU, where it runs eagerly.
"""

from __future__ import annotations

import random

import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.config import EngineConfig
from moeserve.moe.layer import MoELayer
from moeserve.runner.cuda_graphs import CudaGraphRunner, graph_batch_sizes, graph_unsupported_reason
from moeserve.runner.model_runner import ModelRunner, max_expert_rows
from moeserve.scheduler.output import ScheduledRequest, SchedulerOutput
from moeserve.testing.tiny_checkpoints import ARCHITECTURES, VOCAB_SIZE
from tests.compiles import recorded_compilations

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
# transformers' fp32 logits gap between its best two tokens under which a different pick counts as a tie
# (Triton's fp32 dots run in tf32 on Hopper: ~1e-3 relative error in the logits).
TIE_GAP = 2e-2
# Few graph sizes keep start-up (capture, Triton compiles) short; batches above 16 run eagerly.
CUDA = dict(device="cuda", cuda_graph_max_batch=16)


def _triton_ready() -> bool:
    try:
        import moeserve.attention.triton_backend  # noqa: F401
        from moeserve.kernels import fused_moe  # noqa: F401
    except Exception:  # ImportError, or a kernel module that fails at import
        return False
    return True


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def hf_greedy_with_gaps(path, prompts, max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """transformers' generate(do_sample=False) in fp32 on the CPU, one prompt at a time, eos disabled.
    Returns the tokens and, per generated token, the gap between its two best logits."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    gen = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens, gaps = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            tokens.append(out.sequences[0, len(p) :].tolist())
            top2 = torch.stack([s[0].float().topk(2).values for s in out.scores])
            gaps.append((top2[:, 0] - top2[:, 1]).tolist())
    return tokens, gaps


def assert_greedy_equal(ours, theirs, gaps, exact: bool) -> int:
    """Sequences must be equal; unless `exact`, a sequence may part at a near-tie of the reference (after
    which it is no longer comparable). Returns how many sequences parted at a tie."""
    ties = 0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        first = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        assert not exact and gaps[i][first] < TIE_GAP, (
            f"prompt {i}: token {first} differs ({a[first]} vs {b[first]}); "
            f"reference gap {gaps[i][first]:.4f}"
        )
        ties += 1
    return ties


def assert_greedy_agree_up_to_ties(ours, ref, min_identical: int, tie_nats: float = 0.1) -> None:
    """Two engines' greedy outputs (`RequestOutput`s of the same lengths, the reference's with logprobs) agree:
    where a sequence parts, our token is within tie_nats of the reference's best at that step (bf16 near-ties
    between kernels that sum in different orders), and at least min_identical sequences are identical."""
    identical = 0
    for o, r in zip(ours, ref, strict=True):
        a, b = o.outputs[0].token_ids, r.outputs[0].token_ids
        assert len(a) == len(b), (len(a), len(b))
        if a == b:
            identical += 1
            continue
        d = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        top = dict(r.outputs[0].logprobs[d].top)
        assert a[d] in top and top[b[d]] - top[a[d]] < tie_nats, (d, a[d], b[d], top)
    assert identical >= min_identical, (identical, min_identical)


def engine_greedy_outputs(path: str, seed: int, check=None, **llm_kwargs) -> list:
    """One engine's greedy outputs (bf16 on CUDA, graphs up to batch 8; 16 tokens with top-5 logprobs) for six
    random prompts of 1-64 tokens drawn from seed, for `assert_greedy_agree_up_to_ties` between two engines.
    check(llm), when given, runs once the engine is built; the engine is freed before returning."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 200, (int(n),), generator=gen).tolist() for n in (1, 7, 30, 64, 5, 19)]
    llm = LLM(path, dtype="bfloat16", device="cuda", cuda_graph_max_batch=8, **llm_kwargs)
    try:
        if check is not None:
            check(llm)
        return llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5))
    finally:  # also when a check fails, so the next test finds the GPU memory free
        del llm
        torch.cuda.empty_cache()


# ---- CPU: config and graph planning ----


def test_config_validates_graph_options():
    assert EngineConfig().enable_cuda_graphs and EngineConfig().cuda_graph_max_batch == 256
    with pytest.raises(ValueError, match="cuda_graph_max_batch"):
        EngineConfig(cuda_graph_max_batch=0)
    with pytest.raises(ValueError, match="cuda_graph_max_batch"):
        EngineConfig(cuda_graph_max_batch=4096)
    with pytest.raises(ValueError, match="enable_cuda_graphs"):
        EngineConfig(enable_cuda_graphs="yes")


def test_kernel_warm_up_option_and_the_rows_it_covers():
    """The warm-up is on by default and a bool; it covers the step's token budget (or decode batch when larger),
    times the DP ranks whose tokens an expert-parallel rank may receive."""
    assert EngineConfig().warmup_kernels
    with pytest.raises(ValueError, match="warmup_kernels"):
        EngineConfig(warmup_kernels="no")
    assert max_expert_rows(EngineConfig()) == 2048
    assert max_expert_rows(EngineConfig(max_num_batched_tokens=128, max_num_seqs=512)) == 512
    assert max_expert_rows(EngineConfig(data_parallel_size=4)) == 2048  # DP attention, every rank all experts
    assert max_expert_rows(EngineConfig(data_parallel_size=4, expert_parallel_size=4)) == 4 * 2048


def test_graph_sizes_cover_every_batch_up_to_the_limit():
    for limit in (1, 3, 10, 64, 100, 256, 300, 1024):
        sizes = graph_batch_sizes(limit)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == limit
    assert graph_batch_sizes(256)[:5] == [1, 2, 4, 8, 16]


def test_graphs_only_with_graph_safe_pieces():
    cuda = torch.device("cuda")
    assert graph_unsupported_reason(cuda, "triton", "triton", "local") is None
    assert "cpu" in graph_unsupported_reason(torch.device("cpu"), "triton", "triton", "local")
    assert "attention" in graph_unsupported_reason(cuda, "torch", "triton", "local")
    assert "expert" in graph_unsupported_reason(cuda, "triton", "torch", "local")
    assert "dispatcher" in graph_unsupported_reason(cuda, "triton", "triton", "deepep")


def test_cpu_runner_has_no_graphs_and_no_scratch_block(tiny_checkpoint):
    path = str(tiny_checkpoint("qwen3_moe"))
    runner = ModelRunner(EngineConfig(model=path, device="cpu", num_kv_blocks=10), path)
    assert runner.graphs is None and runner.num_blocks == 10
    assert runner.model.model.layers[0].self_attn.k_cache.shape[0] == 10


def test_prefill_warm_up_leaves_nothing_a_request_sees(tiny_checkpoint):
    """The start-up prompts (`_warm_up_prefill`, run on CUDA; called here on the CPU) write KV into the first
    blocks and sample: a request later given those blocks gets the logits and KV of a runner that never warmed
    up."""
    path = str(tiny_checkpoint("qwen3_moe"))
    config = EngineConfig(model=path, device="cpu", dtype="float32", block_size=4, num_kv_blocks=12)
    warmed, fresh = ModelRunner(config, path), ModelRunner(config, path)
    warmed._warm_up_prefill()
    assert all(k[:9].abs().sum() > 0 for k in _kv(warmed)), "the warm-up prompts wrote no KV"
    prompt = random_prompts(1, warmed.model_config.vocab_size, 9, 9, seed=5)[0]
    outs, kvs = [], []
    for runner in (warmed, fresh):
        step = _decode_reqs(runner, [prompt], [[0, 1, 2]])  # prefill into blocks the warm-up wrote, then decode
        with torch.inference_mode():
            outs.append(runner.model.compute_logits(runner.model(runner.build_batch(step))))
        kvs.append([k[:3].flatten(0, 1)[:10] for k in _kv(runner)])  # the request's 10 slots
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    for a, b in zip(*kvs):
        assert torch.equal(a, b)


# ---- the padded static decode batch: CPU (eager) and CUDA (graph replay) -----------------------------------


def _decode_reqs(runner: ModelRunner, prompts, blocks) -> list[ScheduledRequest]:
    """Prefill `prompts` into the given block lists, then return each request's first decode step."""
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prefill = [
        ScheduledRequest(f"r{i}", p, 0, b, True, greedy) for i, (p, b) in enumerate(zip(prompts, blocks))
    ]
    out = runner.execute(SchedulerOutput(0, prefill))
    return [
        ScheduledRequest(f"r{i}", out.sampled[f"r{i}"], len(p), b, True, greedy, 1)
        for i, (p, b) in enumerate(zip(prompts, blocks))
    ]


def _kv(runner: ModelRunner) -> list[torch.Tensor]:
    return [layer.self_attn.k_cache.clone() for layer in runner.model.model.layers]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
def test_padded_decode_batch_matches_eager_and_spares_real_blocks(arch, device, tiny_checkpoint):
    if device == "cuda" and not _triton_ready():
        pytest.skip("Triton backends not importable")
    # MLA with rope width 16: the smallest the latent decode kernel's tl.dot accepts (the tiny default is 8).
    path = str(tiny_checkpoint(arch, **({"qk_rope_head_dim": 16} if arch == "deepseek_v2" else {})))
    config = EngineConfig(
        model=path,
        device=device,
        dtype="float32",
        block_size=4,
        num_kv_blocks=24,
        max_model_len=64,
        cuda_graph_max_batch=8,
    )
    runner = ModelRunner(config, path)
    if device == "cuda":
        assert runner.graphs is not None, "CUDA graphs were not captured"
        # The block-size lookup learns the model's expert count (an EP rank's weights hold only its share).
        assert runner.ctx.expert_kernel.global_experts == runner.model_config.num_experts
        graphs, scratch = runner.graphs, runner.num_blocks
    else:  # same static buffers and padding, run eagerly; block 23 plays the scratch block
        scratch = 23
        graphs = CudaGraphRunner(
            runner.model,
            max_batch=8,
            max_seq_len=64,
            block_size=4,
            scratch_block=scratch,
            device=runner.device,
            use_graphs=False,
        )
    vocab = runner.model_config.vocab_size
    prompts = random_prompts(5, vocab, 2, 11, seed=11)
    blocks = [[1, 2, 3], [5, 6, 7], [9, 10, 11], [13, 14, 15], [17, 18, 19]]
    reqs = _decode_reqs(runner, prompts, blocks)
    moe = next(m for m in runner.model.modules() if isinstance(m, MoELayer))
    chosen = []
    select = moe.select

    def recording_select(logits, num_real=None):
        weights, ids = select(logits, num_real)
        chosen.append(ids)
        return weights, ids

    moe.select = recording_select
    with torch.inference_mode():
        for subset in (reqs[:3], reqs, reqs[:1]):  # padded to 4, 8, 1; buffers reused across sizes
            ref = runner.model.compute_logits(runner.model(runner.build_batch(subset)))
            before = _kv(runner)
            chosen.clear()
            got = graphs.run(subset).clone()  # the graph ends with the LM head
            after = _kv(runner)
            if device == "cpu":  # padding rows choose no expert: a padded graph reads no extra expert weights
                ids = chosen[0]
                assert ids.shape[0] == graphs.padded_size(len(subset))
                assert (ids[len(subset):] == -1).all() and (ids[: len(subset)] >= 0).all()
            torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
            for b, a in zip(before, after):
                keep = torch.ones(b.shape[0], dtype=torch.bool, device=b.device)
                keep[scratch] = False
                # real requests' slots are rewritten with (nearly) the same values; all else stays bit-equal
                torch.testing.assert_close(a[keep], b[keep], atol=2e-3, rtol=2e-3)
                untouched = keep.clone()
                untouched[[x for r in subset for x in r.block_ids]] = False
                assert torch.equal(a[untouched], b[untouched])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_graph_steps_launched_ahead_take_their_inputs_on_the_device(device, tiny_checkpoint):
    """Decode steps through the graph runner launched before the step before is resolved, as the engine's async
    loop does (inputs are placeholders): inside the graph each placeholder takes its token from the step before,
    whether the sampler drew it (a seeded row, or the prefill before) or the graph's own argmax did (all rows
    greedy), and an all-greedy step's tokens (and a greedy row's logprobs) come from the graph's argmax. Tokens
    and logprobs equal eager steps run one at a time on the real tokens. On the CPU the graphs' static batches
    run eagerly."""
    from moeserve.request import PLACEHOLDER

    if device == "cuda" and not _triton_ready():
        pytest.skip("Triton backends not importable")
    path = str(tiny_checkpoint("qwen3_moe"))
    config = EngineConfig(model=path, device=device, dtype="float32", block_size=4, num_kv_blocks=24,
                          max_model_len=64, cuda_graph_max_batch=8)
    seeded = SamplingParams(temperature=0.8, seed=5, max_tokens=16, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=16, logprobs=2, ignore_eos=True)
    params = [GREEDY, seeded, with_logprobs]
    prompts = random_prompts(3, VOCAB_SIZE, 2, 9, seed=3)
    blocks = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    # Steps 0-2 have the seeded row (the sampler samples), steps 3-6 only the greedy ones (the graph's argmax).
    members = [[0, 1, 2]] * 3 + [[0, 2]] * 4

    def generate(ahead: bool) -> tuple[dict[int, list[int]], list, list[bool]]:
        """ahead: through the graphs, each step launched on placeholders; else eager steps on the real tokens."""
        runner = ModelRunner(config, path)
        if not ahead:
            runner.graphs = None
        elif device == "cpu":
            runner.graphs = runner.graph_runner(23, use_graphs=False)
        assert runner.graphs is not None or not ahead
        prefill = [ScheduledRequest(f"r{i}", p, 0, b, True, params[i]) for i, (p, b) in enumerate(zip(prompts, blocks))]
        tokens = {i: [t] for i, (t,) in enumerate(runner.execute(SchedulerOutput(0, prefill)).sampled.values())}
        logprobs, from_graph, pending = [], [], None

        def record(step) -> None:
            out = step.resolve()
            for rid, (t,) in out.sampled.items():
                tokens[int(rid[1:])].append(t)
            logprobs.append(out.logprobs["r2"][0])

        for k, rows in enumerate(members):
            reqs = [ScheduledRequest(f"r{i}", [PLACEHOLDER] if ahead else [tokens[i][-1]], len(prompts[i]) + k,
                                     blocks[i], True, params[i], k + 1) for i in rows]
            launched = runner.launch(SchedulerOutput(k + 1, reqs))
            if ahead:
                from_graph.append(launched.sampled.tokens.data_ptr() == runner.graphs.buffers.sampled.data_ptr())
                if pending is not None:
                    record(pending)
                pending = launched
            else:
                record(launched)
        if pending is not None:
            record(pending)
        assert runner.num_graph_steps == (len(members) if ahead else 0)
        return tokens, logprobs, from_graph

    with torch.inference_mode():
        ahead, ahead_logprobs, from_graph = generate(ahead=True)
        plain, plain_logprobs, _ = generate(ahead=False)
    assert from_graph == [False] * 3 + [True] * 4
    assert ahead == plain
    assert [len(t) for t in ahead.values()] == [8, 4, 8]
    tol = 1e-2 if device == "cuda" else 2e-3  # (Triton's fp32 dots run in tf32 on Hopper)
    for got, want in zip(ahead_logprobs, plain_logprobs, strict=True):
        assert got.token_id == want.token_id and [t for t, _ in got.top] == [t for t, _ in want.top]
        torch.testing.assert_close(torch.tensor([got.logprob, *(v for _, v in got.top)]),
                                   torch.tensor([want.logprob, *(v for _, v in want.top)]), atol=tol, rtol=tol)


# ---- CUDA: the engine end to end ----

BACKENDS = ["torch", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cuda_greedy_matches_transformers(arch, backend, tiny_checkpoint):
    if backend == "triton" and not _triton_ready():
        pytest.skip("Triton backends not importable")
    path = str(tiny_checkpoint(arch))
    llm = LLM(path, dtype="float32", attention_backend=backend, expert_kernel=backend, **CUDA)
    runner = llm.engine.runner
    assert runner.ctx.attention.name == backend and runner.ctx.expert_kernel.name == backend
    assert (runner.graphs is not None) == (backend == "triton")  # graphs exactly with graph-safe kernels
    prompts = random_prompts(4, llm.engine.vocab_size, 3, 40, seed=1)
    prompts[0] = prompts[0][:1]
    ours = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    theirs, gaps = hf_greedy_with_gaps(path, prompts, 32)
    ties = assert_greedy_equal(ours, theirs, gaps, exact=backend == "torch")
    same = len(prompts) - ties
    print(f"[parity] {arch} {backend}: {same}/{len(prompts)} identical, {ties} parted at a near-tie")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cuda_graphs_on_equals_off(arch, tiny_checkpoint):
    if not _triton_ready():
        pytest.skip("Triton backends not importable")
    path = str(tiny_checkpoint(arch))
    prompts = random_prompts(11, VOCAB_SIZE, 1, 40, seed=2)  # 11 running requests: graphs of 16, then fewer
    outs = {}
    for graphs in (True, False):
        llm = LLM(path, dtype="float32", enable_cuda_graphs=graphs, **CUDA)
        assert (llm.engine.runner.graphs is not None) == graphs
        params = [SamplingParams(temperature=0.0, max_tokens=8 + 2 * i, ignore_eos=True) for i in range(11)]
        outs[graphs] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs[True] == outs[False]


def _prefill_logits(path: str, dtype: str, prompts) -> torch.Tensor:
    """Logits [len(prompts), vocab] (float64) at each prompt's last token, one prefill batch on CUDA."""
    config = EngineConfig(
        model=path, device="cuda", dtype=dtype, num_kv_blocks=3 * len(prompts), enable_cuda_graphs=False
    )
    runner = ModelRunner(config, path)
    greedy = SamplingParams(temperature=0.0)
    reqs = [
        ScheduledRequest(f"r{i}", p, 0, [3 * i, 3 * i + 1, 3 * i + 2], True, greedy)
        for i, p in enumerate(prompts)
    ]
    with torch.inference_mode():
        batch = runner.build_batch(reqs)
        return runner.model.compute_logits(runner.model(batch)[batch.sample_indices]).double()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_close_to_fp32(arch, tiny_checkpoint):
    """bf16 (the serving dtype) computes the same function as fp32 within bf16's error.

    Per prompt, the relative error of the centred logits is typically 1-2 %; a prompt whose router scores
    nearly tie can pick another expert in bf16 (measured on the CPU: up to ~20 % for such a prompt), so the
    median is held tight and the maximum loose (unrelated logits would give ~140 %). The greedy first token
    agrees on most prompts."""
    path = str(tiny_checkpoint(arch))
    prompts = random_prompts(8, VOCAB_SIZE, 4, 40, seed=3)
    ref, got = _prefill_logits(path, "float32", prompts), _prefill_logits(path, "bfloat16", prompts)
    ref_c, got_c = ref - ref.mean(-1, keepdim=True), got - got.mean(-1, keepdim=True)
    rel = (got_c - ref_c).norm(dim=-1) / ref_c.norm(dim=-1)
    agree = int((ref.argmax(-1) == got.argmax(-1)).sum())
    print(f"[bf16] {arch}: relative error median {rel.median():.4f} max {rel.max():.4f}, argmax {agree}/8")
    assert rel.median() < 0.05 and rel.max() < 0.5
    assert agree >= 6


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_cuda_async_scheduling_equals_sync_and_launch_never_waits(arch, tiny_checkpoint):
    """Async scheduling on CUDA: the same tokens as the synchronous engine (greedy and seeded sampling with
    logprobs, through the decode graphs), and launching a step never synchronises with the device — the host
    is free to schedule step N+1 while step N runs."""
    import warnings

    if not _triton_ready():
        pytest.skip("Triton backends not importable")
    path = str(tiny_checkpoint(arch))
    prompts = random_prompts(11, VOCAB_SIZE, 1, 40, seed=4)
    params = [
        SamplingParams(temperature=0.0, max_tokens=6 + 2 * i, ignore_eos=True) if i % 2 else
        SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=12, logprobs=2, ignore_eos=True)
        for i in range(11)
    ]
    outs = {}
    for flag in (False, True):
        llm = LLM(path, dtype="float32", async_scheduling=flag, **CUDA)
        assert llm.engine.async_scheduling == flag and llm.engine.runner.graphs is not None
        runner, launch = llm.engine.runner, llm.engine.runner.launch

        def checked_launch(*args, launch=launch, **kwargs):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return launch(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        runner.launch = checked_launch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs[flag] = [(o.token_ids, o.outputs[0].logprobs is not None) for o in llm.generate(prompts, params)]
        # torch's text for a sync it caught (switching the mode on warns once too, differently worded)
        syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
        assert not syncs, syncs[:3]
    assert outs[True] == outs[False]


@pytest.mark.gpu
@pytest.mark.parametrize("arch,overrides", [(a, {}) for a in ARCHITECTURES] + [("qwen3_moe", {"head_dim": 64})],
                         ids=list(ARCHITECTURES) + ["qwen3_moe-64-wide-heads"])
def test_cuda_requests_compile_nothing_after_start_up(arch, overrides, tiny_checkpoint):
    """Start-up (the MoE warm-up, the decode graphs' capture, the warm-up prompts) compiles every Triton kernel a
    request takes: prompts of 1-70 tokens, prefix-cache hits, decode batches of 1-11, greedy and sampled with
    logprobs then compile nothing (Triton's JIT hook), so no first request waits for a compilation. 64-wide
    heads take the one-launch qkv projection + rotary (`qkv_rope`) at up to 16 rows."""
    if not _triton_ready():
        pytest.skip("Triton backends not importable")
    llm = LLM(str(tiny_checkpoint(arch, **overrides)), dtype="bfloat16", **CUDA)
    lengths = [1, 2, 3, 9, 12, 15, 16, 17, 33, 64, 70]  # each row-count class of the kernels at each size
    rng = random.Random(9)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in lengths]
    params = [
        SamplingParams(temperature=0.0, max_tokens=3 + i, ignore_eos=True) if i % 2 else
        SamplingParams(temperature=0.7, seed=i, max_tokens=8, logprobs=2, ignore_eos=True)
        for i in range(len(prompts))
    ]
    try:
        with recorded_compilations() as compiled:
            for prompt, p in zip(prompts, params):  # alone, so that its length is its prefill step's rows
                llm.generate([prompt], p)
            llm.generate(prompts, params)  # decode batches of 1-11
            llm.generate([p + [3, 4, 5] for p in prompts[3:7]], GREEDY)  # their prefixes come from the cache
            torch.cuda.synchronize()
    finally:
        del llm
        torch.cuda.empty_cache()
    assert not compiled, f"{len(compiled)} compilations after start-up: {compiled[:4]}"
