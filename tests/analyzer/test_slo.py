"""SLO burn-rate maths against hand computations, and good/bad task counting against seeded spans."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tests.spans import COLUMNS, span_row
from tracetune.analyzer.slo import (
    SLO,
    SLO_STATUS_COLUMNS,
    SLOError,
    alerts,
    burn_rate,
    burn_windows,
    data_note,
    error_budget_remaining,
    get_slo,
    list_slos,
    request_counts,
    save_slo,
    slo_status,
    slower_than,
    window_label,
)

# ---- the burn-rate table -------------------------------------------------------------------------


def test_the_30_day_table_is_the_sre_workbook():
    rules = burn_windows(30)
    assert [(r.long_s, r.short_s, r.factor, r.budget_fraction, r.severity) for r in rules] == [
        (3600, 300, 14.4, 0.02, "page"), (21600, 1800, 6.0, 0.05, "page"), (259200, 21600, 1.0, 0.10, "ticket")]


@pytest.mark.parametrize("days, windows", [
    (7, [(840, 70), (5040, 420), (60480, 5040)]),
    (28, [(3360, 280), (20160, 1680), (241920, 20160)]),
])
def test_scaled_windows_keep_the_factors(days, windows):
    rules = burn_windows(days)
    assert [(r.long_s, r.short_s) for r in rules] == windows
    assert [r.factor for r in rules] == [14.4, 6.0, 1.0]
    for rule in rules:  # the factor still means "this share of the period's budget in the long window"
        assert rule.factor * rule.long_s / (days * 86400) == pytest.approx(rule.budget_fraction)


@pytest.mark.parametrize("days, factors", [(7, [3.36, 1.4, 0.233333333]), (28, [13.44, 5.6, 0.933333333])])
def test_fixed_windows_change_the_factors(days, factors):
    rules = burn_windows(days, scale_windows=False)
    assert [(r.long_s, r.short_s) for r in rules] == [(3600, 300), (21600, 1800), (259200, 21600)]
    assert [r.factor for r in rules] == pytest.approx(factors)


def test_window_labels():
    assert [window_label(s) for s in (3600, 300, 259200, 280, 70, 60480)] == ["1h", "5m", "3d", "4m40s", "1m10s",
                                                                              "16h48m"]


# ---- burn rates and alerts on constructed error streams --------------------------------------------


def _window_counts(stream: list[tuple[int, int]], minutes: int) -> tuple[int, int]:
    """(bad, total) over the last `minutes` of a per-minute (requests, errors) stream."""
    tail = stream[-minutes:]
    return sum(e for _, e in tail), sum(r for r, _ in tail)


def _rates(stream, budget: float) -> dict[int, float]:
    return {m * 60: burn_rate(*_window_counts(stream, m), budget) for m in (5, 30, 60, 360, 4320)}


def test_burn_rate_is_the_error_ratio_over_the_budget():
    assert burn_rate(144, 10_000, 0.001) == pytest.approx(14.4)  # 1.44% errors against 99.9%
    assert burn_rate(1, 1000, 0.001) == pytest.approx(1.0)
    assert burn_rate(0, 0, 0.001) == 0.0
    with pytest.raises(SLOError, match=r"error budget must be a fraction in \(0, 1\]"):
        burn_rate(1, 10, 0)


def test_a_fast_burn_pages_while_it_lasts_and_stops_when_the_short_window_recovers():
    budget = 0.001  # 99.9% availability, 30-day period
    quiet = [(1000, 0)] * (3 * 24 * 60 - 60)  # three days of 1000 requests a minute, no errors
    burning = quiet + [(1000, 20)] * 60  # then an hour at 2% errors
    rates = _rates(burning, budget)
    assert rates[3600] == pytest.approx(20.0) and rates[300] == pytest.approx(20.0)
    assert rates[21600] == pytest.approx(20.0 / 6)  # one hot hour out of six
    assert rates[259200] == pytest.approx(20.0 / 72)
    assert [(r.long_s, r.severity) for r in alerts(rates)] == [(3600, "page")]

    # The incident ended five minutes ago: the hour is still over 14.4, the 5 minutes are not -> no page.
    recovered = quiet + [(1000, 20)] * 55 + [(1000, 0)] * 5
    rates = _rates(recovered, budget)
    assert rates[3600] == pytest.approx(55 * 20 / 60_000 / budget)  # 18.33
    assert rates[300] == 0.0
    assert alerts(rates) == []

    # A slow burn: 0.7% errors for six hours pages on the 6h/30m rule (7 > 6), not on 1h/5m (7 < 14.4).
    slow = [(1000, 0)] * (3 * 24 * 60 - 360) + [(1000, 7)] * 360
    assert [(r.long_s, r.severity) for r in alerts(_rates(slow, budget))] == [(21600, "page")]

    # A trickle at 1.2x the budget for three days opens a ticket only.
    trickle = [(1000, 1.2)] * (3 * 24 * 60)
    assert [r.severity for r in alerts(_rates(trickle, budget))] == ["ticket"]

    with pytest.raises(SLOError, match="no burn rate for window"):
        alerts({3600: 20.0})


def test_alerts_use_the_scaled_windows_of_a_7_day_slo():
    rules = burn_windows(7)
    rates = {840: 15.0, 70: 15.0, 5040: 2.0, 420: 2.0, 60480: 0.5}  # 14 min / 70 s over 14.4: page
    assert [r.long_s for r in alerts(rates, rules)] == [840]
    assert alerts(rates | {70: 14.4}, rules) == []  # at the factor is not over it (the workbook's `>`)


def test_error_budget_remaining_over_the_period():
    assert error_budget_remaining(250, 1_000_000, 0.001) == pytest.approx(0.75)  # 1000 allowed, 250 spent
    assert error_budget_remaining(1500, 1_000_000, 0.001) == pytest.approx(-0.5)  # overspent
    assert error_budget_remaining(0, 0, 0.001) == 1.0


# ---- the SLO record ---------------------------------------------------------------------------------


def test_slo_objectives_and_budgets():
    slo = SLO("triage", p95_ms=200, p99_ms=800, objective=0.999)
    assert [(o.kind, o.target_ms, o.error_budget) for o in slo.objectives()] == [
        ("availability", None, pytest.approx(0.001)), ("latency_p95", 200.0, 0.05), ("latency_p99", 800.0, 0.01)]
    assert SLO("triage", error_rate=0.01, objective=0.99).error_budget == 0.01
    assert SLO("triage", cost_per_1k=2.5).objectives() == []
    assert SLO.from_dict(json.loads(slo.to_json())) == slo
    assert SLO.from_dict({"p95_ms": 100, "period_days": None}, pipeline="x") == SLO("x", p95_ms=100)


@pytest.mark.parametrize("fields, message", [
    ({"p95_ms": -5}, r"`p95_ms` must be a latency in milliseconds in \(0, 8.64e\+07\], got -5"),
    ({"p95_ms": 1e308}, r"`p95_ms` must be a latency in milliseconds in \(0, 8.64e\+07\], got 1e\+308"),
    ({"p95_ms": 300, "p99_ms": 200}, r"`p99_ms` \(200\) must not be below `p95_ms` \(300\)"),
    ({"error_rate": 1.5}, r"`error_rate` must be a fraction of requests in \(0, 1\)"),
    ({"error_rate": 0.01, "objective": 0.999}, "disagree; set only one of them"),
    ({"objective": True}, "`objective` must be a fraction of good requests"),
    ({"p95_ms": 100, "period_days": 0}, r"`period_days` must be a number of days in \(0, 366\]"),
    ({"quality_floor": float("nan")}, r"`quality_floor` must be a score in \[0, 1\]"),
    ({}, "no target set"),
])
def test_slo_validation_names_the_field(fields, message):
    with pytest.raises(SLOError, match=message):
        SLO("triage", **fields)


def test_slo_from_dict_rejects_unknown_fields():
    with pytest.raises(SLOError, match="unknown SLO field `p90_ms`; use pipeline, p95_ms"):
        SLO.from_dict({"pipeline": "x", "p90_ms": 10})
    with pytest.raises(SLOError, match="needs `pipeline`"):
        SLO.from_dict({"p95_ms": 10})


def test_save_and_get_slo_keep_versions(client):
    assert get_slo(client, "triage") is None
    first = SLO("triage", p95_ms=250, error_rate=0.001, cost_per_1k=1.5, quality_floor=0.9)
    assert save_slo(client, first, author="alice") == 1
    assert save_slo(client, first, author="alice") == 1  # unchanged: no new version
    assert get_slo(client, "triage") == first
    second = SLO("triage", p95_ms=300, p99_ms=900, objective=0.995, period_days=7)
    assert save_slo(client, second, author="bob") == 2
    assert save_slo(client, SLO("search", p99_ms=50)) == 1
    assert get_slo(client, "triage") == second
    assert list_slos(client) == [SLO("search", p99_ms=50), second]
    versions = client.query("SELECT version, author FROM tracetune_slos WHERE pipeline = 'triage' ORDER BY version")
    assert versions.result_rows == [(1, "alice"), (2, "bob")]


# ---- counting against the store ---------------------------------------------------------------------

NOW = datetime.now(UTC).replace(second=0, microsecond=0)  # minute-aligned: rollup windows are exact


def _span(at: datetime, attrs: dict[str, str], duration_ms: float, error: bool, n: int) -> list:
    """A task span; failures alternate pdata's `Error` and the proto name `STATUS_CODE_ERROR` (both count)."""
    ts_ns = int(at.timestamp()) * 10**9 + n
    status = ("Error" if n % 100 else "STATUS_CODE_ERROR") if error else "Unset"
    return span_row(ts_ns, trace_id=f"{n:032x}", name="task", kind="Server", attrs=attrs,
                    duration=int(duration_ms * 1e6), status=status)


