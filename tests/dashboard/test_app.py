"""Every dashboard page run headless (Streamlit AppTest) against a real embedded store with seeded traffic.

One seeded database serves the read-only page tests (module scope); the drift, tuner-write and
empty-store tests take their own. Expected figures come from the seed (tests/dashboard/seed.py),
worked out by hand; where a figure is the analyzer's own (a sketch percentile, a sampled critical
path), the test says so and checks it against what the seed makes it.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.conftest import make_settings
from tests.dashboard import seed
from tests.dashboard.seed import (
    DRIFT_SPANS,
    EARLIER_REQUESTS,
    GENERATE_BATCH,
    GENERATE_QUEUE_MS,
    OLD_EMBED_CALLS,
    PIPELINES,
    ROUTES,
    SLO,
    durations_ms,
    request_cost,
    step_cost,
)
from tracetune import analyzer, store
from tracetune.base.settings import Settings
from tracetune.dashboard import steps as steps_page
from tracetune.dashboard.frames import format_money

APP = Path(str(resources.files("tracetune.dashboard").joinpath("app.py")))
RUN_TIMEOUT = 30  # the first run imports altair, polars and clickhouse-connect
PAGES = ("overview", "steps", "cost", "drift", "tuner", "alerts")
PRICES = analyzer.load_prices()  # nothing is published: the pages price with the bundled prices.toml


def use_settings(monkeypatch, settings: Settings, tmp_path: Path) -> None:
    """Hand `settings` to the app the way `tracetune dashboard` does: TRACETUNE_* variables."""
    for key in [k for k in os.environ if k.startswith("TRACETUNE_")]:
        monkeypatch.delenv(key)
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TRACETUNE_CONFIG", str(tmp_path / "absent.toml"))


def open_page(page: str, **params: str) -> AppTest:
    """A fresh session on `page` with the query string `params`, run once (answers cached by an earlier test
    or run are dropped first, as their time-to-live would)."""
    st.cache_data.clear()
    at = AppTest.from_file(str(APP))
    for name, value in params.items():
        at.query_params[name] = value
    at.switch_page(f"{page}.py")
    return run(at)


def run(at: AppTest) -> AppTest:
    at.run(timeout=RUN_TIMEOUT)
    assert not at.exception, [e.value for e in at.exception]
    return at


def click(at: AppTest, key: str) -> AppTest:
    at.button(key=key).click()
    return run(at)


def rows(at: AppTest, index: int = 0) -> list[dict]:
    return at.dataframe[index].value.to_dict("records")


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def charts(at: AppTest) -> list:
    return at.get("vega_lite_chart")


def chart_rows(chart) -> list[dict]:
    """The rows a chart element carries (its Arrow datasets, or its inline data), every layer's."""
    proto = chart.proto
    found: list[dict] = []
    for dataset in proto.datasets:
        found += pa.ipc.open_stream(io.BytesIO(dataset.data.data)).read_all().to_pylist()
    if proto.data.data:
        found += pa.ipc.open_stream(io.BytesIO(proto.data.data)).read_all().to_pylist()
    return found


def within_sketch(value: float, durations, q: float) -> bool:
    """The pages read rollups: DDSketch puts each percentile within 0.5% of a sample at its rank."""
    lo, hi = np.percentile(durations, q, method="lower"), np.percentile(durations, q, method="higher")
    return lo * 0.995 <= value <= hi * 1.005


@pytest.fixture(scope="module")
def seeded(store_settings: Settings, tmp_path_factory) -> Iterator[tuple[Settings, list[seed.Request], dict]]:
    """One database with the seed, for every read-only page test of this module; the app reads it."""
    settings = store_settings.replace(database=f"t_{uuid.uuid4().hex[:12]}")
    client = store.connect(settings)
    requests = seed.seed_spans(client)
    analyzer.save_slo(client, SLO)
    tuner = seed.seed_tuner(client)
    seed.seed_alerts(client)
    with pytest.MonkeyPatch.context() as patch:
        use_settings(patch, settings, tmp_path_factory.mktemp("dashboard"))
        yield settings, requests, tuner


@pytest.fixture(scope="module")
def reader(seeded):
    return store.connect(seeded[0], ensure_schema=False)


