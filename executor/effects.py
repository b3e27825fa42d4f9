"""Safe side effects: bounded retries with backoff, idempotency keys, a concurrency cap, dead letters.

A step that changes the world (creates a CRM follow-up, sends a mail) must not do it twice when
retried, must not hammer a struggling service, and must leave a trace when it gives up. This module
holds the retry policy (also used by the LLM client), `SideEffect` for one such call, and the
`DeadLetters` writer behind the `tracetune_dead_letters` table.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import httpx
from opentelemetry import trace

from tracetune.base.retrying import is_retryable_status, parse_retry_after
from tracetune.executor import metrics
from tracetune.executor.limits import Limiter

__all__ = ["RetryPolicy", "RetryResult", "RetriesExhausted", "send_with_retries", "parse_retry_after",
           "is_retryable_status", "describe_response", "SideEffect", "SideEffectFailed",
           "DeadLetter", "DeadLetters", "Replayed"]

log = logging.getLogger("tracetune.executor.effects")

@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter; a server's Retry-After is a floor, `max_delay` the ceiling.

    `sleep` and `random` are injectable so tests can record the delays instead of waiting them out.
    """

    max_attempts: int = 5
    base_delay: float = 0.1
    max_delay: float = 5.0
    jitter: bool = True
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay < 0:
            raise ValueError(f"RetryPolicy.base_delay must be >= 0, got {self.base_delay}")
        if self.max_delay < self.base_delay:
            raise ValueError(f"RetryPolicy.max_delay ({self.max_delay}) must be >= base_delay ({self.base_delay})")

    def backoff_cap(self, failed_attempt: int) -> float:
        """The most we wait after the n-th failed attempt (1-based): base * 2^(n-1), at most max_delay."""
        return min(self.max_delay, self.base_delay * 2 ** (failed_attempt - 1))

    def delay(self, failed_attempt: int, retry_after: float | None = None) -> float:
        cap = self.backoff_cap(failed_attempt)
        wait = cap * self.random() if self.jitter else cap
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(self.max_delay, wait)


class RetriesExhausted(Exception):
    """Every attempt failed with something worth retrying (or the time budget ran out)."""

    def __init__(self, attempts: int, last_status: int, error: str, error_type: str = ""):
        super().__init__(error)
        self.attempts = attempts
        self.last_status = last_status  # 0 when the last attempt got no HTTP answer
        self.error = error
        # The OTel `error.type` of the last attempt: its status ("503"), or, with no HTTP answer, the exception's
        # class ("httpx.ReadTimeout": sent and not answered in time, which a provider may bill; "httpx.ConnectError",
        # "httpx.ConnectTimeout", "httpx.PoolTimeout": never sent).
        self.error_type = error_type or (str(last_status) if last_status else "_OTHER")


def _error_type_of(exc: BaseException) -> str:
    """`error.type` for an exception, as the OTel conventions ask: its class's fully qualified name, under the
    name its package exports it by ("httpx.ReadTimeout", not "httpx._exceptions.ReadTimeout")."""
    kind = type(exc)
    package = kind.__module__.split(".")[0]
    return f"{package}.{kind.__qualname__}" if package != "builtins" else kind.__qualname__


class RetryResult(NamedTuple):
    response: httpx.Response  # a success, or a non-retryable error the caller must handle
    attempts: int


def describe_response(response: httpx.Response) -> str:
    """`HTTP 503 Service Unavailable: <the server's message>` from JSON error bodies in common shapes."""
    detail = ""
    try:
        body = response.json()
        err = body.get("error", body.get("detail", "")) if isinstance(body, dict) else ""
        detail = err.get("message", "") if isinstance(err, dict) else str(err)
    except ValueError:
        detail = response.text[:200]
    head = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    return f"{head}: {detail}" if detail else head


def send_with_retries(send: Callable[[], httpx.Response], policy: RetryPolicy,
                      deadline: float | None = None) -> RetryResult:
    """Call `send` until it answers < 400 or a non-retryable status; retry 408/429/5xx, timeouts, resets.

    `deadline` (time.monotonic) stops retrying early when the next wait would pass it.
    Raises RetriesExhausted with the attempt count and the last status and error.
    """
    attempt = 0
    while True:
        attempt += 1
        retry_after = None
        try:
            response = send()
        except httpx.UnsupportedProtocol:
            raise
        except httpx.TimeoutException as exc:
            status, error, kind = 0, f"timed out ({type(exc).__name__})", _error_type_of(exc)
        except httpx.TransportError as exc:
            status, error, kind = 0, f"{type(exc).__name__}: {exc}", _error_type_of(exc)
        else:
            if response.status_code < 400 or not is_retryable_status(response.status_code):
                return RetryResult(response, attempt)
            status, error, kind = response.status_code, describe_response(response), str(response.status_code)
            retry_after = parse_retry_after(response.headers)
        if attempt >= policy.max_attempts:
            raise RetriesExhausted(attempt, status, error, kind)
        wait = policy.delay(attempt, retry_after)
        if deadline is not None and time.monotonic() + wait > deadline:
            raise RetriesExhausted(attempt, status, f"{error} (out of time budget, next retry in {wait:.2f}s)", kind)
        policy.sleep(wait)


