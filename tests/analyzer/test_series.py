"""What the dashboard plots (analyzer/series.py): step series with gaps, cost from rollup cells, why cost changed."""

from __future__ import annotations

import math
import time
import uuid

import numpy as np
import polars as pl
import pytest

from tests.analyzer.test_cost_rollup import PRICES, traffic  # noqa: F401  (the shared traffic fixture)
from tests.spans import COLUMNS, span_row
from tracetune import analyzer
from tracetune.analyzer import series

MINUTE_NS = 60 * 10**9


def _within_sketch(value: float, durations, q: float) -> bool:
    lo, hi = np.percentile(durations, q, method="lower"), np.percentile(durations, q, method="higher")
    return lo * 0.995 <= value <= hi * 1.005


def test_step_series_leaves_idle_minutes_out_and_filters_by_tenant(client):
    """Spans three and one minutes ago, none in between: two buckets, the idle minute absent (a gap)."""
    minute_now = time.time_ns() // MINUTE_NS * MINUTE_NS
    rows, durations = [], {}
    for ago, tenant in ((3, "acme"), (1, "globex")):
        start = minute_now - ago * MINUTE_NS + 5 * 10**9
        for i in range(20):
            trace, root = uuid.uuid4().hex, uuid.uuid4().hex[:16]
            ms = 10.0 + i * (ago + 1)
            durations.setdefault(ago, []).append(ms)
            attrs = {"tracetune.pipeline": "p", "tracetune.tenant": tenant}
            rows.append(span_row(start + i * 10**8, trace_id=trace, span_id=root, attrs=attrs,
                                 duration=int(ms * 1e6) + 1000))
            rows.append(span_row(start + i * 10**8, trace_id=trace, span_id=uuid.uuid4().hex[:16], parent=root,
                                 attrs={**attrs, "tracetune.step": "s", "tracetune.route": "fp32",
                                        "tracetune.cache": "hit" if i % 4 == 0 else "miss",
                                        "tracetune.batch_size": str(1 + i % 3), "tracetune.queue_ms": "2.5"},
                                 duration=int(ms * 1e6)))
    client.insert("otel_traces", rows, column_names=COLUMNS)

    frame = analyzer.step_series(client, "10m", bucket_seconds=60)
    steps = frame.filter(pl.col("step") == "s").sort("bucket")
    assert steps["bucket"].dt.epoch("ns").to_list() == [minute_now - 3 * MINUTE_NS, minute_now - MINUTE_NS]
    assert steps["requests"].to_list() == [20, 20] and steps["route"].to_list() == ["fp32", "fp32"]
    for row, ago in zip(steps.to_dicts(), (3, 1), strict=True):
        for q in (50, 95, 99):
            assert _within_sketch(row[f"p{q}_ms"], durations[ago], q), (ago, q)
        assert row["cache_hit_rate"] == pytest.approx(5 / 20)
        assert row["mean_batch_size"] == pytest.approx(sum(1 + i % 3 for i in range(20)) / 20)
        assert row["mean_queue_ms"] == pytest.approx(2.5)
    assert set(frame.filter(pl.col("step") == analyzer.END_TO_END)["requests"]) == {20}

    whole = analyzer.step_series(client, "10m", bucket_seconds=0)
    assert whole.filter(pl.col("step") == "s")["requests"].to_list() == [40]
    acme = analyzer.step_series(client, "10m", tenant="acme", bucket_seconds=0)
    assert acme.filter(pl.col("step") == "s")["requests"].to_list() == [20]
    assert analyzer.tenants(client, "10m") == ["acme", "globex"]
    assert analyzer.step_series(client, "10m", pipeline="absent").is_empty()