def recent(requests: list[seed.Request], pipeline: str = "", tenant: str = "") -> list[seed.Request]:
    """The seeded requests of the last four minutes (in every range), of a pipeline and tenant if given."""
    return [r for r in requests if not r.earlier and (not pipeline or r.pipeline == pipeline)
            and (not tenant or r.tenant == tenant)]


# ---- Overview ------------------------------------------------------------------------------------------

def test_overview_says_the_slo_in_words_and_marks_targets_decisions_costs_and_alerts(seeded, reader):
    _, requests, tuner = seeded
    at = open_page("overview")
    assert at.title[0].value == "Overview" and not at.error

    # support_bot: 2 of 25 tasks failed against a 0.1% budget: spent, by (2 / (0.001 x 25) - 1) of the budget;
    # its p95 target of 60 s holds for every task: on track, the whole budget left.
    assert metrics(at)["SLO · support_bot"] == "Budget spent"
    slos = {(r["pipeline"], r["objective"]): r for r in rows(at, 0)}
    over = 100 * (2 / (SLO.error_rate * 26) - 1)  # and the task three hours back, in the SLO's 30 days
    assert slos["support_bot", "errors"]["status"] == f"budget spent: {over:.0f}% over the 30-day budget"
    assert slos["support_bot", "p95 latency"]["status"] == "on track: 100% of the error budget left"
    assert slos["support_bot", "p95 latency"]["target"] == "95% of tasks within 60,000 ms"
    assert not any("burn" in str(v) and "factor" in str(v) for r in rows(at, 0) for v in r.values())

    # A cost per 1k headline per pipeline, against its budget where one is set, from the seed by hand.
    head = metrics(at)
    for pipeline in PIPELINES:
        mine = recent(requests, pipeline)
        assert head[pipeline] == format_money(
            1000 * sum(request_cost(r, PRICES) for r in mine) / len(mine), "USD"), pipeline

    # One p95 and one cost chart, a panel per pipeline (facet rows, each its own y scale), each panel with only
    # its own target and decisions.
    p95, cost, top = charts(at)
    for chart, column, target in ((p95, "p95_ms", ("SLO p95", SLO.p95_ms)), (cost, "cost_per_1k",
                                                                            ("budget", SLO.cost_per_1k))):
        spec = json.loads(chart.proto.spec)
        assert spec["facet"]["row"]["field"] == "pipeline" and spec["resolve"]["scale"]["y"] == "independent"
        shown = chart_rows(chart)
        assert {r["pipeline"] for r in shown if r["row"] == "point"} == set(PIPELINES)
        assert [(r["pipeline"], r[column]) for r in shown if r["row"] == "target"] == [("support_bot", target[1])]
        assert [r["label"] for r in shown if r["row"] == "target"][0].startswith(target[0])
        marks = sorted((r["pipeline"], r["kind"]) for r in shown if r["row"] == "decision")
        assert marks == [("reviews", "canary_rollback"), ("reviews", "tune"), ("ticket_triage", "canary_start"),
                         ("ticket_triage", "tune")]  # the seeded decisions, in the last hour, each its pipeline's

    # Top cost contributors: each (pipeline, step, route)'s share of the cost, from the seed by hand.
    spent: dict[str, float] = {}
    for request in recent(requests):
        for step, ns, index in request.steps:
            label = " / ".join(p for p in (request.pipeline, step, ROUTES.get(step, "")) if p)
            spent[label] = spent.get(label, 0.0) + step_cost(step, ns, index, PRICES)[1]
    total = sum(spent.values())
    expected = sorted(spent, key=spent.get, reverse=True)[:5]
    shown = chart_rows(top)
    assert [r["contributor"] for r in shown] == expected
    assert shown[0]["share %"] == pytest.approx(100 * spent[expected[0]] / total, rel=1e-6)

    # Open alerts: support_bot's page is firing (silenced, still open); ticket_triage's resolved: not listed.
    assert [(r["pipeline"], r["state"], r["severity"]) for r in rows(at, 1)] == [("support_bot", "firing", "page")]


# ---- Steps ---------------------------------------------------------------------------------------------

