"""Batching writer: accepted rows queue in memory and reach ClickHouse in large inserts.

A request is accepted whole or refused whole (`offer` returns False when the queue is full, so the
receiver answers 503 with Retry-After). Accepted rows stay queued until an insert succeeds;
failed inserts are retried with backoff, never dropped. Rows still unwritten when the process
stops are spilled to a JSON-lines file and queued again by the next writer that starts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collector.rows import COLUMNS

log = logging.getLogger("tracetune.collector")


class SpanWriter:
    def __init__(self, client_factory: Callable[[], Any], batch_rows: int = 5000,
                 flush_seconds: float = 1.0, max_queue_rows: int = 200_000, table: str = "otel_traces",
                 spill_dir: Path | None = None):
        self._client_factory = client_factory
        self._client: Any = None
        self.batch_rows = batch_rows
        self.flush_seconds = flush_seconds
        self.max_queue_rows = max_queue_rows
        self.table = table
        self._queue: deque[list[Any]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="span-writer", daemon=True)
        self.rows_written = 0
        self.insert_failures = 0
        self.last_error = ""
        self.spill_dir = spill_dir
        self.rows_spilled = 0
        self.shutdown_retry_seconds = 30.0  # how long a stopping writer keeps retrying before it spills

    # ---- producer side -------------------------------------------------------------------
    def offer(self, rows: list[list[Any]]) -> bool:
        """Queue every row or none: False means the queue is full (back off and retry)."""
        with self._cond:
            if self._stopping or len(self._queue) + len(rows) > self.max_queue_rows:
                return False
            self._queue.extend(rows)
            if len(self._queue) >= self.batch_rows:
                self._cond.notify()
            return True

    @property
    def queued_rows(self) -> int:
        return len(self._queue)

    # ---- consumer side -------------------------------------------------------------------
    def start(self) -> SpanWriter:
        self._replay_spill()
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, flush what is queued (retrying until `timeout`), then return."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is written; True on success."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify()
        while time.monotonic() < deadline:
            if not self._queue and not self._inflight:
                return True
            time.sleep(0.02)
        return False

    _inflight = 0

    def _take(self) -> list[list[Any]]:
        with self._cond:
            deadline = time.monotonic() + self.flush_seconds
            while not self._stopping and len(self._queue) < self.batch_rows:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(len(self._queue), self.batch_rows)
            batch = [self._queue.popleft() for _ in range(count)]
            self._inflight = count
            return batch

    def _give_back(self, batch: list[list[Any]]) -> None:
        with self._cond:
            self._queue.extendleft(reversed(batch))
            self._inflight = 0

    def _insert(self, batch: list[list[Any]]) -> None:
        if self._client is None:
            self._client = self._client_factory()
        self._client.insert(self.table, batch, column_names=COLUMNS)

    def _run(self) -> None:
        backoff = 0.2
        stop_deadline: float | None = None
        while True:
            batch = self._take()
            if not batch:
                self._inflight = 0
                if self._stopping:
                    return
                continue
            try:
                self._insert(batch)
            except Exception as exc:  # noqa: BLE001 - ClickHouse down or refusing: keep the rows, retry later
                self._give_back(batch)
                self.insert_failures += 1
                self.last_error = str(exc).splitlines()[0][:300]
                self._client = None
                log.warning("insert of %d spans failed, will retry: %s", len(batch), self.last_error)
                if self._stopping:
                    stop_deadline = stop_deadline or time.monotonic() + self.shutdown_retry_seconds
                    if time.monotonic() > stop_deadline:
                        self._spill()
                        return
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            with self._cond:
                self.rows_written += len(batch)
                self._inflight = 0

    # ---- spill -----------------------------------------------------------------------------
    def _spill(self) -> None:
        with self._cond:
            rows, self._queue = list(self._queue), deque()
        if not rows:
            return
        if self.spill_dir is None:
            log.error("ClickHouse unreachable at shutdown: %d spans unwritten and no spill dir", len(rows))
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"spill-{time.time_ns()}-{os.getpid()}.jsonl"
        with path.open("w") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")
        self.rows_spilled += len(rows)
        log.error("ClickHouse unreachable at shutdown: spilled %d spans to %s", len(rows), path)

    def _replay_spill(self) -> None:
        if self.spill_dir is None or not self.spill_dir.exists():
            return
        for path in sorted(self.spill_dir.glob("spill-*.jsonl")):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
            with self._cond:
                self._queue.extend(rows)
            path.unlink()
            log.warning("queued %d spilled spans from %s", len(rows), path)
