"""The per-minute rollup agrees with raw spans: counts exactly, percentiles within DDSketch's 0.5%."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.spans import COLUMNS, span_row
from tracetune import analyzer
from tracetune.analyzer import latency, step_stats

ALPHA = 0.005  # the rollup's DDSketch relative accuracy


def row(ts: int, pipeline: str, step: str, duration: int, *, route="", tenant="", cache="", batch=0, queue=0.0,
        error=False, root=False, status="") -> list:
    attrs = {"tracetune.pipeline": pipeline}
    if step:
        attrs["tracetune.step"] = step
    for key, value in (("tracetune.route", route), ("tracetune.tenant", tenant), ("tracetune.cache", cache)):
        if value:
            attrs[key] = value
    if batch:
        attrs["tracetune.batch_size"] = str(batch)
        attrs["tracetune.queue_ms"] = str(queue)
    return span_row(ts, span_id=f"{ts % (1 << 62):016x}", parent="" if root else "00000000000000aa",
                    name=step or pipeline, attrs=attrs, duration=duration,
                    status=status or ("STATUS_CODE_ERROR" if error else "STATUS_CODE_UNSET"))


@pytest.fixture
def seeded(client):
    rng = np.random.default_rng(7)
    now = time.time_ns()
    rows, truth = [], {}
    for step, median in (("embed", 3e6), ("classify", 8e5), ("llm", 4e8)):
        d = rng.lognormal(np.log(median), 0.8, 3000).astype(np.int64) + 1
        routes = rng.choice(["fp32", "int8"], 3000)
        tenants = rng.choice(["acme", "globex", "initech"], 3000)
        caches = rng.choice(["hit", "miss"], 3000, p=[0.3, 0.7])
        errors = rng.random(3000) < 0.02
        for i in range(3000):
            rows.append(row(now - int(rng.integers(0, 240e9)) - i, "triage", step, int(d[i]), route=str(routes[i]),
                            tenant=str(tenants[i]), cache=str(caches[i]), batch=int(i % 8) + 1, queue=float(i % 5),
                            error=bool(errors[i])))
        truth[step] = (d, routes, tenants, caches, errors)
    for _ in range(500):
        rows.append(row(now - int(rng.integers(0, 240e9)), "triage", "", int(rng.integers(1e6, 1e9)), root=True))
    for start in range(0, len(rows), 4000):  # several inserts, so the rollup merges several states
        client.insert("otel_traces", rows[start:start + 4000], column_names=COLUMNS)
    return truth


def test_rollup_counts_equal_raw_and_percentiles_are_within_the_sketch_error(client, seeded):
    rollup = {r["step"]: r for r in step_stats(client, "10m").iter_rows(named=True)}
    raw = {r["step"]: r for r in step_stats(client, "10m", source="raw").iter_rows(named=True)}
    assert set(rollup) == set(raw) == {analyzer.END_TO_END, "embed", "classify", "llm"}
    assert rollup[analyzer.END_TO_END]["requests"] == raw[analyzer.END_TO_END]["requests"] == 500
    for step, (durations, *_rest, errors) in seeded.items():
        assert rollup[step]["requests"] == raw[step]["requests"] == 3000
        assert rollup[step]["errors"] == raw[step]["errors"] == int(errors.sum())
        assert rollup[step]["max_ms"] == pytest.approx(durations.max() / 1e6)
        for q, name in ((50, "p50_ms"), (95, "p95_ms"), (99, "p99_ms")):
            # DDSketch guarantees |estimate - x| <= ALPHA * x for the sample x at the quantile's rank.
            lo, hi = np.percentile(durations, q, method="lower"), np.percentile(durations, q, method="higher")
            assert lo * (1 - ALPHA) / 1e6 <= rollup[step][name] <= hi * (1 + ALPHA) / 1e6
            relative_error = abs(rollup[step][name] - raw[step][name]) / raw[step][name]
            assert relative_error <= ALPHA + (hi - lo) / lo


def test_grouping_by_route_and_tenant_with_cache_and_batching(client, seeded):
    frame = latency(client, "10m", by=("step", "route", "tenant"))
    raw = latency(client, "10m", by=("step", "route", "tenant"), source="raw")
    assert frame.height == raw.height == 3 * 2 * 3 + 1  # and the tasks' row (end to end, no route nor tenant)
    durations, routes, tenants, caches, _ = seeded["embed"]
    one = frame.filter((frame["step"] == "embed") & (frame["route"] == "int8") & (frame["tenant"] == "acme")).row(
        0, named=True)
    mask = (routes == "int8") & (tenants == "acme")
    assert one["requests"] == int(mask.sum())
    assert one["cache_hit_rate"] == pytest.approx((caches[mask] == "hit").mean())
    assert one["mean_ms"] == pytest.approx(durations[mask].mean() / 1e6)
    by_step = {r["step"]: r for r in latency(client, "10m", by=("step",)).iter_rows(named=True)}
    assert by_step["embed"]["mean_batch_size"] == pytest.approx(np.mean([i % 8 + 1 for i in range(3000)]))
    assert by_step["embed"]["mean_queue_ms"] == pytest.approx(np.mean([i % 5 for i in range(3000)]))
    # Per second of data (the spans cover the last 240 s of the 10-minute window), not per window second:
    # the rollup knows the minute the data starts, so it divides by up to a minute more.
    assert 3000 / 310 <= by_step["embed"]["throughput_rps"] <= 3000 / 240
    raw = {r["step"]: r for r in latency(client, "10m", by=("step",), source="raw").iter_rows(named=True)}
    assert raw["embed"]["throughput_rps"] == pytest.approx(3000 / 240, rel=0.05)


@pytest.mark.parametrize("source", ["rollup", "raw"])
def test_errors_count_in_either_spelling(client, source):
    """pdata's `Error` (the contrib exporter, our collector) and the proto enum name (older writers) alike."""
    now = time.time_ns()
    statuses = ["Error", "STATUS_CODE_ERROR", "Error", "Unset", "STATUS_CODE_UNSET", "Ok", "STATUS_CODE_OK"]
    rows = [row(now - i * 10**9, "triage", "embed", 10**6, status=status) for i, status in enumerate(statuses)]
    client.insert("otel_traces", rows, column_names=COLUMNS)
    stats = step_stats(client, "10m", source=source).row(0, named=True)
    assert (stats["requests"], stats["errors"]) == (7, 3)