def test_steps_page_shows_percentiles_self_time_batching_cache_and_errors(seeded, reader):
    _, requests, _ = seeded
    at = open_page("steps")
    # One table per pipeline (in name order; a heading names it), then the error list.
    assert [m.value for m in at.markdown if m.value.startswith("**")] == [f"**{p}**" for p in sorted(PIPELINES)]
    table = {(pipeline, r["step"], r["route"]): r for i, pipeline in enumerate(sorted(PIPELINES))
             for r in rows(at, i)}
    expected = {(p, step, ROUTES.get(step, "")): (calls, errors, base) for p, steps in PIPELINES.items()
                for step, calls, errors, base in steps}
    assert set(table) == set(expected) | {(p, analyzer.END_TO_END, "") for p in PIPELINES}
    for key, (calls, errors, base) in expected.items():
        row = table[key]
        assert row["requests"] == calls and row["error %"] == pytest.approx(100 * errors / calls), key
        for q in (50, 95, 99):
            assert within_sketch(row[f"p{q} ms"], durations_ms(base, calls), q), (key, q)
    for pipeline, steps in PIPELINES.items():  # tasks: every request, failed if a step failed
        row = table[pipeline, analyzer.END_TO_END, ""]
        assert row["requests"] == steps[0][1] and row["error %"] == pytest.approx(
            100 * sum(e for _, _, e, _ in steps) / steps[0][1])
        # Steps run one after another: each one's critical-path share is its time over the tasks' time.
        totals = {step: sum(durations_ms(base, calls)) for step, calls, _, base in steps}
        for step, calls, _, _ in steps:
            shown = table[pipeline, step, ROUTES.get(step, "")]
            assert shown["critical %"] == pytest.approx(100 * totals[step] / sum(totals.values()), rel=1e-3)
            assert shown["self ms"] == pytest.approx(totals[step] / calls, rel=1e-3)  # steps have no children
    embed = table["ticket_triage", "embed", "int8"]
    assert embed["cache hit %"] == pytest.approx(100 * 10 / 40)  # every fourth call hits
    generate = table["support_bot", "generate", "llm"]
    assert (generate["batch size"], generate["queue ms"]) == (pytest.approx(GENERATE_BATCH),
                                                               pytest.approx(GENERATE_QUEUE_MS))
    assert np.isnan(embed["batch size"]) and np.isnan(generate["cache hit %"])  # blank: no batching, no cache

    head = metrics(at)
    tasks = sum(steps[0][1] for steps in PIPELINES.values())
    failed = sum(errors for steps in PIPELINES.values() for _, _, errors, _ in steps)
    assert head["Requests"] == f"{tasks}" and head["Error %"] == f"{100 * failed / tasks:.1f} %"
    slowest = [label for label in head if label.startswith("Slowest step")]
    assert slowest == ["Slowest step p95 · support_bot / generate"]

    latency, operations = charts(at)
    labels = {" / ".join(p for p in (pipeline, step, route) if p) for pipeline, step, route in expected}
    # More series than a reader tells apart: the 8 with the highest p95 are drawn, the others a choice away.
    lines = at.multiselect(key="steps_latency_lines")
    assert len(labels) > steps_page.MAX_LINES and set(lines.options) == labels
    assert len(lines.value) == steps_page.MAX_LINES
    drawn = {r["series"] for r in chart_rows(latency)}
    assert drawn == set(lines.value)
    lines.set_value(sorted(labels))
    run(at)
    latency, operations = charts(at)
    assert {r["series"] for r in chart_rows(latency)} == labels
    peaks: dict[str, float] = {}
    for r in chart_rows(latency):
        if r["value"] is not None:
            peaks[r["series"]] = max(peaks.get(r["series"], 0.0), r["value"])
    assert min(peaks[s] for s in drawn) >= max(peaks[s] for s in labels - drawn)  # the slowest were drawn first
    assert {r["series"] for r in chart_rows(operations)} == {"support_bot / generate / llm"}  # batch size by default
    assert {r["value"] for r in chart_rows(operations)} == {GENERATE_BATCH}

    at.radio(key="steps_percentile").set_value("p99")
    at.radio(key="steps_operation").set_value("cache hit rate")
    run(at)
    hits = chart_rows(charts(at)[1])
    assert {r["series"] for r in hits} == {"ticket_triage / embed / int8", "reviews / escalate / llm"}
    assert all(0 <= r["value"] <= 100 for r in hits)

    # Errors: each failed step's spans, and the failed tasks (their root spans repeat the error).
    errors = {(r["pipeline"], r["step"]): r for r in rows(at, len(PIPELINES))}
    failed: dict[tuple[str, str], list[str]] = {}
    for r in recent(requests):
        if r.failed:
            failed.setdefault((r.pipeline, r.steps[-1][0]), []).append(r.trace_id)
            failed.setdefault((r.pipeline, "(task)"), []).append(r.trace_id)
    assert set(errors) == set(failed)
    for key, traces in failed.items():
        assert errors[key]["message"] == "step failed" and errors[key]["count"] == len(traces)
        assert errors[key]["kind"] == "server" and errors[key]["trace id"] in traces