def _seed(client) -> None:
    """An hour of 'triage' tasks, one a second: every 50th fails (2%), every 10th takes 900 ms (10%)."""
    rows = []
    for i in range(3600):
        at = NOW - timedelta(seconds=i + 1)
        attrs = {"tracetune.pipeline": "triage", "tracetune.tenant": "acme" if i % 2 else "globex"}
        rows.append(_span(at, attrs, 900 if i % 10 == 0 else 120, i % 50 == 0, i))
        # Step spans fail and are slow, but a step is not a task.
        rows.append(_span(at, {"tracetune.pipeline": "triage", "tracetune.step": "classify"}, 5000, True, i))
    rows.append(_span(NOW - timedelta(days=31), {"tracetune.pipeline": "triage"}, 5000, True, 0))  # before the period
    rows.append(_span(NOW + timedelta(minutes=2), {"tracetune.pipeline": "triage"}, 5000, True, 0))  # after now
    rows.append(_span(NOW - timedelta(seconds=30), {"tracetune.pipeline": "search"}, 5000, True, 0))
    client.insert("otel_traces", rows, column_names=COLUMNS)


@pytest.mark.parametrize("source", ["raw", "rollup"])
def test_request_counts_count_failed_and_slow_tasks_per_window(client, source):
    _seed(client)
    counts = request_counts(client, "triage", [300, 60, 3600, 86400], latency_targets_ms=[200, 1000], now=NOW,
                            source=source)
    assert [t.replace(microsecond=0) for t in counts["first_seen"]] == [NOW - timedelta(seconds=s)
                                                                        for s in (60, 300, 3600, 3600)]
    assert counts["client_errors"].to_list() == [0, 0, 0, 0]
    assert counts.select("window_seconds", "total", "errors", "slow").to_dicts() == [
        {"window_seconds": 60, "total": 60, "errors": 2, "slow": [6.0, 0.0]},
        {"window_seconds": 300, "total": 300, "errors": 6, "slow": [30.0, 0.0]},
        {"window_seconds": 3600, "total": 3600, "errors": 72, "slow": [360.0, 0.0]},
        {"window_seconds": 86400, "total": 3600, "errors": 72, "slow": [360.0, 0.0]},
    ]
    tenant = request_counts(client, "triage", [3600], [200], now=NOW, tenant="acme", source=source)
    assert tenant.row(0)[:5] == (3600, 1800, 0, 0, [0.0])  # failures and slow tasks all have even i: globex
    assert request_counts(client, "nope", [60], [], now=NOW, source=source).row(0) == (60, 0, 0, 0, [], None)


