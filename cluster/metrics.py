"""Prometheus metrics of the serving layer, rendered in text exposition format 0.0.4.

A small registry of our own (counters, gauges, histograms with labels) keeps the ingress free of global
client-library state: each `ServingMetrics` owns its registry, so several apps in one process (tests, Serve
replicas) never collide. Request-side metrics are recorded by the HTTP layer; engine-side gauges are filled
from `EngineClient.stats()` when /metrics is scraped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: from sub-millisecond decode steps to multi-minute generations.
# fmt: off
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
# fmt: on


def _format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """Monotonic total. `set_total` mirrors a cumulative count kept elsewhere (the engine)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up, got inc({amount})")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def set_total(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        return [
            f"{self.name}{_label_text(self.labelnames, k)} {_format_value(v)}"
            for k, v in self._values.items()
        ]


class Gauge(_Metric):
    """Value that goes up and down; a series appears once set, and `clear` drops all series."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def clear(self) -> None:
        self._values.clear()

    def value(self, **labels: str) -> float | None:
        return self._values.get(self._key(labels))

    def samples(self) -> list[str]:
        return [
            f"{self.name}{_label_text(self.labelnames, k)} {_format_value(v)}"
            for k, v in self._values.items()
        ]


class Histogram(_Metric):
    """Distribution over fixed upper bounds; renders cumulative `_bucket{le=..}`, `_sum` and `_count`."""

    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help_text, labelnames)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{self.name}: buckets must be distinct and non-empty, got {list(buckets)}")
        self.bounds = bounds if math.isinf(bounds[-1]) else [*bounds, math.inf]
        # Per label set: [per-bucket (non-cumulative) counts, sum, count].
        self._series: dict[tuple[str, ...], list] = {}

    def observe(self, value: float, count: int = 1, **labels: str) -> None:
        """Record `count` observations of `value` at once (e.g. every token of a multi-token delta)."""
        if count <= 0:
            return
        key = self._key(labels)
        series = self._series.setdefault(key, [[0] * len(self.bounds), 0.0, 0])
        i = next(i for i, b in enumerate(self.bounds) if value <= b)
        series[0][i] += count
        series[1] += value * count
        series[2] += count

    def count(self, **labels: str) -> int:
        series = self._series.get(self._key(labels))
        return 0 if series is None else series[2]

    def samples(self) -> list[str]:
        out = []
        for key, (counts, total, n) in self._series.items():
            cumulative = 0
            for bound, c in zip(self.bounds, counts):
                cumulative += c
                le = f'le="{_format_value(bound)}"'
                out.append(f"{self.name}_bucket{_label_text(self.labelnames, key, le)} {cumulative}")
            labels = _label_text(self.labelnames, key)
            out.append(f"{self.name}_sum{labels} {_format_value(total)}")
            out.append(f"{self.name}_count{labels} {n}")
        return out


class Registry:
    """Metrics in registration order; `render` is the /metrics body."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        return self.register(Counter(name, help_text, labelnames))

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self.register(Gauge(name, help_text, labelnames))

    def histogram(
        self, name: str, help_text: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> Histogram:
        return self.register(Histogram(name, help_text, buckets, labelnames))

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines += metric.header()
            lines += metric.samples()
        return "\n".join(lines) + "\n"


class RequestTracker:
    """Times one engine request (one choice): TTFT, inter-token latency, end-to-end latency, token counts."""

    __slots__ = ("_metrics", "_arrival", "_last", "_num_output", "_done")

    def __init__(self, metrics: ServingMetrics, arrival: float, num_prompt_tokens: int) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._last: float | None = None
        self._num_output = 0
        self._done = False
        metrics.prompt_tokens.inc(num_prompt_tokens)

    def on_tokens(self, num_tokens: int) -> None:
        """A delta with num_tokens new tokens arrived now."""
        if num_tokens <= 0 or self._done:
            return
        now = time.perf_counter()
        m = self._metrics
        if self._last is None:
            m.ttft.observe(now - self._arrival)
            if num_tokens > 1:
                m.itl.observe(0.0, count=num_tokens - 1)
        else:
            # A delta of k tokens after dt seconds: each of its tokens took dt / k.
            m.itl.observe((now - self._last) / num_tokens, count=num_tokens)
        self._last = now
        self._num_output += num_tokens
        m.generation_tokens.inc(num_tokens)

    def on_finish(self, finish_reason: str) -> None:
        """The request ended: "stop", "length", "abort" (client left or engine aborted), "error"."""
        if self._done:
            return
        self._done = True
        self._metrics.e2e.observe(time.perf_counter() - self._arrival)
        self._metrics.requests.inc(finish_reason=finish_reason)


class ServingMetrics:
    """Every metric the ingress exports (names are the public contract for dashboards)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.ttft = r.histogram(
            "moeserve_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            LATENCY_BUCKETS,
        )
        self.itl = r.histogram(
            "moeserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            LATENCY_BUCKETS,
        )
        self.e2e = r.histogram(
            "moeserve_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            LATENCY_BUCKETS,
        )
        self.prompt_tokens = r.counter("moeserve_prompt_tokens_total", "Prompt tokens of all requests.")
        self.generation_tokens = r.counter("moeserve_generation_tokens_total", "Generated tokens.")
        self.requests = r.counter(
            "moeserve_requests_total", "Finished requests (one per choice).", ["finish_reason"]
        )
        self.running = r.gauge("moeserve_num_requests_running", "Requests running, all ranks.")
        self.waiting = r.gauge("moeserve_num_requests_waiting", "Requests waiting, all ranks.")
        self.kv_usage = r.gauge("moeserve_kv_cache_usage_ratio", "Mean fraction of KV cache blocks in use.")
        self.hit_rate = r.gauge(
            "moeserve_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / prompt tokens looked up, all ranks.",
        )
        self.balancedness = r.gauge(
            "moeserve_expert_balancedness",
            "Mean / max tokens per GPU over MoE layers (1 = perfectly balanced).",
        )
        self.rank_running = r.gauge("moeserve_rank_num_requests_running", "Requests running.", ["rank"])
        self.rank_waiting = r.gauge("moeserve_rank_num_requests_waiting", "Requests waiting.", ["rank"])
        self.rank_load = r.gauge(
            "moeserve_rank_load", "Running + waiting requests (the router's load).", ["rank"]
        )
        self.rank_kv_usage = r.gauge(
            "moeserve_rank_kv_cache_usage_ratio", "Fraction of KV blocks in use.", ["rank"]
        )
        self.rank_hit_rate = r.gauge(
            "moeserve_rank_prefix_cache_hit_rate", "Prefix cache hit rate.", ["rank"]
        )
        self.rank_preemptions = r.counter(
            "moeserve_rank_num_preemptions_total", "Requests preempted.", ["rank"]
        )
        self.engine_up = r.gauge("moeserve_engine_up", "1 when the engine answered the last stats call.")

    def start_request(self, num_prompt_tokens: int, arrival: float | None = None) -> RequestTracker:
        """Begin timing one engine request; arrival is a time.perf_counter() value (default: now)."""
        return RequestTracker(self, time.perf_counter() if arrival is None else arrival, num_prompt_tokens)

    def update_from_stats(self, stats: dict | None) -> None:
        """Fill the engine gauges from `EngineClient.stats()`; None means the engine did not answer."""
        if stats is None:
            self.engine_up.set(0)
            return
        self.engine_up.set(1)
        ranks = stats.get("ranks", [])
        for g in (
            self.rank_running,
            self.rank_waiting,
            self.rank_load,
            self.rank_kv_usage,
            self.rank_hit_rate,
        ):
            g.clear()  # ranks may come and go across restarts; show only the current ones
        hit = query = 0
        for s in ranks:
            rank = str(s["rank"])
            running, waiting = s.get("num_running", 0), s.get("num_waiting", 0)
            self.rank_running.set(running, rank=rank)
            self.rank_waiting.set(waiting, rank=rank)
            self.rank_load.set(running + waiting, rank=rank)
            self.rank_kv_usage.set(s.get("kv_usage", 0.0), rank=rank)
            self.rank_hit_rate.set(s.get("prefix_cache_hit_rate", 0.0), rank=rank)
            self.rank_preemptions.set_total(s.get("num_preemptions", 0), rank=rank)
            hit += s.get("prefix_cache_hit_tokens", 0)
            query += s.get("prefix_cache_query_tokens", 0)
        self.running.set(sum(s.get("num_running", 0) for s in ranks))
        self.waiting.set(sum(s.get("num_waiting", 0) for s in ranks))
        if ranks:
            self.kv_usage.set(sum(s.get("kv_usage", 0.0) for s in ranks) / len(ranks))
        self.hit_rate.set(hit / query if query > 0 else 0.0)
        balancedness = stats.get("balancedness")
        self.balancedness.clear()
        if balancedness is not None:
            self.balancedness.set(balancedness)

    def render(self) -> str:
        return self.registry.render()
