"""The ClickHouse HTTP interface in front of the embedded engine.

Speaks enough of the real protocol that clickhouse-connect (and curl) work unchanged: `/ping`,
queries in the URL or body, `INSERT ... FORMAT X` with a data body (not `INSERT ... SELECT ... input()`
or `FROM INFILE`: the engine gets the body as a file of its own), per-request settings,
`database`, `param_*` query parameters, compressed bodies both ways (HTTP encodings and ClickHouse's
native blocks, `compress=1` / `decompress=1`), and errors as HTTP errors
carrying the engine's message and `X-ClickHouse-Exception-Code`. As in ClickHouse, a request holds
one statement, GET is read-only, and `X-ClickHouse-Timezone` is the zone the values were read in.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import queue
import re
import secrets
import threading
import uuid
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import lz4.frame
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tracetune.store import blocks, lexer
from tracetune.store.access import AccessDenied, Users, check_origin, credentials
from tracetune.store.engine import Engine, EngineError, ExternalTable, Request
from tracetune.store.policy import Lock, Refused
from tracetune.store.statements import ParseError, Parser

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

_DATA_START = re.compile(rb"[ \t]*(?:\r?\n)?")  # after FORMAT X / VALUES: blanks and one line break
_NAME_BEFORE = {b"INTO", b"TABLE", b"."}  # the next word is a table name, even if it reads FORMAT

# ClickHouse's own mapping of error codes to HTTP statuses (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp).
_STATUS_CODES = {
    400: (36, 6, 25, 26, 38, 41, 72, 441, 675, 676, 27, 376, 15, 44, 37, 123, 8, 167, 168, 223, 62, 117, 53, 321),
    404: (60, 46, 47, 50, 56, 81, 115, 152, 63, 73, 336, 78, 511),
    403: (192, 193, 516, 512, 497),
    401: (194,), 413: (229,), 501: (48,), 503: (209, 76, 439), 411: (381,), 408: (159,), 415: (779,),
}
_HTTP_STATUS = {code: status for status, codes in _STATUS_CODES.items() for code in codes}
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


def _encoding(accept: str) -> str | None:
    """The first encoding in Accept-Encoding that the store can write."""
    for part in accept.split(","):
        encoding = part.split(";")[0].strip().lower()
        if encoding in _SUPPORTED_ENCODINGS:
            return encoding
    return None


def _compress(body: bytes, encoding: str) -> bytes:
    """One self-contained frame (lz4, zstd) or member (gzip): streamed chunks concatenate into one valid body."""
    if encoding == "lz4":
        return lz4.frame.compress(body)
    if encoding == "zstd" and _zstd:
        return _zstd.compress(body)
    if encoding == "gzip":
        return gzip.compress(body, compresslevel=3)
    return zlib.compress(body, 3)


def _tokens(text: bytes) -> Iterator[tuple[str, bytes, int, int]]:
    """The tokens outside parentheses: a column named `values` is not a VALUES clause."""
    depth = 0
    for kind, token, start, end in lexer.tokens(text):
        if token == b"(":
            depth += 1
        elif token == b")":
            depth = max(depth - 1, 0)
        elif depth == 0:
            yield kind, token, start, end


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
    raw = text.encode("utf-8", "surrogateescape")
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


_SHOW_CREATE_SYSTEM = re.compile(r"(?is)\s*SHOW\s+CREATE\s+(?:TEMPORARY\s+)?(?:TABLE\s+)?`?system`?\.`?(\w+)`?")
_SYSTEM_TABLE_DDL = (
    "SELECT concat('CREATE TABLE system.', {tracetune_system_table:String}, '\\n(\\n', "
    "arrayStringConcat(groupArray(concat('    `', name, '` ', type)), ',\\n'), '\\n)\\nENGINE = ', "
    "(SELECT any(engine) FROM system.tables WHERE database = 'system' AND name = {tracetune_system_table:String})) "
    "AS statement FROM system.columns WHERE database = 'system' AND table = {tracetune_system_table:String} "
    "HAVING count() > 0"
)


def parse_request(params: dict[str, str], body: bytes) -> Request:
    """Turn URL parameters and a (decompressed) body into one engine Request."""
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
    # Bytes that are not UTF-8 (a binary `$name$` heredoc) pass through to the engine unchanged.
    text = query_param + ("\n" if query_param and body else "") + body.decode("utf-8", "surrogateescape")
    text = text.strip()
    if not text:
        raise BadRequest("Empty query. Send the query in the request body or the `query` parameter",
                         62, "SYNTAX_ERROR")
    given_format = _output_format(text)
    output_format = given_format or default_format
    system_table = _SHOW_CREATE_SYSTEM.match(text)
    if system_table:  # the engine keeps no DDL for system tables; answer it from system.columns
        text = _SYSTEM_TABLE_DDL + (f" FORMAT {given_format}" if given_format else "")
        query_params = {**query_params, "tracetune_system_table": system_table.group(1)}
    return Request(text, output_format=output_format, database=database, settings=settings,
                   params=query_params)


def _flag(params: dict[str, str], name: str) -> bool:
    return params.get(name, "0").lower() in ("1", "true")


def _blocks(body: bytes) -> bytes:
    """A `decompress=1` body: ClickHouse's compressed blocks, checked, or BadRequest with its code."""
    try:
        return blocks.decompress(body)
    except blocks.BlockError as exc:
        checksum = "checksum" in str(exc)
        raise BadRequest(f"Cannot decompress the request body (decompress=1): {exc}", 40 if checksum else 271,
                         "CHECKSUM_DOESNT_MATCH" if checksum else "CANNOT_DECOMPRESS") from None


