"""Alert delivery: receivers, Standard Webhooks signatures and a durable outbox in ClickHouse.

The rules engine hands over a `Notification`; `enqueue` writes one outbox row per request to send
(`tracetune_alert_outbox`, store/sql/044_*) before anything is sent; `deliver_due` (run by a
`DeliveryWorker`) sends what is due and appends each attempt to `tracetune_alert_deliveries`.
Delivery is at least once: a crash between a send and its record sends again on restart, with the
same `webhook-id`, so receivers deduplicate on it. One process drains the outbox (the analyzer):
two deliverers over the same database would each send every delivery, so several analyzers take
turns by a lease (`DeliveryWorker(active=...)`, docs/alerts.md "Several replicas").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import random
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx

from tracetune.retrying import is_retryable_status, parse_retry_after
from tracetune.settings import Settings

__all__ = ["Notification", "Receiver", "WebhookReceiver", "SlackReceiver", "PagerDutyReceiver",
           "pagerduty_severity", "receivers_from_settings", "sign", "new_secret", "RetryPolicy", "enqueue",
           "deliver_due", "send_now", "deliveries", "delivery_attempts", "DeliveryWorker", "OUTBOX_TABLE",
           "DELIVERIES_TABLE"]

log = logging.getLogger("tracetune.analyzer.delivery")

OUTBOX_TABLE = "tracetune_alert_outbox"
DELIVERIES_TABLE = "tracetune_alert_deliveries"
_OUTBOX_COLUMNS = ["created_at", "delivery_id", "receiver", "kind", "group_key", "notification_status", "body"]
_DELIVERY_COLUMNS = ["recorded_at", "delivery_id", "receiver", "attempt", "status", "http_status", "error",
                     "duration_ms", "next_attempt_at"]
_USER_AGENT = "tracetune-alerts"
_SECRET_PREFIX = "whsec_"


# ---- notifications ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Notification:
    """One group notification as the rules engine hands it over, in Alertmanager's terms.

    `alerts` are dicts already in Alertmanager v4 alert shape (status, labels, annotations, startsAt,
    endsAt, generatorURL, fingerprint); `receiver` is the route name written into the webhook body.
    """

    receiver: str
    group_key: str
    status: str  # firing (some alert fires) | resolved (all resolved)
    alerts: list[dict[str, Any]]
    group_labels: dict[str, str] = field(default_factory=dict)
    common_labels: dict[str, str] = field(default_factory=dict)
    common_annotations: dict[str, str] = field(default_factory=dict)
    external_url: str = ""
    truncated_alerts: int = 0
    notification_reason: str = "first notification"  # Alertmanager's NotifyReason words
    route_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in ("firing", "resolved"):
            raise ValueError(f"Notification.status must be 'firing' or 'resolved', got {self.status!r}")

    def alertmanager(self) -> dict[str, Any]:
        """The body Alertmanager's webhook_config POSTs (version 4), field for field and in its order
        (notify/webhook `Message`: template `Data`, then version, groupKey, truncatedAlerts)."""
        return {
            "receiver": self.receiver,
            "status": self.status,
            "alerts": [dict(alert) for alert in self.alerts],
            "notification_reason": self.notification_reason,
            "groupLabels": dict(self.group_labels),
            "commonLabels": dict(self.common_labels),
            "commonAnnotations": dict(self.common_annotations),
            "routeLabels": dict(self.route_labels),
            "externalURL": self.external_url,
            "version": "4",
            "groupKey": self.group_key,
            "truncatedAlerts": int(self.truncated_alerts),
        }

    def title(self) -> str:
        """Alertmanager's default subject: `[FIRING:2] <group label values> (<other common label values>)`."""
        firing = sum(1 for a in self.alerts if a.get("status") == "firing")
        head = f"[FIRING:{firing}]" if self.status == "firing" else "[RESOLVED]"
        values = [v for _, v in sorted(self.group_labels.items())]
        extra = [v for k, v in sorted(self.common_labels.items()) if k not in self.group_labels]
        return " ".join([head, *values, *([f"({' '.join(extra)})"] if extra else [])])


# ---- signatures (Standard Webhooks, symmetric) -------------------------------------------------------

