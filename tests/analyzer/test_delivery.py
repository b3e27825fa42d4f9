"""Alert delivery against real HTTP receivers on 127.0.0.1 and the real store.

The PagerDuty and Slack receivers here are local stand-ins answering as those services document
(PagerDuty Events API v2: 202 and a JSON status; Slack incoming webhooks: 200 `ok`); the bodies are
checked against the formats those services publish. Signatures are checked by a verifier written
in this file from the Standard Webhooks specification, not by tracetune's `sign`.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.servers import ThreadServer, free_port, wait_until
from tracetune import store
from tracetune.analyzer import delivery
from tracetune.analyzer.alerts import group_key
from tracetune.analyzer.delivery import (
    DeliveryWorker,
    Notification,
    PagerDutyReceiver,
    RetryPolicy,
    SlackReceiver,
    WebhookReceiver,
    deliver_due,
    deliveries,
    delivery_attempts,
    enqueue,
    new_secret,
    receivers_from_settings,
    send_now,
    sign,
)
from tracetune.base import settings as settings_mod

# ---- an independent Standard Webhooks verifier (from the specification's text) ----------------------

# The specification's published test vector (also in its reference libraries' tests).
VECTOR = {"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
          "timestamp": "1614265330", "body": b'{"test": 2432232314}',
          "signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None,
           tolerance: float = 300) -> None:
    """Raise AssertionError unless `webhook-signature` holds a v1 HMAC-SHA256 of `{id}.{timestamp}.{body}`
    under the base64 key after `whsec_`, and the timestamp (integer seconds) is within `tolerance`."""
    msg_id, stamp, signatures = headers["webhook-id"], headers["webhook-timestamp"], headers["webhook-signature"]
    assert stamp.isdigit(), f"webhook-timestamp {stamp!r} is not integer seconds"
    assert abs((time.time() if now is None else now) - int(stamp)) <= tolerance, "timestamp outside tolerance"
    assert "." not in msg_id
    key = base64.b64decode(secret.split("_", 1)[1])
    expected = hmac.new(key, b".".join([msg_id.encode(), stamp.encode(), body]), hashlib.sha256).digest()
    for entry in signatures.split(" "):
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(value), expected):
            return
    raise AssertionError(f"no v1 signature in {signatures!r} matches")


def test_the_independent_verifier_accepts_the_specification_vector():
    headers = {"webhook-id": VECTOR["id"], "webhook-timestamp": VECTOR["timestamp"],
               "webhook-signature": "v1a,c29tZXRoaW5nIGVsc2U= " + VECTOR["signature"]}
    verify(VECTOR["secret"], headers, VECTOR["body"], now=int(VECTOR["timestamp"]))
    with pytest.raises(AssertionError):
        verify(VECTOR["secret"], headers, b'{"test": 2432232315}', now=int(VECTOR["timestamp"]))


def test_sign_reproduces_the_specification_vector():
    assert sign(VECTOR["secret"], VECTOR["id"], int(VECTOR["timestamp"]), VECTOR["body"]) == VECTOR["signature"]
    assert sign(VECTOR["secret"], VECTOR["id"], int(VECTOR["timestamp"]), VECTOR["body"].decode()) == \
        VECTOR["signature"]


def test_new_secret_is_whsec_and_24_random_bytes():
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:], validate=True)) == 24
    assert secret != new_secret()


# ---- real receivers ---------------------------------------------------------------------------------

@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


async def _receive(request: Request) -> Response:
    state = request.app.state
    body = await request.body()
    seen = Seen(dict(request.headers), body)
    state.seen.append(seen)
    chosen = state.choose(seen) if state.choose else None
    status, headers, content = chosen or (state.answers.pop(0) if state.answers else state.default)
    return Response(content, status_code=status, headers=headers)


def receiver_app(*answers: tuple[int, dict, str], default: tuple[int, dict, str] = (200, {}, "ok"),
                 choose=None) -> Starlette:
    """A receiver that records every request and answers the scripted (status, headers, body) in turn
    (or what `choose(seen)` returns for a request, when it returns one)."""
    app = Starlette(routes=[Route("/{path:path}", _receive, methods=["POST"])])
    app.state.seen = []
    app.state.choose = choose
    app.state.answers = list(answers)
    app.state.default = default
    return app


SECRET = new_secret()
T0 = datetime.now(UTC).replace(microsecond=0)  # the outbox is read back over the last 7 days
FAST = RetryPolicy(base_seconds=0.2, cap_seconds=0.5, timeout_seconds=5)


def alert(fingerprint: str, status: str = "firing", severity: str = "page", **labels: str) -> dict:
    labels = {"alertname": "SLOBurnRate", "pipeline": "triage", "severity": severity, **labels}
    return {"status": status, "labels": labels,
            "annotations": {"summary": f"triage burns its error budget <fast> ({fingerprint})",
                            "description": "14.4x over 1h & 5m"},
            "startsAt": "2026-11-30T11:55:00Z",
            "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-30T12:10:00Z",
            "generatorURL": "http://127.0.0.1:8501/?page=slo&pipeline=triage", "fingerprint": fingerprint}


def notification(*alerts: dict, group: str = "triage") -> Notification:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    group_labels = {"alertname": "SLOBurnRate", "pipeline": group}
    return Notification(receiver="tracetune", group_key=group_key(group_labels),
                        status=status, alerts=list(alerts), group_labels=group_labels,
                        common_labels={**group_labels, "severity": "page"},
                        common_annotations={"description": "14.4x over 1h & 5m"},
                        external_url="http://127.0.0.1:8501", truncated_alerts=0)


# Alertmanager's webhook Message (notify/webhook/webhook.go: template.Data + version, groupKey,
# truncatedAlerts) and template.Alert, by their JSON names.
AM_FIELDS = {"version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels", "commonLabels",
             "commonAnnotations", "externalURL", "alerts", "notification_reason", "routeLabels"}
AM_ALERT_FIELDS = {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}


def check_alertmanager_v4(body: dict) -> None:
    assert set(body) == AM_FIELDS
    assert body["version"] == "4" and isinstance(body["truncatedAlerts"], int)
    assert body["status"] in ("firing", "resolved")
    for name in ("groupKey", "receiver", "externalURL"):
        assert isinstance(body[name], str)
    assert body["notification_reason"] in ("first notification", "new alerts added", "some alerts resolved",
                                           "all alerts resolved", "repeat interval elapsed")
    for name in ("groupLabels", "commonLabels", "commonAnnotations", "routeLabels"):
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in body[name].items())
    for item in body["alerts"]:
        assert set(item) == AM_ALERT_FIELDS
        assert item["status"] in ("firing", "resolved")
        for name in ("startsAt", "endsAt"):
            datetime.fromisoformat(item[name].replace("Z", "+00:00"))  # RFC 3339
        assert all(isinstance(v, str) for m in (item["labels"], item["annotations"]) for v in m.values())


def test_webhook_gets_the_alertmanager_v4_body_signed(client):
    app = receiver_app()
    with ThreadServer(app) as server:
        receiver = WebhookReceiver("webhook", f"{server.url}/hook", SECRET)
        sent = notification(alert("1a30ba71cca2921f"), alert("bc97ff14869b13e3", status="resolved"))
        ids = enqueue(client, sent, [receiver])
        assert [d["status"] for d in deliveries(client)] == ["pending"]
        summary = deliver_due(client, [receiver])
    assert summary["delivered"] == 1 and summary["attempted"] == 1
    [seen] = app.state.seen
    body = seen.json()
    check_alertmanager_v4(body)
    assert body == sent.alertmanager()
    assert body["alerts"][0]["fingerprint"] == "1a30ba71cca2921f" and body["receiver"] == "tracetune"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["webhook-id"] == ids[0] and ids[0].startswith("msg_")
    verify(SECRET, seen.headers, seen.body)
    with pytest.raises(AssertionError):
        verify(SECRET, seen.headers, seen.body.replace(b"firing", b"resolved"))
    with pytest.raises(AssertionError):
        verify(new_secret(), seen.headers, seen.body)
    [logged] = deliveries(client)
    assert (logged["delivery_id"], logged["status"], logged["attempts"], logged["http_status"]) == \
        (ids[0], "delivered", 1, 200)
    assert deliver_due(client, [receiver])["attempted"] == 0  # delivered once, not again


def test_a_receiver_down_for_a_while_gets_the_notification_when_it_returns(db_settings, client):
    port = free_port()
    receiver = WebhookReceiver("webhook", f"http://127.0.0.1:{port}/hook", SECRET)
    [delivery_id] = enqueue(client, notification(alert("1a30ba71cca2921f")), [receiver])
    app = receiver_app()
    with DeliveryWorker(store.connect(db_settings, ensure_schema=False), [receiver], FAST, interval=0.05):
        wait_until(lambda: len(delivery_attempts(client, delivery_id)) >= 3, 30, 0.1, "three refused attempts")
        with ThreadServer(app, port=port):
            wait_until(lambda: deliveries(client)[0]["status"] == "delivered", 30, 0.1, "delivery")
    attempts = delivery_attempts(client, delivery_id)
    assert all(a["status"] == "retrying" and a["http_status"] == 0 for a in attempts[:-1])
    assert "ConnectError" in attempts[0]["error"]
    assert attempts[-1]["status"] == "delivered" and attempts[-1]["attempt"] == len(attempts)
    [seen] = app.state.seen
    assert seen.headers["webhook-id"] == delivery_id
    verify(SECRET, seen.headers, seen.body)


_WORKER = """
import sys
from tracetune import store
from tracetune.base import settings
from tracetune.analyzer import delivery
s = settings.load()
receivers = delivery.receivers_from_settings(s)
policy = delivery.RetryPolicy(base_seconds=float(sys.argv[1]), cap_seconds=float(sys.argv[1]) * 2)
delivery.DeliveryWorker(store.connect(s, ensure_schema=False), receivers, policy, interval=0.05).run()
"""


def _start_worker(settings, log, base: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    env.update(settings.as_env())
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(base)], env=env, cwd=log.parent,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def test_a_restart_mid_retry_still_delivers(db_settings, client, tmp_path):
    """A worker process is killed (SIGKILL) while retrying; a new process resumes from the outbox."""
    app = receiver_app(default=(503, {}, "upstream down"))
    with ThreadServer(app) as server:
        settings = db_settings.replace(home=tmp_path / "home", alert_webhook_url=f"{server.url}/am",
                                       alert_webhook_secret=SECRET)
        [delivery_id] = enqueue(client, notification(alert("1a30ba71cca2921f")), receivers_from_settings(settings))
        first = _start_worker(settings, tmp_path / "first.log", base=0.2)
        try:
            wait_until(lambda: len(app.state.seen) >= 2 or first.poll() is not None, 60, 0.05, "two attempts")
            assert first.poll() is None, (tmp_path / "first.log").read_text()
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
        tried = len(app.state.seen)
        wait_until(lambda: len(delivery_attempts(client, delivery_id)) >= tried - 1, 10, 0.1, "attempts recorded")
        assert deliveries(client)[0]["status"] == "retrying"
        app.state.default = (200, {}, "ok")
        second = _start_worker(settings, tmp_path / "second.log", base=0.2)
        try:
            wait_until(lambda: deliveries(client)[0]["status"] == "delivered", 60, 0.1,
                       "delivery by the second process")
        finally:
            os.killpg(second.pid, signal.SIGTERM)
            second.wait(10)
    assert len(app.state.seen) > tried
    assert {s.headers["webhook-id"] for s in app.state.seen} == {delivery_id}  # receivers can deduplicate
    for seen in app.state.seen:
        verify(SECRET, seen.headers, seen.body)
    assert len({s.body for s in app.state.seen}) == 1
    attempts = delivery_attempts(client, delivery_id)
    assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
    assert attempts[-1]["status"] == "delivered" and attempts[-1]["http_status"] == 200


def test_other_4xx_is_a_recorded_permanent_failure(client):
    app = receiver_app((400, {}, "bad payload"))
    with ThreadServer(app) as server:
        receiver = WebhookReceiver("webhook", server.url, SECRET)
        [delivery_id] = enqueue(client, notification(alert("1a30ba71cca2921f")), [receiver], now=T0)
        assert deliver_due(client, [receiver], now=T0)["failed"] == 1
        assert deliver_due(client, [receiver], now=T0 + timedelta(hours=2))["attempted"] == 0
    assert len(app.state.seen) == 1
    [logged] = deliveries(client, status="failed")
    assert (logged["delivery_id"], logged["http_status"], logged["attempts"]) == (delivery_id, 400, 1)
    assert "HTTP 400" in logged["error"] and "bad payload" in logged["error"]
    assert logged["next_attempt_at"] is None
    assert deliveries(client, status="pending") == []


def test_429_and_503_retry_after_are_honoured_with_the_same_webhook_id(client):
    retry_date = email.utils.format_datetime(T0 + timedelta(seconds=121 + 300), usegmt=True)
    app = receiver_app((429, {"retry-after": "120"}, "slow down"), (503, {"retry-after": retry_date}, ""))
    fast = RetryPolicy(base_seconds=0.1, cap_seconds=1)
    with ThreadServer(app) as server:
        receiver = WebhookReceiver("webhook", server.url, SECRET)
        [delivery_id] = enqueue(client, notification(alert("1a30ba71cca2921f")), [receiver], now=T0)
        assert deliver_due(client, [receiver], now=T0, policy=fast)["retrying"] == 1
        [first] = delivery_attempts(client, delivery_id)
        assert first["http_status"] == 429
        assert 120 <= (first["next_attempt_at"] - T0).total_seconds() < 122
        assert deliver_due(client, [receiver], now=T0 + timedelta(seconds=60), policy=fast) == \
            {"attempted": 0, "delivered": 0, "retrying": 0, "failed": 0, "waiting": 1}
        assert deliver_due(client, [receiver], now=T0 + timedelta(seconds=121), policy=fast)["retrying"] == 1
        second = delivery_attempts(client, delivery_id)[1]
        assert second["http_status"] == 503
        assert 299 <= (second["next_attempt_at"] - T0 - timedelta(seconds=121)).total_seconds() < 302
        assert deliver_due(client, [receiver], now=T0 + timedelta(seconds=200), policy=fast)["attempted"] == 0
        assert deliver_due(client, [receiver], now=T0 + timedelta(seconds=430), policy=fast)["delivered"] == 1
    assert [s.headers["webhook-id"] for s in app.state.seen] == [delivery_id] * 3
    assert len({s.body for s in app.state.seen}) == 1


def test_backoff_is_exponential_with_jitter_capped_and_gives_up(client):
    policy = RetryPolicy(base_seconds=5, cap_seconds=600, random=lambda: 1.0)
    assert [policy.delay(n) for n in (1, 2, 3, 8, 9, 30)] == [5, 10, 20, 600, 600, 600]
    assert RetryPolicy(base_seconds=5, random=lambda: 0.0).delay(3) == 10  # at least half the ceiling
    assert policy.delay(1, retry_after=90) == 90
    app = receiver_app(default=(500, {}, "boom"))
    give_up = RetryPolicy(base_seconds=1, cap_seconds=10, give_up_seconds=60)
    with ThreadServer(app) as server:
        receiver = WebhookReceiver("webhook", server.url, SECRET)
        enqueue(client, notification(alert("1a30ba71cca2921f")), [receiver], now=T0)
        assert deliver_due(client, [receiver], now=T0, policy=give_up)["retrying"] == 1
        assert deliver_due(client, [receiver], now=T0 + timedelta(seconds=59), policy=give_up)["failed"] == 1
    [logged] = deliveries(client)
    assert logged["status"] == "failed" and logged["attempts"] == 2 and "gave up after 2 attempts" in logged["error"]


def test_resolved_is_delivered_after_its_firing_in_order(client):
    busy = []

    def once_busy_for_triage(seen: Seen):  # groups go out concurrently: refuse triage's first, whatever comes first
        if seen.json()["groupLabels"].get("pipeline") == "triage" and not busy:
            busy.append(seen)
            return 503, {}, "busy"
        return None

    app = receiver_app(choose=once_busy_for_triage)
    with ThreadServer(app) as server:
        receiver = WebhookReceiver("webhook", server.url, SECRET)
        firing = enqueue(client, notification(alert("1a30ba71cca2921f")), [receiver], now=T0)
        resolved = enqueue(client, notification(alert("1a30ba71cca2921f", status="resolved")), [receiver], now=T0)
        other = enqueue(client, notification(alert("c6eadffa33fcdf37", pipeline="reviews"), group="reviews"),
                        [receiver], now=T0)
        first = deliver_due(client, [receiver], now=T0, policy=FAST)
        assert [s.headers["webhook-id"] for s in app.state.seen if s.headers["webhook-id"] != other[0]] == firing
        assert first == {"attempted": 2, "delivered": 1, "retrying": 1, "failed": 0, "waiting": 1}
        assert deliver_due(client, [receiver], now=T0 + timedelta(minutes=1), policy=FAST)["delivered"] == 2
    ids = [s.headers["webhook-id"] for s in app.state.seen if s.headers["webhook-id"] != other[0]]
    assert ids == [*firing, *firing, *resolved]
    assert [s.json()["status"] for s in app.state.seen if s.headers["webhook-id"] != other[0]] == \
        ["firing", "firing", "resolved"]
    assert {d["status"] for d in deliveries(client)} == {"delivered"}


def test_pagerduty_gets_one_event_per_alert(client):
    """A stand-in for https://events.pagerduty.com/v2/enqueue answering as PagerDuty documents (202)."""
    answer = (202, {"content-type": "application/json"},
              '{"status":"success","message":"Event processed","dedup_key":"x"}')
    app = receiver_app(answer, answer)
    with ThreadServer(app) as server:
        receiver = PagerDutyReceiver("pagerduty", "R0UTINGKEY0000000000000000000000", f"{server.url}/v2/enqueue",
                                     SECRET)
        sent = notification(alert("1a30ba71cca2921f"), alert("bc97ff14869b13e3", status="resolved"),
                            alert("c6eadffa33fcdf37", severity="ticket", step="classify"))
        ids = enqueue(client, sent, [receiver])
        assert deliver_due(client, [receiver])["delivered"] == 3
        stored = {d["delivery_id"]: d["body"] for d in deliveries(client)}
    trigger, resolve, ticket = (s.json() for s in app.state.seen)
    assert [s.headers["webhook-id"] for s in app.state.seen] == ids
    for seen in app.state.seen:
        verify(SECRET, seen.headers, seen.body)
    assert resolve == {"routing_key": "R0UTINGKEY0000000000000000000000", "event_action": "resolve",
                       "dedup_key": "bc97ff14869b13e3"}
    assert trigger["routing_key"] == "R0UTINGKEY0000000000000000000000"
    assert trigger["event_action"] == "trigger" and trigger["dedup_key"] == "1a30ba71cca2921f"
    payload = trigger["payload"]
    assert {"summary", "source", "severity"} <= set(payload)
    assert payload["severity"] == "critical" and ticket["payload"]["severity"] == "warning"
    assert payload["summary"].startswith("triage burns its error budget") and len(payload["summary"]) <= 1024
    assert payload["source"] == "triage" and ticket["payload"]["component"] == "classify"
    assert (payload["group"], payload["class"]) == ("triage", "SLOBurnRate")
    assert payload["timestamp"] == "2026-11-30T11:55:00Z"
    assert payload["custom_details"]["labels"]["alertname"] == "SLOBurnRate"
    assert trigger["links"] == [{"href": "http://127.0.0.1:8501/?page=slo&pipeline=triage",
                                 "text": "Open in tracetune"}]
    assert all("R0UTINGKEY" not in body for body in stored.values())  # the key is never stored