@pytest.mark.usefixtures("traffic")
def test_cost_by_agrees_with_cost_per_1k_and_shares_batches_over_tenants(client):
    cells = analyzer.cost_cells(client, "10m")
    for by in (("pipeline",), ("pipeline", "step", "route"), ("model",)):
        mine = analyzer.cost_by(cells, PRICES, by)
        theirs = analyzer.cost_per_1k(client, "10m", by=by, prices=PRICES, source="rollup").sort(list(by))
        assert mine[list(by)].to_dicts() == theirs[list(by)].to_dicts()
        assert mine["requests"].to_list() == theirs["requests"].to_list()
        assert mine["cost_per_1k"].to_list() == pytest.approx(theirs["cost_per_1k"].to_list(), rel=1e-9)
        assert set(mine["price_version"]) == {"test-1"}

    # By tenant: every request and every bit of batch compute lands on a tenant, close to the exact raw split.
    tenants = analyzer.cost_by(cells, PRICES, ("tenant",))
    total = analyzer.cost_by(cells, PRICES, ())
    assert tenants["requests"].sum() == total["requests"][0] == 40
    assert tenants["cost"].sum() == pytest.approx(total["cost"][0], rel=1e-6)
    raw = analyzer.cost_per_1k(client, "10m", by=("tenant",), prices=PRICES).sort("tenant")
    assert tenants["tenant"].to_list() == raw["tenant"].to_list() == ["acme", "globex"]
    assert tenants["cost_per_1k"].to_list() == pytest.approx(raw["cost_per_1k"].to_list(), rel=0.02)
    acme = analyzer.cost_by(cells, PRICES, ("pipeline",), tenant="acme")
    assert acme["requests"].to_list() == [20]
    assert acme["cost"][0] == pytest.approx(tenants.filter(tenant="acme")["cost"][0], rel=1e-9)

    over_time = analyzer.cost_by(analyzer.cost_cells(client, "10m", bucket_seconds=60), PRICES, ("pipeline",),
                                 over_time=True)
    assert over_time["requests"].sum() == 40
    assert over_time["cost"].sum() == pytest.approx(total["cost"][0], rel=1e-9)
    previous = analyzer.cost_cells(client, "10m", offset_seconds=600)  # the 10 minutes before: nothing
    assert previous.is_empty()


def test_a_step_priced_per_call_is_not_unpriced_whatever_its_route():
    cells = pl.DataFrame({"bucket": [None, None], "kind": ["root", "step"], "pipeline": ["p", "p"],
                          "step": ["", "create_followup"], "route": ["", "crm-unlisted"], "model": ["", ""],
                          "tenant": ["", ""], "n": [3, 3], "batched": [0, 0], "input_tokens": [0, 0],
                          "output_tokens": [0, 0], "unbatched_ns": [0, 10**9], "duration_ns": [0, 10**9]},
                         schema_overrides={"bucket": pl.Datetime("us", "UTC")})
    priced = analyzer.cost_by(cells, PRICES, ("pipeline",))
    assert priced["unpriced_spans"].to_list() == [0]
    assert priced["cost_per_1k"][0] == pytest.approx(1000 * 3 * PRICES.calls["create_followup"] / 3)
    unknown = cells.with_columns(step=pl.Series(["", "lookup"]))
    assert analyzer.cost_by(unknown, PRICES, ("pipeline",))["unpriced_spans"].to_list() == [3]


def _cells(requests: int, steps: dict[tuple[str, str, str], tuple[int, float, float]]) -> pl.DataFrame:
    """cost_by-shaped rows: (step, route, model) -> (spans, token cost, other cost), for one pipeline."""
    return pl.DataFrame([{"pipeline": "p", "step": s, "route": r, "model": m, "requests": requests, "spans": n,
                          "token_cost": t, "cost": t + o} for (s, r, m), (n, t, o) in steps.items()])


