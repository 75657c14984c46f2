"""The parts of the serving benchmark that need no network: workloads, arrival times, SSE parsing, metrics.

`benchmarks/serving.py` drives these over HTTP; tests import them directly. Standard library only, so the
benchmark runs wherever httpx does (no numpy, no torch, no moeserve).

Metric definitions (all times in seconds, measured on the client with `time.perf_counter`):

- TTFT: from sending the request to receiving the first chunk that carries generated output (non-empty text
  or logprob tokens). Role-only, usage-only and keep-alive events do not count.
- ITL: the gap between two successive output chunks, split evenly over the tokens the later chunk carries:
  a chunk of k tokens arriving g after the previous one contributes k samples of g / k. Tokens that arrive in
  the first chunk add no sample (they are inside TTFT). So ITL is "time per token while streaming", and its
  samples number (output tokens - tokens of the first chunk).
- Tokens per chunk: exact when the chunk carries logprob tokens (`--token-counts logprobs`); otherwise the
  request's completion tokens (from the final usage chunk) are spread over its output chunks: one each, the
  rest in proportion to each chunk's UTF-8 bytes beyond its first (`attribute_tokens`). One chunk per token,
  the usual case, is always exact; so is a byte-level tokenizer on valid UTF-8 (one byte per token).
- TPOT: per request, (E2E - TTFT) / (output tokens - 1), for requests with at least two output tokens.
- E2E: from sending the request to receiving `data: [DONE]`.
- Throughputs: totals over successful requests divided by the benchmark duration (first send to last finish).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field

# ---- workload ----------------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class WorkloadSpec:
    """What to generate.

    Unique prompt lengths lie in [floor(input_len * (1 - range_ratio)), input_len] (at least 1), output
    lengths likewise. Every prompt starts with the same `shared_prefix_len` tokens, so its total length is
    shared_prefix_len + its unique length. Token ids are drawn uniformly from [3, vocab).
    """

    num_prompts: int
    input_len: int
    output_len: int
    range_ratio: float = 0.0
    shared_prefix_len: int = 0
    vocab: int = 256
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.num_prompts >= 1, f"num_prompts must be >= 1, got {self.num_prompts}"),
            (self.input_len >= 1, f"input_len must be >= 1, got {self.input_len}"),
            (self.output_len >= 1, f"output_len must be >= 1, got {self.output_len}"),
            (0.0 <= self.range_ratio <= 1.0, f"range_ratio must be in [0, 1], got {self.range_ratio}"),
            (self.shared_prefix_len >= 0, f"shared_prefix_len must be >= 0, got {self.shared_prefix_len}"),
            (self.vocab > 3, f"vocab must be > 3 (ids are drawn from [3, vocab)), got {self.vocab}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(slots=True, frozen=True)
class BenchRequest:
    """One request of the workload: `prompt` is a list of token ids; exactly `max_tokens` are asked for."""

    index: int
    prompt: list[int]
    max_tokens: int


def length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] of lengths drawn around `length`."""
    return max(1, math.floor(length * (1.0 - range_ratio))), length


def make_workload(spec: WorkloadSpec) -> list[BenchRequest]:
    """The requests of `spec`; the same spec (seed included) always gives the same requests."""
    spec.validate()
    rng = random.Random(spec.seed)
    in_lo, in_hi = length_bounds(spec.input_len, spec.range_ratio)
    out_lo, out_hi = length_bounds(spec.output_len, spec.range_ratio)
    prefix = [rng.randrange(3, spec.vocab) for _ in range(spec.shared_prefix_len)]
    requests = []
    for i in range(spec.num_prompts):
        n_in = rng.randint(in_lo, in_hi)
        n_out = rng.randint(out_lo, out_hi)
        unique = [rng.randrange(3, spec.vocab) for _ in range(n_in)]
        requests.append(BenchRequest(i, prefix + unique, n_out))
    return requests


def arrival_offsets(num: int, request_rate: float, seed: int) -> list[float]:
    """Send times in seconds after the start: a Poisson process of `request_rate` per second, the first at 0;
    all 0 when the rate is infinite. Its own random stream, so the rate never changes the prompts."""
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf: all at once), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num
    rng = random.Random(seed + 1_000_003)
    offsets, t = [], 0.0
    for i in range(num):
        if i > 0:
            t += rng.expovariate(request_rate)
        offsets.append(t)
    return offsets