def test_pagerduty_severity_mapping():
    assert [delivery.pagerduty_severity(s) for s in ("page", "ticket", "critical", "warning", "", None, "x")] == \
        ["critical", "warning", "critical", "warning", "info", "info", "info"]


def test_slack_gets_a_readable_summary(client):
    """A stand-in for a Slack incoming webhook (hooks.slack.com/services/...), answering 200 `ok`."""
    app = receiver_app()
    with ThreadServer(app) as server:
        receiver = SlackReceiver("slack", f"{server.url}/services/T000/B000/XXXX", SECRET)
        sent = notification(alert("1a30ba71cca2921f"), alert("bc97ff14869b13e3", status="resolved"))
        enqueue(client, sent, [receiver])
        assert deliver_due(client, [receiver])["delivered"] == 1
    [seen] = app.state.seen
    verify(SECRET, seen.headers, seen.body)
    body = seen.json()
    assert set(body) == {"text", "blocks"}
    assert body["text"].startswith("[FIRING:1] SLOBurnRate triage (page)")
    header, *sections = body["blocks"]
    assert header == {"type": "header", "text": {"type": "plain_text", "text": "[FIRING:1] SLOBurnRate triage (page)"}}
    assert [s["type"] for s in sections] == ["section", "section"]
    text = sections[0]["text"]
    assert text["type"] == "mrkdwn" and len(text["text"]) <= 3000
    assert "&lt;fast&gt;" in text["text"] and "&amp;" in text["text"] and "<fast>" not in text["text"]
    assert "<http://127.0.0.1:8501/?page=slo&pipeline=triage|Open in tracetune>" in text["text"]