def test_cost_change_splits_the_move_exactly_into_its_drivers():
    before = _cells(100, {("gen", "small", "m1"): (80, 0.8, 0.0), ("gen", "large", "m2"): (20, 2.0, 0.0),
                          ("embed", "fp32", ""): (100, 0.0, 0.5)})
    # Twice the requests; gen moved to 50/50 small/large; embed's calls take 1.5x the compute.
    after = _cells(200, {("gen", "small", "m1"): (100, 1.0, 0.0), ("gen", "large", "m2"): (100, 10.0, 0.0),
                         ("embed", "fp32", ""): (200, 0.0, 1.5)})
    row = analyzer.cost_change(before, after).row(0, named=True)
    c0, c1 = (0.8 + 2.0 + 0.5) / 100, (1.0 + 10.0 + 1.5) / 200
    assert row["per_1k_before"] == pytest.approx(1000 * c0) and row["per_1k_after"] == pytest.approx(1000 * c1)
    assert sum(row[d] for d in series.COST_CHANGE_DRIVERS) == pytest.approx(1000 * (c1 - c0))
    assert row["mix"] == pytest.approx(0.0)  # one gen and one embed call per request, before and after
    # route: gen's share of large went 0.2 -> 0.5 at the old per-call prices (0.01 small, 0.1 large)
    assert row["route"] == pytest.approx(1000 * ((0.5 - 0.8) * 0.01 + (0.5 - 0.2) * 0.1))
    assert row["tokens"] == pytest.approx(0.0)
    assert row["compute"] == pytest.approx(1000 * (1.5 / 200 - 0.5 / 100))
    assert row["volume"] == pytest.approx((200 - 100) * c0)

    new_step = _cells(200, {**{k: v for k, v in {("gen", "small", "m1"): (160, 1.6, 0.0),
                                                  ("gen", "large", "m2"): (40, 4.0, 0.0),
                                                  ("embed", "fp32", ""): (200, 0.0, 1.0)}.items()},
                            ("rerank", "fp32", ""): (100, 0.0, 3.0)})
    row = analyzer.cost_change(before, new_step).row(0, named=True)
    assert row["mix"] == pytest.approx(1000 * 100 / 200 * 0.03)  # half the requests now rerank, at 0.03 a call
    assert row["route"] == pytest.approx(0.0) and row["tokens"] == pytest.approx(0.0)
    assert sum(row[d] for d in series.COST_CHANGE_DRIVERS) == pytest.approx(row["per_1k_after"] - row["per_1k_before"])


def test_feature_histograms_bin_numbers_by_reference_quantiles_and_count_categories():
    reference = [str(v) for v in range(100)]
    current = [str(v) for v in range(50, 150)]
    frame = analyzer.feature_histograms(reference, current, "numeric", bins=4)
    ref = frame.filter(window="reference").sort("order")
    cur = frame.filter(window="current").sort("order")
    assert ref["count"].to_list() == [25, 25, 25, 25]  # quartile bins of the reference
    edges = np.quantile(np.arange(100.0), [0.25, 0.5, 0.75])
    assert cur["count"].to_list() == [0, 0, sum(edges[1] <= v < edges[2] for v in range(50, 150)),
                                      sum(v >= edges[2] for v in range(50, 150))]
    assert math.isclose(cur["share"].sum(), 1.0)
    cats = analyzer.feature_histograms(["en"] * 9 + ["de"], ["de"] * 7 + ["en"] * 3, "categorical")
    assert {(r["window"], r["bin"]): r["share"] for r in cats.to_dicts()} == {
        ("reference", "de"): 0.1, ("reference", "en"): 0.9, ("current", "de"): 0.7, ("current", "en"): 0.3}


