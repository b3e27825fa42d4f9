"""Dead letters in the real store: a letter per idempotency key, its status from its newest event, and the
DeadLettersGrowing alert (new open letters within the hour, until they are replayed or discarded)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tracetune import store
from tracetune.analyzer import alerts, dead_letters
from tracetune.executor.effects import DeadLetter, DeadLetters

NOW = datetime.now(UTC)


def _write(settings, task_id: str, at: datetime, step: str = "create_followup", attempts: int = 3) -> str:
    key = f"key-{step}-{task_id}"
    DeadLetters(lambda: store.connect(settings, ensure_schema=False)).write(DeadLetter(
        "triage", step, task_id, key, attempts, 503, "HTTP 503 Service Unavailable: down", {"task": task_id},
        created_at=at))
    return key


def test_a_letter_is_open_until_replayed_or_discarded_and_open_again_when_dead_lettered_again(db_settings, client):
    key = _write(db_settings, "t1", NOW - timedelta(minutes=10))
    _write(db_settings, "t1", NOW - timedelta(minutes=5), attempts=2)  # the task resubmitted, failed again
    [letter] = dead_letters.letters(client)
    assert (letter.idempotency_key, letter.status, letter.dead_lettered, letter.attempts) == (key, "open", 2, 5)
    assert letter.body == {"task": "t1"}
    assert dead_letters.find(client, key[:10]).idempotency_key == key
    with pytest.raises(dead_letters.DeadLetterError, match="at least 8"):
        dead_letters.find(client, "key")

    dead_letters.record(client, letter, dead_letters.Event("replay_failed", "alice", "HTTP 503", 2, 503))
    assert dead_letters.letters(client)[0].status == "open"
    dead_letters.record(client, letter, dead_letters.Event("replayed", "alice", "", 1, 201))
    assert dead_letters.letters(client) == [] and dead_letters.letters(client, "replayed")[0].replays == 2

    _write(db_settings, "t1", datetime.now(UTC) + timedelta(seconds=1))  # dead-lettered after the replay
    assert [lt.status for lt in dead_letters.letters(client, "all")] == ["open"]
    found = dead_letters.find(client, key)
    assert len(found.history) == 3 and [e.action for e in found.events] == ["replay_failed", "replayed"]


def test_the_alert_fires_for_new_open_letters_and_clears_when_they_are_handled(db_settings, client):
    old = _write(db_settings, "old", NOW - timedelta(hours=3), step="notify")  # open, but not new
    new = _write(db_settings, "new", NOW - timedelta(minutes=2))
    _write(db_settings, "new2", NOW - timedelta(minutes=1))
    conditions = alerts.dead_letter_conditions(dead_letters.growth(client, NOW))
    [condition] = conditions
    assert condition.labels == {"alertname": "DeadLettersGrowing", "pipeline": "triage", "step": "create_followup",
                                "severity": "ticket", "rule": "dead_letters"}
    assert condition.annotations["runbook_url"] == "docs/runbooks.md#dead-letters"
    assert "2 new dead letters" in condition.annotations["summary"] and condition.value == 2

    for key in (new, "key-create_followup-new2"):
        letter = dead_letters.find(client, key)
        dead_letters.record(client, letter, dead_letters.Event("discarded", "alice", "duplicate"))
    assert alerts.dead_letter_conditions(dead_letters.growth(client, NOW)) == []
    assert [lt.idempotency_key for lt in dead_letters.letters(client)] == [old]  # still listed, never paged