def test_a_receiver_no_longer_configured_is_a_recorded_failure(client):
    receiver = WebhookReceiver("webhook", "http://127.0.0.1:9/", SECRET)
    enqueue(client, notification(alert("1a30ba71cca2921f")), [receiver])
    assert deliver_due(client, [])["failed"] == 1
    [logged] = deliveries(client)
    assert "not configured any more" in logged["error"]


# ---- settings --------------------------------------------------------------------------------------

def _load(tmp_path, **values):
    return settings_mod.load(config_file=tmp_path / "none.toml", environ={}, home=str(tmp_path / "home"), **values)


def test_receivers_from_settings_with_a_generated_secret(tmp_path):
    assert receivers_from_settings(_load(tmp_path)) == []
    assert not (tmp_path / "home" / "alert_webhook.secret").exists()
    settings = _load(tmp_path, alert_webhook_url="https://hooks.example/am", alert_slack_url="https://hooks.slack.com/x",
                     alert_pagerduty_routing_key="k" * 32)
    webhook, slack, pagerduty = receivers_from_settings(settings)
    path = tmp_path / "home" / "alert_webhook.secret"
    assert path.stat().st_mode & 0o777 == 0o600
    secret = path.read_text().strip()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    assert webhook == WebhookReceiver("webhook", "https://hooks.example/am", secret)
    assert slack == SlackReceiver("slack", "https://hooks.slack.com/x", secret)
    assert pagerduty == PagerDutyReceiver("pagerduty", "k" * 32, "https://events.pagerduty.com/v2/enqueue", secret)
    assert receivers_from_settings(settings)[0].secret == secret  # generated once