# ---- Cost ----------------------------------------------------------------------------------------------

def test_cost_page_breaks_cost_down_names_the_price_version_and_explains_the_change(seeded, reader):
    _, requests, _ = seeded
    at = open_page("cost")
    assert not at.warning  # every seeded span is priced (create_followup per call, though it has no route)
    caption = " ".join(c.value for c in at.caption)
    assert f"version {PRICES.version}" in caption and "not published yet" in caption
    assert "counted at 0" not in " ".join(e.value for e in at.markdown) + caption

    now = recent(requests)
    total = sum(request_cost(r, PRICES) for r in now)
    head = metrics(at)
    assert head["Cost per 1k requests (USD)"] == format_money(1000 * total / len(now), "USD")
    assert head["Priced requests"] == f"{len(now)}"

    # One row per step, route and model: escalate's calls answered from the cache (route, no model, no tokens)
    # count in its model's row, not in a second blank-model row; a missing route or model shows as a dash.
    def text(value):  # a missing text reaches pandas as NaN
        return None if isinstance(value, float) and np.isnan(value) else value

    by_step = {(r["pipeline"], r["step"], text(r["route"]), text(r["model"])): r for r in rows(at, 0)}
    models = {"generate": seed.LLM_MODEL, "escalate": seed.ESCALATE_MODEL}
    expected = {(pipeline, step, ROUTES.get(step), models.get(step)) for pipeline, steps in PIPELINES.items()
                for step, *_ in steps}
    assert set(by_step) == expected
    for pipeline, steps in PIPELINES.items():
        count = len(recent(requests, pipeline))
        for step, *_ in steps:
            spent = sum(step_cost(s, ns, i, PRICES)[1] for r in recent(requests, pipeline) for s, ns, i in r.steps
                        if s == step)
            key = (pipeline, step, ROUTES.get(step), models.get(step))
            assert by_step[key]["cost per 1k"] == pytest.approx(1000 * spent / count, rel=1e-6), key
    assert by_step["ticket_triage", "create_followup", None, None]["per call per 1k"] == pytest.approx(
        1000 * 37 * PRICES.calls["create_followup"] / 40)

    by_tenant = {(r["pipeline"], r["tenant"]): r for r in rows(at, 1)}
    for pipeline in PIPELINES:
        for tenant in ("acme", "globex"):
            mine = recent(requests, pipeline, tenant)
            if not mine:
                assert (pipeline, tenant) not in by_tenant
                continue
            assert by_tenant[pipeline, tenant]["requests"] == len(mine)
            assert by_tenant[pipeline, tenant]["cost per 1k"] == pytest.approx(
                1000 * sum(request_cost(r, PRICES) for r in mine) / len(mine), rel=1e-6)

    # What changed: ticket_triage ran 20 requests in the hour before, without create_followup; support_bot is new.
    earlier = [r for r in requests if r.earlier]
    before = 1000 * sum(request_cost(r, PRICES) for r in earlier) / EARLIER_REQUESTS
    after = 1000 * sum(request_cost(r, PRICES) for r in recent(requests, "ticket_triage")) / 40
    change = {r["pipeline"]: r for r in rows(at, 2)}
    triage = change["ticket_triage"]
    assert triage["per 1k before"] == pytest.approx(before, rel=1e-6)
    assert triage["per 1k now"] == pytest.approx(after, rel=1e-6)
    drivers = [triage[d] for d in ("mix", "route", "tokens", "compute")]
    assert sum(drivers) == pytest.approx(after - before, rel=1e-6)
    assert triage["route"] == pytest.approx(0.0, abs=1e-12)  # no step changed its route
    sentences = [m.value for m in at.markdown if m.value.startswith("- ")]
    triage_said = next(s for s in sentences if s.startswith("- ticket_triage"))
    assert "up" in triage_said and triage_said.index("steps called more or less often") < triage_said.index(
        "compute time per call")  # create_followup's per-call price is the bigger part of the move
    assert any(s.startswith("- support_bot: new this period") for s in sentences)

    over_time = chart_rows(charts(at)[1])  # a row of its own per pipeline
    assert {r["pipeline"] for r in over_time if r["row"] == "point"} == set(PIPELINES)


