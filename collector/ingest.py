"""The one path every receiver (OTLP/HTTP, OTLP/gRPC) hands a decoded request to.

`Ingest.export()` validates the spans, makes the request durable (write-ahead log, fsynced) and
queues its rows for ClickHouse; it returns only once the acknowledgement is a promise. Rejected spans
are reported as OTLP partial success and quarantined; a request that cannot be taken raises
IngestError (503 + Retry-After when the queue or the log is full).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tracetune.collector import metrics
from tracetune.collector.rows import checked_span_count, convert
from tracetune.collector.wal import WalError, WriteAheadLog
from tracetune.collector.writer import Entry, SpanWriter

log = logging.getLogger("tracetune.collector")

_RECORD = struct.Struct("<QB")  # received_ns, receiver; then the request as protobuf
RECEIVERS = ("http", "grpc")
RETRY_AFTER_SECONDS = 2


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


def _prepare(request: ExportTraceServiceRequest, body: bytes, received_ns: int, receiver: str
             ) -> tuple[Callable[[int], Entry], ExportResult, list[list]]:
    """How a request is queued, what the sender is told, and the spans it quarantines.

    A request whose spans are all valid is queued as its protobuf body, converted with its batch
    (columns.to_arrow); any other goes through the reference converter now, span by span.
    """
    spans = checked_span_count(request)
    if spans is not None:
        return (lambda lsn: Entry(lsn, body=body, spans=spans)), ExportResult(spans), []
    converted = convert(request, received_ns, receiver)
    result = ExportResult(len(converted.rows), converted.rejected, converted.message())
    return ((lambda lsn: Entry(lsn, rows=converted.rows, quarantine=converted.quarantine,
                               spans=len(converted.rows))), result, converted.quarantine)


class Ingest:
    """Validate, log durably, queue. Thread-safe; `export` blocks until the log is fsynced."""

    def __init__(self, wal: WriteAheadLog, writer: SpanWriter):
        self.wal = wal
        self.writer = writer

    def replay(self) -> int:
        """Queue every logged record not yet in ClickHouse (at start, before receivers open); spans queued."""
        spans = 0
        for lsn, payload in self.wal.replay():
            received_ns, receiver = _RECORD.unpack_from(payload)
            body = payload[_RECORD.size:]
            make, _, _ = _prepare(ExportTraceServiceRequest.FromString(body), body, received_ns, RECEIVERS[receiver])
            entry = make(lsn)
            self.writer.enqueue(entry)
            spans += entry.size
        if spans:
            log.warning("replaying %d spans from the write-ahead log in %s", spans, self.wal.directory)
        return spans

    def export(self, request: ExportTraceServiceRequest, received_ns: int | None = None, receiver: str = "http",
               payload: bytes | None = None) -> ExportResult:
        """Take one request; `payload` is its protobuf encoding when the caller has it already."""
        received_ns = received_ns or time.time_ns()
        body = payload if payload is not None else request.SerializeToString()
        make, result, quarantine = _prepare(request, body, received_ns, receiver)
        total = result.accepted_spans + result.rejected_spans
        metrics.SPANS_RECEIVED.labels(receiver).inc(total)
        for row in quarantine:
            metrics.SPANS_REJECTED.labels(receiver, row[2].split()[0]).inc()
        if total == 0:
            return result
        if not self.writer.has_room(total):
            metrics.REQUESTS_REFUSED.labels(receiver, "503").inc()
            raise IngestError(503, f"write queue is full ({self.writer.queued_rows} spans, "
                                   f"{self.wal.pending_bytes} log bytes waiting for ClickHouse); retry later",
                              retry_after=RETRY_AFTER_SECONDS)
        record = _RECORD.pack(received_ns, RECEIVERS.index(receiver)) + body
        try:
            self.wal.append(record, on_written=lambda lsn: self.writer.enqueue(make(lsn)))
        except WalError as exc:
            metrics.REQUESTS_REFUSED.labels(receiver, "503").inc()
            log.error("%s", exc)
            raise IngestError(503, str(exc), retry_after=RETRY_AFTER_SECONDS) from None
        metrics.SPANS_ACCEPTED.labels(receiver).inc(result.accepted_spans)
        metrics.WAL_BYTES.set(self.wal.pending_bytes)
        return result
