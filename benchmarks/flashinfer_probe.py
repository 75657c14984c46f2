"""Probe FlashInfer's paged decode kernels on our cache layout, next to our Triton kernels (GPU box, no Ray).

    python benchmarks/flashinfer_probe.py [--out DIR] [--deadline-s SECONDS] [--skip-tensor-cores]

1. Imports flashinfer and prints its version; JIT-compiles the modules the cases use, all at once in threads
   (each a ninja build; MAX_JOBS sets its parallelism), timing each; a module that fails to build is a result.
   Each built module's .so is copied to DIR (so a later run can load it ahead of time, without nvcc).
2. MLA decode (latent 512 + 64, 128 heads) and GQA decode (32 q / 4 kv heads, d128) at B64 / ctx 4096 (page 16
   and 64) and B1 / B10 at ctx 1024 (page 16): FlashInfer's wrappers on views of OUR cache (no copies in the
   timed region), `FlashInferAttentionBackend.attend`, and our Triton kernel. Each is checked against the fp32
   reference (rel_err <= 1e-2) and timed with `kernels_attention.bench_ms` (do_bench median); bytes and FLOPs
   are counted as in benchmarks/kernels_attention.py. Host-side times of plan() and of one attend() call
   (dispatch only) are measured with a host clock.
3. Writes DIR/flashinfer_probe.json (rows as in kernels_attention, plus "ok" and "note") and prints a table.
Each case runs in its own try: a failure is printed and recorded, and the probe carries on. Cases not started
by --deadline-s (seconds since start) are recorded as skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernels_attention import _try, bench_ms, copy_bandwidth_tbs, format_table  # noqa: E402

from moeserve.forward_batch import AttentionMetadata  # noqa: E402
from moeserve.kernels.attention_reference import (  # noqa: E402
    make_paged_cache,
    mla_decode_attention_ref,
    paged_decode_attention_ref,
)

BF16 = torch.bfloat16
LORA, ROPE, MLA_HEADS, MLA_SCALE = 512, 64, 128, 192**-0.5
GQA_HEADS, GQA_KV_HEADS, GQA_DIM = 32, 4, 128
SHAPES = [(64, 4096, 16), (64, 4096, 64), (1, 1024, 16), (10, 1024, 16)]  # (batch, ctx, page)
START = time.monotonic()
JIT_BUSY: Callable[[], bool] = lambda: False  # noqa: E731  (set by main once builds start)
PROFILE_PLAN = os.environ.get("PROFILE_PLAN") == "1"
TRITON = None  # TritonAttentionBackend, set by main


def log(*args) -> None:
    print(f"[{time.monotonic() - START:6.1f}s]", *args, flush=True)


# ---------------------------------------------------------------- JIT


def jit_modules(skip_tensor_cores: bool) -> dict[str, Callable[[], object]]:
    """name -> a call that builds and loads one FlashInfer module (the same cached call the wrappers make)."""
    from flashinfer.decode import get_batch_decode_module
    from flashinfer.mla._batch_mla._backends._fa_common import get_batch_mla_module
    from flashinfer.prefill import get_batch_prefill_module

    i32 = torch.int32
    mods = {
        "mla_fa3": lambda: get_batch_mla_module("fa3", BF16, BF16, BF16, i32, LORA, ROPE, False),
        "decode_cuda_cores": lambda: get_batch_decode_module(BF16, BF16, BF16, i32, GQA_DIM, GQA_DIM, 0, False,
                                                             False),
        "mla_fa2": lambda: get_batch_mla_module("fa2", BF16, BF16, BF16, i32, LORA, ROPE, False),
    }
    if not skip_tensor_cores:
        for be in ("fa2", "fa3"):
            mods[f"decode_tensor_cores_{be}"] = (
                lambda be=be: get_batch_prefill_module(be, BF16, BF16, BF16, i32, GQA_DIM, GQA_DIM, 0, False,
                                                       False, False))
    return mods


def start_jit(mods: dict[str, Callable[[], object]]) -> dict[str, cf.Future]:
    """Build every module in its own thread; each future returns (seconds, error or None)."""
    def build(name: str, fn: Callable[[], object]) -> tuple[float, str | None]:
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
            log(f"JIT {name} FAILED after {time.monotonic() - t0:.0f}s: {err[-3000:]}")
            return time.monotonic() - t0, err[-600:]
        seconds = time.monotonic() - t0
        log(f"JIT {name} built in {seconds:.0f}s")
        return seconds, None

    pool = cf.ThreadPoolExecutor(max_workers=len(mods))
    return {name: pool.submit(build, name, fn) for name, fn in mods.items()}


def save_jit_outputs(out_dir: str) -> list[str]:
    """Copy every built JIT .so to out_dir (name = module uri); returns the names."""
    from flashinfer.jit import env as jit_env

    names = []
    for so in sorted(jit_env.FLASHINFER_JIT_DIR.glob("*/*.so"))[:6]:  # the device tool returns <= 8 files
        shutil.copy(so, os.path.join(out_dir, so.name))
        names.append(f"{so.name} ({so.stat().st_size / 2**20:.1f} MiB)")
    return names


# ---------------------------------------------------------------- cases


def paged_setup(seq: list[int], bt: torch.Tensor, sl: torch.Tensor, page: int):
    """(our decode metadata, FlashInfer's host CSR, its page ids on the GPU, a 128 MB workspace) for a cache."""
    from moeserve.attention.flashinfer_backend import HostCsr, pages_to_indices

    meta = AttentionMetadata.for_decode(bt, sl, page)
    csr = HostCsr.from_seq_lens(seq, page)
    indices = torch.empty(csr.total_pages, dtype=torch.int32, device="cuda")
    pages_to_indices(bt, sl, page, indices)
    return meta, csr, indices, torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")


def host_us(fn: Callable[[], object], reps: int = 30) -> float:
    """Median host time of fn in µs (the GPU is synchronized before each call, not after)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def replan(backend, fn: Callable[[], object]) -> None:
    """One attend() that plans, as the first layer of a new step does (the backend forgets its plans)."""
    for slot in backend._eager.values():
        slot.planned_for = None
    fn()


def graph_plan_us(backend, attend: Callable[[AttentionMetadata], object], sl: torch.Tensor, bt: torch.Tensor,
                  page: int) -> float:
    """Host time of before_graph_replay (the per-step cost under CUDA graphs), after a warm-up that creates the
    graph-mode wrapper of this batch size (no capture needed for the host cost)."""
    meta = AttentionMetadata.for_decode(bt, sl, page)
    backend.before_graph_replay(meta)
    attend(meta)
    return host_us(lambda: backend.before_graph_replay(meta))


def profile_plan(plan: Callable[[], object], reps: int = 10) -> None:
    """Print where plan()'s host time goes (cProfile, top entries by cumulative time)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        plan()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(18)


def run_variant(rows: list[dict], base: dict, make: Callable[[], tuple[Callable, dict]], ref: torch.Tensor,
                nbytes: int, copy_tbs: float, flops: float = 0.0) -> None:
    """make() sets a variant up (wrappers, plan) and returns (the timed call, extra fields for the row)."""
    try:
        fn, extra = make()
    except Exception as exc:
        row = dict(base, error=f"setup: {type(exc).__name__}: {str(exc)[:300]}")
        rows.append(row)
        log("FAILED", row)
        traceback.print_exc()
        return
    extra["jit_busy"] = JIT_BUSY()  # other modules still compiling: host times may be inflated
    _try(rows, dict(base, **extra), fn, ref, nbytes, copy_tbs, flops)
    rows[-1]["ok"] = "error" not in rows[-1] and rows[-1]["rel_err"] <= 1e-2


def mla_case(rows: list[dict], batch: int, ctx: int, page: int, copy_tbs: float, ready: dict) -> None:
    import flashinfer

    from moeserve.attention.flashinfer_backend import FlashInferAttentionBackend, pages_to_indices
    from moeserve.kernels.mla_decode import mla_decode_attention

    seq = [ctx - 7 * i for i in range(batch)]  # ragged, so the last pages are partly filled
    kv, _, bt, sl = make_paged_cache(seq, page, 1, LORA + ROPE, None, BF16, "cuda")
    q = torch.randn(batch, MLA_HEADS, LORA + ROPE, device="cuda", dtype=BF16)
    ref = mla_decode_attention_ref(q, kv, bt, sl, MLA_SCALE, LORA)
    nbytes = sum(seq) * (LORA + ROPE) * 2 + q.numel() * 2 + batch * MLA_HEADS * LORA * 2
    flops = 2.0 * sum(seq) * MLA_HEADS * (LORA + ROPE + LORA)
    base = dict(kernel="decode_mla", shape=f"B{batch} ctx{ctx} {MLA_HEADS}h {LORA}+{ROPE} page{page}")
    meta, csr, indices, workspace = paged_setup(seq, bt, sl, page)

    run_variant(rows, dict(base, config="triton (ours)"),
                lambda: (lambda: mla_decode_attention(q, kv, bt, sl, MLA_SCALE, LORA, max(seq)),
                         dict(attend_host_us=host_us(lambda: TRITON.attend(q, kv, kv[..., :LORA], meta,
                                                                           MLA_SCALE)))),
                ref, nbytes, copy_tbs, flops)
    for backend in ("auto", "fa3", "fa2"):
        module = "mla_fa2" if backend == "fa2" else "mla_fa3"
        if not ready.get(module):
            rows.append(dict(base, config=f"flashinfer {backend}", error=f"JIT module {module} unavailable"))
            continue

        def make(backend=backend):
            wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend=backend)
            metadata = flashinfer.mla.MLAPlanMetadata.csr(csr.qo_indptr, csr.kv_indptr, indices, csr.kv_len)

            def plan():
                wrapper.plan(metadata=metadata, num_heads=MLA_HEADS, head_dim_ckv=LORA, head_dim_kpe=ROPE,
                             page_size=page, causal=False, sm_scale=MLA_SCALE, q_data_type=BF16,
                             kv_data_type=BF16)

            plan()
            if PROFILE_PLAN and backend == "fa3" and batch == 64 and page == 16:
                profile_plan(plan)
            out = torch.empty(batch, MLA_HEADS, LORA, device="cuda", dtype=BF16)
            view = kv[:, :, 0]  # [num_blocks, page, 576]: a view, no copy

            def fn():
                return wrapper.run(query=q, kv_cache=view, out=out)

            extra = dict(picked=str(wrapper._planned_backend_name), plan_host_us=host_us(plan, 20),
                         run_host_us=host_us(fn))
            return fn, extra

        run_variant(rows, dict(base, config=f"flashinfer {backend}"), make, ref, nbytes, copy_tbs, flops)
    if ready.get("mla_fa3"):
        def make_backend():
            backend = FlashInferAttentionBackend("cuda")

            def fn():
                return backend.attend(q, kv, kv[..., :LORA], meta, MLA_SCALE)

            fn()  # plans for this step; the timed calls reuse the plan, as layers 2..L of a step do
            return fn, dict(attend_host_us=host_us(fn), plan_step_host_us=host_us(lambda: replan(backend, fn)),
                            graph_plan_host_us=graph_plan_us(backend, lambda m: backend.attend(
                                q, kv, kv[..., :LORA], m, MLA_SCALE), sl, bt, page),
                            convert_us=1e3 * bench_ms(lambda: pages_to_indices(bt, sl, page, indices)))

        run_variant(rows, dict(base, config="FlashInferAttentionBackend.attend"), make_backend, ref, nbytes,
                    copy_tbs, flops)