def new_secret() -> str:
    """A fresh signing secret: `whsec_` and the base64 of 24 random bytes."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _secret_key(secret: str) -> bytes:
    raw = secret[len(_SECRET_PREFIX):] if secret.startswith(_SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ValueError("a webhook secret must be whsec_ followed by base64 (make one with delivery.new_secret())")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """`v1,<base64 HMAC-SHA256>` of `{msg_id}.{timestamp}.{body}`: the `webhook-signature` value."""
    payload = body.encode() if isinstance(body, str) else body
    content = f"{msg_id}.{int(timestamp)}.".encode() + payload
    digest = hmac.new(_secret_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


_last_id_ns = 0
_id_lock = threading.Lock()


def _new_delivery_id() -> str:
    """`msg_` + 16 hex digits of nanoseconds (strictly increasing in a process) + 8 random hex digits."""
    global _last_id_ns
    with _id_lock:
        _last_id_ns = max(time.time_ns(), _last_id_ns + 1)
        stamp = _last_id_ns
    return f"msg_{stamp:016x}{secrets.token_hex(4)}"


# ---- receivers -------------------------------------------------------------------------------------

class Receiver(ABC):
    """Where notifications go. `payloads` is what the outbox stores (no secrets); `request` what is sent.

    `name` finds the receiver again when a restarted process resumes its pending deliveries; with a
    `secret` (whsec_...) every request is signed per Standard Webhooks.
    """

    kind: ClassVar[str] = ""
    name: str
    secret: str

    @abstractmethod
    def payloads(self, notification: Notification) -> list[dict[str, Any]]:
        """The bodies to send for `notification` (one, or one per alert)."""

    @abstractmethod
    def request(self, body: str) -> tuple[str, bytes]:
        """(url, exact bytes to POST) for a stored body."""

    def headers(self, delivery_id: str, body: bytes, now: float | None = None) -> dict[str, str]:
        """JSON content type and, with a secret, `webhook-id`, `webhook-timestamp`, `webhook-signature`."""
        stamp = int(time.time() if now is None else now)
        headers = {"content-type": "application/json", "user-agent": _USER_AGENT, "webhook-id": delivery_id,
                   "webhook-timestamp": str(stamp)}
        if self.secret:
            headers["webhook-signature"] = sign(self.secret, delivery_id, stamp, body)
        return headers


def _check_url(kind: str, url: str) -> None:
    parts = httpx.URL(url)
    if parts.scheme not in ("http", "https") or not parts.host:
        raise ValueError(f"{kind} receiver URL must be an http(s) URL, got {url!r}")


@dataclass(frozen=True)
class _UrlReceiver(Receiver):
    """A receiver that POSTs each stored body as it is to one URL (checked when it is made)."""

    name: str
    url: str
    secret: str = ""

    def __post_init__(self) -> None:
        _check_url(self.kind, self.url)

    def request(self, body: str) -> tuple[str, bytes]:
        return self.url, body.encode()


@dataclass(frozen=True)
class WebhookReceiver(_UrlReceiver):
    """Any tool that takes Alertmanager webhooks: the Alertmanager v4 body, unchanged."""

    kind: ClassVar[str] = "webhook"

    def payloads(self, notification: Notification) -> list[dict[str, Any]]:
        return [notification.alertmanager()]


def _slack_escape(text: str) -> str:
    """Slack mrkdwn treats only &, < and > specially; they must be sent as entities."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_SLACK_ALERT_BLOCKS = 10  # Slack allows 50 blocks; a long group ends with "and N more"


@dataclass(frozen=True)
class SlackReceiver(_UrlReceiver):
    """A Slack incoming webhook: a readable summary as `text` plus Block Kit `blocks`."""

    kind: ClassVar[str] = "slack"

    def payloads(self, notification: Notification) -> list[dict[str, Any]]:
        title = notification.title()
        lines = []
        blocks: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": title[:150]}}]
        for alert in notification.alerts[:_SLACK_ALERT_BLOCKS]:
            labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
            summary = annotations.get("summary") or labels.get("alertname", "alert")
            icon = ":red_circle:" if alert.get("status") == "firing" else ":large_green_circle:"
            parts = [f"{icon} *{_slack_escape(summary)}* ({alert.get('status', '')})"]
            if annotations.get("description"):
                parts.append(_slack_escape(annotations["description"]))
            parts.append(" ".join(f"`{_slack_escape(k)}={_slack_escape(v)}`" for k, v in sorted(labels.items())))
            if alert.get("generatorURL"):
                parts.append(f"<{alert['generatorURL']}|Open in tracetune>")
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(parts)[:3000]}})
            lines.append(f"- {summary} ({alert.get('status', '')})")
        more = len(notification.alerts) - _SLACK_ALERT_BLOCKS + notification.truncated_alerts
        if more > 0:
            blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"and {more} more"}]})
            lines.append(f"and {more} more")
        return [{"text": "\n".join([title, *lines]), "blocks": blocks}]


