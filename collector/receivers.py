"""OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf and JSON), as the OTLP spec defines it.

Writes need the collector's bearer token (401 without it). A Host header that does not name the collector
and browser requests from another site get 403 (tracetune.base.serving.Guard). Malformed bodies get 400, oversized 413,
unsupported media types 415, a body that does not arrive in time 408, a full queue or log 503 with
Retry-After; the error body is a `google.rpc.Status` in the request's encoding. A 200 means every
accepted span is in the fsynced write-ahead log; spans refused one by one are counted in
`partial_success`. `/health` is 503 while the writer makes no progress; `/metrics` answers Prometheus text or
OpenMetrics, as the scraper's Accept asks.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tracetune.base.serving import LOOPBACK_HOSTS, Guard, Refused
from tracetune.base.serving import metrics as prometheus
from tracetune.collector import metrics
from tracetune.collector.ingest import Ingest, IngestError

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_GRPC_CODES = {400: 3, 401: 16, 403: 7, 408: 4, 413: 3, 415: 3, 429: 8, 503: 14}  # INVALID_ARGUMENT, ...
_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")

def _hex_ids_to_base64(node):
    """OTLP/JSON carries ids as hex; protobuf's JSON mapping expects base64 for bytes fields."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise IngestError(400, f"{key} {value[:80]!r} is not a hex string") from None
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)
    return node


