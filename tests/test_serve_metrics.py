"""Prometheus exposition of the serving metrics, checked by parsing the rendered text."""

from __future__ import annotations

import math
import random
import re

import pytest

from moeserve.cluster.metrics import Registry, ServingMetrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """A minimal 0.0.4 parser: TYPE per metric family and value per (sample name, labels)."""
    assert text.endswith("\n")
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("# HELP ") or not line:
            continue
        else:
            m = _SAMPLE.match(line)
            assert m, f"malformed sample line {line!r}"
            labels = frozenset(
                (k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                for k, v in _LABEL.findall(m.group(3) or "")
            )
            samples[(m.group(1), labels)] = float(m.group(4))
    return types, samples


def _labels(**kv: str) -> frozenset:
    return frozenset(kv.items())


def test_histogram_matches_reference_counts():
    rng = random.Random(0)
    reg = Registry()
    buckets = [0.01, 0.1, 1.0, 10.0]
    hist = reg.histogram("lat_seconds", "latency", buckets)
    values = [rng.expovariate(2.0) for _ in range(500)] + [0.1, 10.0, 50.0]
    for v in values:
        hist.observe(v)
    hist.observe(0.05, count=3)
    values += [0.05] * 3
    types, samples = parse(reg.render())
    assert types["lat_seconds"] == "histogram"
    for b in [*buckets, math.inf]:
        le = "+Inf" if math.isinf(b) else repr(b)
        assert samples[("lat_seconds_bucket", _labels(le=le))] == sum(v <= b for v in values)
    assert samples[("lat_seconds_count", _labels())] == len(values)
    assert samples[("lat_seconds_sum", _labels())] == pytest.approx(sum(values))


def test_counter_gauge_labels_and_escaping():
    reg = Registry()
    c = reg.counter("reqs_total", "requests\nwith newline", ["reason"])
    g = reg.gauge("temp", "a gauge")
    c.inc(reason="stop")
    c.inc(2.5, reason='we"ird\\')
    g.set(-3.0)
    text = reg.render()
    assert "# HELP reqs_total requests\\nwith newline" in text
    types, samples = parse(text)
    assert types == {"reqs_total": "counter", "temp": "gauge"}
    assert samples[("reqs_total", _labels(reason="stop"))] == 1.0
    assert samples[("reqs_total", _labels(reason='we"ird\\'))] == 2.5
    assert samples[("temp", _labels())] == -3.0
    with pytest.raises(ValueError):
        c.inc(-1, reason="stop")
    with pytest.raises(ValueError):
        c.inc(reason="stop", other="x")
    with pytest.raises(ValueError):
        reg.gauge("temp", "again")


def test_request_tracker_records_latencies_and_tokens():
    m = ServingMetrics()
    t = m.start_request(num_prompt_tokens=11)
    t.on_tokens(1)
    t.on_tokens(3)  # a coalesced delta: 3 inter-token gaps
    t.on_finish("length")
    t.on_finish("length")  # idempotent
    _, s = parse(m.render())
    assert s[("moeserve_prompt_tokens_total", _labels())] == 11
    assert s[("moeserve_generation_tokens_total", _labels())] == 4
    assert s[("moeserve_requests_total", _labels(finish_reason="length"))] == 1
    assert s[("moeserve_time_to_first_token_seconds_count", _labels())] == 1
    assert s[("moeserve_inter_token_latency_seconds_count", _labels())] == 3
    assert s[("moeserve_e2e_request_latency_seconds_count", _labels())] == 1


def test_engine_stats_fill_gauges():
    m = ServingMetrics()
    rng = random.Random(1)
    ranks = [
        {
            "rank": r,
            "num_running": rng.randrange(10),
            "num_waiting": rng.randrange(10),
            "kv_usage": rng.random(),
            "prefix_cache_hit_rate": rng.random(),
            "prefix_cache_hit_tokens": rng.randrange(100),
            "prefix_cache_query_tokens": 100 + rng.randrange(100),
            "num_preemptions": rng.randrange(5),
        }
        for r in range(3)
    ]
    m.update_from_stats({"ranks": ranks, "balancedness": 0.8})
    types, s = parse(m.render())
    assert types["moeserve_num_requests_running"] == "gauge"
    assert s[("moeserve_num_requests_running", _labels())] == sum(r["num_running"] for r in ranks)
    assert s[("moeserve_num_requests_waiting", _labels())] == sum(r["num_waiting"] for r in ranks)
    assert s[("moeserve_kv_cache_usage_ratio", _labels())] == pytest.approx(
        sum(r["kv_usage"] for r in ranks) / 3
    )
    hit = sum(r["prefix_cache_hit_tokens"] for r in ranks) / sum(
        r["prefix_cache_query_tokens"] for r in ranks
    )
    assert s[("moeserve_prefix_cache_hit_rate", _labels())] == pytest.approx(hit)
    assert s[("moeserve_expert_balancedness", _labels())] == 0.8
    assert s[("moeserve_engine_up", _labels())] == 1
    for r in ranks:
        rank = str(r["rank"])
        assert s[("moeserve_rank_num_requests_running", _labels(rank=rank))] == r["num_running"]
        assert s[("moeserve_rank_num_requests_waiting", _labels(rank=rank))] == r["num_waiting"]
        assert s[("moeserve_rank_load", _labels(rank=rank))] == r["num_running"] + r["num_waiting"]
        assert s[("moeserve_rank_num_preemptions_total", _labels(rank=rank))] == r["num_preemptions"]
    # Balancedness unknown and the engine gone: the series disappears, engine_up drops.
    m.update_from_stats({"ranks": ranks[:1], "balancedness": None})
    m.update_from_stats(None)
    _, s = parse(m.render())
    assert ("moeserve_expert_balancedness", _labels()) not in s
    assert ("moeserve_rank_load", _labels(rank="2")) not in s
    assert s[("moeserve_engine_up", _labels())] == 0


def test_rendered_text_parses_with_prometheus_client():
    parser = pytest.importorskip("prometheus_client.parser")
    m = ServingMetrics()
    t = m.start_request(5)
    t.on_tokens(2)
    t.on_finish("stop")
    m.update_from_stats(
        {
            "ranks": [
                {
                    "rank": 0,
                    "num_running": 1,
                    "num_waiting": 0,
                    "kv_usage": 0.1,
                    "prefix_cache_hit_rate": 0.0,
                    "prefix_cache_hit_tokens": 0,
                    "prefix_cache_query_tokens": 0,
                    "num_preemptions": 0,
                }
            ],
            "balancedness": 1.0,
        }
    )
    families = {f.name: f for f in parser.text_string_to_metric_families(m.render())}
    assert families["moeserve_time_to_first_token_seconds"].type == "histogram"
    assert families["moeserve_requests"].samples[0].labels == {"finish_reason": "stop"}
