"""The dashboard page run headless (Streamlit AppTest) against a real embedded store."""

from __future__ import annotations

import io
import os
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import make_settings
from tests.spans import COLUMNS, span_row
from tracetune import analyzer
from tracetune.dashboard.frames import format_money
from tracetune.settings import Settings

APP = Path(str(resources.files("tracetune.dashboard").joinpath("app.py")))
RUN_TIMEOUT = 30  # the first run imports altair, polars and clickhouse-connect
TAB_LABELS = ["Latency", "Cost", "Critical path", "Drift", "SLOs", "Alerts"]

# pipeline -> [(step, calls, failed calls, base latency ms)]; a failed step ends its request,
# so later steps see fewer calls.
PIPELINES = {
    "ticket_triage": [("embed", 40, 0, 12.0), ("classify", 40, 3, 45.0), ("route", 37, 0, 4.0),
                      ("create_followup", 37, 0, 20.0)],
    "doc_qa": [("retrieve", 25, 0, 30.0), ("rerank", 25, 0, 80.0), ("generate", 25, 2, 600.0)],
}
# Routes as priced in the bundled prices.toml (create_followup has none: it is priced per call).
ROUTES = {"embed": "int8", "classify": "fp32", "route": "fp32", "retrieve": "fp32", "rerank": "fp32",
          "generate": "llm"}
LLM_MODEL, OUTPUT_TOKENS = "gpt-4o-mini", 50  # generate's i-th call reads 300 + i input tokens
OLD_EMBED_CALLS = 5  # extra ticket_triage/embed calls three hours ago: only in the 6h window
# doc_qa's SLO: 2 of its 25 requests fail, 80x its 0.1% budget; but four minutes of data is not
# enough for any rule's long window (1h, 6h, 3d): none fires, each says so. Its requests take at most
# ~1.8 s, so the 60 s p95 target holds.
SLO = analyzer.SLO(pipeline="doc_qa", error_rate=0.001, p95_ms=60_000)


def durations_ms(base: float, calls: int) -> list[float]:
    """Deterministic spread: base .. ~2.5x base, so p50 < p95 < p99."""
    return [round(base * (1 + 1.5 * (i / max(1, calls - 1)) ** 3), 3) for i in range(calls)]


def _span(start_ns: int, trace: str, parent: str, name: str, duration_ns: int, attrs: dict[str, str],
          error: bool, span_id: str = "") -> list:
    return span_row(start_ns, trace_id=trace, span_id=span_id or uuid.uuid4().hex[:16], parent=parent, name=name,
                    service="tracetune-executor", resource={"service.name": "tracetune-executor"},
                    scope=("tracetune", "0.1.0"), attrs=attrs, duration=duration_ns,
                    status="STATUS_CODE_ERROR" if error else "STATUS_CODE_UNSET",
                    status_message="step failed" if error else "")


def _step_attrs(pipeline: str, step: str, index: int) -> dict[str, str]:
    attrs = {"tracetune.pipeline": pipeline, "tracetune.step": step}
    if step in ROUTES:
        attrs["tracetune.route"] = ROUTES[step]
    if step == "generate":
        attrs |= {"gen_ai.request.model": LLM_MODEL, "gen_ai.usage.input_tokens": str(300 + index),
                  "gen_ai.usage.output_tokens": str(OUTPUT_TOKENS)}
    return attrs


