"""OTLP/gRPC trace receiver (`TraceService/Export`, port 4317) handing requests to the shared Ingest path.

It decodes the request itself, so malformed protobuf is INVALID_ARGUMENT rather than grpcio's INTERNAL,
and turns Ingest's HTTP-style refusals into the gRPC codes and RetryInfo the OTLP spec tells SDKs to act on.

The server is grpc.aio on an event loop of its own: a request waits for its message as a coroutine, not on
a worker thread, so streams that announce a message and never send it cannot starve the others (grpcio's
thread-pool server reads each unary request on a worker thread). A request whose spans are all valid waits for
the write-ahead log's group commit on the loop; converting one with spans to reject runs on the `workers`
threads, and only once a whole message has arrived.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, NamedTuple

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2
from google.rpc.error_details_pb2 import RetryInfo
from grpc_status import rpc_status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tracetune.collector import metrics
from tracetune.collector.ingest import ExportResult, Ingest, IngestError

__all__ = ["SERVICE", "GrpcServer", "TraceReceiver", "grpc_status", "response_for", "serve_grpc", "server_options"]

log = logging.getLogger("tracetune.collector")

SERVICE: Final = "opentelemetry.proto.collector.trace.v1.TraceService"
"""The fully qualified gRPC service; its one method is `Export`."""

RETRY_INFO_TRAILER: Final = "google.rpc.retryinfo-bin"
"""The Python SDK reads RetryInfo from this trailer; Go and Java read it from grpc-status-details-bin. We send both."""

THROTTLE_RETRY_SECONDS: Final = 1
"""RetryInfo delay for a 429 without retry_after: RESOURCE_EXHAUSTED is retryable only with RetryInfo."""

INGEST_CODES: Final = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}
"""IngestError.status → gRPC code (OTLP spec, "OTLP/gRPC Response" › Failures). 413 is INVALID_ARGUMENT, not
RESOURCE_EXHAUSTED: both are non-retryable per spec, but SDKs (Python's among them) retry RESOURCE_EXHAUSTED
regardless and would resend the same oversized request. Other 4xx are INVALID_ARGUMENT, other 5xx INTERNAL."""

CONNECTION_LIMITS: Final = {
    "grpc.max_connection_idle_ms": 60_000,
    "grpc.max_connection_age_ms": 120_000,
    "grpc.max_connection_age_grace_ms": 15_000,
    "grpc.keepalive_time_ms": 60_000,
    "grpc.keepalive_timeout_ms": 20_000,
    "grpc.http2.min_recv_ping_interval_without_data_ms": 10_000,
    "grpc.http2.max_ping_strikes": 2,
    "grpc.max_concurrent_streams": 100,
}
"""Idle connections close after a minute; every connection is recycled (GOAWAY) after two minutes and cut 15 s
later, which also ends the streams of a client that never finishes sending its message; dead peers are
found by keepalive pings; clients pinging more often than every 10 s are disconnected; one connection holds at
most 100 streams at once."""


class _Status(NamedTuple):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, bytes | str], ...]


class _GrpcStatus(_Status, grpc.Status):
    """A grpc.Status for `context.abort_with_status` (grpc.Status is an interface with no constructor)."""


def grpc_status(http_status: int, message: str, retry_after: int | None = None) -> grpc.Status:
    """The gRPC status for an IngestError: code per INGEST_CODES, RetryInfo on the retryable ones."""
    code = INGEST_CODES.get(http_status) or (
        grpc.StatusCode.INVALID_ARGUMENT if 400 <= http_status < 500 else grpc.StatusCode.INTERNAL)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is None:
        retry_after = THROTTLE_RETRY_SECONDS
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if code not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE) or retry_after is None:
        return rpc_status.to_status(status)
    retry_info = RetryInfo(retry_delay=Duration(seconds=max(int(retry_after), 0)))
    status.details.add().Pack(retry_info)
    standard = rpc_status.to_status(status)
    trailers = (*standard.trailing_metadata, (RETRY_INFO_TRAILER, retry_info.SerializeToString()))
    return _GrpcStatus(standard.code, standard.details, trailers)


def response_for(result: ExportResult) -> ExportTraceServiceResponse:
    """Full success leaves partial_success unset; rejected spans or a warning message set it (OTLP spec)."""
    response = ExportTraceServiceResponse()
    if result.rejected_spans or result.error_message:
        response.partial_success.rejected_spans = result.rejected_spans
        response.partial_success.error_message = result.error_message or f"{result.rejected_spans} spans rejected"
    return response


class TraceReceiver:
    """The Export handler: check the bearer token, decode, hand to Ingest (its slow path on `pool`), map the
    outcome to gRPC."""

    def __init__(self, ingest: Ingest, token: str = "", pool: ThreadPoolExecutor | None = None):
        self.ingest = ingest
        self._token = token.encode()
        self._pool = pool

    def authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        if not self._token:
            return True
        presented = next((value for key, value in metadata or () if key == "authorization"), "")
        presented = presented.encode() if isinstance(presented, str) else presented
        scheme, _, credential = presented.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self._token)

    async def export(self, body: bytes, context: grpc.aio.ServicerContext) -> ExportTraceServiceResponse:
        received_ns = time.time_ns()
        if not self.authorized(context.invocation_metadata()):
            metrics.REQUESTS_REFUSED.labels("grpc", "401").inc()  # as the HTTP receiver counts its 401
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong bearer token: send metadata `authorization: Bearer <token>` "
                                "(SDKs: OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer%20<token>)")
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except (DecodeError, RecursionError) as exc:
            problem = f"request is not a valid ExportTraceServiceRequest protobuf: {exc}"
        else:
            problem = ""
        if problem:
            metrics.REQUESTS_REFUSED.labels("grpc", "400").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        refusal: grpc.Status | None = None
        try:  # Ingest counts its own refusals (a full queue or log)
            result = await self.ingest.export_async(request, received_ns, "grpc", body, self._pool)
        except IngestError as exc:
            refusal = grpc_status(exc.status, exc.message, exc.retry_after)
        except Exception:
            log.exception("OTLP/gRPC export failed")
            refusal = _GrpcStatus(grpc.StatusCode.INTERNAL, "the collector failed to take the request; see its log",
                                  ())
        if refusal is not None:
            await context.abort(refusal.code, refusal.details, refusal.trailing_metadata)
        return response_for(result)

    def handler(self) -> grpc.GenericRpcHandler:
        """`Export` with raw bytes in (we decode, see module docstring) and the protobuf response out."""
        export = grpc.unary_unary_rpc_method_handler(
            self.export, response_serializer=ExportTraceServiceResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, {"Export": export})


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """grpc.server options: the receive limit (bigger messages, also after gzip, get RESOURCE_EXHAUSTED
    from grpc itself, which the spec says clients must not retry), CONNECTION_LIMITS, and no SO_REUSEPORT, so a
    second collector on the same port fails at start instead of silently sharing it."""
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.so_reuseport", 0),
            *CONNECTION_LIMITS.items()]


class GrpcServer:
    """The running grpc.aio server on its own event-loop thread; `stop(grace)` returns an event to `.wait()` on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, server: grpc.aio.Server,
                 pool: ThreadPoolExecutor):
        self._loop, self._thread, self._server, self._pool = loop, thread, server, pool
        self._stopped = threading.Event()

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, let those running finish within `grace` seconds (None: cancel them now)."""
        if not self._stopped.is_set():
            asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._stopped.set()
        return self._stopped


def serve_grpc(ingest: Ingest, host: str, port: int, *, max_message_bytes: int, token: str = "",
               workers: int = 8) -> GrpcServer:
    """Start the OTLP/gRPC receiver on host:port and return the running server; the caller calls `.stop(grace)`.

    gzip and deflate request compression are handled by grpc itself. `workers` threads run Ingest's blocking
    work. Raises OSError if the port cannot be bound.
    """
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    if workers <= 0:
        raise ValueError(f"workers must be positive, got {workers}")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-grpc")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="otlp-grpc-loop", daemon=True)
    thread.start()

    async def start() -> grpc.aio.Server | None:
        server = grpc.aio.server(handlers=[TraceReceiver(ingest, token, pool).handler()],
                                 options=server_options(max_message_bytes))
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            await server.stop(None)
            return None
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result()
    if server is None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        pool.shutdown(wait=False)
        raise OSError(f"cannot listen for OTLP/gRPC on {address}: the port is in use or the address is not "
                      f"local; free it or choose another port (collector_grpc_port)")
    return GrpcServer(loop, thread, server, pool)