_PAGERDUTY_SEVERITIES = ("critical", "error", "warning", "info")
_PAGERDUTY_SEVERITY_OF = {"page": "critical", "ticket": "warning"}


def pagerduty_severity(label: str | None) -> str:
    """tracetune's severity label → PagerDuty's: page → critical, ticket → warning; PagerDuty's own
    four values pass through; anything else is info."""
    value = (label or "").lower()
    return value if value in _PAGERDUTY_SEVERITIES else _PAGERDUTY_SEVERITY_OF.get(value, "info")


@dataclass(frozen=True)
class PagerDutyReceiver(Receiver):
    """PagerDuty Events API v2: one event per alert, trigger while firing, resolve when resolved,
    `dedup_key` = the alert's fingerprint. The routing key is added at send time, never stored."""

    kind: ClassVar[str] = "pagerduty"
    name: str
    routing_key: str
    url: str = "https://events.pagerduty.com/v2/enqueue"
    secret: str = ""

    def __post_init__(self) -> None:
        _check_url(self.kind, self.url)
        if not self.routing_key:
            raise ValueError("pagerduty receiver needs a routing key (the service's Events API v2 integration key)")

    def payloads(self, notification: Notification) -> list[dict[str, Any]]:
        events = []
        for alert in notification.alerts:
            labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
            dedup_key = str(alert.get("fingerprint") or notification.group_key)[:255]
            if alert.get("status") == "resolved":
                events.append({"event_action": "resolve", "dedup_key": dedup_key})
                continue
            summary = annotations.get("summary") or " ".join(
                [labels.get("alertname", "alert"), *(f"{k}={v}" for k, v in sorted(labels.items())
                                                     if k != "alertname")])
            event: dict[str, Any] = {
                "event_action": "trigger",
                "dedup_key": dedup_key,
                "payload": {
                    "summary": summary[:1024],
                    "source": labels.get("pipeline") or "tracetune",
                    "severity": pagerduty_severity(labels.get("severity")),
                    "component": labels.get("step") or labels.get("pipeline") or "tracetune",
                    "custom_details": {"labels": labels, "annotations": annotations,
                                       "group_key": notification.group_key},
                },
                "client": "tracetune",
            }
            for name, label in (("group", "pipeline"), ("class", "alertname")):
                if labels.get(label):
                    event["payload"][name] = labels[label]
            if alert.get("startsAt"):
                event["payload"]["timestamp"] = alert["startsAt"]
            if notification.external_url:
                event["client_url"] = notification.external_url
            if alert.get("generatorURL"):
                event["links"] = [{"href": alert["generatorURL"], "text": "Open in tracetune"}]
            events.append(event)
        return events

    def request(self, body: str) -> tuple[str, bytes]:
        return self.url, json.dumps({"routing_key": self.routing_key, **json.loads(body)},
                                    separators=(",", ":")).encode()


def receivers_from_settings(settings: Settings) -> list[Receiver]:
    """The receivers the settings turn on (`alert_webhook_url`, `alert_slack_url`,
    `alert_pagerduty_routing_key`), each signing with the alert secret."""
    wanted = [settings.alert_webhook_url, settings.alert_slack_url, settings.alert_pagerduty_routing_key]
    if not any(wanted):
        return []
    secret = settings.alert_secret()
    receivers: list[Receiver] = []
    if settings.alert_webhook_url:
        receivers.append(WebhookReceiver("webhook", settings.alert_webhook_url, secret))
    if settings.alert_slack_url:
        receivers.append(SlackReceiver("slack", settings.alert_slack_url, secret))
    if settings.alert_pagerduty_routing_key:
        receivers.append(PagerDutyReceiver("pagerduty", settings.alert_pagerduty_routing_key,
                                           settings.alert_pagerduty_url, secret))
    return receivers