_BOOLEAN_PARAMS = ("session_check", "compress", "decompress", "wait_end_of_query",
                   "enable_http_compression", "send_progress_in_http_headers",
                   "cancel_http_readonly_queries_on_client_close", "add_http_cors_header", "http_wait_end_of_query",
                   "output_format_parallel_formatting")
_COUNT_PARAMS = ("buffer_size", "http_response_buffer_size", "http_headers_progress_interval_ms",
                 "client_protocol_version")
MAX_SESSION_TIMEOUT = 3600  # ClickHouse's default max_session_timeout
DEFAULT_SESSION_TIMEOUT = 60


def _check_transport(params: dict[str, str]) -> None:
    """Every parameter that steers the HTTP layer has a value ClickHouse would accept, or BadRequest."""
    for name in _BOOLEAN_PARAMS:
        if name in params and params[name].lower() not in ("0", "1", "true", "false", ""):
            raise BadRequest(f"Invalid value {params[name]!r} for {name}: expected 0 or 1", 36, "BAD_ARGUMENTS")
    for name in _COUNT_PARAMS:
        if name in params and not params[name].isdigit():
            raise BadRequest(f"Invalid value {params[name]!r} for {name}: expected a number", 36, "BAD_ARGUMENTS")
    if "http_zlib_compression_level" in params and params["http_zlib_compression_level"] not in list("123456789"):
        raise BadRequest(f"Invalid value {params['http_zlib_compression_level']!r} for http_zlib_compression_level: "
                         "expected 1 to 9", 36, "BAD_ARGUMENTS")
    if "session_timeout" in params:
        value = params["session_timeout"]
        if not value.isdigit():
            raise BadRequest(f"Invalid session timeout: {value!r}: expected a number of seconds", 374,
                             "INVALID_SESSION_TIMEOUT")
        if int(value) > MAX_SESSION_TIMEOUT:
            raise BadRequest(f"Session timeout {value} is larger than max_session_timeout ({MAX_SESSION_TIMEOUT}). "
                             "Maximum session timeout could be modified in configuration file.", 374,
                             "INVALID_SESSION_TIMEOUT")
    if params.get("session_check", "0") in ("1", "true") and not params.get("session_id"):
        raise BadRequest("Session check without session_id", 36, "BAD_ARGUMENTS")
    if len(params.get("query_id", "")) > 256:
        raise BadRequest("Query id is too long (at most 256 characters)", 36, "BAD_ARGUMENTS")
    if params.get("role"):
        raise BadRequest(f"There is no role `{params['role']}` in user directories (the embedded store has users "
                         "but no roles)", 511, "UNKNOWN_ROLE")


