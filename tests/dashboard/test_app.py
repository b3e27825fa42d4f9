"""The dashboard page run headless (Streamlit AppTest) against a real embedded store."""

from __future__ import annotations

import io
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from collector.rows import COLUMNS
from tests.conftest import make_settings
from tracetune.settings import Settings

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
RUN_TIMEOUT = 30  # the first run imports altair, polars and clickhouse-connect

# pipeline -> [(step, calls, failed calls, base latency ms)]; a failed step ends its request,
# so later steps see fewer calls.
PIPELINES = {
    "ticket_triage": [("embed", 40, 0, 12.0), ("classify", 40, 3, 45.0), ("route", 37, 0, 4.0)],
    "doc_qa": [("retrieve", 25, 0, 30.0), ("rerank", 25, 0, 80.0), ("generate", 25, 2, 600.0)],
}
OLD_EMBED_CALLS = 5  # extra ticket_triage/embed calls three hours ago: only in the 6h window


def _durations_ms(base: float, calls: int) -> list[float]:
    """Deterministic spread: base .. ~2.5x base, so p50 < p95 < p99."""
    return [round(base * (1 + 1.5 * (i / max(1, calls - 1)) ** 3), 3) for i in range(calls)]


def _span(start_ns: int, trace: str, parent: str, name: str, duration_ns: int, attrs: dict[str, str],
          error: bool, span_id: str = "") -> list:
    return [
        start_ns, trace, span_id or uuid.uuid4().hex[:16], parent, "", name,
        "SPAN_KIND_INTERNAL", "tracetune-executor", {"service.name": "tracetune-executor"},
        "tracetune", "0.1.0", attrs, duration_ns,
        "STATUS_CODE_ERROR" if error else "STATUS_CODE_UNSET", "step failed" if error else "",
        [], [], [], [], [], [], [],
    ]


def _seed(client) -> None:
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
                duration = int(_durations_ms(base, calls)[index] * 1e6)
                failed = index < errors
                attrs = {"tracetune.pipeline": pipeline, "tracetune.step": step, "tracetune.route": "default"}
                rows.append(_span(start + offset, trace, root, f"{pipeline}.{step}", duration, attrs, failed))
                offset += duration
            rows.append(_span(start, trace, "", pipeline, offset, {"tracetune.pipeline": pipeline}, failed,
                              span_id=root))
    for i in range(OLD_EMBED_CALLS):
        attrs = {"tracetune.pipeline": "ticket_triage", "tracetune.step": "embed"}
        rows.append(_span(now - int(3 * 3600e9) + i * int(1e9), uuid.uuid4().hex, uuid.uuid4().hex[:16],
                          "ticket_triage.embed", int(15e6), attrs, False))
    assert made == {(p, step): calls for p, steps in PIPELINES.items() for step, calls, *_ in steps}
    client.insert("otel_traces", rows, column_names=COLUMNS)


def _use(monkeypatch, settings: Settings, tmp_path: Path) -> None:
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


def _table(at: AppTest) -> dict[tuple[str, str], dict]:
    frame = at.dataframe[0].value
    return {(row.get("pipeline", ""), row["step"]): row for row in frame.to_dict("records")}


def _charts(at: AppTest) -> list:
    return at.get("vega_lite_chart")


def _chart_rows(chart) -> list[dict]:
    """The rows a chart element carries (its Arrow datasets, or its inline data)."""
    proto = chart.proto
    rows: list[dict] = []
    for dataset in proto.datasets:
        rows += pa.ipc.open_stream(io.BytesIO(dataset.data.data)).read_all().to_pylist()
    if proto.data.data:
        rows += pa.ipc.open_stream(io.BytesIO(proto.data.data)).read_all().to_pylist()
    return rows


def _within_sketch(value: float, durations, q: float) -> bool:
    """The page reads the per-minute rollup: DDSketch puts each percentile within 0.5% of a sample at its rank."""
    lo, hi = np.percentile(durations, q, method="lower"), np.percentile(durations, q, method="higher")
    return lo * 0.995 <= value <= hi * 1.005


@pytest.fixture
def seeded(db_settings: Settings, client, monkeypatch, tmp_path) -> Settings:
    _seed(client)
    _use(monkeypatch, db_settings, tmp_path)
    return db_settings