def test_slower_than_estimates_within_the_bucket_of_the_target():
    durations_ns = [1e8] * 5 + [2e8] * 7 + [9e8] * 3  # target 2e8 lands in the 2e8 bucket
    hist: dict[int, int] = {}
    for d in durations_ns:
        bucket = math.floor(math.log2(d + 1) * 8)
        hist[bucket] = hist.get(bucket, 0) + 1
    assert slower_than(hist, 5e8) == 3.0 and slower_than(hist, 5e7) == 15.0
    assert 3.0 <= slower_than(hist, 2e8) <= 10.0


def test_slo_status_burns_the_budget_of_each_objective(client):
    _seed(client)
    slo = SLO("triage", p95_ms=200, p99_ms=1000, error_rate=0.001)
    with pytest.raises(SLOError, match="no SLO saved for pipeline 'triage'"):
        slo_status(client, "triage", now=NOW)
    save_slo(client, slo)
    # One good task 4 days ago: the period has 4 days of data, so every rule (up to 3d) can judge.
    client.insert("otel_traces", [_span(NOW - timedelta(days=4), {"tracetune.pipeline": "triage"}, 100, False, 9999)],
                  column_names=COLUMNS)
    frame = slo_status(client, "triage", now=NOW, source="raw")
    assert frame.columns == SLO_STATUS_COLUMNS and frame.height == 9
    rows = {(r["slo"], r["long_window"]): r for r in frame.iter_rows(named=True)}

    # Availability: 2% errors against a 0.1% budget burns at 20 in every window; all three rules fire.
    for window in ("1h", "6h", "3d"):
        row = rows[("availability", window)]
        assert row["long_burn_rate"] == pytest.approx(20) and row["short_burn_rate"] == pytest.approx(20)
        assert row["firing"]
    row = rows[("availability", "1h")]
    assert (row["short_window"], row["factor"], row["severity"], row["objective"]) == ("5m", 14.4, "page", 0.999)
    assert row["period_requests"] == 3601 and row["period_bad"] == 72
    assert row["budget_remaining"] == pytest.approx(1 - 72 / 3.601)
    assert set(frame["data_seconds"]) == {4 * 86400.0} and frame["enough_data"].all()

    # p95 200 ms: 10% slower against a 5% budget burns at 2 -> only the 3d/6h ticket (factor 1) fires.
    assert [(r["long_window"], r["firing"]) for r in frame.filter(pl.col("slo") == "latency_p95").iter_rows(
        named=True)] == [("1h", False), ("6h", False), ("3d", True)]
    assert rows[("latency_p95", "1h")]["long_burn_rate"] == pytest.approx(2.0)
    assert rows[("latency_p95", "3d")]["budget_remaining"] == pytest.approx(1 - 360 / (0.05 * 3601))
    # p99 1000 ms: nothing is that slow.
    p99 = frame.filter(pl.col("slo") == "latency_p99")
    assert not p99["firing"].any() and set(p99["budget_remaining"]) == {1.0}

    assert_frame_equal(slo_status(client, "triage", now=NOW, source="rollup"), frame)

    # A 7-day SLO evaluates on the scaled windows.
    weekly = slo_status(client, "triage", now=NOW, slo=SLO("triage", error_rate=0.05, period_days=7), source="raw")
    assert weekly["long_window"].to_list() == ["14m", "1h24m", "16h48m"]
    assert weekly["long_burn_rate"].to_list() == pytest.approx([17 / 840 / 0.05, 0.4, 0.4])  # ~2% against 5%
    assert not weekly["firing"].any()