# ---- server-sent events ------------------------------------------------------------------------------------


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event: `data` is its data lines joined with newlines."""

    data: str
    event: str = "message"


class SSEDecoder:
    """Incremental server-sent-events parser (the WHATWG rules a completions stream uses).

    Feed it text as it arrives, in pieces of any size; lines end with \\n, \\r\\n or \\r; a blank line
    dispatches the event; lines starting with ':' are comments (keep-alives); `id` and `retry` are ignored.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._data: list[str] = []
        self._event = ""

    def feed(self, text: str) -> list[SSEEvent]:
        self._buf += text
        events = []
        while True:
            cut = _line_end(self._buf)
            if cut is None:
                return events
            end, nxt = cut
            line, self._buf = self._buf[:end], self._buf[nxt:]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def close(self) -> list[SSEEvent]:
        """End of stream: a final line without its newline still counts; an undispatched event is dropped."""
        events = self.feed("\n") if self._buf else []
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent("\n".join(self._data), self._event or "message")
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None


def _line_end(buf: str) -> tuple[int, int] | None:
    """(end of the first complete line, start of the next) or None. A trailing \\r waits: \\n may follow."""
    for i, ch in enumerate(buf):
        if ch == "\n":
            return i, i + 1
        if ch == "\r":
            if i + 1 == len(buf):
                return None
            return i, i + 2 if buf[i + 1] == "\n" else i + 1
    return None


# ---- one request's stream ----------------------------------------------------------------------------------


@dataclass(slots=True)
class StreamState:
    """What a streamed completion has delivered so far; `on_event` takes each event with its arrival time."""

    chunk_times: list[float] = field(default_factory=list)  # arrival of each output chunk
    chunk_bytes: list[int] = field(default_factory=list)  # UTF-8 bytes of its text
    chunk_tokens: list[int | None] = field(default_factory=list)  # its logprob tokens, when it had them
    text: list[str] = field(default_factory=list)
    usage: dict | None = None
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False

    def on_event(self, event: SSEEvent, t: float) -> None:
        if event.data.strip() == "[DONE]":
            self.done = True
            return
        try:
            body = json.loads(event.data)
        except json.JSONDecodeError:
            self.error = f"undecodable event: {event.data[:200]!r}"
            return
        if event.event == "error" or "error" in body:
            err = body.get("error", body)
            self.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            return
        if body.get("usage"):
            self.usage = body["usage"]
        for choice in body.get("choices") or []:
            self._on_choice(choice, t)

    def _on_choice(self, choice: dict, t: float) -> None:
        text = choice.get("text")
        if text is None:  # a chat stream
            text = (choice.get("delta") or {}).get("content") or ""
        logprobs = choice.get("logprobs") or {}
        tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        if not text and not tokens:
            return
        self.chunk_times.append(t)
        self.chunk_bytes.append(len(text.encode("utf-8")))
        self.chunk_tokens.append(len(tokens) if tokens else None)
        self.text.append(text)

    def output_tokens(self) -> tuple[int, str]:
        """(completion tokens, where the number came from: "usage", "logprobs" or "chunks")."""
        if self.usage and self.usage.get("completion_tokens") is not None:
            return int(self.usage["completion_tokens"]), "usage"
        if self.exact_chunk_counts():
            return sum(self.chunk_tokens), "logprobs"
        return len(self.chunk_times), "chunks"

    def exact_chunk_counts(self) -> bool:
        """Did every output chunk say how many tokens it carried (logprob tokens)?"""
        return bool(self.chunk_tokens) and all(k is not None for k in self.chunk_tokens)

    def tokens_per_chunk(self) -> list[int]:
        if self.exact_chunk_counts():
            return list(self.chunk_tokens)
        return attribute_tokens(self.output_tokens()[0], self.chunk_bytes)


def attribute_tokens(total: int, chunk_bytes: list[int]) -> list[int]:
    """Spread `total` tokens over chunks of the given byte lengths: one each, then the rest in proportion
    to each chunk's bytes beyond its first (largest remainder, ties to the earlier chunk; evenly when no chunk
    has more than one byte). Exact when every token is one byte; sums to `total` when total >= len(chunks)."""
    n = len(chunk_bytes)
    if n == 0:
        return []
    if total <= n:
        return [1] * n
    extra = total - n
    weights = [max(b - 1, 0) for b in chunk_bytes]
    if sum(weights) == 0:
        weights = [1] * n
    shares = [extra * w / sum(weights) for w in weights]
    counts = [1 + math.floor(s) for s in shares]
    left = total - sum(counts)
    order = sorted(range(n), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def itl_samples(chunk_times: list[float], tokens_per_chunk: list[int]) -> list[float]:
    """Per-token inter-token latencies: chunk i >= 1, g after chunk i-1, gives k_i samples of g / k_i."""
    samples = []
    for i in range(1, len(chunk_times)):
        k = max(1, tokens_per_chunk[i])
        samples.extend([(chunk_times[i] - chunk_times[i - 1]) / k] * k)
    return samples


# ---- per-request records and the summary -------------------------------------------------------------------


@dataclass(slots=True)
class RequestRecord:
    """The outcome of one request; times in seconds, `sent` relative to the start of the benchmark."""

    index: int
    prompt_tokens: int
    max_tokens: int
    ok: bool = False
    error: str | None = None
    scheduled: float = 0.0  # when the arrival process released it
    sent: float = 0.0  # when it was sent (later than scheduled while waiting for a concurrency slot)
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    output_tokens_source: str = "usage"
    num_chunks: int = 0
    chunk_counts_exact: bool = False  # tokens per chunk known (logprobs, offline) rather than estimated
    finish_reason: str | None = None
    itl: list[float] = field(default_factory=list)
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self, with_text: bool = False) -> dict:
        d = asdict(self)
        d["tpot"] = self.tpot
        if not with_text:
            del d["text"]
        return d


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(values: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99, max of `values` (all None when empty)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None, "count": 0}
    return {"mean": math.fsum(values) / len(values), "p50": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99), "max": max(values),
            "count": len(values)}


