"""Dead letters: side effects that gave up (`tracetune_dead_letters`, written by the executor), what
operators did about them (`tracetune_dead_letter_events`: replays and discards, append-only), and how
fast they grow (the `DeadLettersGrowing` alert).

A letter is one idempotency key: one effect of one task (pipeline, step, task id). A task resubmitted and
dead-lettered again adds a row to the same letter (its `dead_lettered` count and `attempts` grow). Its
status is its newest event — `replayed` or `discarded` — unless it was dead-lettered again after that
event; otherwise (no event, or a replay that failed) it is `open`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from tracetune.analyzer._time import utc
from tracetune.store import next_seq

__all__ = ["STATUSES", "ACTIONS", "LETTER_COLUMNS", "DeadLetterError", "Letter", "Event", "letters", "find",
           "record", "growth", "KEY_PREFIX_MIN"]

LETTERS_TABLE: Final = "tracetune_dead_letters"
EVENTS_TABLE: Final = "tracetune_dead_letter_events"
STATUSES: Final = ("open", "replayed", "discarded", "all")
"""Which letters `letters()` lists: `open` (default), `replayed`, `discarded` or `all`."""
ACTIONS: Final = ("replayed", "replay_failed", "discarded")
"""What an event records: a replay the downstream took, one it did not (the letter stays open), a discard."""
KEY_PREFIX_MIN: Final = 8
"""A letter may be named by a unique prefix of its idempotency key, at least this long (as git's short hashes)."""
_KEY = re.compile(r"^[0-9A-Za-z_.:-]{1,200}$")

LETTER_COLUMNS: Final = ["idempotency_key", "status", "pipeline", "step", "task_id", "dead_lettered", "attempts",
                         "last_status", "error", "first_at", "last_at", "replays", "last_action", "last_event_at",
                         "last_author", "last_reason", "payload"]

# One row per letter: its dead-letter rows folded (newest wins), joined with its newest event.
_LETTERS_SQL: Final = """
SELECT idempotency_key, status, pipeline, step, task_id, dead_lettered, attempts, last_status, error, first_at,
       last_at, replays, last_action, last_event_at, last_author, last_reason, payload
FROM (
    SELECT l.idempotency_key AS idempotency_key, l.pipeline AS pipeline, l.step AS step, l.task_id AS task_id,
           l.dead_lettered AS dead_lettered, l.attempts AS attempts, l.last_status AS last_status, l.error AS error,
           l.first_at AS first_at, l.last_at AS last_at, e.replays AS replays, e.last_action AS last_action,
           e.last_event_at AS last_event_at, e.last_author AS last_author, e.last_reason AS last_reason,
           l.payload AS payload,
           multiIf(e.last_action IN ('replayed', 'discarded') AND e.last_event_at >= l.last_at, e.last_action,
                   'open') AS status
    FROM (
        SELECT idempotency_key, argMax(pipeline, created_at) AS pipeline, argMax(step, created_at) AS step,
               argMax(task_id, created_at) AS task_id, count() AS dead_lettered, sum(attempts) AS attempts,
               argMax(last_status, created_at) AS last_status, argMax(error, created_at) AS error,
               argMax(payload, created_at) AS payload, min(created_at) AS first_at, max(created_at) AS last_at
        FROM (SELECT * FROM tracetune_dead_letters
              WHERE ({pipeline:String} = '' OR pipeline = {pipeline:String})
                AND ({step:String} = '' OR step = {step:String})
                AND ({key:String} = '' OR startsWith(idempotency_key, {key:String})))
        GROUP BY idempotency_key
    ) AS l
    LEFT JOIN (
        SELECT idempotency_key, countIf(action != 'discarded') AS replays,
               argMax(action, (at, seq)) AS last_action, max(at) AS last_event_at,
               argMax(author, (at, seq)) AS last_author, argMax(reason, (at, seq)) AS last_reason
        FROM tracetune_dead_letter_events
        WHERE ({key:String} = '' OR startsWith(idempotency_key, {key:String}))
        GROUP BY idempotency_key
    ) AS e ON e.idempotency_key = l.idempotency_key
)
WHERE ({status:String} = 'all' OR status = {status:String})
  AND last_at >= {since:DateTime64(3)}
ORDER BY last_at DESC, idempotency_key
LIMIT {limit:UInt32}
"""

_ROWS_SQL: Final = """
SELECT created_at, task_id, attempts, last_status, error
FROM tracetune_dead_letters WHERE idempotency_key = {key:String} ORDER BY created_at
"""

_EVENTS_SQL: Final = """
SELECT at, action, author, reason, attempts, http_status, response
FROM tracetune_dead_letter_events WHERE idempotency_key = {key:String} ORDER BY at, seq
"""

_EVENT_COLUMNS: Final = ["at", "seq", "idempotency_key", "pipeline", "step", "action", "author", "reason", "attempts",
                         "http_status", "response"]

# Per pipeline and step: open letters, how many arrived within the window, the newest and its error.
_GROWTH_SQL: Final = """
SELECT pipeline, step, count() AS open, countIf(last_at >= {since:DateTime64(3)}) AS new,
       max(last_at) AS newest, argMax(error, last_at) AS error
FROM (
    SELECT l.pipeline AS pipeline, l.step AS step, l.last_at AS last_at, l.error AS error,
           multiIf(e.last_action IN ('replayed', 'discarded') AND e.last_event_at >= l.last_at, e.last_action,
                   'open') AS status
    FROM (
        SELECT idempotency_key, argMax(pipeline, created_at) AS pipeline, argMax(step, created_at) AS step,
               argMax(error, created_at) AS error, max(created_at) AS last_at
        FROM tracetune_dead_letters GROUP BY idempotency_key
    ) AS l
    LEFT JOIN (
        SELECT idempotency_key, argMax(action, (at, seq)) AS last_action, max(at) AS last_event_at
        FROM tracetune_dead_letter_events GROUP BY idempotency_key
    ) AS e ON e.idempotency_key = l.idempotency_key
)
WHERE status = 'open'
GROUP BY pipeline, step
ORDER BY pipeline, step
"""


class DeadLetterError(LookupError):
    """No letter, or more than one, answers to a key; the message says which and what to do."""


@dataclass(frozen=True)
class Event:
    """One thing an operator did with a letter: a replay (and how it went) or a discard (and why)."""

    action: str
    author: str
    reason: str = ""
    attempts: int = 0
    http_status: int = 0
    response: str = ""
    at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat() if self.at else None, "action": self.action, "author": self.author,
                "reason": self.reason, "attempts": self.attempts, "http_status": self.http_status,
                "response": self.response}


