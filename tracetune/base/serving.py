"""Serving tracetune's HTTP APIs: uvicorn that lets the caller flush after a stop, the Guard every API
sits behind (Host allow-list, browser origins, body limits, JSON checks) and the Prometheus /metrics endpoint.

uvicorn re-raises the SIGTERM/SIGINT it caught once the server has stopped; with Python's default
handlers that ends the process at once, skipping every `finally`. Harmless handlers installed first
make the re-raise a no-op, so `serve()` returns and the caller can flush.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

HEADER_TIMEOUT_SECONDS = 10.0


def protocol_with_header_timeout(seconds: float = HEADER_TIMEOUT_SECONDS) -> type:
    """uvicorn's httptools protocol, closing a connection whose request headers take longer than `seconds`.

    uvicorn times out idle keep-alive connections but not a request that trickles in, so a few
    hundred slow clients could hold every connection open; this arms a timer per request.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Protocol(HttpToolsProtocol):
        _header_timer = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


def serve(app: Any, host: str, port: int, **options: Any) -> None:
    import uvicorn

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    options = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 5,
               "http": protocol_with_header_timeout(), **options}
    uvicorn.run(app, host=host, port=port, **options)


# ---- who may call: the Host allow-list and browser origins -------------------------------------------
#
# The same rule as the embedded store's (store/access.py): a web page must not reach an API on
# loopback, neither through a name it re-bound to 127.0.0.1 (DNS rebinding: Host is the page's name)
# nor by sending a request from its own origin (Origin, Sec-Fetch-Site).

BODY_TIMEOUT_SECONDS = 30.0
"""A request body that has not fully arrived this long after its headers gets 408."""

MAX_JSON_DEPTH = 64
"""JSON nested deeper than this (objects and arrays) is refused with 400, before any handler recurses into it."""


LOOPBACK_HOSTS: frozenset[str] = frozenset({"localhost", "127.0.0.1", "::1"})
"""The Host allow-list of a server bound to 127.0.0.1: what apps built without settings (tests) answer to."""


class Refused(Exception):
    """A request refused before it reaches a handler: HTTP status and one line saying why and what to do."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hostname(authority: str) -> str:
    """`host` of `host:port` / `[v6]:port`, lower case; "" when it is not one."""
    parsed = urlsplit("//" + authority)
    try:
        return (parsed.hostname or "").lower()
    except ValueError:
        return ""


def allowed_hosts(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """Names the Host header may carry for a server bound to `bind_host`, plus `extra` names (those in
    the `*_endpoint` and `allowed_hosts` settings); None: any (bound to every interface, or `*` given)."""
    extra = [name.strip().lower().strip("[]") for name in extra if name and name.strip()]
    if bind_host in ("0.0.0.0", "::", "") or "*" in extra:
        return None
    names = {bind_host.lower().strip("[]"), *extra}
    if _loopback(bind_host):
        names |= LOOPBACK_HOSTS
    return frozenset(names)


ALLOWED_HOSTS_HINT = " (or add the name to the allowed_hosts setting)"


def check_origin(method: str, headers: Mapping[str, str], hosts: frozenset[str] | None, *,
                 navigation_allowed: bool = True, hint: str = ALLOWED_HOSTS_HINT) -> None:
    """Refuse a rebound DNS name (Host) and any cross-site browser request (Origin, Sec-Fetch-Site).

    A top-level navigation (a link to /docs) is let through for GET unless `navigation_allowed` is off: the
    page that linked cannot read it. `hint` ends the foreign-Host refusal (how to allow another name).
    """
    host = hostname(headers.get("host", ""))
    if hosts is not None and host not in hosts:
        raise Refused(403, f"Host {headers.get('host', '')[:100]!r} is not this server's address; connect to "
                           f"{' or '.join(sorted(hosts))}{hint}")
    origin = headers.get("origin")
    if origin is not None:
        origin_host = hostname(urlsplit(origin).netloc) if origin != "null" else ""
        if not origin_host or (hosts is not None and origin_host not in hosts) or origin_host != host:
            raise Refused(403, f"requests from the web page at {origin[:100]!r} are refused: this API accepts "
                               "browser requests only from its own origin")
    site = headers.get("sec-fetch-site", "same-origin")
    navigation = navigation_allowed and headers.get("sec-fetch-mode") == "navigate" and method in ("GET", "HEAD")
    if site not in ("same-origin", "none") and not navigation:
        raise Refused(403, f"cross-site browser requests are refused (Sec-Fetch-Site: {site[:40]})")


# ---- what may come in: body size, media type, JSON shape --------------------------------------------

def _json_media_type(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def check_json(value: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than `max_depth` or holding a lone UTF-16 surrogate (`"\\ud800"`: valid
    JSON, but no Unicode text, so it cannot be stored or encoded), naming where."""
    stack: list[tuple[Any, str, int]] = [(value, "body", 1)]
    while stack:
        node, where, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node, where)
        elif isinstance(node, dict | list):
            if depth > max_depth:
                raise Refused(400, f"body is nested more than {max_depth} levels deep (at {where[:100]})")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, f"{where} key {key[:40]!r}")
                step = f".{_printable(key)}" if isinstance(key, str) else f"[{key}]"
                stack.append((item, where + step, depth + 1))