# ---- dead letters -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeadLetter:
    pipeline: str
    step: str
    task_id: str
    idempotency_key: str
    attempts: int
    last_status: int
    error: str
    payload: Any
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class DeadLetters:
    """Appends side effects that gave up to `tracetune_dead_letters` (store/sql/030_*), for replay by hand.

    `client_factory` returns a clickhouse-connect client, e.g. `lambda: store.connect(settings)`;
    it is called on first use and again after a failed insert.
    """

    table = "tracetune_dead_letters"
    columns = ("created_at", "pipeline", "step", "task_id", "idempotency_key", "attempts", "last_status",
               "error", "payload")

    def __init__(self, client_factory: Callable[[], Any]):
        self._factory = client_factory
        self._client: Any = None
        self._lock = threading.Lock()

    def write(self, letter: DeadLetter) -> None:
        payload = letter.payload if isinstance(letter.payload, str) else json.dumps(letter.payload, default=str)
        row = [letter.created_at, letter.pipeline, letter.step, letter.task_id, letter.idempotency_key,
               min(letter.attempts, 65535), min(letter.last_status, 65535), letter.error, payload]
        with self._lock:
            try:
                if self._client is None:
                    self._client = self._factory()
                self._client.insert(self.table, [row], column_names=list(self.columns))
            except Exception:
                self._client = None
                raise


# ---- side effects -------------------------------------------------------------------------------

class SideEffectFailed(Exception):
    """A side effect did not happen; the message says why and where the task was dead-lettered."""

    def __init__(self, message: str, *, step: str, task_id: str, idempotency_key: str, attempts: int,
                 last_status: int, error: str, dead_lettered: bool):
        super().__init__(message)
        self.step = step
        self.task_id = task_id
        self.idempotency_key = idempotency_key
        self.attempts = attempts
        self.last_status = last_status
        self.error = error
        self.dead_lettered = dead_lettered


class Replayed(NamedTuple):
    """A dead letter the service took on replay: its JSON answer, the attempts it needed, the HTTP status."""

    answer: dict[str, Any]
    attempts: int
    status: int


class _Sent(NamedTuple):
    response: httpx.Response | None  # the success, or None with the error and why
    attempts: int
    status: int  # 0 when the last attempt got no HTTP answer
    error: str
    why: str
    queued: float  # seconds spent waiting for a concurrency slot
    error_type: str = ""  # the OTel `error.type` of a failure (`RetriesExhausted.error_type`)


def _answer(response: httpx.Response) -> dict[str, Any]:
    try:
        return response.json()
    except ValueError:
        return {}


_KEY_NAMESPACE = uuid.UUID("6f1d7a52-3c1b-4f0e-9a57-2f3b7c9d1e44")


