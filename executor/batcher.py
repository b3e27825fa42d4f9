"""Adaptive-size micro-batching: requests queue, a batch runs when full or when its oldest waited long enough.

One batch span is linked to every request span it served; each request learns its batch size and
queue time so its own step span can carry them. With a `length` function and `bucket_by_length`, a
batch holds the oldest request and the next-oldest of its length bucket only, so padded batches waste
less compute (others wait for a batch of their own bucket).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from tracetune.base.batching import padding_ratio, seconds_until_due, take_batch


@dataclass
class BatchResult:
    value: Any
    batch_size: int
    queue_ms: float
    padding_ratio: float = 0.0  # share of the batch's padded length that was padding
    queue_depth: int = 0  # requests queued (itself included) when this one joined


@dataclass
class _Pending:
    item: Any
    future: Future
    enqueued: float
    link: trace.Link | None
    length: int = 0
    depth: int = 0


class Batcher:
    """Collects single items into batches for `run_batch`: up to `max_size`, waiting at most `max_wait_ms`.

    `submit` returns a Future; one thread runs the batches, emits a batch span linked to the callers'
    spans, and optionally groups items of similar length to cut padding. `configure` takes new
    knobs from the tuner without a restart.
    """

    def __init__(self, name: str, run_batch: Callable[[list[Any]], list[Any]], max_size: int = 8,
                 max_wait_ms: float = 5.0, tracer: trace.Tracer | None = None,
                 on_batch: Callable[[int, float], None] | None = None,
                 length: Callable[[Any], int] | None = None, bucket_by_length: bool = False,
                 attributes: dict[str, Any] | None = None):
        self.name = name
        self._run_batch = run_batch
        self.max_size = max_size
        self.max_wait_ms = max_wait_ms
        self._tracer = tracer or trace.get_tracer("tracetune.executor")
        self._on_batch = on_batch
        self._length = length
        self._attributes = dict(attributes or {})  # on every batch span, e.g. tracetune.batch_of
        self.bucket_by_length = bucket_by_length
        self.padding_waste = [0, 0]  # padded tokens, total padded length, over all batches
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def configure(self, max_size: int, max_wait_ms: float, bucket_by_length: bool | None = None) -> None:
        """Apply new bounds; queued requests are kept and served under the new bounds."""
        with self._cond:
            self.max_size = max(1, int(max_size))
            self.max_wait_ms = max(0.0, float(max_wait_ms))
            if bucket_by_length is not None:
                self.bucket_by_length = bucket_by_length
            self._cond.notify()

    def submit(self, item: Any) -> Future:
        return self.submit_many([item])[0]

    def submit_many(self, items: list[Any]) -> list[Future]:
        """Queue `items` together, as one burst: no batch is taken between two of them."""
        span_context = trace.get_current_span().get_span_context()
        link = trace.Link(span_context) if span_context.is_valid else None
        now = time.monotonic()
        pending = [_Pending(item, Future(), now, link, self._length(item) if self._length else 0) for item in items]
        with self._cond:
            if self._closed:
                raise RuntimeError(f"batcher {self.name} is closed")
            for one in pending:
                self._queue.append(one)
                one.depth = len(self._queue)
            self._cond.notify()
        return [one.future for one in pending]

    @property
    def depth(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(10)

    def _next_batch(self) -> list[_Pending]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            while not self._closed:
                remaining = seconds_until_due(len(self._queue), self.max_size, self._queue[0].enqueued,
                                              self.max_wait_ms, time.monotonic())
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            bucketing = bool(self.bucket_by_length and self._length)
            chosen = take_batch([p.length for p in self._queue] if bucketing else [0] * len(self._queue),
                                self.max_size, bucketing)
            batch = [self._queue[i] for i in chosen]
            for i in reversed(chosen):
                del self._queue[i]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            started = time.monotonic()
            links = [p.link for p in batch if p.link is not None]
            padded = max(p.length for p in batch) * len(batch)
            padding = padding_ratio([p.length for p in batch])
            self.padding_waste[0] += padded - sum(p.length for p in batch)
            self.padding_waste[1] += padded
            attributes = {**self._attributes, "tracetune.batch_size": len(batch)}
            if self._length:
                attributes["tracetune.padding_ratio"] = round(padding, 4)
            with self._tracer.start_as_current_span(f"batch {self.name}", links=links,
                                                    attributes=attributes) as span:
                try:
                    values = self._run_batch([p.item for p in batch])
                    if len(values) != len(batch):
                        raise RuntimeError(f"batch function returned {len(values)} results for {len(batch)} inputs")
                except BaseException as exc:  # noqa: BLE001 - every waiter hears about the failure, none is lost
                    span.record_exception(exc)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                    for p in batch:
                        p.future.set_exception(exc)
                    continue
            if self._on_batch:
                self._on_batch(len(batch), time.monotonic() - started)
            for p, value in zip(batch, values, strict=False):
                p.future.set_result(BatchResult(value, len(batch), (started - p.enqueued) * 1000, padding, p.depth))