def _printable(text: str) -> str:
    """`text` safe to put in an answer: a lone surrogate as its \\u escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Refused(400, f"{where[:100]} holds a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x} at "
                           f"character {exc.start}): send valid Unicode text") from None


def _load_json(body: bytes) -> Any:
    """json.loads of UTF-8 `body`; Refused(400) for other bytes or nesting Python cannot parse, ValueError
    for text that is not JSON."""
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Refused(400, f"body is not UTF-8 text (byte {exc.start}): send JSON encoded as UTF-8") from None
    except RecursionError:
        raise Refused(400, f"body is nested more than {MAX_JSON_DEPTH} levels deep") from None


ErrorResponse = Callable[[Mapping[str, str], "Refused"], Any]


def _json_error(_: Mapping[str, str], refused: Refused) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": refused.message}, status_code=refused.status, headers=refused.headers)


class Guard:
    """ASGI middleware in front of every tracetune HTTP API: Host allow-list and browser origins, then
    (with `max_body_bytes`) the body read whole up to that size within BODY_TIMEOUT_SECONDS (413, 408),
    and (with `json_body`) a body that is JSON (415 otherwise), UTF-8, without lone surrogates and at
    most MAX_JSON_DEPTH deep (400). Invalid JSON is left to the handler, which names what it expected.

    `error(headers, refused)` makes the refusal in the API's own error shape.
    """

    def __init__(self, app: Any, *, hosts: frozenset[str] | None, max_body_bytes: int | None = None,
                 json_body: bool = False, error: ErrorResponse = _json_error,
                 body_timeout: float = BODY_TIMEOUT_SECONDS):
        self.app = app
        self.hosts = hosts
        self.max_body_bytes = max_body_bytes
        self.json_body = json_body
        self.error = error
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            check_origin(scope["method"], headers, self.hosts)
            if self.max_body_bytes is not None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
                body = await self._read(headers, receive)
                receive = _replay(body, receive)
                if body and self.json_body:
                    self._check_json(headers, body)
        except Refused as refused:
            return await self.error(headers, refused)(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _read(self, headers: Mapping[str, str], receive) -> bytes:
        limit = self.max_body_bytes or 0
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"body of {declared} bytes is larger than this API's {limit}-byte limit")
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise Refused(400, "the client went away before sending the whole body")
                    body += message.get("body", b"")
                    if len(body) > limit:
                        raise Refused(413, f"body is larger than this API's {limit}-byte limit")
                    if not message.get("more_body", False):
                        return bytes(body)
        except TimeoutError:
            raise Refused(408, f"the body did not arrive within {self.body_timeout:g} s") from None

    @staticmethod
    def _check_json(headers: Mapping[str, str], body: bytes) -> None:
        content_type = headers.get("content-type", "")
        if not _json_media_type(content_type):
            raise Refused(415, f"Content-Type {content_type[:80]!r} is not accepted: send the body as JSON with "
                               "Content-Type: application/json")
        try:
            value = _load_json(body)
        except ValueError:
            return  # not JSON: the handler says what it expected
        check_json(value)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body already read, then waits for the client as usual."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# ---- Prometheus /metrics ----------------------------------------------------------------------------

def _metrics_setup() -> None:
    """`_created` samples off: in the text format they are separate gauges Prometheus scrapes as series."""
    import prometheus_client

    prometheus_client.disable_created_metrics()


_metrics_setup()


async def metrics(request: Any) -> Any:
    """Prometheus metrics at /metrics itself (no redirect to /metrics/): the text format, or OpenMetrics
    when the scraper's Accept asks for it (prometheus_client's own negotiation)."""
    from prometheus_client import REGISTRY
    from prometheus_client.exposition import choose_encoder
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(await run_in_threadpool(encoder, REGISTRY), headers={"Content-Type": content_type})