class SideEffect:
    """One external write made safe to retry: POST `url` with JSON and an `Idempotency-Key` header.

    The key is derived from (pipeline, step, task id), so a retried or resubmitted task reuses it and
    the service creates the effect once. At most `max_concurrency` attempts are in flight at a time;
    each attempt times out after `timeout` s; `budget` (s, optional) bounds the whole call: attempts
    are cut short at it and no retry starts whose wait would pass it.
    On the current span: `tracetune.idempotency_key`, `tracetune.retries`, `http.response.status_code`.
    """

    def __init__(self, url: str, *, pipeline: str, step: str, policy: RetryPolicy | None = None,
                 timeout: float = 5.0, budget: float | None = None, max_concurrency: int = 8,
                 dead_letters: DeadLetters | None = None, headers: Mapping[str, str] | None = None,
                 client: httpx.Client | None = None):
        if max_concurrency < 1:
            raise ValueError(f"SideEffect.max_concurrency must be >= 1, got {max_concurrency}")
        if httpx.URL(url).scheme not in ("http", "https"):
            raise ValueError(f"SideEffect.url must be an http(s) URL, got {url!r}")
        if timeout <= 0:
            raise ValueError(f"SideEffect.timeout must be > 0 seconds, got {timeout}")
        self.url = url
        self.pipeline = pipeline
        self.step = step
        self.policy = policy or RetryPolicy()
        self.timeout = timeout
        self.budget = budget
        self.max_concurrency = max_concurrency
        self.dead_letters = dead_letters
        self._headers = dict(headers or {})
        self._slots = Limiter(max_concurrency)
        self._own_client = client is None
        self._client = client or httpx.Client(limits=httpx.Limits(max_connections=max_concurrency,
                                                                  max_keepalive_connections=max_concurrency))

    def configure(self, max_concurrency: int | None = None, timeout: float | None = None) -> None:
        """New limits from the tuner; calls in flight finish under the old ones."""
        if max_concurrency is not None:
            self.max_concurrency = int(max_concurrency)
            self._slots.resize(self.max_concurrency)
        if timeout is not None:
            if timeout <= 0:
                raise ValueError(f"SideEffect.timeout must be > 0 seconds, got {timeout}")
            self.timeout = float(timeout)

    def idempotency_key(self, task_id: str) -> str:
        """Stable per (pipeline, step, task): the same task always sends the same key."""
        return str(uuid.uuid5(_KEY_NAMESPACE, f"{self.pipeline}\x1f{self.step}\x1f{task_id}"))

    def __call__(self, task_id: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Perform the effect for `task_id`; returns the service's JSON answer or raises SideEffectFailed."""
        span = trace.get_current_span()
        key = self.idempotency_key(task_id)
        span.set_attribute("tracetune.idempotency_key", key)
        sent = self._send(key, payload)
        span.set_attribute("tracetune.queue_ms", round(sent.queued * 1000, 3))
        self._annotate(span, sent.attempts, sent.status, sent.queued)
        if sent.response is not None:
            return _answer(sent.response)
        span.set_attribute("error.type", sent.error_type or str(sent.status))
        raise self._fail(task_id, key, payload, sent.attempts, sent.status, sent.error, sent.why)

    def replay(self, task_id: str, idempotency_key: str, payload: Any) -> Replayed:
        """Send a dead letter again: its `payload` under its ORIGINAL `idempotency_key`, retried per the policy
        and never dead-lettered again (the letter is still there), so the service stores the effect once however
        often it is replayed. Returns the answer; raises SideEffectFailed saying why it failed again."""
        sent = self._send(idempotency_key, payload)
        outcome = "replayed" if sent.response is not None else "failed"
        metrics.DEAD_LETTER_REPLAYS_TOTAL.labels(self.pipeline, self.step, outcome).inc()
        if sent.response is not None:
            return Replayed(_answer(sent.response), sent.attempts, sent.status)
        raise SideEffectFailed(f"replay of {self.step} for task {task_id!r}: POST {self.url} {sent.why}; last error: "
                               f"{sent.error}; the dead letter is kept", step=self.step, task_id=task_id,
                               idempotency_key=idempotency_key, attempts=sent.attempts, last_status=sent.status,
                               error=sent.error, dead_lettered=True)

    def _send(self, key: str, payload: Any) -> _Sent:
        """POST `payload` with `key` until it is taken, refused or retries run out (the policy and budget)."""
        headers = {**self._headers, "Idempotency-Key": key}
        queued = [0.0]
        deadline = time.monotonic() + self.budget if self.budget is not None else None

        def send() -> httpx.Response:
            started = time.perf_counter()
            with self._slots.slot():
                queued[0] += time.perf_counter() - started
                timeout = self.timeout
                if deadline is not None:
                    timeout = max(0.001, min(timeout, deadline - time.monotonic()))
                return self._client.post(self.url, json=payload, headers=headers, timeout=timeout)

        try:
            response, attempts = send_with_retries(send, self.policy, deadline)
        except RetriesExhausted as exc:
            why = f"gave up after {exc.attempts} attempt{'s' if exc.attempts > 1 else ''}"
            return _Sent(None, exc.attempts, exc.last_status, exc.error, why, queued[0], exc.error_type)
        if response.status_code < 400:
            return _Sent(response, attempts, response.status_code, "", "", queued[0])
        why = f"was refused ({response.status_code} is not retryable; the request needs fixing)"
        return _Sent(None, attempts, response.status_code, describe_response(response), why, queued[0])

    def _annotate(self, span: trace.Span, attempts: int, status: int, queued: float) -> None:
        span.set_attribute("tracetune.retries", attempts - 1)
        metrics.RETRIES_TOTAL.labels(self.pipeline, self.step).inc(max(0, attempts - 1))
        if status:
            span.set_attribute("http.response.status_code", status)

    def _fail(self, task_id: str, key: str, payload: Mapping[str, Any], attempts: int, status: int,
              error: str, why: str) -> SideEffectFailed:
        where = "not dead-lettered (no dead-letter table configured)"
        dead = False
        if self.dead_letters is not None:
            try:
                self.dead_letters.write(DeadLetter(self.pipeline, self.step, task_id, key, attempts, status, error,
                                                   dict(payload)))
                where, dead = f"dead-lettered in {DeadLetters.table}", True
            except Exception as exc:  # noqa: BLE001 - the failed effect matters more than the bookkeeping
                log.warning("could not dead-letter task %s of %s/%s: %s", task_id, self.pipeline, self.step, exc)
                where = f"NOT dead-lettered ({DeadLetters.table} insert failed: {exc})"
        if dead:
            trace.get_current_span().set_attribute("tracetune.dead_letter", True)
            metrics.DEAD_LETTERS_TOTAL.labels(self.pipeline, self.step).inc()
        message = (f"{self.step} for task {task_id!r}: POST {self.url} {why}; last error: {error}; "
                   f"{where} with idempotency key {key}")
        return SideEffectFailed(message, step=self.step, task_id=task_id, idempotency_key=key, attempts=attempts,
                                last_status=status, error=error, dead_lettered=dead)

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    def __enter__(self) -> SideEffect:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