def test_alert_settings_are_validated(tmp_path):
    with pytest.raises(settings_mod.SettingsError, match="alert_webhook_url .* must be an http"):
        _load(tmp_path, alert_webhook_url="hooks.example/am")
    with pytest.raises(settings_mod.SettingsError, match="alert_webhook_secret .* whsec_"):
        _load(tmp_path, alert_webhook_secret="hunter2")
    with pytest.raises(settings_mod.SettingsError, match="alert_webhook_secret"):
        _load(tmp_path, alert_webhook_secret="whsec_c2hvcnQ=")  # 5 bytes
    env = {"TRACETUNE_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/am", "TRACETUNE_ALERT_WEBHOOK_SECRET": SECRET}
    settings = settings_mod.load(config_file=tmp_path / "none.toml", environ=env)
    assert (settings.alert_webhook_url, settings.alert_secret()) == ("http://127.0.0.1:9/am", SECRET)


@pytest.mark.parametrize("by_hand", [True, False])
def test_an_item_sent_now_is_never_pending_for_the_analyzers_worker(client, db_settings, by_hand):
    """`tracetune alerts test` sends while the analyzer's worker drains the same outbox: one sender per item.
    While its first attempt is in flight, the item must not be pending (the worker would send it too, with
    the same webhook-id); enqueued the ordinary way it is, which is what the worker is for."""
    from tracetune import store

    other = store.connect(db_settings, ensure_schema=False)  # what the worker sees, from another connection
    pending_during_send = []
    app = receiver_app(choose=lambda seen: pending_during_send.append(
        [d["delivery_id"] for d in deliveries(other, status="pending")]))
    with ThreadServer(app) as server:
        receiver = WebhookReceiver("webhook", f"{server.url}/hook", SECRET)
        if by_hand:
            ids = send_now(client, notification(alert("1a30ba71cca2921f")), [receiver])
            assert pending_during_send == [[]]
            assert deliver_due(client, [receiver])["attempted"] == 0
        else:
            ids = enqueue(client, notification(alert("1a30ba71cca2921f")), [receiver])
            deliver_due(client, [receiver])
            assert pending_during_send == [ids]
    assert len(app.state.seen) == 1
    assert [(d["delivery_id"], d["status"], d["attempts"]) for d in deliveries(client)] == [(ids[0], "delivered", 1)]