def test_root_spans_are_tasks(client, seeded):
    roots = latency(client, "10m", by=("pipeline",), steps="roots")
    assert roots["requests"].to_list() == [500]


def test_unknown_dimension_is_refused(client):
    with pytest.raises(ValueError, match="choose from"):
        latency(client, "5m", by=("pipeline; DROP TABLE otel_traces",))


def test_hourly_rollup_cascades_from_the_minute_rollup(client, seeded):
    hourly = {r["step"]: r for r in step_stats(client, "24h").iter_rows(named=True)}  # reads tracetune_spans_1h
    minute = {r["step"]: r for r in step_stats(client, "5h").iter_rows(named=True)}  # reads tracetune_spans_1m
    for step in ("embed", "classify", "llm"):
        assert hourly[step]["requests"] == minute[step]["requests"] == 3000
        assert hourly[step]["p95_ms"] == pytest.approx(minute[step]["p95_ms"], rel=1e-9)  # same sketch, merged
    rows = client.query("SELECT sum(requests) FROM tracetune_spans_1h").result_rows[0][0]
    assert rows == 3 * 3000 + 500


def test_batch_size_and_queue_time_distributions(client, seeded):
    frame = analyzer.batching(client, "10m")
    assert frame.height == 3 * 2  # three steps x two routes, every span seeded with a batch
    embed = frame.filter((frame["step"] == "embed") & (frame["route"] == "fp32")).row(0, named=True)
    _, routes, *_ = seeded["embed"]
    fp32 = [i for i in range(3000) if routes[i] == "fp32"]
    sizes = np.array([i % 8 + 1 for i in fp32])
    queues = np.array([float(i % 5) for i in fp32])
    assert embed["batched_spans"] == len(fp32)
    assert embed["batch_size_p50"] == pytest.approx(np.percentile(sizes, 50))
    assert embed["batch_size_max"] == 8
    assert embed["queue_ms_p95"] == pytest.approx(np.percentile(queues, 95))
    histogram = {h["batch_size"]: h["spans"] for h in embed["size_histogram"]}
    assert histogram == {int(s): int((sizes == s).sum()) for s in np.unique(sizes)}
