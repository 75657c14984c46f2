"""Load generator for an OpenAI-compatible `/v1/completions` endpoint (moeserve's HTTP server, or any other).

Sends random token-id prompts (so lengths are exact) as streaming requests, on a Poisson arrival process
and/or under a concurrency cap, and reports throughput and TTFT / ITL / TPOT / E2E latency (definitions in
`serving_lib.py`). Prints a table and writes JSON with per-request records.

    python benchmarks/serving.py --num-prompts 64 --input-len 128 --output-len 32 --request-rate 8
    python benchmarks/serving.py --max-concurrency 16 --shared-prefix-len 64 --range-ratio 0.5
    python benchmarks/serving.py --compare-offline --check-outputs 4     # HTTP + Serve overhead vs in-process

`--compare-offline` replays the same workload through `moeserve.LLM` in this process (same prompts,
max_tokens, greedy, arrival offsets and concurrency cap) and reports the per-request overhead of the HTTP
path. Its engine options (`--offline-arg`) must match the server's for the figure to mean anything.

Needs httpx; never imports ray; imports moeserve only for --compare-offline / --check-outputs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_lib import (  # noqa: E402
    BenchRequest,
    RequestRecord,
    SSEDecoder,
    StreamState,
    WorkloadSpec,
    arrival_offsets,
    format_table,
    itl_samples,
    make_workload,
    summarize,
)

OVERHEAD_DEFINITION = (
    "overhead per request = mean HTTP E2E - mean offline E2E, where the offline run replays the same "
    "prompts, max_tokens, greedy sampling, arrival offsets and concurrency cap into one in-process engine "
    "(offline E2E: from adding the request to its last token). With --request-rate inf and no "
    "--max-concurrency both runs submit every request at t=0. It is the time the HTTP path (client, HTTP, "
    "Serve routing, streaming) adds to a request, provided the offline engine options match the server's."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None,
                    help="served model name (default: the first id of GET /v1/models)")
    ap.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer <key>'")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128, help="unique prompt tokens (upper bound)")
    ap.add_argument("--output-len", type=int, default=32, help="max_tokens (upper bound)")
    ap.add_argument("--range-ratio", type=float, default=0.0,
                    help="lengths uniform in [len * (1 - ratio), len]; 0 = fixed lengths")
    ap.add_argument("--shared-prefix-len", type=int, default=0, help="common tokens in front of every prompt")
    ap.add_argument("--vocab", type=int, default=256, help="token ids are drawn from [3, vocab)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="Poisson arrivals per second (inf: all at once)")
    ap.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="let EOS end requests early (default: ignore_eos=true, exactly max_tokens)")
    ap.add_argument("--token-counts", choices=("usage", "logprobs"), default="usage",
                    help="tokens per chunk: estimated from usage + text (default), or exact by asking for "
                         "logprobs=0 (use it when tokens stream without text, as with the demo model)")
    ap.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    ap.add_argument("--warmup-requests", type=int, default=1, help="short requests sent first, not measured")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds, per request")
    ap.add_argument("--out", default="benchmarks/out/serving.json")
    ap.add_argument("--include-text", action="store_true",
                    help="keep generated text in the per-request records")
    ap.add_argument("--compare-offline", action="store_true",
                    help="also run the workload through moeserve.LLM in this process and report the overhead")
    ap.add_argument("--check-outputs", type=int, default=0, metavar="N",
                    help="compare non-streaming HTTP text with offline greedy text for the first N prompts")
    ap.add_argument("--offline-model", default=None,
                    help="checkpoint for the offline engine (default: the demo model)")
    ap.add_argument("--offline-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="offline engine option (an EngineConfig field, e.g. dtype=float32), repeatable; "
                         "VALUE is parsed as JSON when it can be")
    ap.add_argument("--offline-threads", type=int, default=None,
                    help="torch CPU threads for the offline engine (default: torch's); match the server's")
    args = ap.parse_args(argv)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        ap.error(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if not 0 <= args.check_outputs <= args.num_prompts:
        ap.error(f"--check-outputs must be in [0, --num-prompts], got {args.check_outputs}")
    if (args.compare_offline or args.check_outputs) and args.temperature != 0.0:
        ap.error("--compare-offline and --check-outputs compare greedy runs; they need --temperature 0")
    return args


# ---- HTTP --------------------------------------------------------------------------------------------------


def request_body(req: BenchRequest, args: argparse.Namespace, model: str, stream: bool = True) -> dict:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": args.temperature, "ignore_eos": args.ignore_eos, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
        if args.token_counts == "logprobs":
            body["logprobs"] = 0
    return {**body, **args.extra_body}


def _http_error(resp: httpx.Response, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")[:500]
    return f"HTTP {resp.status_code}: {message}"


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, rec: RequestRecord, t0: float) -> None:
    """Send one streaming completion and fill `rec` from what comes back (errors land in rec.error)."""
    state, decoder = StreamState(), SSEDecoder()
    start = time.perf_counter()
    rec.sent = start - t0
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                rec.error = _http_error(resp, await resp.aread())
                return
            async for piece in resp.aiter_text():
                now = time.perf_counter()
                for event in decoder.feed(piece):
                    state.on_event(event, now)
            for event in decoder.close():
                state.on_event(event, time.perf_counter())
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        return
    end = time.perf_counter()
    rec.num_chunks, rec.chunk_counts_exact = len(state.chunk_times), state.exact_chunk_counts()
    rec.output_tokens, rec.output_tokens_source = state.output_tokens()
    rec.finish_reason = state.finish_reason
    rec.text = "".join(state.text)
    if state.chunk_times:
        rec.ttft = state.chunk_times[0] - start
        rec.itl = itl_samples(state.chunk_times, state.tokens_per_chunk())
    rec.e2e = end - start
    if state.error is not None:
        rec.error = f"error event: {state.error}"
    elif not state.done:
        rec.error = "stream ended before 'data: [DONE]'"
    rec.ok = rec.error is None


async def run_http(client: httpx.AsyncClient, url: str, model: str, requests: list[BenchRequest],
                   offsets: list[float], args: argparse.Namespace) -> tuple[list[RequestRecord], float]:
    """All requests, each released at its offset and sent once a concurrency slot is free; returns the records
    and the duration (first release to last finish)."""
    slots = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    t0 = time.perf_counter()
    last_end = t0

    async def one(req: BenchRequest, offset: float) -> RequestRecord:
        nonlocal last_end
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        rec = RequestRecord(req.index, len(req.prompt), req.max_tokens, scheduled=time.perf_counter() - t0)
        body = request_body(req, args, model)
        if slots is None:
            await stream_one(client, url, body, rec, t0)
        else:
            async with slots:
                await stream_one(client, url, body, rec, t0)
        last_end = max(last_end, time.perf_counter())
        return rec

    records = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
    return list(records), last_end - t0


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    try:
        resp = await client.get(f"{base_url}/v1/models")
    except httpx.HTTPError as exc:
        raise SystemExit(f"cannot reach {base_url}/v1/models ({type(exc).__name__}: {exc}); "
                         "is the server up?") from None
    if resp.status_code != 200:
        raise SystemExit(f"GET {base_url}/v1/models: {_http_error(resp, resp.content)}")
    data = resp.json().get("data") or []
    if not data:
        raise SystemExit(f"GET {base_url}/v1/models lists no model; pass --model")
    return data[0]["id"]


async def warm_up(client: httpx.AsyncClient, url: str, model: str, requests: list[BenchRequest],
                  args: argparse.Namespace) -> None:
    for i in range(args.warmup_requests):
        req = requests[i % len(requests)]
        short = BenchRequest(-1, req.prompt, min(4, req.max_tokens))
        rec = RequestRecord(-1, len(req.prompt), short.max_tokens)
        await stream_one(client, url, request_body(short, args, model), rec, time.perf_counter())
        if not rec.ok:
            raise SystemExit(f"warm-up request to {url} failed: {rec.error}")


async def http_texts(client: httpx.AsyncClient, url: str, model: str, requests: list[BenchRequest],
                     args: argparse.Namespace) -> list[str | None]:
    """Non-streaming completions of `requests`, one at a time; None where a request failed."""
    texts: list[str | None] = []
    for req in requests:
        try:
            resp = await client.post(url, json=request_body(req, args, model, stream=False))
            texts.append(resp.json()["choices"][0]["text"] if resp.status_code == 200 else None)
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            texts.append(None)
    return texts


# ---- offline -----------------------------------------------------------------------------------------------


def offline_options(args: argparse.Namespace) -> dict:
    options: dict = {"device": "cpu"}
    for item in args.offline_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--offline-arg wants KEY=VALUE (an EngineConfig field), got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def make_llm(args: argparse.Namespace, requests: list[BenchRequest]):
    """The offline engine, warmed up like the server: the same short requests as `warm_up` sends."""
    from moeserve import LLM, SamplingParams

    if args.offline_threads:
        import torch

        torch.set_num_threads(args.offline_threads)
    llm = LLM(args.offline_model, **offline_options(args))
    for i in range(max(1, args.warmup_requests)):
        req = requests[i % len(requests)]
        llm.generate([req.prompt], SamplingParams(temperature=0.0, max_tokens=min(4, req.max_tokens),
                                                  ignore_eos=True))
    return llm


def _offline_params(req: BenchRequest, args: argparse.Namespace):
    from moeserve import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=req.max_tokens, ignore_eos=args.ignore_eos)


def run_offline(llm, requests: list[BenchRequest], offsets: list[float],
                args: argparse.Namespace) -> tuple[list[RequestRecord], float]:
    """Replay the workload into `llm.engine`: the loop `LLM.generate` runs, plus admission by arrival offset
    and concurrency cap. Per-request times come from the step at which each chunk appeared."""
    engine = llm.engine
    cap = args.max_concurrency or len(requests)
    records = [RequestRecord(r.index, len(r.prompt), r.max_tokens, scheduled=o)
               for r, o in zip(requests, offsets)]
    times: dict[int, list[float]] = {}
    counts: dict[int, list[int]] = {}
    in_flight: dict[str, int] = {}
    nxt = 0
    t0 = time.perf_counter()
    while nxt < len(requests) or in_flight:
        now = time.perf_counter() - t0
        while nxt < len(requests) and len(in_flight) < cap and offsets[nxt] <= now:
            req = requests[nxt]
            rid = engine.add_request(req.prompt, _offline_params(req, args), f"bench-{nxt}")
            in_flight[rid], records[nxt].sent = nxt, time.perf_counter() - t0
            times[nxt], counts[nxt] = [], []
            nxt += 1
        if not in_flight:
            time.sleep(max(0.0, offsets[nxt] - now))  # idle until the next arrival
            continue
        chunks = engine.step()
        now = time.perf_counter() - t0
        for chunk in chunks:
            i = in_flight[chunk.request_id]
            rec = records[i]
            if chunk.token_ids:
                times[i].append(now)
                counts[i].append(len(chunk.token_ids))
                rec.output_tokens += len(chunk.token_ids)
            rec.text += chunk.text
            if chunk.finish_reason is not None:
                del in_flight[chunk.request_id]
                rec.ok, rec.finish_reason, rec.e2e = True, chunk.finish_reason, now - rec.sent
                rec.num_chunks, rec.output_tokens_source = len(times[i]), "engine"
                rec.chunk_counts_exact = True
                if times[i]:
                    rec.ttft = times[i][0] - rec.sent
                    rec.itl = itl_samples(times[i], counts[i])
    return records, time.perf_counter() - t0


def comparison(http: dict, offline: dict) -> dict:
    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    return {
        "definition": OVERHEAD_DEFINITION,
        "http_wall_s": http["duration_s"], "http_output_throughput": http["output_throughput"],
        "offline_wall_s": offline["duration_s"], "offline_output_throughput": offline["output_throughput"],
        "http_e2e_mean_s": http["e2e_s"]["mean"], "offline_e2e_mean_s": offline["e2e_s"]["mean"],
        "overhead_per_request_s": diff(http["e2e_s"]["mean"], offline["e2e_s"]["mean"]),
        "ttft_overhead_s": diff(http["ttft_s"]["mean"], offline["ttft_s"]["mean"]),
        "wall_overhead_s": diff(http["duration_s"], offline["duration_s"]),
    }


def format_comparison(c: dict, options: dict) -> str:
    def f(x: float | None, scale: float = 1.0, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x * scale, fmt)

    return "\n".join([
        f"offline engine (in-process, {options}): wall {f(c['offline_wall_s'])} s, "
        f"{f(c['offline_output_throughput'], fmt='.1f')} output tok/s",
        f"HTTP endpoint:                wall {f(c['http_wall_s'])} s, "
        f"{f(c['http_output_throughput'], fmt='.1f')} output tok/s",
        f"HTTP + Serve overhead per request: {f(c['overhead_per_request_s'], 1e3)} ms "
        f"(E2E mean {f(c['http_e2e_mean_s'], 1e3)} vs {f(c['offline_e2e_mean_s'], 1e3)} ms; "
        f"TTFT +{f(c['ttft_overhead_s'], 1e3)} ms)",
        f"  definition: {c['definition']}",
    ])


# ---- the benchmark -----------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> dict:
    config = {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in vars(args).items()}
    if config.get("api_key"):
        config["api_key"] = "<redacted>"
    return config


async def run(args: argparse.Namespace) -> dict:
    """The whole benchmark: returns the report (also printed, and written to args.out as JSON)."""
    spec = WorkloadSpec(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                        args.shared_prefix_len, args.vocab, args.seed)
    try:
        requests = make_workload(spec)
        offsets = arrival_offsets(len(requests), args.request_rate, args.seed)
    except ValueError as exc:
        raise SystemExit(f"bad workload: {exc}") from None
    base_url = args.base_url.rstrip("/")
    url = f"{base_url}/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # No pool limit beyond the concurrency cap: waiting for a pooled connection would count as latency.
    cap = args.max_concurrency
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(args.request_timeout),
                                 limits=limits) as client:
        model = args.model or await first_model(client, base_url)
        await warm_up(client, url, model, requests, args)
        records, duration = await run_http(client, url, model, requests, offsets, args)
        checked = requests[: args.check_outputs]
        texts = await http_texts(client, url, model, checked, args) if checked else []
    summary = summarize(records, duration)
    report = {"config": _config(args), "model": model, "summary": summary,
              "requests": [r.to_json(args.include_text) for r in records],
              "offline": None, "comparison": None, "check_outputs": None}
    print(format_table(f"serving benchmark: {model} @ {base_url}", summary))
    if args.compare_offline or checked:
        report.update(offline_report(args, requests, offsets, summary, checked, texts))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return report


def offline_report(args: argparse.Namespace, requests: list[BenchRequest], offsets: list[float], http: dict,
                   checked: list[BenchRequest], texts: list[str | None]) -> dict:
    """The "offline", "comparison" and "check_outputs" parts of the report (printed as they are made)."""
    import torch

    llm = make_llm(args, requests)
    part: dict = {}
    if args.compare_offline:
        records, wall = run_offline(llm, requests, offsets, args)
        summary = summarize(records, wall)
        options = {**offline_options(args), "torch_threads": torch.get_num_threads()}
        part["offline"] = {"options": options, "model": args.offline_model, "summary": summary,
                           "requests": [r.to_json(args.include_text) for r in records]}
        part["comparison"] = comparison(http, summary)
        print(format_table("offline engine, same workload", summary))
        print(format_comparison(part["comparison"], options))
    if checked:
        part["check_outputs"] = check_outputs(llm, checked, texts, args)
    return part


def check_outputs(llm, requests: list[BenchRequest], http: list[str | None],
                  args: argparse.Namespace) -> dict:
    """Greedy text of HTTP (non-streaming) vs `llm.generate` for the same prompts."""
    outs = llm.generate([r.prompt for r in requests], [_offline_params(r, args) for r in requests])
    offline = [o.text for o in outs]
    mismatches = [{"index": r.index, "http": h, "offline": o}
                  for r, h, o in zip(requests, http, offline) if h != o]
    print(f"check outputs: {len(requests) - len(mismatches)}/{len(requests)} identical "
          f"(non-streaming HTTP text vs offline greedy)")
    for m in mismatches[:3]:
        print(f"  prompt {m['index']}: http={m['http']!r:.80} offline={m['offline']!r:.80}")
    return {"checked": len(requests), "identical": len(requests) - len(mismatches), "mismatches": mismatches}


def main(argv: list[str] | None = None) -> None:
    asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    main()
