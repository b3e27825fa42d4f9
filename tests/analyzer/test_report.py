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


def test_report_opens_with_each_pipeline_at_a_glance(client, traffic):  # noqa: F811
    import polars as pl

    from tracetune.analyzer import cost_per_1k, latency
    from tracetune.analyzer.report import at_a_glance
    from tracetune.analyzer.slo import list_slos, slo_status, slo_words

    save_slo(client, SLO("triage", p95_ms=100.0, error_rate=0.01, cost_per_1k=0.000001))
    html = build_report(client, "10m", prices=PRICES)
    assert html.index("At a glance") < html.index("Latency per step")
    slos = [s for s in list_slos(client) if s.pipeline == "triage"]
    stats = latency(client, "10m", ("pipeline", "step"), "triage")
    totals = cost_per_1k(client, "10m", by=("pipeline",), pipeline="triage", prices=PRICES)
    cost = cost_per_1k(client, "10m", by=("pipeline", "step", "route"), pipeline="triage", prices=PRICES)
    status = slo_status(client, "triage", slo=slos[0])
    (row,) = at_a_glance(stats, totals, cost, status, slos, pl.DataFrame())
    end = stats.filter(pl.col("step") == "(end to end)").row(0, named=True)
    assert (row["pipeline"], row["tasks"], row["p95_ms"]) == ("triage", 40, end["p95_ms"])
    assert row["p95_target_ms"] == 100.0 and row["cost_budget"] == 0.000001
    assert row["cost_per_1k"] == totals["cost_per_1k"][0] > row["cost_budget"]  # over budget: marked in the page
    top = cost.sort("cost_per_1k", descending=True).row(0, named=True)
    share = top["cost_per_1k"] / cost["cost_per_1k"].sum()
    assert row["top_cost"].startswith(top["step"]) and row["top_cost"].endswith(f"{share:.0%}")
    worst = slo_words(status).row(0, named=True)  # worst objective first
    assert (row["slo"], row["slo_state"]) == (worst["status"], worst["state"])
    assert row["slo_state"] == "not enough data"  # seconds of traffic: the rule every surface uses
    assert "not enough data: " in html and ", judged after 1 hour" in html
    assert '<td class="l">triage</td><td>40</td>' in html and "(budget 1e-06)" in html