def test_budgets_count_only_the_time_with_data_and_long_rules_wait_for_enough_of_it(client):
    """An hour of tasks failing 2% against a 0.1% budget: the 1h page fires, the 6h and 3d rules say
    not enough data instead of firing, and the budget says it covers one hour."""
    _seed(client)
    slo = SLO("triage", error_rate=0.001)
    for source in ("raw", "rollup"):
        frame = slo_status(client, "triage", now=NOW, slo=slo, source=source)
        assert frame.select("long_window", "long_burn_rate", "enough_data", "firing").rows() == [
            ("1h", pytest.approx(20), True, True), ("6h", pytest.approx(20), False, False),
            ("3d", pytest.approx(20), False, False)]
        assert set(frame["data_seconds"]) == {3600.0}
        assert data_note(frame["data_seconds"][0], 30) == "1.0 h of data"
        assert frame["budget_remaining"][0] == pytest.approx(1 - 72 / 3.6)  # over the hour there is

    # 7.5 minutes of data: the budget is over those minutes and no rule has enough data to fire.
    short = slo_status(client, "triage", now=NOW - timedelta(seconds=3600 - 450), slo=slo, source="raw")
    assert set(short["data_seconds"]) == {450.0} and not short["firing"].any() and not short["enough_data"].any()
    assert data_note(450, 30) == "7.5 min of data"

    # No data: no budget figure (NaN, not 100% left), nothing fires.
    empty = slo_status(client, "triage", now=NOW - timedelta(days=62), slo=slo, source="raw")
    assert empty["budget_remaining"].is_nan().all() and set(empty["data_seconds"]) == {0.0}
    assert not empty["firing"].any() and data_note(0, 30) == "no data in the period"
    assert data_note(40 * 86400, 30) == "the whole 30-day period"


