"""Batching writer: acknowledged records reach ClickHouse in large inserts, each exactly once.

Every record is already in the write-ahead log when it is queued here. A batch is a run of whole
records; before it is sent, its LSN range goes into the log's checkpoint, and it is inserted with a
deduplication token made from that range, so a batch retried after an outage or a crash lands once.
Connection and server-side failures are retried with backoff; an insert the engine refuses for its
data is bisected until the refused rows are isolated, and those rows go to the quarantine table.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tracetune.collector import columns, metrics
from tracetune.collector.rows import COLUMNS, QUARANTINE_COLUMNS, convert
from tracetune.collector.wal import DAMAGED_DIR, Damage, Intent, Location, WalError, WriteAheadLog

log = logging.getLogger("tracetune.collector")

# ClickHouse error codes that say nothing about the rows: the server or table is not ready, busy,
# or refusing us. Any other server error is taken to be caused by the data and the batch is bisected.
TRANSIENT_CODES = frozenset({
    3, 16, 47, 60, 81, 159, 164, 192, 193, 194, 202, 203, 209, 210, 225, 236, 241, 242, 243, 319, 394, 425, 439,
    497, 516, 999, 1002,
})
_CODE = re.compile(r"Code:? (\d+)")
_SYSTEMIC_AFTER = 64  # failed inserts in one bisection with no success: the store, not the rows
# Beside the token, on every insert (one server or a cluster, see docs/store.md): a Distributed table
# answers only once every shard has the rows (else it acknowledges rows still queued on this node,
# and a retry could not be deduplicated), and the rollup views drop a retried batch too, whatever the
# server's default. `insert_distributed_sync` is `distributed_foreground_insert` under the name every
# server version knows (an unknown setting would fail every insert).
INSERT_SETTINGS = {"insert_distributed_sync": 1, "deduplicate_blocks_in_dependent_materialized_views": 1}


@dataclass(frozen=True)
class ArrowFile:
    """Spans already serialized as the Arrow IPC file an insert sends (by the conversion process,
    converter.py): inserted as they are, the table read back only to split the part."""

    body: bytes = field(repr=False)  # tens of MB: never in a log line
    rows: int = 0
    # The same rows made again in this process from the log (set by the writer): what splitting a refused
    # part falls back to when the file cannot be read back, so a damaged file never holds its batch.
    remake: Callable[[], pa.Table | list[list[Any]]] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.rows

    def table(self) -> pa.Table | list[list[Any]]:
        try:
            return pa.ipc.open_file(pa.py_buffer(self.body)).read_all()
        except (pa.ArrowException, OSError) as exc:
            if self.remake is None:
                raise
            log.error("the conversion process's Arrow file of %d spans cannot be read back (%s): converting them "
                      "again in the collector", self.rows, str(exc).splitlines()[0][:200])
            return self.remake()


Part = list[list[Any]] | pa.Table | ArrowFile  # rows in COLUMNS order, the same as Arrow columns, or serialized
# Bytes of acknowledged request bodies the queue keeps in memory beside their log records, so the writer
# converts them without reading them back (a pread, a copy and the record's CRC: about 0.3 µs per span of
# bench/ingest.py's requests). Past this, queued requests are only where they lie in the log and are read
# back; none is kept while inserts fail, so memory stays flat however long ClickHouse is away. Sized for
# the batch being converted and the one filling behind it at collector_batch_rows = 100,000 (about 43 MB of
# bodies each for those requests; at 32 MiB most of every batch was read back, 0.24 µs per span).
HOLD_BYTES = 128 * 1024 * 1024
# Spans converted to Arrow at a time: an insert may be larger (fewer, larger parts: less merging in the
# store), while the conversion's arrays stay small enough for the CPU's caches (its cost per span grows
# with the arrays: +25% at 100,000 spans in one go, bench/ingest.py --profile).
CONVERT_SPANS = 20_000


def _to_arrow_in_chunks(bodies: list[bytes], spans: list[int]) -> pa.Table | None:
    """columns.to_arrow of whole requests, CONVERT_SPANS spans at a time, as one table; None when any chunk
    needs the reference converter (then the whole part takes it, as when converted in one go, so a batch
    retried after a crash is made of the same rows under the same token)."""
    chunks, start, count = [], 0, 0
    for i, n in enumerate(spans):
        if count and count + n > CONVERT_SPANS:
            chunks.append(bodies[start:i])
            start, count = i, 0
        count += n
    chunks.append(bodies[start:])
    tables = []
    for chunk in chunks:
        table = columns.to_arrow(chunk)
        if table is None:
            return None
        tables.append(table)
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables)
    except pa.ArrowException:  # chunks whose types differ: the reference converter takes the part
        return None


def _reference_rows(bodies: list[tuple[bytes, int, str]]) -> list[list[Any]]:
    """Requests' spans as rows by the reference converter (what a batch the Arrow path declines becomes)."""
    return [row for body, ns, receiver in bodies
            for row in convert(ExportTraceServiceRequest.FromString(body), ns, receiver).rows]