@dataclass(frozen=True)
class Letter:
    """A dead letter: the effect (pipeline, step, task, key, the JSON body it sent), why it failed, how often
    it was tried, when; its status, and with `find` every time it was dead-lettered and every event."""

    idempotency_key: str
    status: str
    pipeline: str
    step: str
    task_id: str
    dead_lettered: int
    attempts: int
    last_status: int
    error: str
    first_at: datetime
    last_at: datetime
    payload: str
    replays: int = 0
    last_action: str = ""
    last_author: str = ""
    last_reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def body(self) -> Any:
        """The request body as JSON (the text as stored if it is not JSON)."""
        try:
            return json.loads(self.payload)
        except ValueError:
            return self.payload

    def to_dict(self, payload: bool = True) -> dict[str, Any]:
        out = {"idempotency_key": self.idempotency_key, "status": self.status, "pipeline": self.pipeline,
               "step": self.step, "task_id": self.task_id, "dead_lettered": self.dead_lettered,
               "attempts": self.attempts, "last_status": self.last_status, "error": self.error,
               "first_at": self.first_at.isoformat(), "last_at": self.last_at.isoformat(), "replays": self.replays,
               "last_action": self.last_action, "last_author": self.last_author, "last_reason": self.last_reason}
        if payload:
            out["payload"] = self.body
        if self.history or self.events:
            out["history"] = [{**row, "created_at": row["created_at"].isoformat()} for row in self.history]
            out["events"] = [event.to_dict() for event in self.events]
        return out


