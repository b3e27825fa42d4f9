"""The ClickHouse HTTP interface in front of the embedded engine.

Speaks enough of the real protocol that clickhouse-connect (and curl) work unchanged: `/ping`,
queries in the URL or body, `INSERT ... FORMAT X` with a data body (not `INSERT ... SELECT ... input()`
or `FROM INFILE`: the engine gets the body as a file of its own), per-request settings,
`database`, `param_*` query parameters, compressed bodies both ways, and errors as HTTP errors
carrying the engine's message and `X-ClickHouse-Exception-Code`. As in ClickHouse, a request holds
one statement, GET is read-only, and `X-ClickHouse-Timezone` is the zone the values were read in.
"""

from __future__ import annotations

import gzip
import json
import re
import uuid
import zlib
from collections.abc import Iterator
from typing import NamedTuple

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
_ZstdError: type[Exception] = _zstd.ZstdError if _zstd else ValueError

# URL parameters that steer the HTTP layer rather than the query.
_TRANSPORT_PARAMS = {
    "query", "database", "default_format", "query_id", "session_id", "session_timeout", "session_check",
    "user", "password", "quota_key", "compress", "decompress", "buffer_size", "wait_end_of_query",
    "enable_http_compression", "http_zlib_compression_level", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "cancel_http_readonly_queries_on_client_close",
    "client_protocol_version", "role", "http_response_buffer_size", "add_http_cors_header",
    "http_wait_end_of_query", "output_format_parallel_formatting",
}

# Enough of ClickHouse's lexer to find INSERT, FORMAT, VALUES and `;` outside string literals,
# quoted identifiers, comments and parentheses (a column named `values` is not a VALUES clause).
_TOKEN = re.compile(
    rb"""(?P<quoted>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*"|`(?:[^`\\]|\\.|``)*`)"""
    rb"""|(?P<comment>--[^\n]*|\#[ !][^\n]*|/\*.*?\*/)"""
    rb"""|(?P<space>\s+)"""
    rb"""|(?P<word>[A-Za-z_][A-Za-z0-9_]*)"""
    rb"""|(?P<other>.)""",
    re.DOTALL,
)
_DATA_START = re.compile(rb"[ \t]*(?:\r?\n)?")  # after FORMAT X / VALUES: blanks and one line break
_NAME_BEFORE = {b"INTO", b"TABLE", b"."}  # the next word is a table name, even if it reads FORMAT

# ClickHouse's own mapping of a few common error codes to HTTP statuses (the rest are 500).
_HTTP_STATUS = {
    6: 400, 27: 400, 36: 400, 41: 400, 42: 400, 43: 400, 44: 400, 46: 400, 47: 400, 53: 400, 62: 400,
    70: 400, 115: 400, 117: 400, 130: 400, 386: 400, 456: 400, 457: 400,
    60: 404, 81: 404, 82: 400, 57: 400, 164: 403, 192: 403, 193: 403, 194: 403, 516: 403,
    159: 504, 160: 504, 241: 500,
}
_SUPPORTED_ENCODINGS = ["lz4", "zstd", "gzip", "deflate"] if _zstd else ["lz4", "gzip", "deflate"]


class BadRequest(Exception):
    """A request the HTTP layer refuses before it reaches the engine, with a ClickHouse error code."""

    def __init__(self, message: str, code: int = 27, name: str = "CANNOT_PARSE_INPUT_ASSERTION_FAILED"):
        super().__init__(f"Code: {code}. DB::Exception: {message} ({name})")
        self.code = code


def _lz4_frames(body: bytes) -> bytes:
    """Every frame of an LZ4 stream: clickhouse-connect sends one frame per insert block."""
    out = []
    while body:
        decompressor = lz4.frame.LZ4FrameDecompressor()
        out.append(decompressor.decompress(body))
        if not decompressor.eof:
            raise ValueError("truncated LZ4 frame")
        body = decompressor.unused_data
    return b"".join(out)


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
            return _lz4_frames(body)
        if encoding == "zstd" and _zstd:
            return _zstd.decompress(body)
    except (OSError, EOFError, ValueError, RuntimeError, zlib.error, _ZstdError) as exc:
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


def _tokens(text: bytes) -> Iterator[tuple[str, bytes, int, int]]:
    """(kind, token, start, end) of each token outside parentheses; spaces and comments skipped."""
    depth = 0
    for match in _TOKEN.finditer(text):
        kind, token = match.lastgroup or "other", match.group()
        if kind in ("space", "comment"):
            continue
        if token == b"(":
            depth += 1
        elif token == b")":
            depth = max(depth - 1, 0)
        elif depth == 0:
            yield kind, token, match.start(), match.end()


class _Insert(NamedTuple):
    """An `INSERT ... FORMAT X` / `INSERT ... VALUES` with data: where its parts are in the request."""

    statement: str  # `INSERT INTO t (cols)`, without its SETTINGS clause
    settings: str  # `SETTINGS a = 1, ...` or ""
    format: str
    data_start: int


