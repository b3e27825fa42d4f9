"""Alert delivery: the retry policy and the loop that sends what the outbox holds.

The rules engine hands over a `Notification`; `enqueue` writes one outbox row per request to send
(`tracetune_alert_outbox`, store/sql/044_*; analyzer/outbox.py) before anything is sent; `deliver_due` (run by a
`DeliveryWorker`) sends what is due to its receiver (analyzer/receivers/, one module per integration) and
appends each attempt to `tracetune_alert_deliveries`.
Delivery is at least once: a crash between a send and its record sends again on restart, with the
same `webhook-id`, so receivers deduplicate on it. One process drains the outbox (the analyzer):
two deliverers over the same database would each send every delivery, so several analyzers take
turns by a lease (`DeliveryWorker(active=...)`, docs/alerts.md "Several replicas").

The names callers use stay importable from here (receivers, signatures, the outbox's reads and writes).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import httpx

from tracetune.analyzer import outbox
from tracetune.analyzer.outbox import (
    DELIVERIES_TABLE,
    OUTBOX_TABLE,
    Due,
    as_datetime,
    deliveries,
    delivery_attempts,
    enqueue,
    new_delivery_id,
    seconds,
)
from tracetune.analyzer.receivers import (
    Notification,
    PagerDutyReceiver,
    Receiver,
    SlackReceiver,
    WebhookReceiver,
    new_secret,
    pagerduty_severity,
    receivers_from_settings,
    sign,
)
from tracetune.base.retrying import is_retryable_status, parse_retry_after

__all__ = ["Notification", "Receiver", "WebhookReceiver", "SlackReceiver", "PagerDutyReceiver",
           "pagerduty_severity", "receivers_from_settings", "sign", "new_secret", "RetryPolicy", "enqueue",
           "deliver_due", "send_now", "deliveries", "delivery_attempts", "DeliveryWorker", "OUTBOX_TABLE",
           "DELIVERIES_TABLE"]

log = logging.getLogger("tracetune.analyzer.delivery")


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


# ---- sending ---------------------------------------------------------------------------------------


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
                item = Due(new_delivery_id(), receiver.name, notification.group_key,
                           json.dumps(payload, separators=(",", ":"), ensure_ascii=False), time.time(), 0, 0.0)
                outcome = _attempt(item, receiver, http, policy, time.time)
                outbox.record_attempt(client, item, time.time(), outcome.status, outcome.http_status,
                                      outcome.error, outcome.duration_ms, outcome.next_at or 0.0)
                outbox.add_sent(client, item, receiver.kind, notification.status)
                _log(item, outcome)
                ids.append(item.delivery_id)
    finally:
        if own_http:
            http.close()
    return ids


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


def _attempt(item: Due, receiver: Receiver | None, http: httpx.Client, policy: RetryPolicy,
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
    offset = 0.0 if now is None else seconds(now) - time.time()
    clock = lambda: time.time() + offset
    moment = clock()
    groups = outbox.due(client, moment)
    summary = {"attempted": 0, "delivered": 0, "retrying": 0, "failed": 0, "waiting": 0}
    heads = [items for items in groups.values() if items[0].next_at <= moment]
    summary["waiting"] = sum(len(items) for items in groups.values()) - sum(len(items) for items in heads)
    if not heads:
        return summary
    own_http = http is None
    http = http or httpx.Client()
    lock = threading.Lock()

    def run(items: list[Due]) -> None:
        for index, item in enumerate(items):
            if item.next_at > clock() or (active is not None and not active()):
                with lock:
                    summary["waiting"] += len(items) - index
                return
            outcome = _attempt(item, by_name.get(item.receiver), http, policy, clock)
            at = clock()
            with lock:
                outbox.record_attempt(client, item, at, outcome.status, outcome.http_status, outcome.error,
                                      outcome.duration_ms, outcome.next_at or 0.0)
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


def _log(item: Due, outcome: _Outcome) -> None:
    if outcome.status == "delivered":
        log.info("alert delivery %s to %s delivered (attempt %d)", item.delivery_id, item.receiver,
                 item.attempts + 1)
    elif outcome.status == "retrying":
        log.warning("alert delivery %s to %s failed (attempt %d: %s); retrying at %s", item.delivery_id,
                    item.receiver, item.attempts + 1, outcome.error, as_datetime(outcome.next_at).isoformat())
    else:
        log.error("alert delivery %s to %s failed for good (attempt %d): %s", item.delivery_id, item.receiver,
                  item.attempts + 1, outcome.error)

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
