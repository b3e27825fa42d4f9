"""The alert outbox in ClickHouse: one row per request to send (`tracetune_alert_outbox`, written before
anything is sent) and one row per attempt (`tracetune_alert_deliveries`, append-only); a delivery's state
is its newest attempt. analyzer/delivery.py sends what `due()` answers and records each attempt here.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tracetune.analyzer.receivers import Notification, Receiver

__all__ = ["OUTBOX_TABLE", "DELIVERIES_TABLE", "Due", "enqueue", "due", "record_attempt", "add_sent", "deliveries",
           "delivery_attempts", "new_delivery_id", "seconds", "as_datetime"]

OUTBOX_TABLE = "tracetune_alert_outbox"
DELIVERIES_TABLE = "tracetune_alert_deliveries"
_OUTBOX_COLUMNS = ["created_at", "delivery_id", "receiver", "kind", "group_key", "notification_status", "body"]
_DELIVERY_COLUMNS = ["recorded_at", "delivery_id", "receiver", "attempt", "status", "http_status", "error",
                     "duration_ms", "next_attempt_at"]


def seconds(moment: datetime | None) -> float:
    """Seconds since the epoch of `moment` (naive = UTC); None is now."""
    if moment is None:
        return time.time()
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def as_datetime(epoch_seconds: float) -> datetime:
    """An aware UTC datetime from seconds since the epoch."""
    return datetime.fromtimestamp(epoch_seconds, UTC)


_last_id_ns = 0
_id_lock = threading.Lock()


def new_delivery_id() -> str:
    """`msg_` + 16 hex digits of nanoseconds (strictly increasing in a process) + 8 random hex digits."""
    global _last_id_ns
    with _id_lock:
        _last_id_ns = max(time.time_ns(), _last_id_ns + 1)
        stamp = _last_id_ns
    return f"msg_{stamp:016x}{secrets.token_hex(4)}"


def enqueue(client, notification: Notification, receivers: Iterable[Receiver],
            now: datetime | None = None) -> list[str]:
    """Write the notification's requests for every receiver to the outbox (one insert); their delivery ids.

    Nothing is sent here: the worker sends them, in order per receiver and group key.
    """
    created = as_datetime(seconds(now))
    rows, ids = [], []
    for receiver in receivers:
        for payload in receiver.payloads(notification):
            delivery_id = new_delivery_id()
            rows.append([created, delivery_id, receiver.name, receiver.kind, notification.group_key,
                         notification.status, json.dumps(payload, separators=(",", ":"), ensure_ascii=False)])
            ids.append(delivery_id)
    if rows:
        client.insert(OUTBOX_TABLE, rows, column_names=_OUTBOX_COLUMNS)
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
class Due:
    """A delivery waiting to be sent: its body as stored, when it was made, attempts so far, when it is due."""

    delivery_id: str
    receiver: str
    group_key: str
    body: str
    created: float
    attempts: int
    next_at: float


def due(client, moment: float) -> dict[tuple[str, str], list[Due]]:
    """Pending and retrying deliveries of the look-back window by (receiver, group key), in outbox order."""
    rows = client.query(_LIVE_SQL, parameters={"since_ms": int((moment - _LOOK_BACK_SECONDS) * 1000)}).result_rows
    groups: dict[tuple[str, str], list[Due]] = {}
    for row in rows:
        r = dict(zip(_STATE_FIELDS, row, strict=True))
        groups.setdefault((r["receiver"], r["group_key"]), []).append(
            Due(r["delivery_id"], r["receiver"], r["group_key"], r["body"], r["created_ms"] / 1000,
                int(r["attempts"]), r["due_ms"] / 1000))
    return groups


def record_attempt(client, item: Due, at: float, status: str, http_status: int, error: str, duration_ms: float,
                   next_at: float) -> None:
    """Append attempt `item.attempts + 1` of a delivery, as `status` (delivered, retrying, failed)."""
    client.insert(DELIVERIES_TABLE, [[as_datetime(at), item.delivery_id, item.receiver, min(item.attempts + 1, 65535),
                                      status, http_status, error, duration_ms, as_datetime(next_at)]],
                  column_names=_DELIVERY_COLUMNS)


def add_sent(client, item: Due, kind: str, notification_status: str) -> None:
    """The outbox row of a delivery whose first attempt was already made and recorded (`send_now`)."""
    client.insert(OUTBOX_TABLE, [[as_datetime(item.created), item.delivery_id, item.receiver, kind, item.group_key,
                                  notification_status, item.body]], column_names=_OUTBOX_COLUMNS)


def _state_dict(row: Sequence[Any]) -> dict[str, Any]:
    r = dict(zip(_STATE_FIELDS, row, strict=True))
    return {
        "delivery_id": r["delivery_id"], "receiver": r["receiver"], "kind": r["kind"],
        "group_key": r["group_key"], "notification_status": r["notification_status"],
        "created_at": as_datetime(r["created_ms"] / 1000), "status": r["status"], "attempts": int(r["attempts"]),
        "http_status": int(r["http_status"]), "error": r["error"],
        "next_attempt_at": as_datetime(r["due_ms"] / 1000) if r["status"] in ("pending", "retrying") else None,
        "updated_at": as_datetime(r["updated_ms"] / 1000) if r["updated_ms"] else None,
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
    parameters: dict[str, Any] = {"since_ms": int((seconds(now) - _LOOK_BACK_SECONDS) * 1000), "limit": limit}
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
    return [{"recorded_at": as_datetime(recorded / 1000), "attempt": int(attempt), "status": status,
             "http_status": int(http_status), "error": error, "duration_ms": float(duration),
             "next_attempt_at": as_datetime(next_ms / 1000) if status == "retrying" else None}
            for recorded, attempt, status, http_status, error, duration, next_ms in rows]
