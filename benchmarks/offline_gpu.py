"""The engine on one GPU: decode step time against its roofline, and offline throughput against transformers.

Random-weight bf16 checkpoints with the real shapes of Qwen3-30B-A3B and DeepSeek-V2-Lite (fewer layers, so
that model, transformers baseline and KV cache fit one GPU and build in seconds) are initialised on the GPU
and saved in HF layout; with --skip-hf transformers builds only the layers up to the first MoE layer and the
others are written beside them, so any --layers fits (`build_deep_checkpoint`). Per model:
  (a) decode steps at batch 1, 10, 64 with ~1024 tokens of context: CUDA-graph replay (forward + LM head),
      eager forward and the whole engine step (`LLMEngine.step()` wall time in a steady decode: with async
      scheduling max(host work, device work incl. sampling)), against the roofline = bytes the step must
      read (distinct experts the batch's routing touches x 3 x H x I, all other weights, LM head, embedding
      rows, KV cache) over the HBM bandwidth that a device-to-device copy measures in the same run;
      --profile-kernels adds each graph's kernel count, kernel time and heaviest kernels (torch.profiler);
      --decode-stack off runs one-request steps through the per-op kernels rather than the one-kernel decode
      stack (`kernels/decode_stack_gluon.py`), for the two side by side;
  (b) offline throughput on N random prompts (ignore_eos) against transformers' batched generate (left
      padding, bf16, same GPU; the largest batch that fits its memory).
Prints tables and writes JSON under --out.

    python benchmarks/offline_gpu.py --out benchmarks/out/offline_gpu            # on a GPU
    python benchmarks/offline_gpu.py --tiny --device cpu --out /tmp/og           # logic check on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import random
import shutil
import statistics
import time
from pathlib import Path

import torch

# model name -> (transformers config class, real shape; layers reduced by --layers)
MODELS = {
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1e6),
        ),
    ),
    "deepseek-v2-lite": (
        "DeepseekV2Config",
        dict(
            vocab_size=102400,
            hidden_size=2048,
            num_attention_heads=16,
            num_key_value_heads=16,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            n_routed_experts=64,
            num_experts_per_tok=6,
            n_shared_experts=2,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            topk_method="greedy",
            routed_scaling_factor=1.0,
            norm_topk_prob=False,
            max_position_embeddings=163840,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=40.0,
                original_max_position_embeddings=4096,
                mscale=0.707,
                mscale_all_dim=0.707,
                beta_fast=32.0,
                beta_slow=1.0,
            ),
        ),
    ),
}
# --tiny: the same architectures at toy size, to check this script's logic on a CPU.
TINY = {
    "qwen3-30b-a3b": dict(
        vocab_size=512,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        moe_intermediate_size=32,
        num_experts=16,
        num_experts_per_tok=4,
    ),
    "deepseek-v2-lite": dict(
        vocab_size=512,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
    ),
}

log = logging.getLogger("offline_gpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Collect dropped models and engines now and, on a GPU, hand their cached blocks back to the driver, so the
    next run starts with the memory free."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def engine_options(args, device: torch.device) -> dict:
    """The `LLM` options every engine of these benchmarks shares: the checkpoint's bf16 on a GPU, fp32 on a CPU;
    room for a prompt, its output and a margin; every request in one batch (at least 64)."""
    return dict(
        device=device.type,
        dtype="auto" if device.type == "cuda" else "float32",
        max_model_len=args.input_len + args.output_len + 64,
        max_num_seqs=max(args.num_requests, 64),
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def time_ms(fn, device: torch.device, reps: int) -> float:
    """Median time of fn() in ms: CUDA events on a GPU, the host clock on a CPU (after one warm-up)."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def hbm_bandwidth(device: torch.device, nbytes: int, rounds: int = 3) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written: the best of `rounds` medians.
    One low reading would lengthen every roofline of the run and flatter its ratios (session 32 saw 2.86 TB/s
    once where the same card read 2.96-2.97 in other runs)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = min(time_ms(lambda: dst.copy_(src), device, reps=20) for _ in range(rounds))

    return 2 * nbytes / (ms / 1e3)