# ---- Tuner (read) -------------------------------------------------------------------------------------

def test_tuner_page_shows_config_decisions_with_predicted_and_observed_and_the_canary(seeded):
    _, _, tuner = seeded
    at = open_page("tuner", pipeline="ticket_triage")
    head = metrics(at)
    second, trial = tuner["versions"][1], tuner["canary"]
    assert head["Config version in force"] == f"{second.version}"
    assert head["Canary in flight"] == f"v{trial.version} · 10% of tasks"
    assert head["Tuner loop"] == "tuning"
    config = {(r["step"], r["knob"]): r["value"] for r in rows(at, 0)}
    assert config == {("embed", "cache_enabled"): "on", ("classify", "batch_max_size"): "16",
                      ("classify", "batch_wait_ms"): "5"}
    assert rows(at, 1) == [{"step": "classify", "knob": "batch_wait_ms", "now": "5", "after": "10"}]
    timeline = at.table[0].value.to_dict("records")  # a static table: every reason and effect wraps, none is cut
    assert [r["decision"] for r in timeline] == ["canary started: version 2 → 3, by tuner",
                                                 "tuned: version 1 → 2, by tuner"]  # newest first
    assert timeline[1]["what changed"] == "classify batch_max_size 8 → 16"
    assert timeline[1]["effect"] == ("p95: predicted 100 ms, observed 95 ms; "
                                     "cost per 1k: predicted 0.4, not observed yet")
    assert timeline[0]["effect"] == "nothing predicted or measured"


def test_tuner_page_says_every_past_decision_in_words(seeded):
    """reviews: a clamped tune (a dict in its reason, route weights with 16 decimals) observed afterwards, then a
    canary rolled back: each says what changed, why and what it did, with no dict dump or long decimal."""
    at = open_page("tuner")
    assert not at.button  # all pipelines: no change buttons until one pipeline is chosen
    tables = [t.value.to_dict("records") for t in at.table]
    reviews = next(t for t in tables if any("canary rolled back" in r["decision"] for r in t))
    back, tune = reviews
    assert tune["what changed"] == ("escalate cache_enabled off → on; escalate cascade_threshold 0.7 → 0.63; "
                                    "sentiment route_weights fp32 50.0% / int8 50.0% → fp32 64.3% / int8 35.7%")
    assert tune["why"] == ("sentiment: int8 answers as well as fp32 at 0.5781 of its compute, moving 0.14 of traffic; "
                           "escalate: escalations 31% -> 22% (clamped to cascade_threshold 0.63, cache_enabled on, "
                           "at most 10% per decision)")
    assert tune["effect"].split("; ") == [
        "p95: 180 ms before, observed 176 ms (-2%)", "cost per 1k: 0.42 before, observed 0.31 (-26%)",
        "measured over 420 tasks", "escalate (whole proposal) predicted: cost per 1k 0.28",
        "sentiment predicted: cost per 1k 0.3312"]
    assert back["effect"].split("; ") == ["canary vs base, p95: 240 ms vs 176 ms (+36%)",
                                          "canary vs base, cost per 1k: 0.29 vs 0.31 (-6%)"]
    for row in (r for t in tables for r in t):
        for cell in row.values():
            assert "{" not in cell and "'" not in cell and "None" not in cell, cell
            assert not re.search(r"\d\.\d{5,}", cell), cell


