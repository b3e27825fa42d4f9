"""Cold starts: the first request each model variant serves after the executor starts.

A variant's first call pays for what later calls find ready (onnxruntime's memory arenas and kernels, a lazy
model load, a remote's connection), so its latency is reported on its own: the step span carries
`tracetune.cold_start` and the executor counts it in `tracetune_cold_starts_total` and
`tracetune_cold_start_duration_seconds`, once per variant per executor start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace

from tracetune.executor import conventions as attr
from tracetune.executor import metrics


class ColdStarts:
    """The variants of one step that have served their first request; a canary's fork shares it (same models)."""

    def __init__(self) -> None:
        self._served: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, route: str) -> bool:
        """True for the first caller on `route` (it measures the cold start), False for every later one."""
        with self._lock:
            if route in self._served:
                return False
            self._served.add(route)
            return True

    def release(self, route: str) -> None:
        """The claimed first call failed: the next call on `route` is the cold start."""
        with self._lock:
            self._served.discard(route)

    @contextmanager
    def first(self, pipeline: str, step: str, route: str, span: trace.Span) -> Iterator[None]:
        """Time the body if it is `route`'s first call since start, and report it; otherwise do nothing."""
        if not self.claim(route):
            yield
            return
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self.release(route)
            raise
        seconds = time.perf_counter() - started
        span.set_attribute(attr.COLD_START, True)
        metrics.COLD_STARTS_TOTAL.labels(pipeline, step, route).inc()
        metrics.COLD_START_SECONDS.labels(pipeline, step, route).set(seconds)
