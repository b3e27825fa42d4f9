"""`tracetune report` renders every section from seeded spans, charts inline, and numbers that match."""

from __future__ import annotations

import re

from tests.analyzer.test_cost_rollup import PRICES, traffic  # noqa: F401 - the seeded-traffic fixture
from tracetune.analyzer.report import build_report, write_report
from tracetune.analyzer.slo import SLO, save_slo


def test_report_has_every_section_with_figures_and_charts(client, traffic, tmp_path):  # noqa: F811
    save_slo(client, SLO("triage", p95_ms=100.0, error_rate=0.01))
    html = build_report(client, "10m", prices=PRICES)
    for heading in ("Latency per step", "Batching", "Which step contributes most", "Cost per 1k requests", "Drift",
                    "SLOs"):
        assert heading in html
    assert html.count("<svg") >= 3  # percentiles, critical path, cost
    assert "<script" not in html  # self-contained, nothing to fetch
    assert "prices test-1 (USD)" in html
    # 40 requests; the classify step ran in every one of them.
    assert re.search(r"<td>triage</td><td class=\"l\">classify</td><td>40</td>", html)
    assert "latency_p95" in html and "availability" in html
    assert "<td class=\"l\">(end to end)</td>" in html  # the tasks' latency, what the latency SLO judges
    assert "Budgets count only the time with data: triage over" in html and "not enough data" in html
    assert "Drift (last 1m against the preceding 1m)" in html and "under 100 samples" in html
    path = write_report(client, tmp_path / "r" / "report.html", "10m", prices=PRICES)
    assert path.read_text() == html or path.stat().st_size > 10_000


def test_report_on_an_empty_database_says_so(client):
    html = build_report(client, "5m", prices=PRICES)
    assert "No step spans in this window" in html and "No SLO set" in html
