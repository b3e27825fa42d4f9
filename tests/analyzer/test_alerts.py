"""Alert rules, state, grouping and silences: pure on constructed conditions, then on a real store with
a real receiver (a burning SLO built from real spans pages on-call and resolves when the burn stops)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.analyzer.test_delivery import SECRET, check_alertmanager_v4, receiver_app, verify
from tests.servers import ThreadServer
from tests.spans import COLUMNS, span_row
from tracetune.analyzer import SLO, save_slo, slo_status
from tracetune.analyzer.alerts import (
    Condition,
    Engine,
    Matcher,
    Silence,
    Timing,
    add_silence,
    advance,
    current_alerts,
    expire_silence,
    fingerprint,
    group_key,
    group_notifications,
    list_silences,
    slo_conditions,
)
from tracetune.analyzer.delivery import WebhookReceiver, deliver_due

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def burn(pipeline: str = "shop", severity: str = "page", rate: float = 20.0) -> Condition:
    return Condition("slo_burn", {"alertname": "SLOBurnRate", "pipeline": pipeline, "slo": "availability",
                                  "severity": severity, "rule": "slo_burn"},
                     {"summary": f"{pipeline} burning {rate}x"}, rate)


def costly(pipeline: str = "shop") -> Condition:
    return Condition("cost", {"alertname": "CostOverBudget", "pipeline": pipeline, "severity": "ticket",
                              "rule": "cost"}, {"summary": "dear"}, 1.0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ---- Alertmanager's ids, exactly --------------------------------------------------------------------

def test_fingerprints_and_group_keys_are_alertmanagers():
    """Fingerprint: prometheus/common model.LabelSet.Fingerprint (its own test vectors, model/signature_test.go);
    groupKey: dispatch aggrGroup.GroupKey, the root route's key `{}` and LabelSet.String (Go-quoted values)."""
    assert fingerprint({}) == f"{14695981039346656037:016x}"
    assert fingerprint({"name": "garland, briggs", "fear": "love is not enough"}) == f"{5799056148416392346:016x}"
    assert fingerprint({"a": "bc"}) != fingerprint({"ab": "c"})  # the separator byte keeps them apart
    assert group_key({"pipeline": "ticket_triage", "alertname": "FeatureDrift"}) == \
        '{}:{alertname="FeatureDrift", pipeline="ticket_triage"}'
    assert group_key({"a": 'say "hi"\\\n\x01é'}) == '{}:{a="say \\"hi\\"\\\\\\n\\x01é"}'


def test_each_notification_says_why_it_goes_out_in_alertmanagers_words():
    timing = Timing(group_wait=0, group_interval=60, repeat_interval=600)
    groups: dict = {}
    alerts, _ = advance({}, [burn()], at(0))
    [first] = group_notifications(alerts.values(), groups, [], at(0), timing)
    assert (first.notification_reason, first.group_key) == ("first notification",
                                                            '{}:{alertname="SLOBurnRate", pipeline="shop"}')
    assert first.alertmanager()["notification_reason"] == "first notification"
    assert first.alertmanager()["routeLabels"] == {}
    other = Condition("slo_burn", {**burn().labels, "slo": "latency_p95"}, {}, 20.0)
    alerts, _ = advance(alerts, [burn(), other], at(60))
    [added] = group_notifications(alerts.values(), groups, [], at(60), timing)
    assert added.notification_reason == "new alerts added"
    alerts, _ = advance(alerts, [burn()], at(120))
    [some] = group_notifications(alerts.values(), groups, [], at(120), timing)
    assert some.notification_reason == "some alerts resolved"
    [again] = group_notifications(alerts.values(), groups, [], at(720), timing)
    assert again.notification_reason == "repeat interval elapsed"
    alerts, _ = advance(alerts, [], at(800))
    [done] = group_notifications(alerts.values(), groups, [], at(800), timing)
    assert (done.notification_reason, done.status) == ("all alerts resolved", "resolved")


# ---- state ------------------------------------------------------------------------------------------

def test_an_alert_fires_at_once_or_after_its_for_duration_and_resolves_when_its_condition_goes():
    alerts, changed = advance({}, [burn(), costly()], at(0))
    states = {a.rule: a.state for a in alerts.values()}
    assert states == {"slo_burn": "firing", "cost": "pending"}  # cost has `for: 5m`
    assert {a.rule for a in changed} == {"slo_burn", "cost"}
    alerts, changed = advance(alerts, [burn(rate=30), costly()], at(240))
    assert changed == [] and {a.rule: a.state for a in alerts.values()}["cost"] == "pending"
    assert alerts[fingerprint(burn().labels)].annotations["summary"] == "shop burning 30x"  # numbers follow
    alerts, changed = advance(alerts, [burn(), costly()], at(300))
    assert [(a.rule, a.state) for a in changed] == [("cost", "firing")]
    alerts, changed = advance(alerts, [costly()], at(360))
    resolved = alerts[fingerprint(burn().labels)]
    assert (resolved.state, resolved.resolved_at, resolved.fired_at) == ("resolved", at(360), at(0))
    assert resolved.to_alertmanager()["endsAt"] == "2026-11-30T12:06:00Z"
    # A pending alert whose condition goes away is dropped without ever firing.
    pending, _ = advance({}, [costly("other")], at(0))
    gone, changed = advance(pending, [], at(60))
    assert gone == {} and [a.state for a in changed] == ["inactive"]