def test_tuner_page_changes_go_through_the_api_with_the_pasted_token_after_a_confirm(db_settings, client,
                                                                                     monkeypatch, tmp_path):
    from tests.servers import ThreadServer
    from tracetune.tuner import decisions, versions
    from tracetune.tuner.api import create_app

    stored = seed.seed_tuner(client)
    first = stored["versions"][0]
    app = create_app(lambda: store.connect(db_settings, ensure_schema=False), token="s3cret")
    with ThreadServer(app) as tuner:
        use_settings(monkeypatch, db_settings.replace(tuner_port=tuner.port), tmp_path)
        at = open_page("tuner", pipeline="ticket_triage")
        assert at.text_input(key="tuner_token").proto.type == at.text_input(key="tuner_token").proto.PASSWORD

        at.radio(key="tuner_action").set_value("freeze")
        click(at, "tuner_review")
        assert "Freeze ticket_triage: The tuner loop stops changing ticket_triage." in at.warning[0].value
        click(at, "tuner_confirm")  # no token pasted: nothing is sent
        assert at.error[0].value == "Paste the tuner token first: nothing was sent."
        assert not decisions.state(client, "ticket_triage").frozen

        at.text_input(key="tuner_token").input("wrong")
        click(at, "tuner_review")
        click(at, "tuner_confirm")
        assert at.error[0].value.startswith("The tuner refused (401): ")
        assert "\n" not in at.error[0].value

        # Roll back to version 1: the page shows the knob that changes, then the tuner does it.
        at.text_input(key="tuner_token").input("s3cret")
        at.radio(key="tuner_action").set_value("rollback")
        run(at)
        at.number_input(key="tuner_version_ticket_triage").set_value(first.version)
        click(at, "tuner_review")
        assert rows(at, len(at.dataframe) - 1) == [{"step": "classify", "knob": "batch_max_size", "now": "16",
                                                    "after": "8"}]
        assert versions.latest(client, "ticket_triage").version == 2  # nothing happens before the confirm
        click(at, "tuner_confirm")
        served = versions.latest(client, "ticket_triage")
        assert served.version == 4 and served.knob("classify", "batch_max_size") == 8  # 3 is the canary's
        assert at.success[0].value == "Done: ticket_triage now serves config version 4 (rollback)."
        assert decisions.history(client, "ticket_triage", 1)[0]["kind"] == "rollback"
        assert metrics(at)["Config version in force"] == "4"  # read again after the change, not from the cache


# ---- Alerts --------------------------------------------------------------------------------------------

def test_alerts_page_shows_firing_resolved_silences_and_the_delivery_log(seeded):
    at = open_page("alerts")
    head = metrics(at)
    assert (head["Alerts firing"], head["Pages firing"]) == ("1", "1")
    # Alerts and deliveries are static tables: a description wraps whole instead of being cut.
    firing, resolved, deliveries = (t.value.to_dict("records") for t in at.table)
    assert [(r["pipeline"], r["state"]) for r in firing] == [("support_bot", "firing (silenced)")]
    assert firing[0]["description"] == seed.DESCRIPTION.format(pipeline="support_bot")
    assert [(r["pipeline"], r["state"]) for r in resolved] == [("ticket_triage", "resolved")]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", firing[0]["since (UTC)"])
    assert rows(at, 0)[0]["matchers"] == "pipeline=support_bot" and rows(at, 0)[0]["state"] == "active"
    assert {d["HTTP"] for d in deliveries} == {"—"}  # nothing answered yet: a dash, not None
    assert {(d["receiver"], d["state"]) for d in deliveries} == {("webhook", "pending")}
    assert len(deliveries) == 2  # one notification per group (support_bot, ticket_triage), none sent yet


# ---- Filters in the URL --------------------------------------------------------------------------------