# ---- retry policy ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter between attempts; a server's Retry-After is a floor.

    A delivery still failing `give_up_seconds` after it was enqueued is recorded as failed.
    `random` is injectable so tests get exact delays.
    """

    base_seconds: float = 5.0
    cap_seconds: float = 600.0
    give_up_seconds: float = 86_400.0
    timeout_seconds: float = 15.0  # per request (Standard Webhooks suggests 15-30 s)
    max_concurrency: int = 4  # groups sent at once; a group's deliveries go one after another
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("base_seconds", "cap_seconds", "give_up_seconds", "timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RetryPolicy.{name} must be > 0, got {getattr(self, name)}")
        if self.cap_seconds < self.base_seconds:
            raise ValueError(f"RetryPolicy.cap_seconds ({self.cap_seconds}) must be >= base_seconds "
                             f"({self.base_seconds})")
        if self.max_concurrency < 1:
            raise ValueError(f"RetryPolicy.max_concurrency must be >= 1, got {self.max_concurrency}")

    def delay(self, failed_attempts: int, retry_after: float | None = None) -> float:
        """Wait after the n-th failed attempt: half of min(cap, base * 2^(n-1)) plus a random other half."""
        ceiling = min(self.cap_seconds, self.base_seconds * 2 ** min(failed_attempts - 1, 62))
        wait = ceiling / 2 + ceiling / 2 * self.random()
        return wait if retry_after is None else max(wait, retry_after)


# ---- the outbox ------------------------------------------------------------------------------------

def _seconds(moment: datetime | None) -> float:
    if moment is None:
        return time.time()
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _datetime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def enqueue(client, notification: Notification, receivers: Iterable[Receiver],
            now: datetime | None = None) -> list[str]:
    """Write the notification's requests for every receiver to the outbox (one insert); their delivery ids.

    Nothing is sent here: the worker sends them, in order per receiver and group key.
    """
    created = _datetime(_seconds(now))
    rows, ids = [], []
    for receiver in receivers:
        for payload in receiver.payloads(notification):
            delivery_id = _new_delivery_id()
            rows.append([created, delivery_id, receiver.name, receiver.kind, notification.group_key,
                         notification.status, json.dumps(payload, separators=(",", ":"), ensure_ascii=False)])
            ids.append(delivery_id)
    if rows:
        client.insert(OUTBOX_TABLE, rows, column_names=_OUTBOX_COLUMNS)
    return ids


def send_now(client, notification: Notification, receivers: Iterable[Receiver], http: httpx.Client | None = None,
             policy: RetryPolicy | None = None) -> list[str]:
    """Send the notification to every receiver now (a person waiting: `tracetune alerts test`) and record it as
    outbox items; their delivery ids.

    One sender per item: each first attempt is made here and recorded before its outbox row exists, so the
    analyzer's worker never sees it pending (it would send the same first attempt at once, with the same
    webhook-id); a failed attempt's retries are then the worker's, like any other delivery's."""
    policy = policy or RetryPolicy()
    own_http = http is None
    http = http or httpx.Client()
    ids = []
    try:
        for receiver in receivers:
            for payload in receiver.payloads(notification):
                item = _Due(_new_delivery_id(), receiver.name, notification.group_key,
                            json.dumps(payload, separators=(",", ":"), ensure_ascii=False), time.time(), 0, 0.0)
                outcome = _attempt(item, receiver, http, policy, time.time)
                client.insert(DELIVERIES_TABLE, [[_datetime(time.time()), item.delivery_id, item.receiver, 1,
                                                  outcome.status, outcome.http_status, outcome.error,
                                                  outcome.duration_ms, _datetime(outcome.next_at or 0.0)]],
                              column_names=_DELIVERY_COLUMNS)
                client.insert(OUTBOX_TABLE, [[_datetime(item.created), item.delivery_id, receiver.name, receiver.kind,
                                              notification.group_key, notification.status, item.body]],
                              column_names=_OUTBOX_COLUMNS)
                _log(item, outcome)
                ids.append(item.delivery_id)
    finally:
        if own_http:
            http.close()
    return ids