# ---- grouping ---------------------------------------------------------------------------------------

TIMING = Timing(group_wait=30, group_interval=300, repeat_interval=3600)


def test_notifications_wait_for_the_group_then_batch_repeat_and_resolve():
    groups: dict = {}
    alerts, _ = advance({}, [burn(severity="page")], at(0))
    assert group_notifications(alerts.values(), groups, [], at(0), TIMING) == []  # group_wait
    alerts, _ = advance(alerts, [burn(severity="page"), burn(severity="ticket")], at(20))
    first = group_notifications(alerts.values(), groups, [], at(30), TIMING)
    assert len(first) == 1 and first[0].status == "firing"
    assert sorted(a["labels"]["severity"] for a in first[0].alerts) == ["page", "ticket"]  # both, in one
    assert first[0].group_labels == {"alertname": "SLOBurnRate", "pipeline": "shop"}
    assert first[0].common_labels["slo"] == "availability" and "severity" not in first[0].common_labels
    # Nothing new: nothing sent until the repeat interval.
    assert group_notifications(alerts.values(), groups, [], at(600), TIMING) == []
    assert len(group_notifications(alerts.values(), groups, [], at(3630), TIMING)) == 1
    # The ticket alert resolves: told after group_interval, the page one still firing alongside.
    alerts, _ = advance(alerts, [burn(severity="page")], at(3700))
    assert group_notifications(alerts.values(), groups, [], at(3800), TIMING) == []
    changed = group_notifications(alerts.values(), groups, [], at(3930), TIMING)
    assert [(a["labels"]["severity"], a["status"]) for a in changed[0].alerts] == [("page", "firing"),
                                                                                   ("ticket", "resolved")]
    assert changed[0].status == "firing"
    alerts, _ = advance(alerts, [], at(4000))
    done = group_notifications(alerts.values(), groups, [], at(4230), TIMING)
    assert done[0].status == "resolved" and [a["status"] for a in done[0].alerts] == ["resolved"]
    assert group_notifications(alerts.values(), groups, [], at(9000), TIMING) == []  # resolved once, then quiet
    assert groups == {}


def test_a_silenced_alert_is_not_notified_and_matchers_read_like_alertmanagers():
    alerts, _ = advance({}, [burn("shop"), burn("bar")], at(0))
    silence = Silence("s1", (Matcher.parse("pipeline=shop"), Matcher.parse("severity=~page|ticket")), at(0), at(600))
    groups: dict = {}
    assert group_notifications(alerts.values(), groups, [silence], at(0), TIMING) == []  # group_wait
    sent = group_notifications(alerts.values(), groups, [silence], at(60), TIMING)
    assert [n.group_labels["pipeline"] for n in sent] == ["bar"]
    assert not silence.silences(burn("shop").labels, at(600))  # ended
    assert Matcher.parse("severity!=page").matches({"severity": "ticket"})
    assert not Matcher.parse("alertname!~SLO.*").matches({"alertname": "SLOBurnRate"})
    assert str(Matcher.parse('pipeline="shop"')) == "pipeline=shop"
    for bad in ("no operator", "1x=y", "a=~(unclosed"):
        with pytest.raises(ValueError):
            Matcher.parse(bad)


# ---- on a real store, to a real receiver ---------------------------------------------------------------

NOW = datetime.now(UTC).replace(microsecond=0)


def _tasks(client, start: datetime, minutes: int, error_every: int, first: int) -> None:
    """A task a second for `minutes` from `start` (root spans of pipeline shop), every `error_every`-th failing."""
    rows = [span_row(int((start + timedelta(seconds=i)).timestamp()) * 10**9, trace_id=f"{first + i:032x}",
                     span_id=f"{first + i:016x}", name="shop", kind="Server", attrs={"tracetune.pipeline": "shop"},
                     duration=50_000_000, status="Error" if error_every and i % error_every == 0 else "Unset")
            for i in range(minutes * 60)]
    client.insert("otel_traces", rows, column_names=COLUMNS)


@pytest.fixture
def hook():
    app = receiver_app()
    with ThreadServer(app) as server:
        yield app.state.seen, WebhookReceiver("webhook", f"{server.url}/alerts", SECRET)


def _evaluate(client, engine: Engine, now: datetime) -> list:
    engine.evaluate(slo_conditions(slo_status(client, "shop", now=now, source="raw"), engine.external_url), now)
    sent = engine.notify(now)
    deliver_due(client, engine.receivers)
    return sent