def test_page_shows_seeded_steps_counts_percentiles_and_charts(seeded: Settings):
    at = _run(AppTest.from_file(str(APP)))

    assert at.title[0].value == "tracetune"
    assert not at.error
    table = _table(at)
    expected = {(p, step): (calls, errors, base) for p, steps in PIPELINES.items()
                for step, calls, errors, base in steps}
    assert set(table) == set(expected)
    for key, (calls, errors, base) in expected.items():
        row = table[key]
        durations = _durations_ms(base, calls)
        assert row["requests"] == calls, key
        assert row["error %"] == pytest.approx(100 * errors / calls), key
        for q in (50, 95, 99):
            assert _within_sketch(row[f"p{q} ms"], durations, q), (key, q)

    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Requests"] == "65"  # 40 ticket_triage + 25 doc_qa requests
    total_calls = sum(c for steps in PIPELINES.values() for _, c, _, _ in steps)
    assert metrics["Error %"] == f"{100 * 5 / total_calls:.1f} %"
    slowest = [label for label in metrics if label.startswith("Slowest step p95")]
    assert slowest == ["Slowest step p95 · doc_qa / generate"]
    shown = float(metrics[slowest[0]].removesuffix(" ms").replace(",", ""))
    assert _within_sketch(shown, _durations_ms(600.0, 25), 95) or abs(shown - np.percentile(
        _durations_ms(600.0, 25), 95, method="lower")) <= 0.5 + 0.005 * shown  # shown rounded to whole ms

    charts = _charts(at)
    assert len(charts) == 2  # p95 over time, percentiles per step
    line_rows = _chart_rows(charts[0])
    assert {r["series"] for r in line_rows} == {f"{p} / {k}" for p, k in expected}
    assert sum(r["requests"] for r in line_rows) == sum(c for c, _, _ in expected.values())
    assert all(r["p95_ms"] > 0 for r in line_rows)
    bar_rows = _chart_rows(charts[1])
    generate_p99 = [r["ms"] for r in bar_rows
                    if r["series"] == "doc_qa / generate" and r["percentile"] == "p99"]
    assert len(generate_p99) == 1 and _within_sketch(generate_p99[0], _durations_ms(600.0, 25), 99)


def test_sidebar_window_and_pipeline_filter_the_page(seeded: Settings):
    at = _run(AppTest.from_file(str(APP)))
    window, pipeline = at.sidebar.selectbox
    assert window.value == "15m"
    assert pipeline.options == ["all", "doc_qa", "ticket_triage"]

    window.set_value("6h")  # the three-hour-old embed calls come into the window
    _run(at)
    assert _table(at)[("ticket_triage", "embed")]["requests"] == 40 + OLD_EMBED_CALLS

    at.sidebar.selectbox[1].set_value("doc_qa")
    _run(at)
    table = at.dataframe[0].value
    assert "pipeline" not in table.columns
    assert dict(zip(table["step"], table["requests"], strict=False)) == {"retrieve": 25, "rerank": 25, "generate": 25}
    assert {m.label: m.value for m in at.metric}["Requests"] == "25"
    assert {r["series"] for r in _chart_rows(_charts(at)[0])} == {"retrieve", "rerank", "generate"}

    at.sidebar.toggle[0].set_value(True)  # auto-refresh on: still one run that returns
    _run(at)
    assert len(at.dataframe) == 1


def test_empty_window_says_no_spans_yet(db_settings: Settings, monkeypatch, tmp_path):
    _use(monkeypatch, db_settings, tmp_path)
    at = _run(AppTest.from_file(str(APP)))
    assert not at.error
    assert "No spans in the last 15m yet" in at.info[0].value
    assert not at.dataframe and not _charts(at)


def test_store_without_the_database_yet_says_no_spans_yet(store_settings: Settings, monkeypatch, tmp_path):
    _use(monkeypatch, store_settings.replace(database=f"absent_{uuid.uuid4().hex[:8]}"), tmp_path)
    at = _run(AppTest.from_file(str(APP)))
    assert not at.error
    assert "No spans in the last 15m yet" in at.info[0].value
    assert "no otel_traces table yet" in at.info[0].value


def test_unreachable_store_shows_one_line_error(tmp_path, monkeypatch):
    settings = make_settings(tmp_path)  # free ports, nothing listening
    _use(monkeypatch, settings, tmp_path)
    at = _run(AppTest.from_file(str(APP)))

    assert len(at.error) == 1
    message = at.error[0].value
    assert f"127.0.0.1:{settings.store_port}" in message
    assert "is `tracetune up` running?" in message
    assert "\n" not in message
    assert not at.dataframe and not _charts(at)