def seed_spans(client) -> None:
    """Root and step spans for each request, spread over the last four minutes."""
    now = time.time_ns()
    rows = []
    made = {(p, step): 0 for p, steps in PIPELINES.items() for step, *_ in steps}
    for pipeline, steps in PIPELINES.items():
        requests = steps[0][1]
        for request in range(requests):
            start = now - int(240e9) + request * int(5e9)  # every 5 s from four minutes ago
            trace = uuid.uuid4().hex
            root = uuid.uuid4().hex[:16]
            offset = 0
            failed = False
            for step, calls, errors, base in steps:
                if failed:
                    break
                index = made[pipeline, step]
                made[pipeline, step] += 1
                duration = int(durations_ms(base, calls)[index] * 1e6)
                failed = index < errors
                rows.append(_span(start + offset, trace, root, f"{pipeline}.{step}", duration,
                                  _step_attrs(pipeline, step, index), failed))
                offset += duration
            rows.append(_span(start, trace, "", pipeline, offset, {"tracetune.pipeline": pipeline}, failed,
                              span_id=root))
    for i in range(OLD_EMBED_CALLS):
        attrs = {"tracetune.pipeline": "ticket_triage", "tracetune.step": "embed"}
        rows.append(_span(now - int(3 * 3600e9) + i * int(1e9), uuid.uuid4().hex, uuid.uuid4().hex[:16],
                          "ticket_triage.embed", int(15e6), attrs, False))
    assert made == {(p, step): calls for p, steps in PIPELINES.items() for step, calls, *_ in steps}
    client.insert("otel_traces", rows, column_names=COLUMNS)


def use_settings(monkeypatch, settings: Settings, tmp_path: Path) -> None:
    """Hand `settings` to the page the way `tracetune dashboard` does: TRACETUNE_* variables."""
    for key in [k for k in os.environ if k.startswith("TRACETUNE_")]:
        monkeypatch.delenv(key)
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TRACETUNE_CONFIG", str(tmp_path / "absent.toml"))