def _in_process(bodies: list[tuple[bytes, int, str]], spans: list[int]) -> pa.Table | list[list[Any]]:
    """Clean requests' spans converted in this process: one Arrow table, or rows by the reference converter."""
    table = _to_arrow_in_chunks([body for body, _, _ in bodies], spans)
    return table if table is not None else _reference_rows(bodies)


def _halves(part: Part) -> tuple[Part, Part]:
    if isinstance(part, ArrowFile):
        part = part.table()
    mid = len(part) // 2
    if isinstance(part, pa.Table):
        return part.slice(0, mid), part.slice(mid)
    return part[:mid], part[mid:]


@dataclass
class Prepared:
    """A batch converted and ready to insert: (table, rows or Arrow table, dedup token) per part."""

    batch: list[Entry]
    intent: Intent
    parts: list[tuple[str, Part, str]]


class _Retry(Exception):
    """The insert failed for a reason that is not in the rows: retry the batch later."""


RECORD = struct.Struct("<QB")  # how a request is logged: received_ns, receiver; then the request as protobuf
RECEIVERS = ("http", "grpc")


def encode_record(body: bytes, received_ns: int, receiver: str) -> tuple[bytes, bytes]:
    """The write-ahead log payload of one request, in two parts (the log joins them once, into its record)."""
    return RECORD.pack(received_ns, RECEIVERS.index(receiver)), body


def decode_record(payload: bytes) -> tuple[bytes, int, str]:
    """(protobuf body, received_ns, receiver) of a logged request."""
    received_ns, receiver = RECORD.unpack_from(payload)
    return payload[RECORD.size:], received_ns, RECEIVERS[receiver]


@dataclass
class Entry:
    """One acknowledged request, by where it lies in the log (its body is read back when its batch is
    prepared, so the queue's memory does not grow with the log), or a report of damaged records."""

    lsn: int
    spans: int = 0  # spans it puts into otel_traces
    rejected: int = 0  # spans it puts into the quarantine
    clean: bool = True  # every span valid: converted with its batch by columns.to_arrow
    location: Location | None = None
    damage: Damage | None = None
    # (body, received_ns, receiver) as its log record holds them, while the writer keeps them in memory
    # (HOLD_BYTES); None: read back from the log
    request: tuple[bytes, int, str] | None = None

    @property
    def size(self) -> int:
        return self.spans + self.rejected + (self.damage is not None)


DAMAGE_COLUMNS = ["detected_at", "wal_id", "segment", "start_byte", "end_byte", "first_lsn", "last_lsn", "spans",
                  "kept_in", "message"]


