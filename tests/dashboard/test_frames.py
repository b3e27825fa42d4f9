"""The dashboard's pure parts: gaps in series, time-axis ticks, SLOs and cost changes in words, filters."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from tracetune.dashboard import charts, frames
from tracetune.dashboard.context import ALL, DEFAULT_REFRESH, DEFAULT_WINDOW, WINDOWS, Filters, filters_from

T0 = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)


def test_an_idle_gap_starts_a_new_line_segment():
    minutes = [0, 1, 2, 7, 8, 20]  # idle from 2 to 7 and from 8 to 20
    frame = pl.DataFrame({"bucket": [T0 + timedelta(minutes=m) for m in minutes] * 2,
                          "series": ["a"] * 6 + ["b"] * 6, "value": list(range(12))})
    segments = frames.with_gaps(frame, ["series"], 60)
    for series in ("a", "b"):
        runs = segments.filter(series=series)["segment"].to_list()
        assert runs == [f"{series} #0"] * 3 + [f"{series} #1"] * 2 + [f"{series} #2"]
    assert frames.with_gaps(frame.head(0), ["series"], 60)["segment"].to_list() == []


@pytest.mark.parametrize("since", WINDOWS)
def test_time_axis_ticks_are_whole_units_with_distinct_labels(since):
    """The complaint was `23:38 | 23:38`: ticks finer than their label. Every tick here is labelled at its own
    unit, and there are at most MAX_TICKS of them."""
    seconds = Filters(since=since).seconds
    step, unit, fmt = charts.tick_interval(seconds)
    size = {"minute": 60, "hour": 3600, "day": 86400}[unit] * step
    ticks = [T0 + timedelta(seconds=size * i) for i in range(math.ceil(seconds / size) + 1)]
    labels = [t.strftime(fmt) for t in ticks]
    assert len(set(labels)) == len(labels), labels
    assert seconds / size <= charts.MAX_TICKS
    window = (T0 - timedelta(seconds=seconds) + timedelta(seconds=17), T0 + timedelta(seconds=17))
    instants, shown_fmt = charts.ticks(window)
    assert shown_fmt == fmt and instants and all(window[0] <= t <= window[1] for t in instants)
    assert all((b - a).total_seconds() == size for a, b in zip(instants, instants[1:], strict=False))
    assert all(t.timestamp() % size == 0 for t in instants)  # whole units: 10:00, 10:10, not 10:03
    assert len({t.strftime(fmt) for t in instants}) == len(instants)
    axis = charts.time_axis(window).to_dict()["axis"]
    assert axis["format"] == fmt and len(axis["values"]) == len(instants)


def test_category_labels_are_never_cut():
    data = pl.DataFrame({"label": ["ticket_triage / classify / fp32"], "share": [1.0], "kind": ["tokens"]})
    for spec in (charts.bars(data, "share", "x", "label", "y").to_dict(),
                 charts.bars(data, "share", "x", "label", "y", color="kind").to_dict()):
        assert spec["encoding"]["y"]["axis"]["labelLimit"] == 0


@pytest.mark.parametrize(("remaining", "burn", "paging", "state", "sentence"), [
    (0.9, 0.5, False, "on track", "on track: 90% of the error budget left"),
    (0.5, 5.0, False, "at risk", "at risk: 3 days of budget left at this burn"),  # 0.5 x 30 d / 5
    (0.05, 14.4 * 2, True, "burning fast", "burning fast: 1 hour of budget left at this burn (on-call is paged)"),
    (0.001, 30.0, False, "at risk", "at risk: 1 minute of budget left at this burn"),  # 0.001 x 30 d / 30 = 1.44 min
    (-0.25, 3.0, True, "budget spent", "budget spent: 25% over the 30-day budget"),
    (float("nan"), 0.0, False, "no traffic yet", "no traffic yet"),
])
def test_budget_left_in_words(remaining, burn, paging, state, sentence):
    assert frames.budget_words(remaining, burn, 30, paging) == (state, sentence)


def test_slo_words_take_the_recent_burn_and_put_the_worst_first():
    rule = {"pipeline": "p", "target_ms": None, "error_budget": 0.01, "period_days": 30.0, "severity": "page",
            "budget_remaining": 0.6, "firing": False}
    status = pl.DataFrame([
        {**rule, "slo": "availability", "long_window": "6h", "long_window_s": 21600, "long_burn_rate": 1.0},
        {**rule, "slo": "availability", "long_window": "1h", "long_window_s": 3600, "long_burn_rate": 4.0},
        {**rule, "slo": "latency_p95", "target_ms": 250.0, "error_budget": 0.05, "long_window": "1h",
         "long_window_s": 3600, "long_burn_rate": 0.2, "budget_remaining": 0.99},
    ])
    words = frames.slo_words(status)
    assert words["objective"].to_list() == ["errors", "p95 latency"]
    assert words["status"].to_list() == ["at risk: 4 days of budget left at this burn",  # 0.6 x 30 d / 4 = 4.5 d
                                         "on track: 99% of the error budget left"]
    assert words["target"].to_list() == ["99% of tasks succeed", "95% of tasks within 250 ms"]
    assert frames.worst_state(words) == {"p": "at risk: 4 days of budget left at this burn"}


def test_a_cost_change_is_said_with_its_largest_driver_first():
    row = {"pipeline": "p", "requests_before": 100, "requests_after": 150, "per_1k_before": 0.40,
           "per_1k_after": 0.50, "cost_before": 0.04, "cost_after": 0.075, "volume": 0.02, "mix": 0.01,
           "route": 0.08, "tokens": 0.0, "compute": 0.01}
    said = frames.change_sentence(row, "USD")
    assert said.startswith("p: cost per 1k requests up (+25%), 0.4 USD → 0.5 USD: calls moved between routes")
    assert said.index("routes or models") < said.index("steps called") and "tokens per call" not in said
    assert said.endswith("requests 100 → 150 (+0.02 USD of total cost from volume)")
    new = frames.change_sentence({**row, "per_1k_before": None}, "USD")
    assert new == "p: new this period, 0.5 USD per 1k requests"


def test_filters_from_a_query_string_fall_back_on_unknown_values():
    assert filters_from({}) == Filters(ALL, DEFAULT_WINDOW, ALL, DEFAULT_REFRESH)
    shared = filters_from({"pipeline": "doc_qa", "since": "6h", "tenant": "acme", "refresh": "off"})
    assert (shared.pipeline_name, shared.seconds, shared.tenant_name, shared.refresh_seconds) == ("doc_qa", 21600,
                                                                                                  "acme", None)
    assert filters_from({"since": "3y", "refresh": "1ms"}) == Filters()
    assert filters_from(shared.params()) == shared
    assert shared.scope() == " for pipeline doc_qa, tenant acme" and Filters().scope() == ""


def test_a_decision_leads_with_the_tuners_sentence_when_it_writes_one():
    from datetime import UTC, datetime

    from tracetune.dashboard.tuner import decision_table

    decision = {"decided_at": datetime(2026, 12, 5, 23, 9, 25, 350000, tzinfo=UTC), "kind": "tune",
                "version_before": 1, "version_after": 2, "author": "tuner", "predicted": {}, "observed": {},
                "config_before": {"steps": {"classify": {"route_weights": {"fp32": 0.5, "int8": 0.5}}}},
                "config_after": {"steps": {"classify": {"route_weights": {"fp32": 0.6431834373838553,
                                                                          "int8": 0.3568165626161447}}}},
                "reason": "Cost per 1k 0.42 -> 0.31.\nclassify: moving traffic (clamped to {'cache_enabled': True})"}
    older = decision_table([decision]).row(0, named=True)
    assert older["why"] == "Cost per 1k 0.42 -> 0.31.; classify: moving traffic (clamped to cache_enabled on)"
    assert older["when (UTC)"] == "2026-12-05 23:09:25"
    assert older["what changed"] == "classify route_weights fp32 50.0% / int8 50.0% → fp32 64.3% / int8 35.7%"
    assert older["effect"] == "nothing predicted or measured"
    summarised = {**decision, "summary": "Cost per 1k 0.42 -> 0.31.",
                  "details": "classify: moving traffic (clamped to {'cache_enabled': True})"}
    assert decision_table([summarised]).row(0, named=True)["why"] == (
        "Cost per 1k 0.42 -> 0.31. (classify: moving traffic (clamped to cache_enabled on))")