# The state of each delivery in the look-back window: its newest attempt; no attempt yet = pending.
_STATE_SQL = f"""
SELECT o.delivery_id, o.receiver, o.kind, o.group_key, o.notification_status, o.body,
       toUnixTimestamp64Milli(o.created_at) AS created_ms,
       if(s.last_id = '', 'pending', s.last_status) AS state,
       s.last_attempt AS attempts,
       if(s.last_id = '', toUnixTimestamp64Milli(o.created_at), s.last_next_ms) AS due_ms,
       s.last_http_status AS http_status, s.last_error AS error,
       if(s.last_id = '', 0, s.last_updated_ms) AS updated_ms
FROM {OUTBOX_TABLE} AS o
LEFT JOIN (
    SELECT delivery_id AS last_id,
           max(attempt) AS last_attempt,
           argMax(status, (attempt, recorded_at)) AS last_status,
           argMax(http_status, (attempt, recorded_at)) AS last_http_status,
           argMax(error, (attempt, recorded_at)) AS last_error,
           toUnixTimestamp64Milli(argMax(next_attempt_at, (attempt, recorded_at))) AS last_next_ms,
           toUnixTimestamp64Milli(max(recorded_at)) AS last_updated_ms
    FROM {DELIVERIES_TABLE}
    WHERE recorded_at >= fromUnixTimestamp64Milli({{since_ms:Int64}}, 'UTC')
    GROUP BY delivery_id
) AS s ON s.last_id = o.delivery_id
WHERE o.created_at >= fromUnixTimestamp64Milli({{since_ms:Int64}}, 'UTC')
"""
_LIVE_SQL = _STATE_SQL + "  AND state IN ('pending', 'retrying')\nORDER BY o.created_at, o.delivery_id"
_LOOK_BACK_SECONDS = 7 * 86_400  # deliveries older than this are neither resumed nor listed
_STATE_FIELDS = ["delivery_id", "receiver", "kind", "group_key", "notification_status", "body", "created_ms",
                 "status", "attempts", "due_ms", "http_status", "error", "updated_ms"]


@dataclass
class _Due:
    delivery_id: str
    receiver: str
    group_key: str
    body: str
    created: float
    attempts: int
    next_at: float


@dataclass
class _Outcome:
    status: str  # delivered | retrying | failed
    http_status: int = 0
    error: str = ""
    duration_ms: float = 0.0
    next_at: float = 0.0


def _describe(response: httpx.Response) -> str:
    head = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    text = response.text.strip().replace("\n", " ")[:200]
    return f"{head}: {text}" if text else head


def _attempt(item: _Due, receiver: Receiver | None, http: httpx.Client, policy: RetryPolicy,
             clock: Callable[[], float]) -> _Outcome:
    """Send one delivery once and decide what happens next."""
    if receiver is None:
        return _Outcome("failed", error=f"receiver {item.receiver!r} is not configured any more; not sent "
                                        "(configure it again and re-send by hand if needed)")
    url, body = receiver.request(item.body)
    started = clock()
    retry_after = None
    try:
        response = http.post(url, content=body, headers=receiver.headers(item.delivery_id, body),
                             timeout=policy.timeout_seconds)
    except httpx.TimeoutException as exc:
        status, error = 0, f"timed out after {policy.timeout_seconds:g}s ({type(exc).__name__})"
    except httpx.TransportError as exc:
        status, error = 0, f"{type(exc).__name__}: {exc}"
    else:
        status = response.status_code
        duration_ms = (clock() - started) * 1000
        if 200 <= status <= 299:
            return _Outcome("delivered", status, "", duration_ms)
        error = _describe(response)
        if not is_retryable_status(status):  # 3xx too: redirects are not followed
            why = "redirects are not followed; fix the URL" if 300 <= status <= 399 else "not retried"
            return _Outcome("failed", status, f"{error} ({why})", duration_ms)
        retry_after = parse_retry_after(response.headers, started)
    duration_ms = (clock() - started) * 1000
    attempts = item.attempts + 1
    next_at = clock() + policy.delay(attempts, retry_after)
    if next_at - item.created > policy.give_up_seconds:
        return _Outcome("failed", status, f"gave up after {attempts} attempts over "
                                          f"{policy.give_up_seconds / 3600:g} h; last error: {error}", duration_ms)
    return _Outcome("retrying", status, error, duration_ms, next_at)