def test_a_burning_slo_built_from_real_spans_pages_and_resolves_when_the_burn_stops(client, hook):
    seen, receiver = hook
    save_slo(client, SLO(pipeline="shop", error_rate=0.001))
    _tasks(client, NOW - timedelta(minutes=70), 70, error_every=10, first=1)  # 10% failing: burn rate 100
    engine = Engine(client, [receiver], Timing(group_wait=0, group_interval=0), external_url="http://dash")
    assert len(_evaluate(client, engine, NOW)) == 1
    assert len(seen) == 1
    verify(SECRET, seen[0].headers, seen[0].body)
    body = seen[0].json()
    check_alertmanager_v4(body)
    assert body["status"] == "firing" and body["groupLabels"] == {"alertname": "SLOBurnRate", "pipeline": "shop"}
    page = next(a for a in body["alerts"] if a["labels"]["severity"] == "page")
    assert page["labels"]["slo"] == "availability" and "100.0x" in page["annotations"]["description"]
    assert page["annotations"]["dashboard"] == "http://dash/?page=slo&pipeline=shop"
    assert {a.labels["severity"]: a.state for a in current_alerts(client).values()}["page"] == "firing"

    # The burn stops: 35 minutes of clean tasks empty both page rules' short windows (5m, 30m).
    later = NOW + timedelta(minutes=35)
    _tasks(client, NOW, 35, error_every=0, first=100_000)
    _evaluate(client, engine, later)
    assert len(seen) == 2
    resolved = {a["labels"]["severity"]: a for a in seen[1].json()["alerts"]}
    assert resolved["page"]["status"] == "resolved" and resolved["page"]["endsAt"] != "0001-01-01T00:00:00Z"
    assert seen[1].headers["webhook-id"] != seen[0].headers["webhook-id"]
    # A restarted analyzer reads the same state back, and has nothing new to say.
    again = Engine(client, [receiver], Timing(group_wait=0, group_interval=0))
    assert again.alerts.keys() == engine.alerts.keys() and again.notify(later) == []


def test_a_silenced_alert_is_not_delivered(client, hook):
    seen, receiver = hook
    save_slo(client, SLO(pipeline="shop", error_rate=0.001))
    _tasks(client, NOW - timedelta(minutes=70), 70, error_every=5, first=1)
    add_silence(client, [Matcher.parse("pipeline=shop")], NOW + timedelta(hours=1), starts_at=NOW - timedelta(hours=1),
                comment="known")
    engine = Engine(client, [receiver], Timing(group_wait=0, group_interval=0))
    assert _evaluate(client, engine, NOW) == [] and seen == []
    assert any(a.state == "firing" for a in current_alerts(client).values())  # firing, just not notified
    silence = list_silences(client)[0]
    expire_silence(client, silence.silence_id, NOW)
    assert len(_evaluate(client, engine, NOW + timedelta(seconds=1))) == 1 and len(seen) == 1


def test_drift_cost_and_tuner_rules_turn_findings_into_conditions(client):
    import polars as pl

    from tracetune.analyzer import DRIFT_COLUMNS
    from tracetune.analyzer.alerts import cost_conditions, drift_conditions, tuner_conditions
    from tracetune.tuner import decisions

    row = {"computed_at": NOW, "pipeline": "shop", "step": "classify", "feature": "category", "kind": "categorical",
           "statistic": "js", "value": 0.31, "p_value": 0.001, "n_reference": 600, "n_current": 580,
           "reference_start": NOW, "reference_end": NOW, "current_start": NOW, "current_end": NOW, "status": "drift"}
    frame = pl.DataFrame([row, {**row, "statistic": "chi2", "value": 90.0}, {**row, "feature": "length",
                                                                                "status": "ok"}])
    (drift,) = drift_conditions(frame.select(DRIFT_COLUMNS), "http://dash")
    assert drift.labels == {"alertname": "FeatureDrift", "pipeline": "shop", "step": "classify",
                            "feature": "category", "severity": "ticket", "rule": "drift"}
    assert "580 current against 600 reference" in drift.annotations["description"]
    assert drift_conditions(frame.filter(pl.col("status") == "ok").select(DRIFT_COLUMNS)) == []

    (cost,) = cost_conditions({"shop": 0.02, "bar": 0.001}, {"shop": 0.012, "bar": 0.012, "baz": 0.01})
    assert cost.labels["pipeline"] == "shop" and "67% above its budget" in cost.annotations["description"]
    assert cost.for_seconds == 300

    decisions.record(client, decisions.Decision("shop", "canary_rollback", 7, 6, {}, {}, "canary slower (p95 900 ms)"))
    (rolled,) = tuner_conditions(client, datetime.now(UTC))
    assert rolled.labels["alertname"] == "TunerCanaryRolledBack"
    assert "canary slower" in rolled.annotations["description"]
    assert tuner_conditions(client, datetime.now(UTC) + timedelta(hours=2)) == []
