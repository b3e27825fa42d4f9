"""The one path every receiver (OTLP/HTTP, OTLP/gRPC) hands a decoded request to.

`Ingest.export()` validates the spans, makes the request durable (write-ahead log, fsynced) and
queues its rows for ClickHouse; it returns only once the acknowledgement is a promise. Rejected spans
are reported as OTLP partial success and quarantined; a request that cannot be taken raises
IngestError (503 + Retry-After when the queue or the log is full).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tracetune.collector import metrics
from tracetune.collector.rows import checked_span_count, convert
from tracetune.collector.wal import Damage, Location, WalError, WriteAheadLog
from tracetune.collector.writer import RECEIVERS, Entry, SpanWriter, decode_record, encode_record

log = logging.getLogger("tracetune.collector")

__all__ = ["RECEIVERS", "ExportResult", "Ingest", "IngestError"]


class IngestError(Exception):
    """A request refused whole: `status` is the HTTP status (400, 413, 415, 429, 503)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class ExportResult:
    """What the receiver answers: spans accepted, spans rejected and why (OTLP partial_success)."""

    accepted_spans: int
    rejected_spans: int = 0
    error_message: str = ""


@dataclass(frozen=True)
class _Checked:
    """A request as the queue sees it: spans for otel_traces and for the quarantine, and the fast path or not."""

    spans: int
    rejected: int
    clean: bool

    def entry(self, lsn: int, location: Location, request: tuple[bytes, int, str] | None = None) -> Entry:
        return Entry(lsn, spans=self.spans, rejected=self.rejected, clean=self.clean, location=location,
                     request=request)


def _clean(spans: int) -> tuple[_Checked, ExportResult, list[list]]:
    """`_check`'s answer for a request whose `spans` are all valid."""
    return _Checked(spans, 0, True), ExportResult(spans), []


def _check(request: ExportTraceServiceRequest, received_ns: int, receiver: str) -> tuple[_Checked, ExportResult,
                                                                                           list[list]]:
    """How a request is queued, what the sender is told, and the spans it quarantines.

    A request whose spans are all valid is converted later with its batch (columns.to_arrow); any
    other goes through the reference converter, span by span (again when its batch is prepared).
    """
    spans = checked_span_count(request)
    if spans is not None:
        return _clean(spans)
    converted = convert(request, received_ns, receiver)
    result = ExportResult(len(converted.rows), converted.rejected, converted.message())
    return _Checked(len(converted.rows), converted.rejected, False), result, converted.quarantine


class Ingest:
    """Validate, log durably, queue. Thread-safe; `export` blocks until the log is fsynced."""

    def __init__(self, wal: WriteAheadLog, writer: SpanWriter):
        self.wal = wal
        self.writer = writer

    def replay(self) -> int:
        """Queue every logged record not yet in ClickHouse, and every damaged record to report (at start,
        before receivers open); spans queued."""
        spans = 0
        for item in self.wal.replay():
            if isinstance(item, Damage):
                self.writer.enqueue(Entry(item.last_lsn, damage=item))
                continue
            body, received_ns, receiver = decode_record(item.payload)
            checked, _, _ = _check(ExportTraceServiceRequest.FromString(body), received_ns, receiver)
            self.writer.enqueue(checked.entry(item.lsn, item.location))
            spans += checked.spans + checked.rejected
        if spans:
            log.warning("replaying %d spans from the write-ahead log in %s", spans, self.wal.directory)
        return spans

    def export(self, request: ExportTraceServiceRequest, received_ns: int | None = None, receiver: str = "http",
               payload: bytes | None = None) -> ExportResult:
        """Take one request; `payload` is its protobuf encoding when the caller has it already.

        Raises IngestError(503) when the log is full or cannot take the record (disk full, I/O error);
        the request is then neither acknowledged nor queued. Every refusal is counted once, here.
        """
        received_ns = received_ns or time.time_ns()
        taken = self._admit(_check(request, received_ns, receiver), request, received_ns, receiver, payload)
        if isinstance(taken, ExportResult):
            return taken
        result, record, total, on_durable = taken
        try:
            self.wal.append(record, spans=total, on_durable=on_durable)
        except WalError as exc:
            raise self._log_refused(receiver, exc) from None
        return self._accepted(result, receiver)

    async def export_async(self, request: ExportTraceServiceRequest, received_ns: int, receiver: str,
                           payload: bytes | None, pool: Executor) -> ExportResult:
        """`export` for a receiver on an event loop: a request whose spans are all valid (the usual case) is
        checked on the loop and waits for the log's group commit without a thread of its own; any other is
        converted span by span in `pool`, as `export` does it, off the loop."""
        spans = checked_span_count(request)
        if spans is None:
            return await asyncio.get_running_loop().run_in_executor(
                pool, self.export, request, received_ns, receiver, payload)
        taken = self._admit(_clean(spans), request, received_ns, receiver, payload)
        if isinstance(taken, ExportResult):
            return taken
        result, record, total, on_durable = taken
        try:
            await self.wal.append_async(record, spans=total, on_durable=on_durable)
        except WalError as exc:
            raise self._log_refused(receiver, exc) from None
        return self._accepted(result, receiver)

    def _admit(self, checked_result: tuple[_Checked, ExportResult, list[list]], request: ExportTraceServiceRequest,
               received_ns: int, receiver: str, payload: bytes | None):
        """Count a checked request; the result itself when there is nothing to log, else (result, the log's
        record, spans, what runs once it is durable); IngestError(503) when the queue has no room."""
        checked, result, quarantine = checked_result
        total = result.accepted_spans + result.rejected_spans
        metrics.SPANS_RECEIVED.labels(receiver).inc(total)
        for row in quarantine:
            metrics.SPANS_REJECTED.labels(receiver, row[2].split()[0]).inc()
        if total == 0:
            return result
        if not self.writer.has_room(total):
            raise self._refuse(receiver, self.wal.broken or (
                f"write queue is full ({self.writer.queued_rows} spans, {self.wal.pending_bytes} log bytes "
                "waiting for ClickHouse); retry later"))
        body = payload if payload is not None else request.SerializeToString()
        logged = (body, received_ns, receiver)  # what the log's record holds: the writer may take it from here
        return (result, encode_record(body, received_ns, receiver), total,
                lambda lsn, location: self.writer.enqueue(checked.entry(lsn, location, logged)))

    def _accepted(self, result: ExportResult, receiver: str) -> ExportResult:
        metrics.SPANS_ACCEPTED.labels(receiver).inc(result.accepted_spans)
        metrics.WAL_BYTES.set(self.wal.pending_bytes)
        return result

    def _log_refused(self, receiver: str, exc: WalError) -> IngestError:
        log.error("%s", exc)
        return self._refuse(receiver, f"{exc}; retry later")

    def _refuse(self, receiver: str, message: str) -> IngestError:
        metrics.REQUESTS_REFUSED.labels(receiver, "503").inc()
        return IngestError(503, message, retry_after=self.writer.retry_after())