def deliver_due(client, receivers: Sequence[Receiver] | Mapping[str, Receiver], now: datetime | None = None,
                http: httpx.Client | None = None, policy: RetryPolicy | None = None,
                active: Callable[[], bool] | None = None) -> dict[str, int]:
    """Send every pending delivery that is due and record each attempt; counts by outcome.

    Deliveries of one receiver and group key go in outbox order, each only once the one before it
    was delivered or failed for good, so a resolved never overtakes its firing. Groups run
    concurrently (`policy.max_concurrency`). `now` moves the clock (tests); None is the real time.
    `active` is asked before each send; once it says no (the analyzer lost its lease), nothing more is sent.
    """
    policy = policy or RetryPolicy()
    by_name = dict(receivers) if isinstance(receivers, Mapping) else {r.name: r for r in receivers}
    offset = 0.0 if now is None else _seconds(now) - time.time()
    clock = lambda: time.time() + offset
    moment = clock()
    rows = client.query(_LIVE_SQL, parameters={"since_ms": int((moment - _LOOK_BACK_SECONDS) * 1000)}).result_rows
    groups: dict[tuple[str, str], list[_Due]] = {}
    for row in rows:
        r = dict(zip(_STATE_FIELDS, row, strict=True))
        groups.setdefault((r["receiver"], r["group_key"]), []).append(
            _Due(r["delivery_id"], r["receiver"], r["group_key"], r["body"], r["created_ms"] / 1000,
                 int(r["attempts"]), r["due_ms"] / 1000))
    summary = {"attempted": 0, "delivered": 0, "retrying": 0, "failed": 0, "waiting": 0}
    heads = [items for items in groups.values() if items[0].next_at <= moment]
    summary["waiting"] = sum(len(items) for items in groups.values()) - sum(len(items) for items in heads)
    if not heads:
        return summary
    own_http = http is None
    http = http or httpx.Client()
    lock = threading.Lock()

    def run(items: list[_Due]) -> None:
        for index, item in enumerate(items):
            if item.next_at > clock() or (active is not None and not active()):
                with lock:
                    summary["waiting"] += len(items) - index
                return
            outcome = _attempt(item, by_name.get(item.receiver), http, policy, clock)
            row = [_datetime(clock()), item.delivery_id, item.receiver, min(item.attempts + 1, 65535),
                   outcome.status, outcome.http_status, outcome.error, outcome.duration_ms,
                   _datetime(outcome.next_at or 0.0)]
            with lock:
                client.insert(DELIVERIES_TABLE, [row], column_names=_DELIVERY_COLUMNS)
                summary["attempted"] += 1
                summary[outcome.status] += 1
            _log(item, outcome)
            if outcome.status == "retrying":
                with lock:
                    summary["waiting"] += len(items) - index - 1
                return

    try:
        with ThreadPoolExecutor(max_workers=min(policy.max_concurrency, len(heads)),
                                thread_name_prefix="alert-delivery") as pool:
            for future in [pool.submit(run, items) for items in heads]:
                future.result()
    finally:
        if own_http:
            http.close()
    return summary


def _log(item: _Due, outcome: _Outcome) -> None:
    if outcome.status == "delivered":
        log.info("alert delivery %s to %s delivered (attempt %d)", item.delivery_id, item.receiver,
                 item.attempts + 1)
    elif outcome.status == "retrying":
        log.warning("alert delivery %s to %s failed (attempt %d: %s); retrying at %s", item.delivery_id,
                    item.receiver, item.attempts + 1, outcome.error, _datetime(outcome.next_at).isoformat())
    else:
        log.error("alert delivery %s to %s failed for good (attempt %d): %s", item.delivery_id, item.receiver,
                  item.attempts + 1, outcome.error)


