"""An exact-match LRU cache with a TTL and a size bound, on an injectable clock.

The executor's answer caches and the tuner's simulation (whose clock is virtual time) use this one class,
so a simulated cache hits exactly when the executor's would.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["TTLCache"]

_MISSING = object()


class TTLCache:
    """Entries expire `ttl_seconds` after they were stored; past `max_entries` the least recent go.

    `configure` changes both while running: a shorter TTL applies to entries already stored.
    """

    def __init__(self, max_entries: int = 10_000, ttl_seconds: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def configure(self, max_entries: int | None = None, ttl_seconds: float | None = None) -> None:
        with self._lock:
            if max_entries is not None:
                self.max_entries = max(1, int(max_entries))
            if ttl_seconds is not None:
                self.ttl_seconds = max(0.0, float(ttl_seconds))
            self._trim()

    def get(self, key: str) -> Any:
        """The cached value, or `TTLCache.MISSING`; a hit refreshes recency, not expiry."""
        now = self._clock()
        with self._lock:
            entry = self._data.get(key)
            if entry is None or entry[0] + self.ttl_seconds <= now:
                if entry is not None:
                    del self._data[key]
                self.misses += 1
                return _MISSING
            self._data.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = (self._clock(), value)
            self._data.move_to_end(key)
            self._trim()

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def _trim(self) -> None:
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

    MISSING = _MISSING