def _top_level_items(text: str) -> list[str]:
    """`UInt8, Decimal(9, 2), Map(String, UInt8)` -> the three types: commas inside parentheses stay."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    return [item for item in items if item]


def _external_tables(params: dict[str, str], files: dict[str, bytes]) -> list[ExternalTable]:
    """ClickHouse external data: each file part is a table named by the part, shaped by `<name>_structure`/_types."""
    tables = []
    for name, data in files.items():
        structure = params.pop(f"{name}_structure", "")
        types = params.pop(f"{name}_types", "")
        if not structure and types:
            structure = ", ".join(f"_{i} {kind}" for i, kind in enumerate(_top_level_items(types), start=1))
        if not structure:
            raise BadRequest(f"Neither structure nor types have not been provided for external table {name}. "
                             f"Use fields {name}_structure or {name}_types to do so.", 36, "BAD_ARGUMENTS")
        tables.append(ExternalTable(name, structure, params.pop(f"{name}_format", "TabSeparated"), data))
    return tables


def _error(message: str, code: int, status: int | None = None, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(
        message.rstrip() + "\n",
        status_code=status or _HTTP_STATUS.get(code, 500),
        headers={"X-ClickHouse-Exception-Code": str(code), **(headers or {})},
    )


async def ping(_: HttpRequest) -> Response:
    return PlainTextResponse("Ok.\n")


async def _client_gone(request: HttpRequest) -> None:
    """Returns once the client closes its connection (its whole body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _left_before(request: HttpRequest, work: asyncio.Future, stop) -> bool:
    """Wait for `work`; if the client goes away first, call `stop` until `work` ends, and say so."""
    gone = asyncio.ensure_future(_client_gone(request))
    await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if work.done():
        return False
    while not work.done():  # the query may not have reached the engine yet
        await run_in_threadpool(stop)
        await asyncio.wait({work}, timeout=0.05)
    return True


async def _execute(request: HttpRequest, engine: Engine, engine_request: Request, session) -> object:
    """Run the request on a worker thread; if the client goes away first, kill its query."""
    work = asyncio.ensure_future(run_in_threadpool(engine.execute, engine_request, session))
    await _left_before(request, work, lambda: engine.cancel(engine_request.query_id))
    return work.result()


async def handle(request: HttpRequest) -> Response:
    state = request.app.state
    engine: Engine = state.engine
    params = dict(request.query_params)
    try:
        check_origin(request.headers, state.hosts)
    except AccessDenied as exc:
        return _error(str(exc), exc.code, exc.status)
    if request.method == "GET" and "query" not in params:
        return PlainTextResponse("Ok.\n")
    try:
        user = state.users.authenticate(*credentials(request.headers, params))
    except AccessDenied as exc:
        return _error(str(exc), exc.code, exc.status, {"WWW-Authenticate": 'Basic realm="ClickHouse server"'})
    query_id = params.get("query_id") or str(uuid.uuid4())
    try:
        files: dict[str, bytes] = {}
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form(max_files=100, max_fields=1000) as form:
                for name, value in form.multi_items():
                    if isinstance(value, str):
                        params[name] = value
                    else:
                        files[name] = await value.read()
            body = b""
        else:  # any other body (form-encoded included, as `curl --data-binary` sends) is the query or data
            body = _decompress(await request.body(), request.headers.get("content-encoding", ""))
        _check_transport(params)
        if _flag(params, "decompress"):
            body = _blocks(body)
        external = _external_tables(params, files)
        engine_request = parse_request(params, body)
        engine_request.external = external
        engine_request.query_id = query_id
        engine_request.settings, engine_request.readonly = _limits(
            engine_request.settings, user.readonly or (2 if request.method == "GET" else 0))
        await run_in_threadpool(_lock, state.lock, engine_request)
        engine_request.user_readonly = user.readonly
        session = None
        if params.get("session_id"):
            timeout = int(params.get("session_timeout") or DEFAULT_SESSION_TIMEOUT)
            session = engine.session(user.name, params["session_id"], timeout,
                                     params.get("session_check", "0") in ("1", "true"))
    except (BadRequest, AccessDenied) as exc:
        return _error(str(exc), exc.code, getattr(exc, "status", None) or _HTTP_STATUS.get(exc.code, 400))
    except Refused as exc:  # as ClickHouse answers its own refusals: by its code-to-status table, else 500
        return _error(str(exc), exc.code)
    except ParseError as exc:
        return _error(str(exc), exc.code, _HTTP_STATUS.get(exc.code, 400))
    except EngineError as exc:
        return _error(str(exc), exc.code)
    encoding = _encoding(request.headers.get("accept-encoding", "")) \
        if params.get("enable_http_compression") in ("1", "true") else None
    framed = _flag(params, "compress")
    if _streamed(engine_request, params) and encoding != "deflate":
        return await _stream(request, engine, engine_request, session, encoding, framed)
    try:
        result = await _execute(request, engine, engine_request, session)
    except EngineError as exc:
        return _error(str(exc), exc.code, headers={"X-ClickHouse-Query-Id": query_id})

    payload = blocks.compress(result.data) if framed else result.data
    if encoding and payload:
        payload = _compress(payload, encoding)
    session_id = params.get("session_id") if session else None
    headers = _headers(engine_request, session_id, result.timezone or engine.timezone,
                       encoding if result.data else None, read_rows=result.rows_read, read_bytes=result.bytes_read,
                       written_rows=result.rows_written, written_bytes=result.bytes_written,
                       total_rows_to_read=result.rows_read,
                       result_rows=0 if engine_request.insert_format else _result_rows(engine_request.output_format,
                                                                                         result.data),
                       result_bytes=len(result.data), elapsed_ns=int(result.elapsed * 1e9))
    media_type = _TEXT_TYPE
    if not engine_request.insert_format and (result.data or _first_word(engine_request.query) in _RESULT_WORDS):
        headers["X-ClickHouse-Format"] = engine_request.output_format  # as ClickHouse: only with a result set
        media_type = _content_type(engine_request.output_format, engine_request.settings)
    return Response(payload, headers=headers, media_type=media_type)


_SUMMARY_KEYS = ("read_rows", "read_bytes", "written_rows", "written_bytes", "total_rows_to_read", "result_rows",
                 "result_bytes", "elapsed_ns")


def _headers(engine_request: Request, session_id: str | None, timezone: str, encoding: str | None,
             **summary: int) -> dict[str, str]:
    """The headers every answer carries: query id, summary (X-ClickHouse-Summary), time zone, session."""
    headers = {
        "X-ClickHouse-Query-Id": engine_request.query_id,
        "X-ClickHouse-Summary": json.dumps({key: str(summary.get(key, 0)) for key in _SUMMARY_KEYS}),
        "X-ClickHouse-Timezone": timezone,
        "X-ClickHouse-Server-Display-Name": "tracetune-embedded",
    }
    if session_id is not None:
        headers["X-ClickHouse-Session-Id"] = session_id
    if encoding:
        headers["Content-Encoding"] = encoding
    return headers


# Content-Type per output format, as ClickHouse's formats declare it (IOutputFormat::getContentType and
# FormatFactory::setContentType); a format not named here gets ClickHouse's default, text/plain.
_TSV_TYPE = "text/tab-separated-values; charset=UTF-8"
_JSON_TYPE = "application/json; charset=UTF-8"
_NDJSON_TYPE = "application/x-ndjson; charset=UTF-8"
_BINARY_TYPE = "application/octet-stream"
_TEXT_TYPE = "text/plain; charset=UTF-8"
_CONTENT_TYPES = {
    **dict.fromkeys(("tabseparated", "tsv", "tabseparatedraw", "tsvraw", "raw", "tabseparatedwithnames",
                     "tsvwithnames", "rawwithnames", "tabseparatedwithnamesandtypes", "tsvwithnamesandtypes",
                     "rawwithnamesandtypes", "tabseparatedrawwithnames", "tsvrawwithnames",
                     "tabseparatedrawwithnamesandtypes", "tsvrawwithnamesandtypes"), _TSV_TYPE),
    "csv": "text/csv; charset=UTF-8; header=absent",
    "csvwithnames": "text/csv; charset=UTF-8; header=present",
    "csvwithnamesandtypes": "text/csv; charset=UTF-8; header=present",
    **dict.fromkeys(("json", "jsonstrings", "jsoncompact", "jsoncompactstrings", "jsoncolumns",
                     "jsoncompactcolumns", "jsoncolumnswithmetadata", "jsonobjecteachrow",
                     "jsoneachrowwithprogress", "jsonstringseachrowwithprogress",
                     "jsoncompacteachrowwithprogress"), _JSON_TYPE),
    **dict.fromkeys(("jsoneachrow", "jsonlines", "ndjson", "jsonl", "jsonstringseachrow", "prettyjsoneachrow",
                     "prettyjsonlines", "prettyndjson"), _NDJSON_TYPE),
    **dict.fromkeys(("native", "rowbinary", "rowbinarywithnames", "rowbinarywithnamesandtypes",
                     "rowbinarywithdefaults", "arrow", "arrowstream", "parquet", "orc", "avro", "msgpack",
                     "protobuf", "protobufsingle", "protobuflist", "capnproto", "bsoneachrow", "npy"), _BINARY_TYPE),
}


def _content_type(output_format: str, settings: dict[str, str]) -> str:
    """The Content-Type ClickHouse sends for a result in `output_format`."""
    name = output_format.lower()
    if name in ("jsoneachrow", "jsonlines", "ndjson", "jsonl", "jsonstringseachrow") \
            and settings.get("output_format_json_array_of_rows", "0").lower() in ("1", "true"):
        return _JSON_TYPE  # one JSON array of rows
    return _CONTENT_TYPES.get(name, _TEXT_TYPE)


# Statements with a result set (ClickHouse names their format in X-ClickHouse-Format; DDL, SET and INSERT have none).
_RESULT_WORDS = {"SELECT", "WITH", "SHOW", "DESC", "DESCRIBE", "EXISTS", "EXPLAIN", "CHECK", "KILL", "VALUES", "FROM"}
# Formats whose chunks concatenate into one valid result (no per-chunk header or footer).
_STREAMED_FORMATS = {"native", "rowbinary", "tabseparated", "tsv", "tabseparatedraw", "tsvraw", "csv", "jsoneachrow",
                     "jsoncompacteachrow", "jsonstringseachrow", "jsoncompactstringseachrow", "jsonlines", "ndjson"}
_FIRST_WORD = re.compile(r"(?:\s|--[^\n]*\n|/\*.*?\*/|\()*([A-Za-z]+)", re.DOTALL)


def _first_word(text: str) -> str:
    match = _FIRST_WORD.match(text)
    return match.group(1).upper() if match else ""


def _streamed(engine_request: Request, params: dict[str, str]) -> bool:
    """A SELECT in a concatenable format is sent as the engine produces it, unless the client waits for the end."""
    return (not engine_request.insert_format and _first_word(engine_request.query) in ("SELECT", "WITH")
            and engine_request.output_format.lower() in _STREAMED_FORMATS
            and params.get("wait_end_of_query", "0") not in ("1", "true"))


def _exception_block(message: str, tag: str) -> bytes:
    """An error after the response began, as ClickHouse writes it into the stream (X-ClickHouse-Exception-Tag)."""
    text = message.rstrip().encode()
    return (b"\r\n__exception__\r\n" + tag.encode() + b"\r\n" + text + b"\n" + str(len(text)).encode() + b" "
            + tag.encode() + b"\r\n__exception__\r\n")


async def _stream(request: HttpRequest, engine: Engine, engine_request: Request, session, encoding: str | None,
                  framed: bool):
    """Stream the result: errors before the first chunk are HTTP errors, later ones an exception block."""
    chunks: queue.Queue = queue.Queue(maxsize=16)
    stop = threading.Event()

    def produce() -> None:
        results = engine.stream(engine_request, session)
        try:
            for data in results:
                while not stop.is_set():
                    try:
                        chunks.put(("data", data), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            chunks.put(("end", b""))
        except EngineError as exc:
            chunks.put(("error", exc))
        finally:
            results.close()

    def take() -> tuple[str, object]:
        while True:
            try:
                return chunks.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():
                    return "end", b""

    threading.Thread(target=produce, name=f"stream-{engine_request.query_id}", daemon=True).start()
    def halt() -> None:
        stop.set()
        engine.cancel(engine_request.query_id)

    first = asyncio.ensure_future(run_in_threadpool(take))
    if await _left_before(request, first, halt):  # the client left before the first chunk: send nothing
        return Response(status_code=499)
    kind, value = first.result()
    if kind == "error":
        return _error(str(value), value.code, headers={"X-ClickHouse-Query-Id": engine_request.query_id})
    tag = secrets.token_hex(8)

    async def body():
        nonlocal kind, value
        try:
            while kind != "end":
                data = value if kind == "data" else _exception_block(str(value), tag)
                if framed:  # every chunk its own checksummed blocks: they concatenate
                    data = blocks.compress(data)
                yield _compress(data, encoding) if encoding else data
                if kind == "error":
                    return
                kind, value = await run_in_threadpool(take)
        finally:
            if kind != "end" and kind != "error":  # the client went away: stop the query
                halt()

    # The headers leave before the rows exist: the summary says 0, as ClickHouse's does when it streams.
    headers = _headers(engine_request, request.query_params.get("session_id") if session else None,
                       engine_request.settings.get("session_timezone") or engine.timezone, encoding)
    headers.update({"X-ClickHouse-Exception-Tag": tag, "X-ClickHouse-Format": engine_request.output_format})
    return StreamingResponse(body(), headers=headers,
                             media_type=_content_type(engine_request.output_format, engine_request.settings))


# Formats that end every row with one line break and escape line breaks inside values (CSV quotes them instead).
_LINE_FORMATS = re.compile(r"(?i)(TabSeparated|TSV|CSV|JSONEachRow|JSONCompactEachRow|JSONStringsEachRow|"
                           r"JSONCompactStringsEachRow|JSONLines|NDJSON|TSKV)(WithNames)?(AndTypes)?$")
_CSV_QUOTED = re.compile(rb'"(?:[^"]|"")*"')
_JSON_ROWS = re.compile(rb'\n\t"rows": (\d+),?\n')


def _result_rows(output_format: str, data: bytes) -> int:
    """Rows in a result, for the summary header: counted in line formats and JSON; 0 where the format hides them."""
    line = _LINE_FORMATS.match(output_format)
    if line:
        if line.group(1).upper() == "CSV":
            data = _CSV_QUOTED.sub(b"", data)
        return max(data.count(b"\n") - (1 if line.group(2) else 0) - (1 if line.group(3) else 0), 0)
    if output_format.startswith("JSON"):
        match = _JSON_ROWS.search(data[-4096:])
        return int(match.group(1)) if match else 0
    return 0


def _limits(settings: dict[str, str], readonly: int) -> tuple[dict[str, str], int]:
    """The request's settings without `readonly`, and the `readonly` level it runs at.

    The user's (or a GET's) level is a floor: the request may ask for stricter, never for less.
    """
    rest = {k: v for k, v in settings.items() if k != "readonly"}
    wanted = settings.get("readonly", "")
    if wanted and wanted not in ("0", "1", "2"):
        raise BadRequest(f"Invalid value {wanted!r} for readonly: expected 0, 1 or 2", 36, "BAD_ARGUMENTS")
    level = int(wanted) if wanted else readonly
    if readonly and level not in (1, 2):
        raise BadRequest("Cannot modify 'readonly' setting in readonly mode: this user or a GET request may only "
                         "read; send writes with POST as a user that may write", 164, "READONLY")
    if readonly == 1 and level == 2:
        level = 1
    return rest, level


def _lock(lock: Lock, engine_request: Request) -> None:
    """Every piece of SQL in the request through the allow-lists; the engine then runs their canonical form."""
    lock.check_settings(engine_request.settings)
    level = engine_request.readonly
    if engine_request.insert_format:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", engine_request.insert_format):
            raise BadRequest(f"Unknown format {engine_request.insert_format!r}", 73, "UNKNOWN_FORMAT")
        engine_request.query, engine_request.insert_settings = lock.check_insert(
            engine_request.query, engine_request.insert_settings, engine_request.insert_format,
            engine_request.params, level)
    else:  # checked in canonical form; run as sent, so comments stay visible in system.processes
        lock.check(engine_request.query, engine_request.params, level)
    for table in engine_request.external:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", table.format):
            raise BadRequest(f"Unknown format {table.format!r} for external table {table.name}", 73, "UNKNOWN_FORMAT")
        table.structure = lock.check_structure(table.structure)


def create_app(engine: Engine, users: Users, hosts: frozenset[str] | None, lock: Lock | None = None) -> Starlette:
    """The HTTP interface for `engine`, open to `users`, answering only to the `hosts` names (None: any)."""
    app = Starlette(routes=[
        Route("/ping", ping, methods=["GET", "HEAD"]),
        Route("/replicas_status", ping, methods=["GET"]),
        Route("/", handle, methods=["GET", "POST"]),
    ])
    app.state.engine = engine
    app.state.users = users
    app.state.hosts = hosts
    app.state.lock = lock or Lock(Parser(str(engine.data_dir)))
    return app


__all__ = ["create_app", "parse_request", "BadRequest"]