def _letter(row: dict[str, Any]) -> Letter:
    has_event = bool(row["last_action"])
    return Letter(row["idempotency_key"], row["status"], row["pipeline"], row["step"], row["task_id"],
                  int(row["dead_lettered"]), int(row["attempts"]), int(row["last_status"]), row["error"],
                  utc(row["first_at"]), utc(row["last_at"]), row["payload"], int(row["replays"] or 0),
                  row["last_action"], row["last_author"] if has_event else "", row["last_reason"] if has_event else "")


def letters(client, status: str = "open", pipeline: str = "", step: str = "", since: datetime | None = None,
            limit: int = 100, key: str = "") -> list[Letter]:
    """Letters newest first (by when they were last dead-lettered), of `status` (see STATUSES), dead-lettered
    since `since` (default: ever), at most `limit`; `key` keeps those whose key starts with it."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
    if key and not _KEY.match(key):
        raise ValueError(f"{key!r} is not an idempotency key (letters, digits, - _ . :)")
    moment = utc(since).replace(tzinfo=None) if since else datetime(1970, 1, 1)
    result = client.query(_LETTERS_SQL, parameters={"status": status, "pipeline": pipeline, "step": step, "key": key,
                                                    "since": moment, "limit": int(limit)})
    return [_letter(row) for row in result.named_results()]


def find(client, key: str) -> Letter:
    """The letter whose idempotency key is `key`, or starts with it (at least KEY_PREFIX_MIN characters), with
    every time it was dead-lettered and every event. DeadLetterError if none or several match."""
    key = key.strip()
    if not _KEY.match(key):
        raise DeadLetterError(f"{key!r} is not an idempotency key; `tracetune dead-letters list` shows them")
    found = letters(client, "all", key=key, limit=2)
    exact = [letter for letter in found if letter.idempotency_key == key]
    if exact:
        found = exact
    elif len(key) < KEY_PREFIX_MIN:
        raise DeadLetterError(f"no dead letter has the key {key!r} (a shorter name must be a prefix of at least "
                              f"{KEY_PREFIX_MIN} characters); `tracetune dead-letters list --status all` shows them")
    if not found:
        raise DeadLetterError(f"no dead letter has a key starting with {key!r}; `tracetune dead-letters list "
                              f"--status all` shows them")
    if len(found) > 1:
        raise DeadLetterError(f"several dead letters have keys starting with {key!r}; give more of the key")
    letter = found[0]
    history = list(client.query(_ROWS_SQL, parameters={"key": letter.idempotency_key}).named_results())
    for row in history:
        row["created_at"] = utc(row["created_at"])
    events = [Event(row["action"], row["author"], row["reason"], int(row["attempts"]), int(row["http_status"]),
                    row["response"], utc(row["at"]))
              for row in client.query(_EVENTS_SQL, parameters={"key": letter.idempotency_key}).named_results()]
    return Letter(**{**letter.__dict__, "history": history, "events": events})


def record(client, letter: Letter, event: Event) -> Event:
    """Append `event` about `letter` to the audit (now, unless the event says when)."""
    if event.action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {event.action!r}")
    at = event.at or datetime.now(UTC)
    client.insert(EVENTS_TABLE, [[at, next_seq(), letter.idempotency_key, letter.pipeline, letter.step, event.action,
                                  event.author, event.reason, min(event.attempts, 65535),
                                  min(event.http_status, 65535), event.response]], column_names=_EVENT_COLUMNS)
    return Event(**{**event.__dict__, "at": at})


@dataclass(frozen=True)
class Growth:
    """Open letters of one pipeline step: how many, how many arrived within the window, the newest and why."""

    pipeline: str
    step: str
    open: int
    new: int
    newest: datetime
    error: str


def growth(client, now: datetime | None = None, window: timedelta = timedelta(hours=1)) -> list[Growth]:
    """Per pipeline and step with open letters: their count and how many arrived within `window` before `now`."""
    since = utc(now or datetime.now(UTC)) - window
    result = client.query(_GROWTH_SQL, parameters={"since": since.replace(tzinfo=None)})
    return [Growth(row["pipeline"], row["step"], int(row["open"]), int(row["new"]), utc(row["newest"]), row["error"])
            for row in result.named_results()]