def _run(at: AppTest) -> AppTest:
    at.run(timeout=RUN_TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def _tab(at: AppTest, label: str):
    tabs = {tab.label: tab for tab in at.tabs}
    assert list(tabs) == TAB_LABELS
    return tabs[label]


def _rows(block, index: int = 0) -> list[dict]:
    return block.dataframe[index].value.to_dict("records")


def _table(block) -> dict[tuple[str, str], dict]:
    return {(row.get("pipeline", ""), row["step"]): row for row in _rows(block)}


def _metrics(block) -> dict[str, str]:
    return {m.label: m.value for m in block.metric}


def _charts(block) -> list:
    return block.get("vega_lite_chart")


def _chart_rows(chart) -> list[dict]:
    """The rows a chart element carries (its Arrow datasets, or its inline data)."""
    proto = chart.proto
    rows: list[dict] = []
    for dataset in proto.datasets:
        rows += pa.ipc.open_stream(io.BytesIO(dataset.data.data)).read_all().to_pylist()
    if proto.data.data:
        rows += pa.ipc.open_stream(io.BytesIO(proto.data.data)).read_all().to_pylist()
    return rows


def _styles(block, index: int) -> str:
    """The CSS a styled dataframe carries (pandas Styler), as one string."""
    return str(block.dataframe[index].proto.arrow_data.styler)


def _within_sketch(value: float, durations, q: float) -> bool:
    """The page reads the per-minute rollup: DDSketch puts each percentile within 0.5% of a sample at its rank."""
    lo, hi = np.percentile(durations, q, method="lower"), np.percentile(durations, q, method="higher")
    return lo * 0.995 <= value <= hi * 1.005


def _expected_cost(pipeline: str, prices: analyzer.PriceTable) -> float:
    """A pipeline's seeded cost by hand: compute (duration × price of the route), tokens and per-call prices."""
    total = 0.0
    for step, calls, _, base in PIPELINES[pipeline]:
        seconds = sum(int(ms * 1e6) for ms in durations_ms(base, calls)) / 1e9
        total += seconds * prices.routes.get(ROUTES.get(step, ""), 0.0) + calls * prices.calls.get(step, 0.0)
        if step == "generate":
            model = prices.models[LLM_MODEL]
            total += sum((300 + i) * model.input_per_1m + OUTPUT_TOKENS * model.output_per_1m
                         for i in range(calls)) / 1e6
    return total


@pytest.fixture
def seeded(db_settings: Settings, client, monkeypatch, tmp_path) -> Settings:
    seed_spans(client)
    analyzer.save_slo(client, SLO)
    use_settings(monkeypatch, db_settings, tmp_path)
    return db_settings


def test_latency_tab_shows_seeded_steps_counts_percentiles_and_charts(seeded: Settings):
    at = _run(AppTest.from_file(str(APP)))

    assert at.title[0].value == "tracetune"
    assert not at.error
    tab = _tab(at, "Latency")
    table = _table(tab)
    expected = {(p, step): (calls, errors, base) for p, steps in PIPELINES.items()
                for step, calls, errors, base in steps}
    assert set(table) == set(expected) | {(p, analyzer.END_TO_END) for p in PIPELINES}
    for pipeline, steps in PIPELINES.items():  # the tasks' row: every request, failed if a step failed
        row = table[(pipeline, analyzer.END_TO_END)]
        assert row["requests"] == steps[0][1] and row["error %"] == pytest.approx(
            100 * sum(e for _, _, e, _ in steps) / steps[0][1])
    for key, (calls, errors, base) in expected.items():
        row = table[key]
        durations = durations_ms(base, calls)
        assert row["requests"] == calls, key
        assert row["error %"] == pytest.approx(100 * errors / calls), key
        for q in (50, 95, 99):
            assert _within_sketch(row[f"p{q} ms"], durations, q), (key, q)

    metrics = _metrics(tab)
    assert metrics["Requests"] == "65"  # 40 ticket_triage + 25 doc_qa requests
    assert metrics["Error %"] == f"{100 * 5 / 65:.1f} %"  # failed tasks of all tasks
    assert [label for label in metrics if label.startswith("End-to-end p95")] == ["End-to-end p95 · doc_qa"]
    slowest = [label for label in metrics if label.startswith("Slowest step p95")]
    assert slowest == ["Slowest step p95 · doc_qa / generate"]
    shown = float(metrics[slowest[0]].removesuffix(" ms").replace(",", ""))
    assert _within_sketch(shown, durations_ms(600.0, 25), 95) or abs(shown - np.percentile(
        durations_ms(600.0, 25), 95, method="lower")) <= 0.5 + 0.005 * shown  # shown rounded to whole ms

    charts = _charts(tab)
    assert len(charts) == 2  # p95 over time, percentiles per step
    line_rows = _chart_rows(charts[0])
    assert {r["series"] for r in line_rows} == {f"{p} / {k}" for p, k in expected}
    assert sum(r["requests"] for r in line_rows) == sum(c for c, _, _ in expected.values())
    assert all(r["p95_ms"] > 0 for r in line_rows)
    bar_rows = _chart_rows(charts[1])
    generate_p99 = [r["ms"] for r in bar_rows
                    if r["series"] == "doc_qa / generate" and r["percentile"] == "p99"]
    assert len(generate_p99) == 1 and _within_sketch(generate_p99[0], durations_ms(600.0, 25), 99)


def test_cost_tab_prices_with_bundled_prices_and_shows_cost_per_1k(seeded: Settings, client):
    assert analyzer.current_prices(client) is None
    at = _run(AppTest.from_file(str(APP)))
    assert analyzer.current_prices(client) is None  # the page reads as the read-only user: it writes nothing
    bundled = published = analyzer.load_prices()

    tab = _tab(at, "Cost")
    assert not tab.error and not tab.warning  # every seeded route and model is priced
    caption = " ".join(c.value for c in tab.caption)
    assert f"version {bundled.version}" in caption and bundled.currency in caption
    assert "not published yet" in caption
    by_pipeline = {row["pipeline"]: row for row in _rows(tab, 0)}
    expected = analyzer.cost_per_1k(client, "15m", by=("pipeline",), prices=published, source="rollup")
    assert set(by_pipeline) == set(PIPELINES) == set(expected["pipeline"])
    for row in expected.to_dicts():
        shown = by_pipeline[row["pipeline"]]
        assert shown["requests"] == row["requests"] == PIPELINES[row["pipeline"]][0][1]
        assert shown["cost per 1k"] == pytest.approx(row["cost_per_1k"], rel=1e-9)
        assert shown["cost per 1k"] == pytest.approx(
            1000 * _expected_cost(row["pipeline"], bundled) / shown["requests"], rel=1e-6)
        assert sum(shown[f"{kind} per 1k"] for kind in ("tokens", "compute", "per call")) == pytest.approx(
            shown["cost per 1k"], rel=1e-9)
    assert by_pipeline["doc_qa"]["tokens per 1k"] > 0 and by_pipeline["ticket_triage"]["per call per 1k"] == \
        pytest.approx(1000 * 37 * bundled.calls["create_followup"] / 40)

    overall = analyzer.cost_per_1k(client, "15m", by=(), prices=published, source="rollup").row(0, named=True)
    metrics = _metrics(tab)
    assert metrics[f"Cost per 1k requests ({bundled.currency})"] == format_money(overall["cost_per_1k"], "USD")
    assert metrics["Priced requests"] == "65"

    by_step = {(r["pipeline"], r["step"], r["route"]): r for r in _rows(tab, 1)}
    steps = analyzer.cost_per_1k(client, "15m", by=("pipeline", "step", "route"), prices=published,
                                 source="rollup")
    assert set(by_step) == {(p, s, ROUTES.get(s, "")) for p, ss in PIPELINES.items() for s, *_ in ss}
    for row in steps.to_dicts():
        assert by_step[row["pipeline"], row["step"], row["route"]]["cost per 1k"] == pytest.approx(row["cost_per_1k"])

    split, over_time = _charts(tab)
    split_rows = _chart_rows(split)
    generate_tokens = [r["per_1k"] for r in split_rows if r["series"] == "doc_qa / generate" and r["kind"] == "tokens"]
    assert generate_tokens == [pytest.approx(by_step["doc_qa", "generate", "llm"]["tokens per 1k"])]
    time_rows = _chart_rows(over_time)
    assert {r["pipeline"] for r in time_rows} == set(PIPELINES)
    assert sum(r["requests"] for r in time_rows) == 65


def test_critical_path_tab_names_the_step_that_dominates(seeded: Settings, client):
    at = _run(AppTest.from_file(str(APP)))
    tab = _tab(at, "Critical path")
    metrics = _metrics(tab)
    breakdown = analyzer.step_breakdown(client, "15m")
    for pipeline, steps in PIPELINES.items():
        # steps run one after another, so each one's share is its total time over the pipeline's
        totals = {step: sum(durations_ms(base, calls)) for step, calls, _, base in steps}
        top = max(totals, key=totals.get)
        share = totals[top] / sum(totals.values())
        assert metrics[f"Biggest contributor · {pipeline}"] == f"{top} · {100 * share:.0f} %"
    table = _table(tab)
    assert ("doc_qa", "generate") in table
    for row in breakdown.to_dicts():
        assert table[row["pipeline"], row["step"]]["critical %"] == pytest.approx(100 * row["critical_share"])
    bars = {r["series"]: r["share"] for r in _chart_rows(_charts(tab)[0])}
    assert max(bars, key=bars.get) == "doc_qa / generate"
    assert bars["doc_qa / generate"] == pytest.approx(table["doc_qa", "generate"]["critical %"])


def test_slo_tab_shows_the_seeded_breach_firing(seeded: Settings, client):
    at = _run(AppTest.from_file(str(APP)))
    tab = _tab(at, "SLOs")
    rows = _rows(tab)
    status = analyzer.slo_status(client, "doc_qa")
    assert len(rows) == status.height == 6  # (availability, latency_p95) x three burn-rate rules
    for shown, row in zip(rows, status.to_dicts(), strict=True):
        assert (shown["pipeline"], shown["slo"], shown["windows"]) == (
            row["pipeline"], row["slo"], f"{row['long_window']} / {row['short_window']}")
        assert shown["state"] == "not enough data" and not row["firing"] and not row["enough_data"]
        assert shown["long burn"] == pytest.approx(row["long_burn_rate"])
        assert shown["budget left %"] == pytest.approx(100 * row["budget_remaining"])
    availability = [r for r in rows if r["slo"] == "availability"]
    assert availability[0]["long burn"] == pytest.approx((2 / 25) / 0.001)  # 80x the budget, over 4 minutes
    assert availability[0]["budget left %"] == pytest.approx(100 * (1 - 2 / (0.001 * 25)))
    assert "#e9ecef" in _styles(tab, 0)  # not-enough-data rows greyed
    assert _metrics(tab)["Alert rules firing"] == "0 of 6"
    caption = " ".join(c.value for c in tab.caption)
    # About 4.5 minutes of seeded tasks; the rollup knows the start to the minute, so 4.x or 5.0.
    assert re.search(r"budgets count only the time with data \(doc_qa over [45]\.\d min of data\)", caption), caption


def test_sidebar_window_and_pipeline_filter_the_page(seeded: Settings):
    at = _run(AppTest.from_file(str(APP)))
    window, pipeline = at.sidebar.selectbox
    assert window.value == "15m"
    assert pipeline.options == ["all", "doc_qa", "ticket_triage"]

    window.set_value("6h")  # the three-hour-old embed calls come into the window
    _run(at)
    assert _table(_tab(at, "Latency"))[("ticket_triage", "embed")]["requests"] == 40 + OLD_EMBED_CALLS

    at.sidebar.selectbox[1].set_value("doc_qa")
    _run(at)
    latency = _tab(at, "Latency")
    table = latency.dataframe[0].value
    assert "pipeline" not in table.columns
    assert dict(zip(table["step"], table["requests"], strict=False)) == {
        analyzer.END_TO_END: 25, "retrieve": 25, "rerank": 25, "generate": 25}
    assert _metrics(latency)["Requests"] == "25"
    assert {r["series"] for r in _chart_rows(_charts(latency)[0])} == {"retrieve", "rerank", "generate"}
    assert [r["pipeline"] for r in _rows(_tab(at, "Cost"), 0)] == ["doc_qa"]
    assert {r["step"] for r in _rows(_tab(at, "Cost"), 1)} == {"retrieve", "rerank", "generate"}
    assert {r["step"] for r in _rows(_tab(at, "Critical path"))} <= {"retrieve", "rerank", "generate",
                                                                     analyzer.ROOT_STEP}

    at.sidebar.selectbox[1].set_value("ticket_triage")  # no SLO there
    _run(at)
    assert "No SLO set for pipeline ticket_triage" in _tab(at, "SLOs").info[0].value

    at.sidebar.toggle[0].set_value(True)  # auto-refresh on: still one run that returns
    _run(at)
    assert len(_tab(at, "Latency").dataframe) == 1


# ---- drift: the current minute against a pinned baseline (five hours ago) ----------------------------

DRIFT_PIPELINE, DRIFT_STEP = "search", "query"
DRIFT_SPANS = 160  # per window: above the 100 samples a verdict needs (PSI needs 500: it stays out)
_NOW = datetime.now(UTC)
BASELINE = (_NOW - timedelta(hours=5, minutes=1), _NOW - timedelta(hours=4))


def seed_features(client) -> analyzer.Baseline:
    """`lang` moves from mostly en to mostly de (drift); `length` keeps its values (ok); `rare` has 10 (too few).

    The reference spans lie in a pinned baseline five hours back (returned); the current spans are the
    last 20 s (0.125 s apart), so they stay in the current minute while the test runs."""
    now = time.time_ns()
    rows = []
    for window, start, step_ns in (("reference", int(BASELINE[0].timestamp() * 1e9) + int(30e9), int(5e9)),
                                   ("current", now - int(20e9), int(0.125e9))):
        for i in range(DRIFT_SPANS):
            share_de = 0.1 if window == "reference" else 0.7
            attrs = {"tracetune.pipeline": DRIFT_PIPELINE, "tracetune.step": DRIFT_STEP,
                     "tracetune.feature.lang": "de" if i < share_de * DRIFT_SPANS else "en",
                     "tracetune.feature.length": str(50 + i % 40)}
            if i < 10:
                attrs["tracetune.feature.rare"] = str(i)
            rows.append(_span(start + i * step_ns, uuid.uuid4().hex, uuid.uuid4().hex[:16],
                              f"{DRIFT_PIPELINE}.{DRIFT_STEP}", int((20 + i % 7) * 1e6), attrs, False))
    client.insert("otel_traces", rows, column_names=COLUMNS)
    return analyzer.set_baseline(client, DRIFT_PIPELINE, *BASELINE)


def _drift_rows(block) -> dict[str, dict]:
    return {row["feature"]: row for row in _rows(block)}


def test_drift_tab_computes_then_shows_the_stored_run(db_settings: Settings, client, monkeypatch, tmp_path):
    baseline = seed_features(client)
    use_settings(monkeypatch, db_settings, tmp_path)
    at = _run(AppTest.from_file(str(APP)))

    tab = _tab(at, "Drift")
    assert "computed now" in tab.caption[0].value
    assert f"{baseline.start:%Y-%m-%d %H:%M} – " in tab.caption[0].value  # what it was compared with
    shown = _drift_rows(tab)
    computed = analyzer.feature_status(analyzer.current_drift(client))
    assert {r["feature"]: r["status"] for r in computed.to_dicts()} == {f: r["status"] for f, r in shown.items()}
    assert shown["lang"]["status"] == "drift" and shown["lang"]["statistic"] == "js"
    assert shown["length"]["status"] == "ok"
    assert shown["rare"]["status"] == "insufficient_data"
    assert (shown["lang"]["n_reference"], shown["lang"]["n_current"]) == (DRIFT_SPANS, DRIFT_SPANS)
    assert list(shown)[0] == "lang"  # worst first
    assert _metrics(tab)["Drift"] == "1"
    assert "#f8d7da" in _styles(tab, 0)  # the drift cell is red

    # The analyzer loop stores a run with its own thresholds: the page shows that run, not a new one,
    # and lists what the stored runs flagged.
    lenient = {"lang": {"js_drift": None, "js_warn": 0.1, "chi2_p": None}}  # the shift only warns
    stored = analyzer.current_drift(client, thresholds=lenient)
    analyzer.store_drift(client, stored)
    at = _run(AppTest.from_file(str(APP)))
    tab = _tab(at, "Drift")
    assert tab.caption[0].value.startswith("Analyzer run of ")
    shown = _drift_rows(tab)
    latest = analyzer.feature_status(analyzer.latest_drift(client))
    assert {r["feature"]: r["status"] for r in latest.to_dicts()} == {f: r["status"] for f, r in shown.items()}
    assert shown["lang"]["status"] == "warn"
    assert shown["lang"]["value"] == pytest.approx(
        stored.filter((pl.col("feature") == "lang") & (pl.col("statistic") == "js"))["value"][0])
    flagged = _rows(tab, 1)
    assert [(r["feature"], r["worst"], r["runs"]) for r in flagged] == [("lang", "warn", 1)]


# ---- empty and broken stores ------------------------------------------------------------------

def test_empty_database_renders_every_tab_with_an_info(db_settings: Settings, client, monkeypatch, tmp_path):
    use_settings(monkeypatch, db_settings, tmp_path)
    at = _run(AppTest.from_file(str(APP)))
    assert not at.error
    assert "No spans in the last 15m yet" in at.info[0].value
    assert not at.dataframe and not _charts(at)
    infos = {label: [i.value for i in _tab(at, label).info] for label in TAB_LABELS}
    assert all(len(messages) == 1 for messages in infos.values()), infos
    assert "No requests in the last 15m" in infos["Cost"][0]
    assert "No step spans" in infos["Drift"][0]
    assert "No SLO set" in infos["SLOs"][0]
    assert analyzer.current_prices(client) is None  # read-only: the page publishes nothing

    client.command("DROP TABLE tracetune_slos")  # a store whose schema predates SLOs: only that tab says so
    _run(at)
    assert not at.error
    assert "has no tracetune_slos table yet" in _tab(at, "SLOs").info[0].value
    assert "No spans in the last 15m yet" in _tab(at, "Latency").info[0].value


def test_store_without_the_database_yet_says_no_spans_yet(store_settings: Settings, monkeypatch, tmp_path):
    use_settings(monkeypatch, store_settings.replace(database=f"absent_{uuid.uuid4().hex[:8]}"), tmp_path)
    at = _run(AppTest.from_file(str(APP)))
    assert not at.error
    assert "No spans in the last 15m yet" in at.info[0].value
    assert "no otel_traces table yet" in at.info[0].value


def test_unreachable_store_shows_one_line_error(tmp_path, monkeypatch):
    settings = make_settings(tmp_path)  # free ports, nothing listening
    use_settings(monkeypatch, settings, tmp_path)
    at = _run(AppTest.from_file(str(APP)))

    assert len(at.error) == 1
    message = at.error[0].value
    assert f"127.0.0.1:{settings.store_port}" in message
    assert "is `tracetune up` running?" in message
    assert "\n" not in message
    assert not at.dataframe and not _charts(at)


# ---- alerts: what on-call was told ---------------------------------------------------------------------

def test_alerts_tab_shows_firing_silenced_resolved_alerts_and_deliveries(db_settings: Settings, client,
                                                                        monkeypatch, tmp_path):
    from datetime import UTC, datetime, timedelta

    from tracetune.analyzer.alerts import Condition, Engine, Matcher, Timing, add_silence
    from tracetune.analyzer.delivery import WebhookReceiver

    use_settings(monkeypatch, db_settings, tmp_path)
    empty = _tab(_run(AppTest.from_file(str(APP))), "Alerts")
    assert _metrics(empty)["Alerts firing"] == "0"
    assert [i.value for i in empty.info] == ["No alert is firing or pending."]

    def burning(pipeline: str, severity: str) -> Condition:
        return Condition("slo_burn", {"alertname": "SLOBurnRate", "pipeline": pipeline, "slo": "availability",
                                      "severity": severity, "rule": "slo_burn"}, {"summary": f"{pipeline} burns"},
                         20.0)

    receiver = WebhookReceiver("webhook", "http://127.0.0.1:9/never")  # nothing listens: the delivery retries
    engine = Engine(client, [receiver], Timing(group_wait=0))
    now = datetime.now(UTC)
    engine.evaluate([burning("shop", "page"), burning("bar", "ticket")], now - timedelta(minutes=2))
    engine.notify(now - timedelta(minutes=2))  # shop and bar told (one notification per group)
    engine.evaluate([burning("shop", "page")], now - timedelta(minutes=1))  # bar's resolved
    add_silence(client, [Matcher.parse("pipeline=shop")], now + timedelta(hours=1), comment="deploying")
    tab = _tab(_run(AppTest.from_file(str(APP))), "Alerts")
    metrics = _metrics(tab)
    assert (metrics["Alerts firing"], metrics["Pages firing"]) == ("1", "1")
    shown = {row["pipeline"]: row for row in _rows(tab, 0)}
    assert shown["shop"]["state"] == "firing (silenced)" and shown["shop"]["severity"] == "page"
    assert shown["bar"]["state"] == "resolved"
    assert _rows(tab, 1)[0]["matchers"] == "pipeline=shop" and _rows(tab, 1)[0]["state"] == "active"
    deliveries = _rows(tab, 2)
    assert {(d["receiver"], d["state"]) for d in deliveries} == {("webhook", "pending")}
    assert len(deliveries) == 2  # one notification per group (shop, bar), none sent yet