def parse(body: bytes, media_type: str) -> ExportTraceServiceRequest:
    """The request a body holds, or IngestError(400) saying why it is not one."""
    message = ExportTraceServiceRequest()
    if media_type == PROTOBUF:
        try:
            message.ParseFromString(body)
        except (DecodeError, RecursionError) as exc:
            raise IngestError(400, f"body is not a valid ExportTraceServiceRequest protobuf: {exc}") from None
        return message
    try:
        document = json.loads(body)
        json_format.ParseDict(_hex_ids_to_base64(document), message, ignore_unknown_fields=True)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IngestError(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise IngestError(400, "body is nested too deeply to be an OTLP/JSON ExportTraceServiceRequest") from None
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise IngestError(400, f"body is not a valid OTLP/JSON ExportTraceServiceRequest: {exc}") from None
    return message


def _decode(body: bytes, encoding: str, limit: int) -> bytes:
    """The body without its Content-Encoding: one complete gzip or deflate stream, at most `limit` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise IngestError(415, f"Content-Encoding {encoding!r} is not supported; use gzip or none")
    try:
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise IngestError(400, f"body is not valid {encoding}: {exc}") from None
    if len(data) > limit:
        raise IngestError(413, f"decompressed body is larger than the {limit}-byte limit")
    if not decompressor.eof:
        raise IngestError(400, f"{encoding} body is truncated (the stream does not end)")
    if decompressor.unused_data:
        raise IngestError(400, f"{encoding} body has {len(decompressor.unused_data)} bytes after the end of its "
                             "stream; send one complete stream")
    return data


def _encode(message, media_type: str) -> bytes:
    if media_type == PROTOBUF:
        return message.SerializeToString()
    return json_format.MessageToJson(message, indent=None).encode()


def _error(exc: IngestError, media_type: str) -> Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
    status = Status(code=_GRPC_CODES.get(exc.status, 2), message=exc.message)
    return Response(_encode(status, media_type), status_code=exc.status, headers=headers, media_type=media_type)


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise IngestError(413, f"body of {declared} bytes is larger than the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise IngestError(413, f"body is larger than the {limit}-byte limit")
    except TimeoutError:
        raise IngestError(408, f"the body did not arrive within {timeout:g} s") from None
    return b"".join(chunks)  # one chunk (the usual case) is returned as it is, without a copy


_log = logging.getLogger("tracetune.collector")
_REFUSAL_LOG_SECONDS = 60.0  # an SDK without the token retries every few seconds: one log line a minute


def _check_token(request: Request, state) -> None:
    token = state.token
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        if time.monotonic() - state.last_refusal_log >= _REFUSAL_LOG_SECONDS:  # the app may only print "401"
            state.last_refusal_log = time.monotonic()
            _log.warning("refused spans from %s: %s bearer token; the token is in <home>/collector.token (or "
                         "TRACETUNE_COLLECTOR_TOKEN): give the SDK OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer%%20"
                         "<token> (logged at most once a minute)", request.client.host if request.client else "?",
                         "a wrong" if given else "no")
        raise IngestError(401, "missing or wrong bearer token: send the header 'Authorization: Bearer <token>' "
                             "(the token is in <home>/collector.token or TRACETUNE_COLLECTOR_TOKEN; SDKs take "
                             "it from OTEL_EXPORTER_OTLP_HEADERS=authorization=Bearer%20<token>)")


async def traces(request: Request) -> Response:
    state = request.app.state
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    reply_type = media_type if media_type in (PROTOBUF, JSON) else JSON
    received_ns = time.time_ns()
    try:
        _check_token(request, state)
        if media_type not in (PROTOBUF, JSON):
            raise IngestError(415, f"Content-Type {media_type!r} is not supported; send {PROTOBUF} or {JSON}")
        body = await _read_body(request, state.max_body_bytes, state.body_timeout)
        data = _decode(body, request.headers.get("content-encoding", ""), state.max_body_bytes)
        message = parse(data, media_type)
    except IngestError as exc:
        metrics.REQUESTS_REFUSED.labels("http", str(exc.status)).inc()
        return _error(exc, reply_type)
    try:
        result = await state.ingest.export_async(message, received_ns, "http",
                                                 data if media_type == PROTOBUF else None, state.pool)
    except IngestError as exc:  # Ingest counted this refusal
        return _error(exc, reply_type)
    reply = ExportTraceServiceResponse()
    if result.rejected_spans or result.error_message:
        reply.partial_success.rejected_spans = result.rejected_spans
        reply.partial_success.error_message = result.error_message
    return Response(_encode(reply, reply_type), media_type=reply_type)


async def health(request: Request) -> Response:
    writer = request.app.state.ingest.writer
    stalled = writer.stalled
    return JSONResponse({
        "status": "stalled" if stalled else "ok", "queued_rows": writer.queued_rows,
        "rows_written": writer.rows_written, "rows_quarantined": writer.rows_quarantined,
        "insert_failures": writer.insert_failures, "last_error": writer.last_error,
        "wal_bytes": writer.wal.pending_bytes,
    }, status_code=503 if stalled else 200)


def _refusal(headers: dict[str, str], refused: Refused) -> Response:
    """The Guard's refusal as OTLP answers every error: a google.rpc.Status in the request's encoding."""
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    metrics.REQUESTS_REFUSED.labels("http", str(refused.status)).inc()
    return _error(IngestError(refused.status, refused.message), media_type if media_type == PROTOBUF else JSON)


def create_app(ingest: Ingest, max_body_bytes: int, body_timeout: float = 30.0, token: str = "",
               hosts: frozenset[str] | None = LOOPBACK_HOSTS) -> Starlette:
    """The OTLP/HTTP app over one ingest path; with a `token`, writes need `Authorization: Bearer <token>`;
    `hosts` is the Host allow-list (None: any). The body limit and timeout are the receiver's own (they
    apply after decompression too)."""
    app = Starlette(routes=[
        Route("/v1/traces", traces, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ])
    app.state.ingest = ingest
    # Requests with spans to reject are converted in these threads (the others wait for the log's group commit
    # on the loop): a plain executor costs less CPU per request than anyio's; 40 threads as anyio's default.
    app.state.pool = ThreadPoolExecutor(max_workers=40, thread_name_prefix="otlp-http")
    app.state.max_body_bytes = max_body_bytes
    app.state.body_timeout = body_timeout
    app.state.token = token
    app.state.last_refusal_log = -_REFUSAL_LOG_SECONDS  # each receiver logs a refused token once a minute
    app.add_middleware(Guard, hosts=hosts, error=_refusal)
    return app


__all__ = ["create_app", "parse"]
