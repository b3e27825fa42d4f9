"""The ClickHouse HTTP interface in front of the embedded engine.

Speaks enough of the real protocol that clickhouse-connect (and curl) work unchanged: `/ping`,
queries in the URL or body, `INSERT ... FORMAT X` with a data body, per-request settings,
`database`, `param_*` query parameters, compressed bodies both ways, and errors as HTTP errors
carrying the engine's message and `X-ClickHouse-Exception-Code`.
"""

from __future__ import annotations

import gzip
import json
import re
import uuid
import zlib

import lz4.frame
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from store.engine import Engine, EngineError, Request

try:
    from compression import zstd as _zstd  # Python 3.14+
except ImportError:  # pragma: no cover - depends on the interpreter
    try:
        from backports import zstd as _zstd
    except ImportError:
        _zstd = None

# URL parameters that steer the HTTP layer rather than the query.
_TRANSPORT_PARAMS = {
    "query", "database", "default_format", "query_id", "session_id", "session_timeout", "session_check",
    "user", "password", "quota_key", "compress", "decompress", "buffer_size", "wait_end_of_query",
    "enable_http_compression", "http_zlib_compression_level", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "cancel_http_readonly_queries_on_client_close",
    "client_protocol_version", "role", "http_response_buffer_size", "add_http_cors_header",
    "http_wait_end_of_query", "output_format_parallel_formatting",
}

_INSERT = re.compile(rb"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*INSERT\b", re.IGNORECASE | re.DOTALL)
_INSERT_FORMAT = re.compile(rb"\b(?:FORMAT\s+([A-Za-z0-9_]+)|(VALUES))[ \t]*(?:\r?\n)?", re.IGNORECASE)
_OUTPUT_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)

# ClickHouse's own mapping of a few common error codes to HTTP statuses (the rest are 500).
_HTTP_STATUS = {
    6: 400, 27: 400, 36: 400, 41: 400, 42: 400, 43: 400, 44: 400, 46: 400, 47: 400, 53: 400, 62: 400,
    70: 400, 115: 400, 117: 400, 130: 400, 386: 400, 456: 400, 457: 400,
    60: 404, 81: 404, 82: 400, 57: 400, 164: 403, 192: 403, 193: 403, 194: 403, 516: 403,
    159: 504, 160: 504, 241: 500,
}
_SUPPORTED_ENCODINGS = ["lz4", "zstd", "gzip", "deflate"] if _zstd else ["lz4", "gzip", "deflate"]


class BadRequest(Exception):
    pass


def _decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    try:
        if encoding in ("", "identity"):
            return body
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
        if encoding == "lz4":
            return lz4.frame.decompress(body)
        if encoding == "zstd" and _zstd:
            return _zstd.decompress(body)
    except Exception as exc:
        raise BadRequest(f"Cannot decompress the request body as {encoding}: {exc}") from None
    raise BadRequest(f"Unsupported Content-Encoding {encoding!r}; supported: {', '.join(_SUPPORTED_ENCODINGS)}")


def _compress(body: bytes, accept: str) -> tuple[bytes, str | None]:
    wanted = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    for encoding in wanted:
        if encoding == "lz4":
            return lz4.frame.compress(body), "lz4"
        if encoding == "zstd" and _zstd:
            return _zstd.compress(body), "zstd"
        if encoding == "gzip":
            return gzip.compress(body, compresslevel=3), "gzip"
        if encoding == "deflate":
            return zlib.compress(body, 3), "deflate"
    return body, None


def parse_request(params: dict[str, str], body: bytes) -> Request:
    """Turn URL parameters and a (decompressed) body into one engine Request."""
    query_param = params.get("query", "")
    settings = {k: v for k, v in params.items() if k not in _TRANSPORT_PARAMS and not k.startswith("param_")}
    query_params = {k[len("param_"):]: v for k, v in params.items() if k.startswith("param_")}
    database = params.get("database", "")
    default_format = params.get("default_format", "TabSeparated")

    head = query_param.encode() if query_param else body
    if _INSERT.match(head):
        match = _INSERT_FORMAT.search(head)
        if match:
            statement = head[:match.start()].decode("utf-8", "replace").strip()
            fmt = match.group(1).decode() if match.group(1) else "Values"
            data = head[match.end():] + (body if query_param else b"")
            return Request(statement, database=database, settings=settings, params=query_params,
                           insert_format=fmt, data=data)
    text = query_param + ("\n" if query_param and body else "") + body.decode("utf-8", "replace")
    text = text.strip()
    if not text:
        raise BadRequest("Empty query. Send the query in the request body or the `query` parameter.")
    match = _OUTPUT_FORMAT.search(text)
    output_format = match.group(1) if match else default_format
    return Request(text, output_format=output_format, database=database, settings=settings,
                   params=query_params)


def _error(message: str, code: int, status: int | None = None) -> Response:
    return PlainTextResponse(
        message.rstrip() + "\n",
        status_code=status or _HTTP_STATUS.get(code, 500),
        headers={"X-ClickHouse-Exception-Code": str(code)},
    )


def create_app(engine: Engine, timezone: str = "UTC") -> Starlette:
    async def ping(_: HttpRequest) -> Response:
        return PlainTextResponse("Ok.\n")

    async def handle(request: HttpRequest) -> Response:
        params = dict(request.query_params)
        body = await request.body()
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            form = await request.form()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
            body = b""
        if request.method == "GET" and not params.get("query"):
            return PlainTextResponse("Ok.\n")
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            body = _decompress(body, request.headers.get("content-encoding", ""))
            engine_request = parse_request(params, body)
        except BadRequest as exc:
            return _error(f"Code: 27. DB::Exception: {exc} (CANNOT_PARSE_INPUT_ASSERTION_FAILED)", 27, 400)
        try:
            result = await run_in_threadpool(engine.execute, engine_request)
        except EngineError as exc:
            return _error(str(exc), exc.code)

        summary = {
            "read_rows": str(result.rows_read), "read_bytes": str(result.bytes_read),
            "written_rows": str(result.rows_written), "written_bytes": str(result.bytes_written),
            "total_rows_to_read": str(result.rows_read), "result_rows": "0", "result_bytes": "0",
            "elapsed_ns": str(int(result.elapsed * 1e9)),
        }
        headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Summary": json.dumps(summary),
            "X-ClickHouse-Timezone": timezone,
            "X-ClickHouse-Server-Display-Name": "tracetune-embedded",
        }
        if not engine_request.insert_format:
            headers["X-ClickHouse-Format"] = engine_request.output_format
        payload = result.data
        if params.get("enable_http_compression") == "1" and payload:
            payload, encoding = _compress(payload, request.headers.get("accept-encoding", ""))
            if encoding:
                headers["Content-Encoding"] = encoding
        return Response(payload, headers=headers, media_type="application/octet-stream")

    return Starlette(routes=[
        Route("/ping", ping, methods=["GET", "HEAD"]),
        Route("/replicas_status", ping, methods=["GET"]),
        Route("/", handle, methods=["GET", "POST"]),
    ])