def test_drift_history_and_feature_samples_read_stored_runs_and_spans(client):
    now = time.time_ns()
    rows = [span_row(now - (60 - i) * 10**9, trace_id=uuid.uuid4().hex, span_id=uuid.uuid4().hex[:16],
                     parent=uuid.uuid4().hex[:16], duration=int((5 + i) * 1e6),
                     attrs={"tracetune.pipeline": "p", "tracetune.step": "s",
                            "tracetune.feature.lang": "de" if i >= 30 else "en"}) for i in range(60)]
    client.insert("otel_traces", rows, column_names=COLUMNS)
    from datetime import UTC, datetime, timedelta
    end = datetime.fromtimestamp(now / 1e9, UTC) + timedelta(seconds=1)
    middle = end - timedelta(seconds=31.5)  # half a second clear of the spans either side
    reference, current = (end - timedelta(seconds=62), middle), (middle, end)
    samples = analyzer.feature_samples(client, "p", "s", "lang", reference, current)
    assert sorted(samples["reference"]) == ["en"] * 30 and sorted(samples["current"]) == ["de"] * 30
    latency = analyzer.feature_samples(client, "p", "s", "latency_ms", reference, current)
    assert sorted(float(v) for v in latency["current"]) == [5.0 + i for i in range(30, 60)]

    run = analyzer.compute_drift(client, reference, current)
    analyzer.store_drift(client, run)
    history = analyzer.drift_history(client, "1h", pipeline="p")
    assert history.height == run.height
    assert set(history["feature"]) == {"lang", "latency_ms"}
    js = history.filter(feature="lang", statistic="js")
    assert js["value"][0] == pytest.approx(run.filter(feature="lang", statistic="js")["value"][0])
    assert analyzer.drift_history(client, "1h", pipeline="other").is_empty()



def test_error_spans_group_failed_spans_by_step_kind_and_message(client):
    now = time.time_ns()
    rows, newest = [], {}
    for i in range(6):
        trace, root = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        step, message, attrs = ("parse", "bad input", {"tracetune.error_kind": "client"}) if i < 2 else \
            ("call", "upstream 503", {})
        at = now - (60 - i) * 10**9
        base = {"tracetune.pipeline": "p"}
        rows.append(span_row(at, trace_id=trace, span_id=root, attrs={**base, **attrs}, duration=10**6,
                             status="STATUS_CODE_ERROR", status_message=message))
        rows.append(span_row(at, trace_id=trace, span_id=uuid.uuid4().hex[:16], parent=root, duration=10**6,
                             attrs={**base, "tracetune.step": step, **attrs}, status="Error", status_message=message))
        rows.append(span_row(at, trace_id=trace, span_id=uuid.uuid4().hex[:16], parent=root, duration=10**6,
                             attrs={**base, "tracetune.step": "ok"}))  # a step that worked: not listed
        newest[step] = trace
    client.insert("otel_traces", rows, column_names=COLUMNS)
    found = {(r["step"], r["kind"], r["message"]): r for r in analyzer.error_spans(client, "10m").to_dicts()}
    assert {k: r["count"] for k, r in found.items()} == {
        ("call", "server", "upstream 503"): 4, ("", "server", "upstream 503"): 4,
        ("parse", "client", "bad input"): 2, ("", "client", "bad input"): 2}
    assert found["call", "server", "upstream 503"]["example_trace_id"] == newest["call"]
    assert found["parse", "client", "bad input"]["example_trace_id"] == newest["parse"]
    assert analyzer.error_spans(client, "10m", limit=1).height == 1
    assert analyzer.error_spans(client, "10m", pipeline="other").is_empty()

    # The failures were read from their copies (tracetune_error_spans, fed by a view) ...
    assert client.query("SELECT count() FROM tracetune_error_spans").result_rows[0][0] == 12
    # ... and a store whose spans predate the view (no copies) gets the same answer from otel_traces,
    before = analyzer.error_spans(client, "10m")
    client.command("TRUNCATE TABLE tracetune_error_spans")
    assert analyzer.error_spans(client, "10m").equals(before)
    # also once new failures are copied: the older ones still come from otel_traces, none counted twice.
    trace = uuid.uuid4().hex
    client.insert("otel_traces", [span_row(time.time_ns(), trace_id=trace, parent="ab" * 8, duration=10**6,
                                           attrs={"tracetune.pipeline": "p", "tracetune.step": "call"},
                                           status="Error", status_message="upstream 503")], column_names=COLUMNS)
    found = {(r["step"], r["kind"], r["message"]): r for r in analyzer.error_spans(client, "10m").to_dicts()}
    assert {k: r["count"] for k, r in found.items()} == {
        ("call", "server", "upstream 503"): 5, ("", "server", "upstream 503"): 4,
        ("parse", "client", "bad input"): 2, ("", "client", "bad input"): 2}
    assert found["call", "server", "upstream 503"]["example_trace_id"] == trace