def _split_insert(head: bytes) -> _Insert | None:
    """For `INSERT ... FORMAT X` / `INSERT ... VALUES`: the statement, its settings, format and data offset."""
    tokens = _tokens(head)
    first = next(tokens, None)
    if first is None or first[1].upper() != b"INSERT":
        return None
    previous, format_at, settings_at, refused = b"", -1, -1, b""
    for kind, token, start, end in tokens:
        word = token.upper() if kind == "word" else b""
        clause = word if previous not in _NAME_BEFORE else b""
        if format_at >= 0 and word:
            return _insert(head, settings_at, format_at, token.decode(), end, refused)
        format_at = -1
        if clause in (b"SELECT", b"WITH", b"INFILE"):
            refused = refused or clause  # from here on, a VALUES is the values() table function
        elif clause == b"VALUES" and not refused:
            return _insert(head, settings_at, start, "Values", end, refused)
        elif clause == b"SETTINGS" and settings_at < 0:
            settings_at = start
        elif clause == b"FORMAT":
            format_at = start
        if token == b";":
            return None
        previous = word or token
    return None


def _insert(head: bytes, settings_at: int, format_at: int, fmt: str, end: int, refused: bytes) -> _Insert:
    """The parts of an insert with data, or BadRequest for the forms the engine cannot take a body for."""
    if refused:
        what = "FROM INFILE" if refused == b"INFILE" else "INSERT ... SELECT with a data body (input())"
        raise BadRequest(f"{what} is not supported by the embedded store; send INSERT INTO table (columns) "
                         "FORMAT X with the data in the request body", 48, "NOT_IMPLEMENTED")
    statement_end = settings_at if settings_at >= 0 else format_at
    return _Insert(head[:statement_end].decode("utf-8", "replace").strip(),
                   head[statement_end:format_at].decode("utf-8", "replace").strip(), fmt,
                   _DATA_START.match(head, end).end())


def _output_format(text: str) -> str | None:
    """The trailing `FORMAT X` of one statement; refuses a second statement as ClickHouse does."""
    raw = text.encode()
    tokens = list(_tokens(raw))
    for i, (_, token, start, _) in enumerate(tokens):
        if token == b";" and i + 1 < len(tokens):
            rest = raw[start:start + 60].decode("utf-8", "replace")
            raise BadRequest(f"Syntax error (Multi-statements are not allowed): failed at position {start + 1}: "
                             f"{rest}. Send one statement per request", 62, "SYNTAX_ERROR")
    if tokens and tokens[-1][1] == b";":
        tokens.pop()
    words = [token.upper() if kind == "word" else token for kind, token, _, _ in tokens]
    for i in range(len(words) - 2, 0, -1):
        if (words[i] == b"FORMAT" and tokens[i + 1][0] == "word" and words[i - 1] not in _NAME_BEFORE
                and (i + 2 == len(words) or words[i + 2] == b"SETTINGS")):
            return tokens[i + 1][1].decode()
    return None


def parse_request(params: dict[str, str], body: bytes) -> Request:
    """Turn URL parameters and a (decompressed) body into one engine Request."""
    for name in ("compress", "decompress"):
        if params.get(name, "0") not in ("", "0"):
            raise BadRequest(f"{name}=1 (ClickHouse's native block compression) is not supported here; "
                             "use Content-Encoding / enable_http_compression=1 with Accept-Encoding instead")
    query_param = params.get("query", "")
    settings = {k: v for k, v in params.items() if k not in _TRANSPORT_PARAMS and not k.startswith("param_")}
    query_params = {k[len("param_"):]: v for k, v in params.items() if k.startswith("param_")}
    database = params.get("database", "")
    default_format = params.get("default_format", "TabSeparated")

    head = query_param.encode() if query_param else body
    insert = _split_insert(head)
    if insert:
        data = head[insert.data_start:] + (body if query_param else b"")
        return Request(insert.statement, database=database, settings=settings, params=query_params,
                       insert_format=insert.format, insert_settings=insert.settings, data=data)
    text = query_param + ("\n" if query_param and body else "") + body.decode("utf-8", "replace")
    text = text.strip()
    if not text:
        raise BadRequest("Empty query. Send the query in the request body or the `query` parameter",
                         62, "SYNTAX_ERROR")
    output_format = _output_format(text) or default_format
    return Request(text, output_format=output_format, database=database, settings=settings,
                   params=query_params)


def _read_only(settings: dict[str, str]) -> dict[str, str]:
    """GET may only read, as in ClickHouse (readonly=2, first, so the URL cannot lift it)."""
    wanted = settings.get("readonly", "2")
    if wanted not in ("1", "2"):
        raise BadRequest("Cannot modify 'readonly' setting in readonly mode: a GET request is read-only; "
                         "send writes with POST", 164, "READONLY")
    return {"readonly": wanted, **{k: v for k, v in settings.items() if k != "readonly"}}


def _error(message: str, code: int, status: int | None = None) -> Response:
    return PlainTextResponse(
        message.rstrip() + "\n",
        status_code=status or _HTTP_STATUS.get(code, 500),
        headers={"X-ClickHouse-Exception-Code": str(code)},
    )


def create_app(engine: Engine) -> Starlette:
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
            if request.method == "GET":
                engine_request.settings = _read_only(engine_request.settings)
        except BadRequest as exc:
            return _error(str(exc), exc.code, _HTTP_STATUS.get(exc.code, 400))
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
            "X-ClickHouse-Timezone": result.timezone or engine.timezone,
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