def gqa_case(rows: list[dict], batch: int, ctx: int, page: int, copy_tbs: float, ready: dict,
             skip_tensor_cores: bool) -> None:
    import flashinfer

    from moeserve.attention.flashinfer_backend import FlashInferAttentionBackend
    from moeserve.kernels.attention_decode import paged_decode_attention

    seq = [ctx - 7 * i for i in range(batch)]
    k, v, bt, sl = make_paged_cache(seq, page, GQA_KV_HEADS, GQA_DIM, GQA_DIM, BF16, "cuda")
    q = torch.randn(batch, GQA_HEADS, GQA_DIM, device="cuda", dtype=BF16)
    scale = GQA_DIM**-0.5
    ref = paged_decode_attention_ref(q, k, v, bt, sl, scale)
    nbytes = sum(seq) * GQA_KV_HEADS * 2 * GQA_DIM * 2 + 2 * q.numel() * 2
    base = dict(kernel="decode_gqa", shape=f"B{batch} ctx{ctx} {GQA_HEADS}/{GQA_KV_HEADS}h d{GQA_DIM} page{page}")
    meta, csr, indices, workspace = paged_setup(seq, bt, sl, page)

    run_variant(rows, dict(base, config="triton (ours)"),
                lambda: (lambda: paged_decode_attention(q, k, v, bt, sl, scale, max(seq)),
                         dict(attend_host_us=host_us(lambda: TRITON.attend(q, k, v, meta, scale)))),
                ref, nbytes, copy_tbs)
    variants = [("cuda cores", False, "fa2", "decode_cuda_cores")]
    if not skip_tensor_cores:
        variants += [(f"tensor cores {be}", True, be, f"decode_tensor_cores_{be}") for be in ("fa2", "fa3")]
    for label, tensor_cores, backend, module in variants:
        if not ready.get(module):
            rows.append(dict(base, config=f"flashinfer {label}", error=f"JIT module {module} unavailable"))
            continue

        def make(tensor_cores=tensor_cores, backend=backend):
            wrapper = flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_tensor_cores=tensor_cores, backend=backend)

            def plan():
                wrapper.plan(csr.kv_indptr, indices, csr.last_page_len, GQA_HEADS, GQA_KV_HEADS, GQA_DIM, page,
                             q_data_type=BF16, kv_data_type=BF16, sm_scale=scale)

            plan()

            def fn():
                return wrapper.run(q, (k, v))

            extra = dict(picked=wrapper.resolved_backend, plan_host_us=host_us(plan, 20), run_host_us=host_us(fn))
            return fn, extra

        run_variant(rows, dict(base, config=f"flashinfer {label}"), make, ref, nbytes, copy_tbs)
    if ready.get("decode_cuda_cores"):
        def make_backend():
            backend = FlashInferAttentionBackend("cuda")

            def fn():
                return backend.attend(q, k, v, meta, scale)

            fn()
            return fn, dict(attend_host_us=host_us(fn), plan_step_host_us=host_us(lambda: replan(backend, fn)),
                            graph_plan_host_us=graph_plan_us(backend, lambda m: backend.attend(q, k, v, m, scale),
                                                             sl, bt, page))

        run_variant(rows, dict(base, config="FlashInferAttentionBackend.attend"), make_backend, ref, nbytes,
                    copy_tbs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--deadline-s", type=float, default=330.0, help="start no case after this many seconds")
    parser.add_argument("--skip-tensor-cores", action="store_true", help="skip the tensor-core GQA variants")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    out_json = os.path.join(args.out, "flashinfer_probe.json")

    def dump() -> None:
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1, default=str)

    import flashinfer
    import triton

    info = dict(kernel="env", flashinfer=flashinfer.__version__, torch=torch.__version__, triton=triton.__version__,
                device=torch.cuda.get_device_name(), flashinfer_path=os.path.dirname(flashinfer.__file__))
    rows.append(info)
    log(info)
    futures = start_jit(jit_modules(args.skip_tensor_cores))
    global JIT_BUSY, TRITON
    from moeserve.attention.triton_backend import TritonAttentionBackend

    TRITON = TritonAttentionBackend()
    JIT_BUSY = lambda: not all(f.done() for f in futures.values())  # noqa: E731
    copy_tbs = copy_bandwidth_tbs()
    rows.append(dict(kernel="copy", shape="1 GiB d2d", config="torch copy_", tb_per_s=copy_tbs))
    log(f"copy bandwidth {copy_tbs:.2f} TB/s")

    def ready(names: list[str]) -> dict[str, bool]:
        """Wait (until the deadline) for these modules' builds; record each build's time or error."""
        status = {}
        for name in names:
            try:
                seconds, err = futures[name].result(timeout=max(1.0, args.deadline_s - (time.monotonic() - START)))
            except cf.TimeoutError:
                seconds, err = time.monotonic() - START, "not built by the deadline"
            status[name] = err is None
            rows.append(dict(kernel="jit", shape=name, time_s=round(seconds, 1), error=err or ""))
        dump()
        return status

    ok = ready(["mla_fa3", "mla_fa2"])
    cases = [("mla", *s) for s in SHAPES] + [("gqa", *s) for s in SHAPES]
    for i, (kind, batch, ctx, page) in enumerate(cases):
        if kind == "gqa" and i == len(SHAPES):
            ok.update(ready([n for n in futures if n.startswith("decode")]))
        if time.monotonic() - START > args.deadline_s:
            rows.append(dict(kernel=f"decode_{kind}", shape=f"B{batch} ctx{ctx} page{page}", error="skipped: deadline"))
            continue
        log(f"case {kind} B{batch} ctx{ctx} page{page}")
        try:
            if kind == "mla":
                mla_case(rows, batch, ctx, page, copy_tbs, ok)
            else:
                gqa_case(rows, batch, ctx, page, copy_tbs, ok, args.skip_tensor_cores)
        except Exception as exc:  # a case that breaks outside its variants
            rows.append(dict(kernel=f"decode_{kind}", shape=f"B{batch} ctx{ctx} page{page}",
                             error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            traceback.print_exc()
        torch.cuda.empty_cache()
        dump()
    cf.wait(list(futures.values()), timeout=max(0.0, args.deadline_s + 60 - (time.monotonic() - START)))
    rows.append(dict(kernel="jit_outputs", files=save_jit_outputs(args.out),
                     unfinished=[n for n, f in futures.items() if not f.done()]))
    dump()
    print(format_table([r for r in rows if r.get("kernel", "").startswith("decode")]))
    for r in rows:
        if r.get("kernel") in ("jit", "jit_outputs") or "picked" in r or "attend_host_us" in r:
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})
    sys.stdout.flush()
    os._exit(0)  # do not wait for builds still running in the pool's threads


if __name__ == "__main__":
    main()
