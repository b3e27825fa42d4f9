"""A concurrency limit whose size can change while calls hold it (the tuner may lower or raise it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class LimitTimeout(TimeoutError):
    """No slot freed up in time."""


class Limiter:
    """At most `limit` holders at once; `resize` takes effect for the next acquisition.

    Lowering the limit never interrupts a holder: new callers wait until enough have left.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"a concurrency limit must be at least 1, got {limit}")
        self.limit = limit
        self.in_use = 0
        self._cond = threading.Condition()

    def resize(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a concurrency limit must be at least 1, got {limit}")
        with self._cond:
            self.limit = limit
            self._cond.notify_all()

    @contextmanager
    def slot(self, timeout: float | None = None) -> Iterator[float]:
        """Hold one slot; yields the seconds spent waiting for it. LimitTimeout after `timeout` s."""
        started = time.monotonic()
        with self._cond:
            if not self._cond.wait_for(lambda: self.in_use < self.limit, timeout):
                raise LimitTimeout(f"all {self.limit} slots stayed busy for {timeout:g} s")
            self.in_use += 1
        try:
            yield time.monotonic() - started
        finally:
            with self._cond:
                self.in_use -= 1
                self._cond.notify()