def test_filters_come_from_the_query_string_and_go_back_into_it(seeded):
    _, requests, _ = seeded
    at = open_page("steps", pipeline="support_bot", since="6h", tenant="acme", refresh="off")
    since, pipeline, tenant, refresh = at.sidebar.selectbox
    assert (since.value, pipeline.value, tenant.value, refresh.value) == ("6h", "support_bot", "acme", "off")
    assert pipeline.options == ["all", *sorted(PIPELINES)] and tenant.options == ["all", "acme", "globex"]
    table = at.dataframe[0].value
    assert "pipeline" not in table.columns
    assert {r["step"]: r["requests"] for r in rows(at, 0)} == {analyzer.END_TO_END: 26, "retrieve": 25,
                                                                 "rerank": 25, "generate": 25}
    assert at.query_params == {"pipeline": "support_bot", "since": "6h", "tenant": "acme", "refresh": "off"}

    pipeline.set_value("all")  # the sidebar writes back to the URL, and the whole 6 h shows
    tenant.set_value("all")
    run(at)
    assert at.query_params == {"pipeline": "all", "since": "6h", "tenant": "all", "refresh": "off"}
    triage = sorted(PIPELINES).index("ticket_triage")  # its table, in name order
    embed = {r["route"]: r["requests"] for r in rows(at, triage) if r["step"] == "embed"}
    assert embed == {"int8": 40 + EARLIER_REQUESTS, "": OLD_EMBED_CALLS}  # the old calls came without a route
    # 6 h reads hourly buckets: a line breaks exactly where an hour without calls lies between two points (the
    # earlier calls, 80 minutes back, and these are one or two hours apart, by the clock), never between
    # consecutive hours.
    line = sorted((r for r in chart_rows(charts(at)[0]) if r["series"] == "ticket_triage / embed / int8"),
                  key=lambda r: r["bucket"])
    assert len(line) >= 2 and all(r["bucket"].minute == 0 for r in line)
    for before, after in zip(line, line[1:], strict=False):
        idle = (after["bucket"] - before["bucket"]).total_seconds() > 3600
        assert (before["segment"] != after["segment"]) == idle, (before, after)

    globex = open_page("cost", tenant="globex")  # a shared link: another session, the same view
    assert metrics(globex)["Priced requests"] == f"{len(recent(requests, tenant='globex'))}"
    assert {r["tenant"] for r in rows(globex, 1)} == {"globex"}


# ---- Drift ---------------------------------------------------------------------------------------------

def test_drift_page_shows_verdicts_reference_history_against_thresholds_and_histograms(db_settings, client,
                                                                                        monkeypatch, tmp_path):
    baseline = seed.seed_features(client)
    use_settings(monkeypatch, db_settings, tmp_path)
    at = open_page("drift")
    assert "computed now" in at.caption[1].value  # [0]: the range, which drift's verdicts do not follow
    reference = next(m.value for m in at.markdown if m.value.startswith("**Reference used**"))
    assert f"search: baseline v1 {baseline.start:%Y-%m-%d %H:%M} – " in reference  # the pinned baseline
    shown = {r["feature"]: r for r in rows(at, 0)}
    assert shown["lang"]["status"] == "drift" and shown["lang"]["statistic"] == "js"
    assert shown["length"]["status"] == "ok" and shown["rare"]["status"] == "not enough data"
    assert (shown["lang"]["n_reference"], shown["lang"]["n_current"]) == (DRIFT_SPANS, DRIFT_SPANS)
    assert metrics(at)["Drift"] == "1"

    # The worst feature is chosen first: lang's histograms, 10% de in the reference, 70% now.
    assert at.selectbox(key="drift_feature").value == "search / query / lang"
    histogram = {(r["window"], r["bin"]): r["share %"] for r in chart_rows(charts(at)[-1])}
    assert histogram[("reference", "de")] == pytest.approx(10.0) and histogram[("current", "de")] == pytest.approx(70.0)

    # Stored runs: the statistic of each run over time, with the warn and drift levels it is judged against.
    run_rows = analyzer.current_drift(client)
    analyzer.store_drift(client, run_rows)
    at = open_page("drift")
    assert at.caption[1].value.startswith("Analyzer run of ")
    history = chart_rows(charts(at)[0])
    values = [r["value"] for r in history if r.get("series") == "js"]
    expected = run_rows.filter(feature="lang", statistic="js")["value"][0]
    assert values == [pytest.approx(expected)]
    levels = {r["level"]: r["value"] for r in history if "level" in r}
    assert levels == {"drift": analyzer.Thresholds().js_drift}  # js has no warn level by default
    assert [(r["feature"], r["worst"], r["runs"]) for r in rows(at, 1)] == [("lang", "drift", 1)]  # flagged


# ---- empty and broken stores ---------------------------------------------------------------------------

