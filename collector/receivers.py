"""OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf and JSON), as the OTLP spec defines it.

Malformed bodies get 400, oversized 413, unsupported media types 415, a full write queue 503 with
Retry-After; the error body is a `google.rpc.Status` in the request's encoding.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib

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

from collector.rows import span_count, to_rows
from collector.writer import SpanWriter

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_GRPC_CODES = {400: 3, 413: 8, 415: 3, 429: 8, 503: 14}  # INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE
_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


class OtlpError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _hex_ids_to_base64(node):
    """OTLP/JSON carries ids as hex; protobuf's JSON mapping expects base64 for bytes fields."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS and isinstance(value, str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise OtlpError(400, f"{key} {value!r} is not a hex string") from None
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)
    return node


def parse(body: bytes, media_type: str) -> ExportTraceServiceRequest:
    message = ExportTraceServiceRequest()
    if media_type == PROTOBUF:
        try:
            message.ParseFromString(body)
        except DecodeError as exc:
            raise OtlpError(400, f"body is not a valid ExportTraceServiceRequest protobuf: {exc}") from None
        return message
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OtlpError(400, f"body is not valid JSON: {exc}") from None
    try:
        json_format.ParseDict(_hex_ids_to_base64(document), message, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise OtlpError(400, f"body is not a valid OTLP/JSON ExportTraceServiceRequest: {exc}") from None
    return message


def _decode(body: bytes, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise OtlpError(415, f"Content-Encoding {encoding!r} is not supported; use gzip or none")
    try:
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        data = decompressor.decompress(body, limit + 1)
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise OtlpError(400, f"body is not valid {encoding}: {exc}") from None
    if len(data) > limit:
        raise OtlpError(413, f"decompressed body is larger than the {limit}-byte limit")
    return data


def _encode(message, media_type: str) -> bytes:
    if media_type == PROTOBUF:
        return message.SerializeToString()
    return json_format.MessageToJson(message).encode()


def create_app(writer: SpanWriter, max_body_bytes: int) -> Starlette:
    def error(exc: OtlpError, media_type: str) -> Response:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
        status = Status(code=_GRPC_CODES.get(exc.status, 2), message=exc.message)
        return Response(_encode(status, media_type), status_code=exc.status, headers=headers,
                        media_type=media_type)

    async def traces(request: Request) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        reply_type = media_type if media_type in (PROTOBUF, JSON) else JSON
        try:
            if media_type not in (PROTOBUF, JSON):
                raise OtlpError(415, f"Content-Type {media_type!r} is not supported; "
                                     f"send {PROTOBUF} or {JSON}")
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_body_bytes:
                raise OtlpError(413, f"body of {declared} bytes is larger than the {max_body_bytes}-byte limit")
            body = bytearray()
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > max_body_bytes:
                    raise OtlpError(413, f"body is larger than the {max_body_bytes}-byte limit")
            data = _decode(bytes(body), request.headers.get("content-encoding", ""), max_body_bytes)
            message = parse(data, media_type)
            rows = to_rows(message)
            if rows and not writer.offer(rows):
                raise OtlpError(503, f"write queue is full ({writer.queued_rows} spans waiting for "
                                     "ClickHouse); retry later", retry_after=2)
        except OtlpError as exc:
            return error(exc, reply_type)
        return Response(_encode(ExportTraceServiceResponse(), reply_type), media_type=reply_type)

    async def health(_: Request) -> Response:
        return JSONResponse({
            "status": "ok", "queued_rows": writer.queued_rows, "rows_written": writer.rows_written,
            "insert_failures": writer.insert_failures, "last_error": writer.last_error,
        })

    return Starlette(routes=[
        Route("/v1/traces", traces, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ])


__all__ = ["create_app", "parse", "span_count", "OtlpError"]
