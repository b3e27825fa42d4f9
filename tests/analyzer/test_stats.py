"""Per-step stats computed in ClickHouse agree with numpy on the same spans."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.spans import COLUMNS, span_row
from tracetune.analyzer import END_TO_END, latency, latency_series, parse_window, step_stats


def step_span(ts_ns: int, pipeline: str, step: str, duration_ns: int, error: bool = False) -> list:
    attrs = {"tracetune.pipeline": pipeline, "tracetune.step": step} if step else {"tracetune.pipeline": pipeline}
    return span_row(ts_ns, trace_id="ab" * 16, name=step or pipeline, attrs=attrs, duration=duration_ns,
                    status="STATUS_CODE_ERROR" if error else "STATUS_CODE_UNSET")


def test_step_percentiles_match_numpy_and_window_is_respected(client):
    rng = np.random.default_rng(42)
    now = time.time_ns()
    expected, rows = {}, []
    for pipeline in ("triage", "search"):
        for step, scale in (("embed", 4e6), ("rank", 1.5e6), ("respond", 9e6)):
            durations = rng.lognormal(np.log(scale), 0.6, size=500).astype(np.int64)
            errors = rng.random(500) < 0.03
            for i, (d, e) in enumerate(zip(durations, errors, strict=False)):
                rows.append(step_span(now - int(60e9 * rng.random()) - i, pipeline, step, int(d), bool(e)))
            expected[(pipeline, step)] = (durations, errors)
            # Old spans outside a 5-minute window must not count.
            rows += [step_span(now - int(3600e9) - i, pipeline, step, 10**12) for i in range(50)]
        rows.append(step_span(now - 1000, pipeline, "", 5 * 10**7))  # a root span is not a step
    client.insert("otel_traces", rows, column_names=COLUMNS)

    frame = step_stats(client, "5m", source="raw", end_to_end=False)
    assert frame.height == 6
    for row in frame.iter_rows(named=True):
        durations, errors = expected[(row["pipeline"], row["step"])]
        assert row["requests"] == 500 and row["errors"] == int(errors.sum())
        assert row["error_rate"] == pytest.approx(errors.mean())
        for q, name in ((50, "p50_ms"), (95, "p95_ms"), (99, "p99_ms")):
            assert row[name] == pytest.approx(np.percentile(durations, q) / 1e6, rel=1e-9)
        assert row["max_ms"] == pytest.approx(durations.max() / 1e6)
        assert row["p99_ms"] >= row["p95_ms"] >= row["p50_ms"] > 0

    only = step_stats(client, "2h", pipeline="search", source="raw")
    assert set(only["pipeline"]) == {"search"} and only["requests"].to_list() == [1, 550, 550, 550]
    assert only["step"].to_list() == [END_TO_END, "embed", "rank", "respond"]  # the task row first

    series = latency_series(client, "5m", bucket_seconds=30)
    assert series["requests"].sum() == 3000 and set(series["step"]) == {"embed", "rank", "respond"}


def test_throughput_is_per_second_of_data_not_per_second_of_window(client):
    """A 20-second run seen through a 1-hour window is 5 requests/s, not 100 / 3600 (every group over the same
    time: from the first span in the window to now)."""
    now = time.time_ns()
    rows = [step_span(now - int(i * 0.2e9), "triage", "embed", 10**6) for i in range(100)]
    rows += [step_span(now - int(i * 0.2e9), "triage", "rank", 10**6) for i in range(10)]
    client.insert("otel_traces", rows, column_names=COLUMNS)
    rates = {r["step"]: r["throughput_rps"] for r in latency(client, "1h", by=("step",), source="raw")
             .iter_rows(named=True)}
    assert rates["embed"] == pytest.approx(100 / 20, rel=0.2)
    assert rates["rank"] == pytest.approx(10 / 20, rel=0.2)


def test_empty_window_gives_an_empty_frame_with_the_columns(client):
    frame = step_stats(client, "1m")
    assert frame.is_empty() and "p95_ms" in frame.columns


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("5m", 300), ("2h", 7200), ("7d", 604800), ("1.5m", 90)])
def test_parse_window(text, seconds):
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m5", "-5m", "5 weeks", "0m"])
def test_parse_window_rejects_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match="30s, 5m"):
        parse_window(text)


@pytest.mark.parametrize("source", ["raw", "rollup"])
def test_end_to_end_is_a_row_and_by_tenant_counts_tasks(client, source):
    """374 tasks of 4 steps each: the end-to-end row has the root spans' latency, and grouping by
    tenant counts the 374 tasks, not their 1,496 step spans."""
    rng = np.random.default_rng(3)
    now = time.time_ns() - 61 * 10**9  # a whole minute back: the rollup's window is whole minutes
    rows, roots = [], []
    for n in range(374):
        tenant = ("acme", "globex")[n % 2]
        start, trace = now - int(50e9 * rng.random()), f"{n:032x}"
        total = 0
        for i, step in enumerate(("normalize", "classify", "escalate", "reply")):
            d = int(rng.lognormal(np.log(2e6 * (i + 1)), 0.4))
            rows.append(span_row(start + total, trace_id=trace, span_id=f"{n:08x}{i + 1:08x}", parent=f"{n:016x}",
                                 name=step, attrs={"tracetune.pipeline": "triage", "tracetune.step": step,
                                                   "tracetune.tenant": tenant}, duration=d))
            total += d
        roots.append(total + 10**6)
        rows.append(span_row(start, trace_id=trace, span_id=f"{n:016x}", name="triage", kind="Server",
                             attrs={"tracetune.pipeline": "triage", "tracetune.tenant": tenant}, duration=roots[-1],
                             status="Error" if n % 50 == 0 else "Unset"))
    client.insert("otel_traces", rows, column_names=COLUMNS)

    frame = step_stats(client, "10m", source=source)
    assert frame["step"].to_list() == [END_TO_END, "classify", "escalate", "normalize", "reply"]
    e2e = frame.row(0, named=True)
    assert (e2e["requests"], e2e["errors"]) == (374, 8)
    assert e2e["p95_ms"] == pytest.approx(np.percentile(roots, 95) / 1e6, rel=1e-9 if source == "raw" else 0.01)

    tenants = latency(client, "10m", by=("tenant",), source=source)
    assert dict(zip(tenants["tenant"], tenants["requests"], strict=True)) == {"acme": 187, "globex": 187}
    routes = latency(client, "10m", by=("pipeline", "route"), source=source)  # a step dimension: step spans
    assert routes["requests"].to_list() == [4 * 374]
    with pytest.raises(ValueError, match="steps must be"):
        latency(client, "10m", steps="tasks")  # type: ignore[arg-type]
