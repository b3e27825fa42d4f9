"""Side effects against the flaky CRM stand-in on 127.0.0.1: idempotency, backoff, limits, dead letters."""

from __future__ import annotations

import email.utils
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from opentelemetry.trace import StatusCode

from tests.servers import ThreadServer, free_port
from tracetune import store
from tracetune.demo.standins import create_crm_app
from tracetune.executor.effects import (
    DeadLetters,
    RetryPolicy,
    SideEffect,
    SideEffectFailed,
    parse_retry_after,
)


class Recorder:
    """A RetryPolicy sleep that records the delays instead of waiting them out (thread-safe)."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, seconds: float) -> None:
        with self._lock:
            self.delays.append(seconds)


def crm_followups(crm_url: str, *, pipeline: str, **options) -> SideEffect:
    """The CRM stand-in's "create follow-up" call, as the demo's `create_followup` step makes it."""
    return SideEffect(crm_url + "/v1/followups", pipeline=pipeline, step="create_followup", **options)


def followups(server: ThreadServer, key: str | None = None) -> list[dict]:
    params = {"idempotency_key": key} if key else {}
    return httpx.get(f"{server.url}/v1/followups", params=params).json()["data"]


def test_flaky_crm_gets_one_followup_per_key_with_exponential_backoff_honouring_retry_after(tracer):
    tracer, exporter = tracer
    sleeps = Recorder()
    policy = RetryPolicy(max_attempts=6, base_delay=0.1, max_delay=5.0, jitter=False, sleep=sleeps)
    # Failures 1..3 answer 503; the second carries Retry-After: 1 (the stand-in marks every second failure).
    with ThreadServer(create_crm_app(fail_first=3, latency_ms=1, retry_after=1)) as crm, \
            crm_followups(crm.url, pipeline="ticket_triage", policy=policy) as effect:
        with tracer.start_as_current_span("create_followup"):
            created = effect("task-1", {"ticket": "my parcel never arrived", "priority": "P2"})
        assert sleeps.delays == [0.1, 1.0, 0.4]  # 0.1 * 2^n, except the Retry-After floor of 1 s
        assert created["data"] == {"ticket": "my parcel never arrived", "priority": "P2"}
        key = effect.idempotency_key("task-1")
        assert created["idempotency_key"] == key
        span = exporter.get_finished_spans()[-1]
        assert span.attributes["tracetune.retries"] == 3
        assert span.attributes["tracetune.idempotency_key"] == key
        assert span.attributes["http.response.status_code"] == 201

        again = effect("task-1", {"ticket": "my parcel never arrived", "priority": "P2"})  # resubmitted task
        assert again["id"] == created["id"]
        assert [f["id"] for f in followups(crm, key)] == [created["id"]]
        assert effect.idempotency_key("task-2") != key


def test_the_same_task_submitted_twice_concurrently_creates_one_followup():
    sleeps = Recorder()
    policy = RetryPolicy(max_attempts=6, base_delay=0.01, max_delay=0.1, sleep=sleeps, random=random.Random(1).random)
    with ThreadServer(create_crm_app(fail_first=2, latency_ms=30)) as crm, \
            crm_followups(crm.url, pipeline="ticket_triage", policy=policy) as effect:
        start = threading.Barrier(4)

        def submit(task_id: str) -> dict:
            start.wait(5)
            return effect(task_id, {"task": task_id})

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(submit, ["task-a", "task-a", "task-a", "task-b"]))
        assert len({r["id"] for r in results[:3]}) == 1 and results[3]["id"] != results[0]["id"]
        assert len(followups(crm, effect.idempotency_key("task-a"))) == 1
        assert len(followups(crm, effect.idempotency_key("task-b"))) == 1
        assert len(followups(crm)) == 2
        assert sleeps.delays  # the 503s were retried


def test_jittered_delays_stay_under_the_exponential_cap():
    sleeps = Recorder()
    policy = RetryPolicy(max_attempts=8, base_delay=0.05, max_delay=0.5, sleep=sleeps, random=random.Random(4).random)
    with ThreadServer(create_crm_app(fail_first=7, latency_ms=0, retry_after=0)) as crm, \
            crm_followups(crm.url, pipeline="p", policy=policy) as effect:
        effect("t", {})
    caps = [policy.backoff_cap(n) for n in range(1, 8)]
    assert caps == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert len(sleeps.delays) == 7
    assert all(0 <= d <= cap for d, cap in zip(sleeps.delays, caps, strict=True))
    assert len(set(sleeps.delays)) == 7  # full jitter: no two waits alike


def test_retry_after_as_seconds_or_http_date_is_a_floor_capped_by_max_delay():
    now = 1_700_000_000.0
    assert parse_retry_after({"retry-after": "3"}, now) == 3
    assert parse_retry_after({"retry-after": email.utils.formatdate(now + 30, usegmt=True)}, now) == 30
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 30, usegmt=True)}, now) == 0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "1"}, now) == 0.25
    assert parse_retry_after({"retry-after": "soon"}, now) is None
    assert parse_retry_after({}, now) is None
    policy = RetryPolicy(base_delay=0.1, max_delay=5, jitter=False)
    assert policy.delay(1, retry_after=2) == 2
    assert policy.delay(1, retry_after=30) == 5
    assert policy.delay(4, retry_after=0.1) == 0.8
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_a_timeout_after_the_effect_happened_is_retried_without_a_second_followup():
    sleeps = Recorder()
    policy = RetryPolicy(max_attempts=4, base_delay=0.05, sleep=sleeps)
    # The first attempt creates the follow-up, then stalls past the client's 0.3 s timeout.
    with ThreadServer(create_crm_app(stall_first=1, stall_ms=1000, latency_ms=0)) as crm, \
            crm_followups(crm.url, pipeline="p", policy=policy, timeout=0.3) as effect:
        created = effect("task-1", {"n": 1})
        assert len(sleeps.delays) == 1
        assert [f["id"] for f in followups(crm)] == [created["id"]]
        assert httpx.get(f"{crm.url}/stats").json()["replayed"] == 1


def test_exhausted_retries_land_in_dead_letters_and_fail_the_span(db_settings, client, tracer):
    tracer, exporter = tracer
    sleeps = Recorder()
    policy = RetryPolicy(max_attempts=3, base_delay=0.05, sleep=sleeps)
    letters = DeadLetters(lambda: store.connect(db_settings, ensure_schema=False))
    payload = {"ticket": "charged twice", "category": "billing"}
    with ThreadServer(create_crm_app(fail_first=100, latency_ms=0)) as crm, \
            crm_followups(crm.url, pipeline="ticket_triage", policy=policy, dead_letters=letters) as effect:
        with pytest.raises(SideEffectFailed) as failed, tracer.start_as_current_span("create_followup"):
            effect("task-9", payload)
        assert httpx.get(f"{crm.url}/stats").json()["requests"] == 3
    message = str(failed.value)
    assert "create_followup for task 'task-9'" in message and "gave up after 3 attempts" in message
    assert "HTTP 503" in message and "dead-lettered in tracetune_dead_letters" in message
    assert failed.value.dead_lettered and failed.value.attempts == 3 and failed.value.last_status == 503
    assert len(sleeps.delays) == 2

    rows = client.query("SELECT pipeline, step, task_id, idempotency_key, attempts, last_status, error, payload "
                        "FROM tracetune_dead_letters").named_results()
    rows = list(rows)
    assert len(rows) == 1
    row = rows[0]
    assert (row["pipeline"], row["step"], row["task_id"]) == ("ticket_triage", "create_followup", "task-9")
    assert row["idempotency_key"] == effect.idempotency_key("task-9")
    assert (row["attempts"], row["last_status"]) == (3, 503)
    assert "temporarily unavailable" in row["error"]
    assert json.loads(row["payload"]) == payload

    span = exporter.get_finished_spans()[-1]
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["tracetune.retries"] == 2 and span.attributes["tracetune.dead_letter"] is True
    assert span.attributes["error.type"] == "503"


def test_non_retryable_4xx_is_not_retried():
    sleeps = Recorder()
    with ThreadServer(create_crm_app(latency_ms=0)) as crm, \
            crm_followups(crm.url, pipeline="p", policy=RetryPolicy(sleep=sleeps)) as effect:
        effect("task-1", {"note": "call back"})
        # The same task with a different body reuses the key: the CRM answers 422, a retry cannot help.
        with pytest.raises(SideEffectFailed, match="422 is not retryable") as failed:
            effect("task-1", {"note": "something else"})
        assert failed.value.attempts == 1 and not failed.value.dead_lettered
        assert "already used with a different body" in str(failed.value)
        assert sleeps.delays == []
        assert httpx.get(f"{crm.url}/stats").json()["requests"] == 2
        missing_key = httpx.post(f"{crm.url}/v1/followups", json={})
        assert missing_key.status_code == 400 and "Idempotency-Key" in missing_key.json()["error"]["message"]


def test_the_time_budget_stops_retries_early():
    policy = RetryPolicy(max_attempts=10, base_delay=0.25, max_delay=5, jitter=False)  # real sleeps
    with ThreadServer(create_crm_app(fail_first=100, latency_ms=0, retry_after=0)) as crm, \
            crm_followups(crm.url, pipeline="p", policy=policy, budget=0.6) as effect:
        with pytest.raises(SideEffectFailed, match="out of time budget, next retry in") as failed:
            effect("task-1", {})
    assert failed.value.attempts in (1, 2) and failed.value.last_status == 503


def test_connection_errors_are_retried_then_fail_clearly():
    sleeps = Recorder()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with crm_followups(url, pipeline="p", policy=RetryPolicy(max_attempts=3, sleep=sleeps)) as effect:
        with pytest.raises(SideEffectFailed, match="gave up after 3 attempts; last error: ConnectError") as failed:
            effect("task-1", {})
    assert failed.value.last_status == 0 and len(sleeps.delays) == 2


def test_concurrency_limit_is_honoured_at_the_server():
    limit = 3
    with ThreadServer(create_crm_app(latency_ms=60)) as crm:
        with crm_followups(crm.url, pipeline="p", max_concurrency=limit) as effect, ThreadPoolExecutor(12) as pool:
            list(pool.map(lambda i: effect(f"task-{i}", {"i": i}), range(12)))
        stats = httpx.get(f"{crm.url}/stats").json()
        assert stats["created"] == 12
        assert 1 <= stats["max_in_flight"] <= limit

    with ThreadServer(create_crm_app(latency_ms=60)) as crm:  # control: without the cap the server sees more
        with crm_followups(crm.url, pipeline="p", max_concurrency=12) as effect, ThreadPoolExecutor(12) as pool:
            barrier = threading.Barrier(12)
            list(pool.map(lambda i: (barrier.wait(5), effect(f"task-{i}", {"i": i})), range(12)))
        assert httpx.get(f"{crm.url}/stats").json()["max_in_flight"] > limit