@pytest.mark.parametrize("source", ["raw", "rollup"])
def test_availability_leaves_out_client_errors(client, source):
    """Tasks refused for their input (tracetune.error_kind=client, or a 4xx error.type) do not spend the
    availability budget; server errors and errors without a kind do."""
    rows = []
    for i in range(100):
        at = NOW - timedelta(seconds=i + 1)
        attrs = {"tracetune.pipeline": "triage"}
        if i < 10:
            attrs["tracetune.error_kind"] = "client"
        elif i < 15:
            attrs["error.type"] = "422"
        elif i < 18:
            attrs["tracetune.error_kind"] = "server"
        rows.append(_span(at, attrs, 100, i < 20, i))  # 15 client errors, 5 server (3 marked, 2 unmarked)
    client.insert("otel_traces", rows, column_names=COLUMNS)
    counts = request_counts(client, "triage", [3600], now=NOW, source=source).row(0, named=True)
    assert (counts["total"], counts["errors"], counts["client_errors"]) == (100, 5, 15)
    status = slo_status(client, "triage", now=NOW, slo=SLO("triage", error_rate=0.1), source=source)
    assert status["period_bad"][0] == 5 and status["period_client_errors"][0] == 15
    assert status["budget_remaining"][0] == pytest.approx(1 - 5 / (0.1 * 100))


def test_one_rule_for_enough_data_in_every_word():
    """An objective whose data does not cover its shortest long window says "not enough data" in the words
    every surface shows (slo_words), not "budget spent" from a few tasks; the rule fires nothing either."""
    from tracetune.analyzer.slo import budget_words, enough_data, slo_words

    assert enough_data(3600, 3600) and not enough_data(3599, 3600)
    assert budget_words(-0.3, 5.0, 30, data_seconds=720, judged_after_s=3600) == (
        "not enough data", "not enough data: 12.0 min of data, judged after 1 hour")
    assert budget_words(-0.3, 5.0, 30, data_seconds=3600, judged_after_s=3600)[0] == "budget spent"
    rule = {"pipeline": "reviews", "target_ms": 250.0, "error_budget": 0.05, "period_days": 30.0,
            "severity": "page", "firing": False, "long_burn_rate": 6.7, "data_seconds": 720.0}
    status = pl.DataFrame([
        {**rule, "slo": "latency_p95", "long_window": "1h", "long_window_s": 3600, "budget_remaining": -0.3},
        {**rule, "slo": "latency_p95", "long_window": "6h", "long_window_s": 21600, "budget_remaining": -0.3},
        {**rule, "slo": "availability", "target_ms": None, "long_window": "1h", "long_window_s": 3600,
         "budget_remaining": 1.0, "long_burn_rate": 0.0}])
    words = slo_words(status)
    assert words["state"].to_list() == ["not enough data", "not enough data"]
    judged = slo_words(status.with_columns(data_seconds=pl.lit(7200.0)))
    assert judged["state"].to_list() == ["budget spent", "on track"]
    both_on_track = status.with_columns(data_seconds=pl.lit(7200.0), long_burn_rate=pl.lit(0.5),
                                        budget_remaining=pl.Series([0.13, 0.13, 1.0]))
    assert slo_words(both_on_track)["status"][0] == "on track: 13% of the error budget left"  # least left first