def test_empty_database_renders_every_page_with_one_info(db_settings, client, monkeypatch, tmp_path):
    use_settings(monkeypatch, db_settings, tmp_path)
    said = {}
    for page in PAGES:
        at = open_page(page)
        assert not at.error and not at.dataframe and not charts(at), page
        said[page] = [i.value for i in at.info]
    assert said["overview"] == [
        "No SLO set. Set one on the tuner with `PUT /v1/pipelines/<pipeline>/slo` (p95_ms, p99_ms, error_rate, "
        "cost_per_1k).", "No tasks in the last 1h yet. Start `tracetune demo`, or point an OpenTelemetry exporter "
        "at the collector."]
    assert said["steps"][0].startswith("No spans in the last 1h yet")
    assert said["cost"][0].startswith("No requests in the last 1h yet")
    assert said["drift"][0].startswith("No step spans")
    assert said["tuner"][0].startswith("The tuner has no config yet")
    assert said["alerts"] == ["No alert is firing or pending."]
    assert analyzer.current_prices(client) is None  # read-only: the pages publish nothing

    client.command("DROP TABLE tracetune_slos")  # a store whose schema predates SLOs: the SLO part says so
    at = open_page("overview")
    assert any("has no tracetune_slos table yet" in i.value for i in at.info)


def test_store_without_the_database_yet_says_no_spans_yet(store_settings: Settings, monkeypatch, tmp_path):
    use_settings(monkeypatch, store_settings.replace(database=f"absent_{uuid.uuid4().hex[:8]}"), tmp_path)
    at = open_page("steps")
    assert not at.error
    assert "No spans in the last 1h yet" in at.info[0].value and "no otel_traces table yet" in at.info[0].value


def test_unreachable_store_shows_one_line_error_on_each_page(tmp_path, monkeypatch):
    settings = make_settings(tmp_path)  # free ports, nothing listening
    use_settings(monkeypatch, settings, tmp_path)
    for page in ("overview", "cost"):
        at = open_page(page)
        assert len(at.error) == 1, page
        message = at.error[0].value
        assert f"127.0.0.1:{settings.store_port}" in message and "is `tracetune up` running?" in message
        assert "\n" not in message and not at.dataframe and not charts(at)


def test_answers_are_cached_for_a_short_time_per_store_function_and_arguments(seeded):
    from tracetune.dashboard import queries

    settings = seeded[0]
    calls = []

    def counted(client, since: str) -> int:
        calls.append(since)
        return len(calls)

    st.cache_data.clear()
    assert queries.cached(settings, counted, since="1h") == queries.cached(settings, counted, since="1h") == 1
    assert queries.cached(settings, counted, since="6h") == 2  # other arguments: asked again
    assert calls == ["1h", "6h"] and queries.CACHE_SECONDS <= 30
    assert re.fullmatch(r"\d+", str(queries.CACHE_SECONDS))


def test_an_alerts_page_link_opens_its_page_with_its_pipeline(seeded):
    """Alerts carry `/?page=drift&pipeline=...` (analyzer/alerts.py): the link lands on that page, filtered."""
    st.cache_data.clear()
    at = AppTest.from_file(str(APP))
    at.query_params["page"] = "tuner"
    at.query_params["pipeline"] = "ticket_triage"
    run(at)
    assert at.title[0].value == "Tuner"
    assert at.query_params == {"pipeline": "ticket_triage", "since": "1h", "tenant": "all", "refresh": "30s"}
    assert metrics(at)["Config version in force"] == f"{seeded[2]['versions'][1].version}"


def test_the_pages_cheap_questions_agree_with_the_full_ones(seeded, reader):
    """analyzer.pipelines (the picker) names what step_series has rows of; step_series(tasks_only=True) (the
    Overview) gives exactly its END_TO_END rows, and no step rows."""
    for since in ("1h", "6h"):
        full = analyzer.step_series(reader, since=since, bucket_seconds=120)
        assert analyzer.pipelines(reader, since=since) == sorted(set(full["pipeline"]))
        tasks = analyzer.step_series(reader, since=since, bucket_seconds=120, tasks_only=True)
        assert set(tasks["step"]) == {analyzer.END_TO_END}
        assert tasks.sort("bucket", "pipeline").equals(
            full.filter(pl.col("step") == analyzer.END_TO_END).sort("bucket", "pipeline"))
    assert set(analyzer.pipelines(reader, since="1h")) == set(PIPELINES)