def _state_dict(row: Sequence[Any]) -> dict[str, Any]:
    r = dict(zip(_STATE_FIELDS, row, strict=True))
    return {
        "delivery_id": r["delivery_id"], "receiver": r["receiver"], "kind": r["kind"],
        "group_key": r["group_key"], "notification_status": r["notification_status"],
        "created_at": _datetime(r["created_ms"] / 1000), "status": r["status"], "attempts": int(r["attempts"]),
        "http_status": int(r["http_status"]), "error": r["error"],
        "next_attempt_at": _datetime(r["due_ms"] / 1000) if r["status"] in ("pending", "retrying") else None,
        "updated_at": _datetime(r["updated_ms"] / 1000) if r["updated_ms"] else None,
        "body": r["body"],
    }


_STATUSES = ("pending", "retrying", "delivered", "failed")


def deliveries(client, limit: int = 100, status: str | None = None, now: datetime | None = None) -> list[dict]:
    """The delivery log, newest first: one dict per delivery with its latest state (the last 7 days).

    Keys: delivery_id, receiver, kind, group_key, notification_status, created_at, status (pending,
    retrying, delivered, failed), attempts, http_status, error, next_attempt_at, updated_at, body.
    """
    if status is not None and status not in _STATUSES:
        raise ValueError(f"status must be one of {', '.join(_STATUSES)}, got {status!r}")
    sql = _STATE_SQL + ("  AND state = {status:String}\n" if status else "") + \
        "ORDER BY o.created_at DESC, o.delivery_id DESC\nLIMIT {limit:UInt32}"
    parameters: dict[str, Any] = {"since_ms": int((_seconds(now) - _LOOK_BACK_SECONDS) * 1000), "limit": limit}
    if status:
        parameters["status"] = status
    return [_state_dict(row) for row in client.query(sql, parameters=parameters).result_rows]


_ATTEMPTS_SQL = f"""
SELECT toUnixTimestamp64Milli(recorded_at), attempt, status, http_status, error, duration_ms,
       toUnixTimestamp64Milli(next_attempt_at)
FROM {DELIVERIES_TABLE} WHERE delivery_id = {{delivery_id:String}}
ORDER BY attempt, recorded_at
"""


def delivery_attempts(client, delivery_id: str) -> list[dict]:
    """Every attempt of one delivery, first to last."""
    rows = client.query(_ATTEMPTS_SQL, parameters={"delivery_id": delivery_id}).result_rows
    return [{"recorded_at": _datetime(recorded / 1000), "attempt": int(attempt), "status": status,
             "http_status": int(http_status), "error": error, "duration_ms": float(duration),
             "next_attempt_at": _datetime(next_ms / 1000) if status == "retrying" else None}
            for recorded, attempt, status, http_status, error, duration, next_ms in rows]


# ---- the worker ------------------------------------------------------------------------------------

class DeliveryWorker:
    """A thread that calls `deliver_due` every `interval` seconds until stopped (inside the analyzer).

    Give it a client of its own (`store.connect(settings)`). Run one per database: a second worker
    over the same outbox would send every delivery twice. With several analyzers, pass `active` (the
    analyzer lease's `holding`): the worker sends only while it says yes.
    """

    def __init__(self, client, receivers: Sequence[Receiver], policy: RetryPolicy | None = None,
                 interval: float = 1.0, http: httpx.Client | None = None,
                 active: Callable[[], bool] | None = None):
        if interval <= 0:
            raise ValueError(f"DeliveryWorker.interval must be > 0 seconds, got {interval}")
        self.client = client
        self.receivers = list(receivers)
        self.policy = policy or RetryPolicy()
        self.interval = interval
        self.active = active
        self._own_http = http is None
        self._http = http or httpx.Client()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> dict[str, int]:
        return deliver_due(self.client, self.receivers, http=self._http, policy=self.policy, active=self.active)

    def run(self) -> None:
        """Deliver until `stop()`; a failed round (store unreachable) is logged and tried again."""
        while not self._stop.is_set():
            try:
                if self.active is None or self.active():
                    self.run_once()
            except Exception:  # the next round retries; the outbox keeps everything
                log.exception("alert delivery round failed; will retry")
            self._stop.wait(self.interval)

    def start(self) -> DeliveryWorker:
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="alert-delivery", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the round in flight (at most one request timeout per group in it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._own_http:
            self._http.close()

    def __enter__(self) -> DeliveryWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