def build_checkpoint(
    name: str, layers: int, path: Path, device: torch.device, dtype: torch.dtype, tiny: bool
):
    """Random weights initialised on `device`, saved in HF layout with the byte tokenizer; returns the model
    (kept for the transformers baseline)."""
    import transformers

    from moeserve.testing import byte_tokenizer as bt

    cls_name, shape = MODELS[name]
    fields = {
        **shape,
        **(TINY[name] if tiny else {}),
        "num_hidden_layers": layers,
        "bos_token_id": bt.BOS_TOKEN_ID,
        "eos_token_id": bt.EOS_TOKEN_ID,
        "pad_token_id": bt.PAD_TOKEN_ID,
    }
    config = getattr(transformers, cls_name)(**fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    bt.write_byte_tokenizer(path)
    return model


def build_deep_checkpoint(
    name: str, layers: int, path: Path, device: torch.device, dtype: torch.dtype, tiny: bool
):
    """As `build_checkpoint`, with transformers building only the layers up to the first MoE layer; the later
    layers are written as more safetensors files, each tensor of that MoE layer again, drawn afresh with its
    spread (constant tensors, such as norm weights, stay as they are). Without the transformers baseline the
    model need not exist whole anywhere, so every layer count fits: transformers cannot initialise all 48 layers
    of Qwen3-30B-A3B (61 GB) on an 80 GB GPU. Returns the model transformers built."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, shape = MODELS[name]
    built = min(layers, {**shape, **(TINY[name] if tiny else {})}.get("first_k_dense_replace", 0) + 1)
    model = build_checkpoint(name, built, path, device, dtype, tiny)
    tag = f".layers.{built - 1}."
    template = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            template.update({k: f.get_tensor(k) for k in f.keys() if tag in k})
    # Each template tensor's spread, once: None keeps a constant tensor (such as a norm's weight) as it is.
    spread = {k: None if bool((t == t.flatten()[0]).all()) else t.float().std() for k, t in template.items()}
    gen = torch.Generator(device=device).manual_seed(1)
    files = {}
    for i in range(built, layers):
        tensors = {}
        for key, t in template.items():
            fresh = t if spread[key] is None else (
                torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32) * spread[key]).to(t.dtype)
            tensors[key.replace(tag, f".layers.{i}.")] = fresh.cpu()
        files[f"layer-{i:03d}.safetensors"] = list(tensors)
        save_file(tensors, str(path / f"layer-{i:03d}.safetensors"))
    # Sharded HF layout: the index lists every tensor's file (one model.safetensors becomes the first shard).
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
    else:
        (path / "model.safetensors").rename(path / "model-base.safetensors")
        with safe_open(str(path / "model-base.safetensors"), framework="pt") as f:
            data = {"metadata": {}, "weight_map": dict.fromkeys(f.keys(), "model-base.safetensors")}
    data["weight_map"].update({key: file for file, keys in files.items() for key in keys})
    data["metadata"]["total_size"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    index.write_text(json.dumps(data, indent=2))
    model.config.num_hidden_layers = layers
    model.config.save_pretrained(path)
    return model


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


@torch.inference_mode()
def run_transformers(model, prompts, output_len: int, device: torch.device, batches: list[int]) -> dict:
    """Batched greedy generate (left padding; equal-length prompts need none), largest batch that fits."""
    from transformers import GenerationConfig

    model.generation_config.eos_token_id = None  # exactly output_len tokens, like ignore_eos
    gen = GenerationConfig(do_sample=False, max_new_tokens=output_len, eos_token_id=None, pad_token_id=0)
    model.generate(
        torch.tensor(prompts[:2], device=device),
        generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=4, eos_token_id=None, pad_token_id=0
        ),
    )  # warm-up
    for batch in batches:
        try:
            outs: list[list[int]] = []
            sync(device)
            t0 = time.perf_counter()
            for i in range(0, len(prompts), batch):
                chunk = prompts[i : i + batch]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                out = model.generate(ids, attention_mask=mask, generation_config=gen)
                outs.extend(out[:, width:].tolist())
            sync(device)
            return dict(seconds=time.perf_counter() - t0, batch=batch, tokens=outs)
        except torch.OutOfMemoryError:
            log.warning("transformers: batch %d does not fit, halving", batch)
            free(device)
    raise RuntimeError("transformers did not fit any batch size")


def distinct_experts(runner, reqs) -> list[int]:
    """Per MoE layer, how many distinct experts the real rows of this decode batch route to (eager pass)."""
    from moeserve.moe.layer import MoELayer

    counts: list[int] = []
    hooks = []
    for layer in runner.model.model.layers:
        moe = layer.ffn
        if not isinstance(moe, MoELayer):
            continue

        def hook(module, args, logits, moe=moe):
            _, ids = moe.select(logits[: len(reqs)])
            counts.append(int(ids.unique().numel()))

        hooks.append(moe.gate.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            runner.model(runner.build_batch(reqs))
    finally:
        for h in hooks:
            h.remove()
    return counts


def step_bytes(runner, reqs, experts_per_layer: list[int]) -> dict:
    """Bytes one decode step must read: touched experts, every other weight, embedding rows, KV cache."""
    from moeserve.moe.layer import MoELayer

    model, n = runner.model, len(reqs)
    elem = torch.tensor([], dtype=runner.dtype).element_size()
    moe_layers = [layer.ffn for layer in model.model.layers if isinstance(layer.ffn, MoELayer)]
    expert = sum(
        c * 3 * m.hidden_size * m.intermediate_size * elem for c, m in zip(experts_per_layer, moe_layers)
    )
    stacked = {id(m.w13) for m in moe_layers} | {id(m.w2) for m in moe_layers}
    embed = model.model.embed_tokens.weight
    dense = sum(
        p.numel() * p.element_size() for p in model.parameters() if id(p) not in stacked and p is not embed
    )
    dense += n * embed.shape[1] * embed.element_size()
    context = sum(r.start_position + 1 for r in reqs)
    kv = sum(
        context * s.num_kv_heads * (s.k_dim + (0 if s.v_is_k_prefix else s.v_dim)) * elem
        for s in model.kv_cache_specs()
    )
    return dict(expert=expert, dense=dense, kv=kv, total=expert + dense + kv)


def decode_steps(
    llm, batch: int, context: int, steps: int, bw: float, device: torch.device, profile: bool = False,
    trace: Path | None = None,
) -> dict:
    """Prefill `batch` prompts of context-1 tokens, then time decode steps (engine, graph replay, eager).
    trace: also write a Chrome trace (torch.profiler, host and device) of TRACE_STEPS more engine steps there."""
    from moeserve import SamplingParams

    engine, runner = llm.engine, llm.engine.runner
    params = SamplingParams(temperature=0.0, max_tokens=steps + TRACE_STEPS + 16, ignore_eos=True)
    ids = [
        engine.add_request(p, params) for p in random_prompts(batch, context - 1, engine.vocab_size, batch)
    ]
    started: set[str] = set()
    while len(started) < batch:  # prefill (chunked) until every request has its first token
        started.update(c.request_id for c in engine.step())
    last = {}
    launch = runner.launch
    waits: list[float] = []  # ms each step spent waiting for the device inside resolve()

    def recording_launch(sched, *args, **kwargs):
        last["sched"] = sched
        pending = launch(sched, *args, **kwargs)
        resolve = pending.resolve

        def timed_resolve():
            t0 = time.perf_counter()
            out = resolve()
            waits.append((time.perf_counter() - t0) * 1e3)
            return out

        pending.resolve = timed_resolve
        return pending

    runner.launch = recording_launch
    wall = []
    try:  # with async scheduling a step's wall time is max(host work, device step), as in a steady state
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            wall.append((time.perf_counter() - t0) * 1e3)
    finally:
        runner.launch = launch
    if trace is not None:
        trace_steps(engine, trace, device)
    reqs = last["sched"].requests
    assert len(reqs) == batch and all(len(r.token_ids) == 1 for r in reqs), "timed steps were not pure decode"
    # With async scheduling the last step's inputs were placeholders; their tokens are known by now.
    reqs = [
        dataclasses.replace(r, token_ids=[engine.scheduler.get_request(r.request_id).all_token_ids[r.start_position]])
        for r in reqs
    ]
    assert all(r.token_ids[0] >= 0 for r in reqs)
    with torch.inference_mode():
        eager_batch = runner.build_batch(reqs)
        eager_ms = time_ms(lambda: runner.model(eager_batch), device, reps=10)
        graph_ms = None
        if runner.graphs is not None and runner.graphs.fits(reqs):
            size = runner.graphs.padded_size(batch)
            runner.graphs.buffers.fill(reqs, size)  # replays rewrite this step's KV with the same values
            graph_ms = time_ms(runner.graphs.graphs[size].replay, device, reps=20)
            kernels = None
            if profile:
                try:
                    kernels = kernel_breakdown(runner.graphs.graphs[size].replay, device)
                except Exception as exc:  # noqa: BLE001 - a profiler problem must not lose the run
                    kernels = dict(error=f"{type(exc).__name__}: {exc}")
    experts = distinct_experts(runner, reqs)
    nbytes = step_bytes(runner, reqs, experts)
    for rid in ids:
        engine.abort(rid)
    roofline_ms = nbytes["total"] / bw * 1e3
    best = graph_ms if graph_ms is not None else eager_ms
    return dict(
        batch=batch,
        context=context,
        engine_step_ms=statistics.median(wall),
        # Host work per step = wall - waiting for the device; near-zero waits mean the step is host-bound.
        resolve_wait_ms=statistics.median(waits[-steps:]) if waits else None,
        eager_forward_ms=eager_ms,
        graph_replay_ms=graph_ms,
        experts_per_layer=experts,
        bytes=nbytes,
        roofline_ms=roofline_ms,
        roofline_fraction=roofline_ms / best,
        kernels=kernels if graph_ms is not None else None,
    )


TRACE_STEPS = 6


def trace_steps(engine, path: Path, device: torch.device) -> None:
    """A Chrome trace of TRACE_STEPS engine steps: what runs on the device between graph replays, and where the
    host spends a step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(TRACE_STEPS):
            engine.step()
        sync(device)
    prof.export_chrome_trace(str(path))


def profile_kernels(fn, device: torch.device, reps: int) -> list[tuple[float, float, str]]:
    """(µs, launches, name) per call of fn() for each kernel it runs (torch.profiler over `reps` calls after
    one warm-up), heaviest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync(device)
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append((us / reps, e.count / reps, e.key))
    return sorted(rows, reverse=True)


def kernel_breakdown(replay, device: torch.device, reps: int = 5, top: int = 14) -> dict:
    """Kernels inside one graph replay (torch.profiler): launches, summed kernel time, and the heaviest names.
    Replay time minus kernel time is what the boundaries between kernels cost."""
    rows = [row for row in profile_kernels(replay, device, reps) if row[1] >= 1]  # in every replay
    return dict(
        launches_per_replay=sum(c for _, c, _ in rows),
        kernel_us_per_replay=sum(us for us, _, _ in rows),
        top=[dict(us=round(us, 1), count=c, name=name[:90]) for us, c, name in rows[:top]],
    )


def timed_generate(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
    """(seconds, outputs) of one greedy `llm.generate` over prompts, max_tokens each (eos ignored)."""
    from moeserve import SamplingParams

    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return time.perf_counter() - t0, outs


class CompileLog:
    """Triton compilations (kernel name, seconds) by phase of the run, through Triton's JIT hooks: what an
    engine compiles lazily after start-up. On a cold compile cache these compilations land inside timed
    runs."""

    def __init__(self) -> None:
        import triton

        self.phase = "start"
        self.compiles: list[dict] = []
        self._started: dict[str, float] = {}
        runtime = triton.knobs.runtime
        runtime.jit_cache_hook = self._before
        runtime.jit_post_compile_hook = self._after

    def _before(self, *, key, fn, **_) -> bool:
        self._started[str(key)] = time.perf_counter()
        return False  # compile as usual

    def _after(self, *, key, repr, fn, **_) -> bool:  # noqa: A002 - Triton's keyword
        t0 = self._started.pop(str(key), None)
        seconds = time.perf_counter() - t0 if t0 is not None else float("nan")
        self.compiles.append(dict(phase=self.phase, kernel=fn.name, seconds=round(seconds, 3), what=repr[:400]))
        return False

    def summary(self) -> dict:
        """Per phase: number of compilations, their seconds and each kernel's count; the timed run's one by one."""
        out: dict = {}
        for c in self.compiles:
            p = out.setdefault(c["phase"], dict(count=0, seconds=0.0, kernels={}))
            p["count"] += 1
            p["seconds"] = round(p["seconds"] + c["seconds"], 3)
            p["kernels"][c["kernel"]] = p["kernels"].get(c["kernel"], 0) + 1
        timed = [c for c in self.compiles if c["phase"] == "throughput (timed)"]
        if timed:
            out["throughput (timed)"]["each"] = timed
        return out


def run_moeserve_throughput(llm, prompts, output_len: int, warmup: bool, log: CompileLog | None = None) -> dict:
    """Time the workload from a cold prefix cache and a warm compile cache.

    warmup: first run the same workload on other prompts (the prefix cache is reset after it), so that its
    steps take the timed run's token counts and whatever those compile lazily is compiled before the timed
    run. Before the engine compiled its MoE kernels at start-up (`EngineConfig.warmup_kernels`, session 20),
    a cold compile cache put the compilation of the fused-MoE entry of the last prefill step inside the
    timed run (2.3 s of a 5.4 s run; benchmarks/RESULTS.md, session 19). Since session 21 the engine compiles
    the prefill path at start-up too and `--log-compiles` shows nothing compiled here; the warm-up stays as a
    guard, so that a kernel compiled lazily again never lands in the timed run."""
    if log is not None:
        log.phase = "throughput warm-up"
    if warmup:
        other = random_prompts(len(prompts), len(prompts[0]), llm.engine.vocab_size, seed=12345)
        timed_generate(llm, other, output_len)
    llm.engine.reset_prefix_cache()
    if log is not None:
        log.phase = "throughput (timed)"
    seconds, outs = timed_generate(llm, prompts, output_len)
    return dict(seconds=seconds, tokens=[o.token_ids for o in outs])


def bench_model(name: str, args, device: torch.device, bw: float) -> dict:
    from moeserve import LLM

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    path = Path(args.ckpt_dir) / name
    t0 = time.perf_counter()
    build = build_deep_checkpoint if args.skip_hf else build_checkpoint
    hf = build(name, args.layers, path, device, dtype, args.tiny)
    build_s = time.perf_counter() - t0
    vocab = hf.config.vocab_size
    prompts = random_prompts(args.num_requests, args.input_len, vocab, seed=0)
    result: dict = dict(model=name, layers=args.layers, build_seconds=build_s)
    if not args.skip_hf:
        batches = [b for b in (256, 128, 64, 32, 16, 8) if b <= args.num_requests] or [args.num_requests]
        hf_run = run_transformers(hf, prompts, args.output_len, device, batches)
        result["transformers"] = {k: v for k, v in hf_run.items() if k != "tokens"}
    del hf
    free(device)

    log = CompileLog() if args.log_compiles else None
    t0 = time.perf_counter()
    llm = LLM(
        str(path),
        **engine_options(args, device),
        enable_cuda_graphs=not args.no_graphs,
        attention_backend=args.attention_backend,
        expert_kernel=args.expert_kernel,
        cuda_graph_max_batch=min(256, max(args.num_requests, 64)),
        decode_stack=args.decode_stack == "on",
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
    )
    runner = llm.engine.runner
    result["engine"] = dict(
        start_seconds=time.perf_counter() - t0,
        decode_stack=runner.model.decode_stack is not None,
        attention=runner.ctx.attention.name,
        experts=runner.ctx.expert_kernel.name,
        cuda_graph_sizes=runner.graphs.sizes if runner.graphs is not None else None,
    )
    if log is not None:
        log.phase = "decode steps"
    result["decode"] = [
        decode_steps(llm, b, args.context, args.steps, bw, device, profile=args.profile_kernels,
                     trace=Path(args.out) / f"trace_{name}_b{b}.json" if args.trace else None)
        for b in args.decode_batches
    ]
    ours = run_moeserve_throughput(llm, prompts, args.output_len, warmup=True, log=log)
    result["moeserve"] = dict(
        seconds=ours["seconds"], max_num_seqs=llm.engine.config.max_num_seqs,
        async_scheduling=llm.engine.async_scheduling,
    )
    if llm.engine.async_scheduling and not args.skip_sync:  # the same engine, host and device in turn
        llm.engine.async_scheduling = False
        sync_run = run_moeserve_throughput(llm, prompts, args.output_len, warmup=False)
        llm.engine.async_scheduling = True
        result["moeserve_sync"] = dict(seconds=sync_run["seconds"], same_tokens=sync_run["tokens"] == ours["tokens"])
    if not args.skip_hf:
        agree = sum(a[:1] == b[:1] for a, b in zip(ours["tokens"], hf_run["tokens"]))
        result["first_token_agreement"] = agree / len(prompts)
    if log is not None:
        result["compiles"] = log.summary()
    out_tokens = args.num_requests * args.output_len
    for key in ("moeserve", "moeserve_sync", "transformers"):
        if key in result:
            s = result[key]["seconds"]
            result[key].update(
                output_tok_s=out_tokens / s,
                total_tok_s=args.num_requests * (args.input_len + args.output_len) / s,
            )
    del llm, runner
    free(device)
    shutil.rmtree(path, ignore_errors=True)
    return result


def print_tables(results: list[dict], bw: float, card: str) -> None:
    print(f"\n{card}; HBM copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    for r in results:
        e = r["engine"]
        print(
            f"\n{r['model']} ({r['layers']} layers, attention={e['attention']}, experts={e['experts']}, "
            f"graphs={'on' if e['cuda_graph_sizes'] else 'off'}, "
            f"decode stack {'on' if e.get('decode_stack') else 'off'}, start {e['start_seconds']:.1f} s)"
        )
        print(
            "| batch | ctx | experts/layer | MB read | roofline ms | graph ms | eager ms | engine step ms "
            "| roofline/graph | roofline/step | wait in resolve ms |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for d in r["decode"]:
            g = f"{d['graph_replay_ms']:.3f}" if d["graph_replay_ms"] is not None else "-"
            avg = sum(d["experts_per_layer"]) / max(len(d["experts_per_layer"]), 1)
            print(
                f"| {d['batch']} | {d['context']} | {avg:.1f} | {d['bytes']['total'] / 1e6:.0f} | "
                f"{d['roofline_ms']:.3f} | {g} | {d['eager_forward_ms']:.3f} | {d['engine_step_ms']:.3f} | "
                f"{d['roofline_fraction']:.2f} | {d['roofline_ms'] / d['engine_step_ms']:.2f} | "
                f"{d['resolve_wait_ms'] if d.get('resolve_wait_ms') is None else round(d['resolve_wait_ms'], 3)} |"
            )
        for d in r["decode"]:
            k = d.get("kernels")
            if k and "error" in k:
                print(f"batch {d['batch']} kernel profile failed: {k['error']}")
            elif k:
                print(
                    f"batch {d['batch']} graph: {k['launches_per_replay']:.0f} kernels, "
                    f"{k['kernel_us_per_replay']:.0f} µs of kernel time in a {d['graph_replay_ms'] * 1e3:.0f} µs replay"
                )
                for row in k["top"]:
                    print(f"    {row['us']:8.1f} µs  x{row['count']:<4.0f} {row['name']}")
        print("| engine | batch | seconds | output tok/s | total tok/s |")
        print("|---|---:|---:|---:|---:|")
        m = r["moeserve"]
        label = "moeserve (async scheduling)" if m["async_scheduling"] else "moeserve"
        print(
            f"| {label} | <= {m['max_num_seqs']} | {m['seconds']:.2f} | {m['output_tok_s']:.0f} | "
            f"{m['total_tok_s']:.0f} |"
        )
        if "moeserve_sync" in r:
            m = r["moeserve_sync"]
            print(
                f"| moeserve (sync, same tokens: {m['same_tokens']}) | same | {m['seconds']:.2f} | "
                f"{m['output_tok_s']:.0f} | {m['total_tok_s']:.0f} |"
            )
        if "transformers" in r:
            t = r["transformers"]
            print(
                f"| transformers | {t['batch']} | {t['seconds']:.1f} | {t['output_tok_s']:.0f} | "
                f"{t['total_tok_s']:.0f} |"
            )
            print(
                f"moeserve / transformers throughput: {m['seconds'] and t['seconds'] / m['seconds']:.2f}x; "
                f"first-token agreement {r['first_token_agreement']:.2f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-30b-a3b,deepseek-v2-lite")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024, help="context of the timed decode steps")
    ap.add_argument("--decode-batches", default="1,10,64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--expert-kernel", default="auto")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-sync", action="store_true", help="no side-by-side run with async scheduling off")
    ap.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--decode-stack", choices=["on", "off"], default="on",
                    help="one-request decode steps in one kernel where the model allows (EngineConfig.decode_stack)")
    ap.add_argument("--profile-kernels", action="store_true", help="kernel breakdown of each decode graph")
    ap.add_argument("--log-compiles", action="store_true", help="Triton compilations per phase (CompileLog)")
    ap.add_argument("--trace", action="store_true", help="Chrome trace of a few engine steps per decode batch")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (checks this script on a CPU)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--ckpt-dir", default=None, help="where checkpoints are written (default: /dev/shm or /tmp)"
    )
    ap.add_argument("--out", default="benchmarks/out/offline_gpu")
    args = ap.parse_args()
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    if args.ckpt_dir is None:
        shm = Path("/dev/shm")
        roomy = shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30
        args.ckpt_dir = str(shm / "moeserve_bench") if roomy else "/tmp/moeserve_bench"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bw = hbm_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    results, failed = [], []
    for name in args.models.split(","):
        log.info("benchmarking %s", name)
        try:
            results.append(bench_model(name, args, device, bw))
        except Exception:  # report and go on with the next model
            log.exception("%s failed", name)
            failed.append(name)
            free(device)
            continue
        (out / f"{name}.json").write_text(
            json.dumps(
                dict(
                    card=card,
                    date=time.strftime("%Y-%m-%d"),
                    hbm_bytes_per_s=bw,
                    args=vars(args),
                    result=results[-1],
                ),
                indent=1,
            )
        )
        print_tables(results[-1:], bw, card)
    print_tables(results, bw, card)
    if failed:
        raise SystemExit(f"offline_gpu: {', '.join(failed)} failed (tracebacks above)")


if __name__ == "__main__":
    main()