def summarize(records: list[RequestRecord], duration: float) -> dict:
    """The benchmark's totals, rates and latency distributions (see the module docstring for definitions)."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    in_tokens = sum(r.prompt_tokens for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    e2e = [r.e2e for r in ok if r.e2e is not None]
    return {
        "completed": len(ok),
        "failed": len(failed),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": rate(len(ok)),
        "input_throughput": rate(in_tokens),
        "output_throughput": rate(out_tokens),
        "mean_concurrency": rate(math.fsum(e2e)),  # Little's law: time in flight summed over the duration
        "ttft_s": describe([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": describe([x for r in ok for x in r.itl]),
        "tpot_s": describe([r.tpot for r in ok if r.tpot is not None]),
        "e2e_s": describe(e2e),
        "errors": errors,
        # Requests that got fewer tokens than asked for (EOS or a stop without ignore_eos, or a server cap).
        "short_outputs": sum(r.output_tokens < r.max_tokens for r in ok),
        # Requests whose tokens came with no text and no logprobs (ids the tokenizer cannot show, or text held
        # back): their TTFT and ITL cannot be measured from the stream; `--token-counts logprobs` fixes that.
        "unmeasured_streams": sum(r.output_tokens > 0 and r.num_chunks == 0 for r in ok),
        # Requests whose chunks carried several tokens (coalesced, or tokens without text): their ITL split
        # rests on the estimate unless the counts came from logprobs.
        "multi_token_chunks": sum(r.num_chunks < r.output_tokens and not r.chunk_counts_exact for r in ok),
    }


def format_table(title: str, s: dict) -> str:
    """A fixed-width text table of a `summarize` result; latencies in milliseconds."""

    def ms(d: dict, key: str) -> str:
        return "-" if d[key] is None else f"{d[key] * 1e3:.2f}"

    def num(x: float | None, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)

    rows = [
        ("Successful requests", str(s["completed"])),
        ("Failed requests", str(s["failed"])),
        ("Benchmark duration (s)", num(s["duration_s"])),
        ("Total input tokens", str(s["total_input_tokens"])),
        ("Total output tokens", str(s["total_output_tokens"])),
        ("Request throughput (req/s)", num(s["request_throughput"])),
        ("Input token throughput (tok/s)", num(s["input_throughput"])),
        ("Output token throughput (tok/s)", num(s["output_throughput"])),
        ("Mean concurrency", num(s["mean_concurrency"])),
    ]
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("TPOT", "tpot_s"), ("E2E latency", "e2e_s")):
        for stat, label in (("mean", "Mean"), ("p50", "P50"), ("p99", "P99")):
            rows.append((f"{label} {name} (ms)", ms(s[key], stat)))
    width = 44
    lines = [f"{' ' + title + ' ':=^{width}}"]
    lines += [f"{name:<34}{value:>10}" for name, value in rows]
    for error, count in list(s["errors"].items())[:5]:
        lines.append(f"  error x{count}: {error[:200]}")
    if s["short_outputs"]:
        lines.append(f"  note: {s['short_outputs']} requests got fewer tokens than max_tokens")
    if s["unmeasured_streams"]:
        lines.append(f"  note: {s['unmeasured_streams']} requests streamed tokens without text, so their "
                     "TTFT/ITL are missing; rerun with --token-counts logprobs")
    elif s["multi_token_chunks"]:
        lines.append(f"  note: {s['multi_token_chunks']} requests had chunks of several tokens; their ITL "
                     "rests on estimated counts (exact with --token-counts logprobs)")
    lines.append("=" * width)
    return "\n".join(lines)