def data_error(exc: BaseException) -> bool:
    """True when ClickHouse refused the insert because of what was in it (so splitting can isolate it)."""
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    if isinstance(exc, OperationalError) or not isinstance(exc, DatabaseError):
        return False
    match = _CODE.search(str(exc))
    if not match:
        return False
    code = int(match.group(1))
    if code == 252:  # TOO_MANY_PARTS: the rows' fault only when one insert spans too many partitions
        return "partitions" in str(exc).lower()
    return code not in TRANSIENT_CODES


class SpanWriter:
    """Drains the queue of acknowledged records into ClickHouse: one thread converts, one inserts.

    Neither thread ever dies of an error: a failed insert, checkpoint or read is logged and retried.
    """

    def __init__(self, client_factory: Callable[[], Any], wal: WriteAheadLog, batch_rows: int = 20_000,
                 flush_seconds: float = 1.0, max_queue_rows: int = 0, table: str = "otel_traces",
                 quarantine_table: str = "tracetune_quarantine", stall_seconds: float = 30.0,
                 damage_table: str = "tracetune_wal_damage",
                 to_arrow: Callable[[list[bytes], list[int]], pa.Table | ArrowFile | None] | None = None):
        self._to_arrow = to_arrow or _to_arrow_in_chunks  # or a ConversionProcess's convert (converter.py)
        self._client_factory = client_factory
        self._client: Any = None
        self.wal = wal
        self.batch_rows = batch_rows
        self.flush_seconds = flush_seconds
        self.max_queue_rows = max_queue_rows  # 0: only the log's size on disk bounds the queue
        self.table = table
        self.quarantine_table = quarantine_table
        self.damage_table = damage_table
        self.stall_seconds = stall_seconds
        self._queue: deque[Entry] = deque()
        self._queued_rows = 0
        self._held_bytes = 0  # bodies of queued entries kept in memory (Entry.request), at most HOLD_BYTES
        self._holding = True  # False from a failed insert until one succeeds: new entries keep no body
        self._cond = threading.Condition()
        self._stopping = False
        self._stop_deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="span-writer", daemon=True)
        self._converter = threading.Thread(target=self._convert_loop, name="span-converter", daemon=True)
        self._handoff: queue.Queue[Prepared | None] = queue.Queue(maxsize=1)
        self._abandoned = False  # the inserter gave up at shutdown: what is left stays in the log
        self.rows_written = 0
        self.rows_quarantined = 0
        self.damaged_records = 0
        self.insert_failures = 0
        self.last_error = ""
        self._last_progress = time.monotonic()
        self._written_at: deque[tuple[float, int]] = deque(maxlen=64)  # (time, log bytes) per commit

    # ---- producer side -------------------------------------------------------------------
    def has_room(self, rows: int) -> bool:
        """Whether a request of `rows` spans may be taken now (else: 503 + Retry-After).

        The log's size on disk (`collector_wal_max_bytes`) is the bound; `max_queue_rows` an optional
        second one. An empty queue takes any request, so one larger than the queue is not refused forever.
        """
        if self._stopping or self.wal.full:
            return False
        return not self.max_queue_rows or not self._queued_rows or self._queued_rows + rows <= self.max_queue_rows

    def retry_after(self) -> int:
        """Seconds a refused sender should wait: 1 while the writer is draining fast enough to make room
        within a second, else 2 (so the six attempts of an OpenTelemetry SDK spread over its 10 s budget)."""
        now = time.monotonic()
        recent = [(t, b) for t, b in self._written_at if now - t < 5.0]
        if self.wal.full and len(recent) >= 2 and not self.wal.short_of_space:
            rate = sum(b for _, b in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-3)
            if self.wal.pending_bytes - self.wal.max_bytes < rate:
                return 1
        return 2

    def enqueue(self, entry: Entry) -> None:
        """Queue a record that is in the log (called in LSN order, once it is fsynced)."""
        with self._cond:
            if not self._queued_rows:
                self._last_progress = time.monotonic()  # an idle writer starts its stall clock now
            if entry.request is not None:
                if self._holding and self._held_bytes + len(entry.request[0]) <= HOLD_BYTES:
                    self._held_bytes += len(entry.request[0])
                else:
                    entry.request = None
            self._queue.append(entry)
            self._queued_rows += entry.size
            metrics.QUEUE_SPANS.set(self._queued_rows)
            if self._queued_rows >= self.batch_rows:
                self._cond.notify()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def stalled(self) -> bool:
        """Rows are waiting and no insert has succeeded for `stall_seconds`."""
        return bool(self._queued_rows) and time.monotonic() - self._last_progress > self.stall_seconds

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> SpanWriter:
        self._converter.start()
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking requests, write what is queued for up to `timeout` s; the rest stays in the log."""
        started = time.monotonic()
        with self._cond:
            self._stopping = True
            self._stop_deadline = started + timeout
            self._cond.notify_all()
        self._thread.join(timeout)
        self._abandoned = self._abandoned or self._thread.is_alive()
        self._converter.join(max(0.0, started + timeout + 0.5 - time.monotonic()))
        if self._abandoned and self._queued_rows:
            log.warning("stopping with %d spans unwritten; they stay in the write-ahead log and are written at the "
                        "next start", self._queued_rows)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is written; True on success."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify()
        while time.monotonic() < deadline:
            if not self._queued_rows:
                return True
            time.sleep(0.02)
        return False

    # ---- consumer side -------------------------------------------------------------------
    def _take(self, intent: Intent | None = None) -> list[Entry]:
        """The next batch: whole records in LSN order, only fsynced ones; [] once stopped and empty.

        With `intent` (the batch in flight when the process died), exactly its records are taken.
        """
        with self._cond:
            deadline = time.monotonic() + self.flush_seconds
            while True:
                if self._abandoned:
                    return []
                rows, last = self._ready()
                if rows and (rows >= self.batch_rows or self._stopping or time.monotonic() >= deadline
                             or (intent is not None and last >= intent.last)):
                    break
                if self._stopping and not self._queue:
                    return []
                if not self._queue:
                    self._cond.wait(self.flush_seconds)
                    deadline = time.monotonic() + self.flush_seconds
                else:
                    self._cond.wait(max(0.002, min(deadline - time.monotonic(), 0.02)))
            batch: list[Entry] = []
            taken = 0
            while self._queue and self._queue[0].lsn <= self.wal.synced_lsn:
                entry = self._queue[0]
                size = entry.size
                if intent is not None and entry.lsn <= intent.last:
                    pass  # part of the batch in flight at the crash, whatever its size
                elif intent is not None or (batch and taken + size > self.batch_rows):
                    break
                batch.append(self._queue.popleft())
                taken += size
            return batch

    def _ready(self) -> tuple[int, int]:
        """(rows, last LSN) of the fsynced records at the head of the queue, up to one batch."""
        synced, rows, last = self.wal.synced_lsn, 0, 0
        for entry in self._queue:
            if entry.lsn > synced or rows >= self.batch_rows:
                break
            rows += entry.size
            last = entry.lsn
        return rows, last

    def _convert_loop(self) -> None:
        """Stage one: take batches and convert them, while stage two inserts the previous one."""
        intent = self.wal.intent  # a batch in flight at a crash is taken first, exactly as it was
        while True:
            batch = self._take(intent)
            intent = None
            prepared = None
            while batch:
                try:
                    prepared = self._prepare(batch)
                    break
                except Exception:
                    log.exception("preparing a batch of %d records failed; retrying", len(batch))
                    time.sleep(1.0)
                    if self._abandoned:
                        return
            while not self._abandoned:
                try:
                    self._handoff.put(prepared, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if prepared is None or self._abandoned:
                return

    def _run(self) -> None:
        """Stage two: insert each prepared batch until it lands, then commit it in the log."""
        while True:
            prepared = self._handoff.get()
            if prepared is None:
                return
            if not self._insert_until_done(prepared):
                self._abandoned = True
                with self._cond:
                    self._cond.notify_all()
                return
            batch = prepared.batch
            self.wal.commit(batch[-1].lsn)
            with self._cond:
                self._queued_rows -= sum(e.size for e in batch)
                self._last_progress = time.monotonic()
                self.rows_written += sum(e.spans for e in batch)
            self._written_at.append((time.monotonic(), sum(e.location.length for e in batch if e.location)))
            metrics.QUEUE_SPANS.set(self._queued_rows)
            metrics.WAL_BYTES.set(self.wal.pending_bytes)

    def _insert_until_done(self, prepared: Prepared) -> bool:
        """Checkpoint the batch's range, then insert it, retrying with backoff; False if stopped first."""
        backoff = 0.2
        while True:
            try:
                if self.wal.intent != prepared.intent:
                    self.wal.begin(prepared.intent)
                self._write(prepared)
                self._holding = True
                return True
            except Exception as exc:  # noqa: BLE001 - ClickHouse down or refusing, disk full: the rows stay, retry
                self._holding = False
                self.insert_failures += 1
                metrics.INSERT_FAILURES.inc()
                self.last_error = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
                if not isinstance(exc, WalError):
                    self._client = None
                log.warning("insert of %d spans failed, will retry: %s",
                            sum(e.spans for e in prepared.batch), self.last_error)
            remaining = self._stop_deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, 5.0)

    # ---- inserts ---------------------------------------------------------------------------
    def _client_or_new(self) -> Any:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def _insert(self, table: str, part: Part, token: str) -> None:
        started = time.perf_counter()
        settings = {"insert_deduplication_token": token, **INSERT_SETTINGS}
        if isinstance(part, ArrowFile):
            self._client_or_new().raw_insert(table, COLUMNS, part.body, settings=settings, fmt="Arrow")
        elif isinstance(part, pa.Table):
            self._client_or_new().insert_arrow(table, part, settings=settings)
        else:
            columns = {self.table: COLUMNS, self.quarantine_table: QUARANTINE_COLUMNS,
                       self.damage_table: DAMAGE_COLUMNS}[table]
            self._client_or_new().insert(table, part, column_names=columns, settings=settings)
        metrics.INSERT_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SPANS.observe(len(part))

    def _prepare(self, batch: list[Entry]) -> Prepared:
        """The inserts a batch becomes, each with its own token derived from the batch's LSN range.

        Each record is read back from the log. Spans of valid requests go in as one Arrow table
        (rows.convert when columns.to_arrow cannot take them), other requests' spans as rows made by the
        reference converter, rejected spans into the quarantine, damaged records into tracetune_wal_damage.
        """
        intent = Intent(batch[0].lsn, batch[-1].lsn)
        token = self.wal.token(intent.first, intent.last)
        parts: list[tuple[str, Part, str]] = []
        bodies: list[tuple[bytes, int, str]] = []
        body_spans: list[int] = []
        body_locations: list[Location] = []
        rows: list[list[Any]] = []
        quarantine: list[list[Any]] = []
        damage: list[list[Any]] = []
        for entry in batch:
            if entry.damage is not None:
                damage.append(self._damage_row(entry.damage))
                continue
            assert entry.location is not None
            try:
                body, received_ns, receiver = entry.request or decode_record(self.wal.read(entry.location))
            except WalError as exc:  # damaged since it was written: report it like any damaged record
                lost = Damage(entry.location.path, entry.location.offset,
                              entry.location.offset + entry.location.length, entry.lsn, entry.lsn,
                              entry.spans + entry.rejected)
                log.error("%s (%s)", lost.describe(), exc)
                damage.append(self._damage_row(lost))
                continue
            if entry.clean:
                bodies.append((body, received_ns, receiver))
                body_spans.append(entry.spans)
                body_locations.append(entry.location)
            else:
                converted = convert(ExportTraceServiceRequest.FromString(body), received_ns, receiver)
                rows += converted.rows
                quarantine += converted.quarantine
        if damage:
            parts.append((self.damage_table, damage, token + "/d"))
        if quarantine:
            parts.append((self.quarantine_table, quarantine, token + "/q"))
        if bodies:
            part: Part | None = self._to_arrow([body for body, _, _ in bodies], body_spans)
            if part is None:
                part = _reference_rows(bodies)
            elif isinstance(part, ArrowFile):
                part = replace(part, remake=lambda: _in_process(
                    [decode_record(self.wal.read(location)) for location in body_locations], body_spans))
            parts.append((self.table, part, token + "/b"))
        if rows:
            parts.append((self.table, rows, token + "/r"))
        self._release(batch)
        return Prepared(batch, intent, parts)

    def _release(self, batch: list[Entry]) -> None:
        """Drop the bodies a prepared batch kept in memory (a failed preparation keeps them for its retry)."""
        held = 0
        for entry in batch:
            if entry.request is not None:
                held += len(entry.request[0])
                entry.request = None
        with self._cond:
            self._held_bytes -= held

    def _damage_row(self, damage: Damage) -> list[Any]:
        return [time.time_ns() // 1_000_000, self.wal.wal_id, damage.path.name, damage.start, damage.end,
                damage.first_lsn, damage.last_lsn, damage.spans, str(self.wal.directory / DAMAGED_DIR),
                damage.describe()]

    def _write(self, prepared: Prepared) -> None:
        """Insert every part; each is tried whole first, so a retry of a part that had landed is dropped."""
        for table, part, token in prepared.parts:
            if table == self.table:
                self._bisect(part, token, {"failures": 0, "successes": 0})
                continue
            self._insert(table, part, token)
            if table == self.quarantine_table:
                self.rows_quarantined += len(part)
            else:
                self.damaged_records += len(part)
                metrics.WAL_DAMAGED_RECORDS.inc(len(part))

    def _bisect(self, part: Part, token: str, tally: dict[str, int]) -> None:
        """Insert `part`; if the engine refuses its data, insert each half the same way (down to one row)."""
        try:
            self._insert(self.table, part, token)
            metrics.SPANS_WRITTEN.inc(len(part))
            tally["successes"] += 1
            return
        except Exception as exc:
            if not data_error(exc):
                raise
            if not tally["failures"]:
                log.warning("ClickHouse refused %d spans for their data, isolating the bad rows: %s", len(part),
                            str(exc).splitlines()[0][:300])
            tally["failures"] += 1
            if not tally["successes"] and tally["failures"] > _SYSTEMIC_AFTER:
                raise _Retry(f"every part of the batch is refused, the store is at fault: {exc}") from None
            if len(part) > 1:
                left, right = _halves(part)
                self._bisect(left, token + "L", tally)
                self._bisect(right, token + "R", tally)
                return
            self._quarantine_row(part, str(exc).strip().splitlines()[0][:500], token + "/q")

    def _quarantine_row(self, part: Part, reason: str, token: str) -> None:
        if isinstance(part, ArrowFile):
            part = part.table()
        values = part.to_pylist()[0] if isinstance(part, pa.Table) else dict(zip(COLUMNS, part[0], strict=True))
        record = [time.time_ns() // 1_000_000, "writer", f"ClickHouse refused the row: {reason}",
                  values["ServiceName"], values["TraceId"], values["SpanId"], values["SpanName"],
                  json.dumps(values, default=str)]
        self._insert(self.quarantine_table, [record], token)
        self.rows_quarantined += 1
        metrics.SPANS_REJECTED.labels("writer", "insert").inc()
        log.error("quarantined span %s of trace %s: %s", values["SpanId"], values["TraceId"], reason)
