"""Hostile requests every tracetune HTTP surface must refuse, with a message: foreign Host names (DNS
rebinding), other sites' pages (Origin, Sec-Fetch-Site), bodies past the limit, text that is not Unicode.

Each check sends real requests to a real server on 127.0.0.1 and returns nothing; `message(response)`
reads the surface's one-line error (the tuner's `detail`, the executor's `error`, the collector's Status).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx

Message = Callable[[httpx.Response], str]

FOREIGN_HOSTS = ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}", "localhost.evil.example",
                 "LOCALHOST.evil.example", "127.0.0.2:{port}", "[::2]:{port}", "0.0.0.0:{port}", "127.1:{port}",
                 "2130706433:{port}", "localhost@evil.example", "evil.example#@127.0.0.1", "a b"]
"""Names a page could re-bind to this host, or that only look like it; none is this server's address."""

OWN_HOSTS = ["127.0.0.1:{port}", "localhost:{port}", "LocalHost:{port}", "127.0.0.1", "[::1]:{port}"]

FOREIGN_ORIGINS = ["http://evil.example", "https://evil.example:{port}", "null", "http://127.0.0.1.evil.example:{port}",
                   "file://", "http://localhost:{port}"]  # the last: another origin than Host 127.0.0.1:{port}
CROSS_SITE = ["cross-site", "same-site"]


def _port(url: str) -> int:
    return urlsplit(url).port or 80


def raw_request(url: str, request: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are (headers httpx would not send) and read the answer (its head and Content-Length)."""
    with socket.create_connection(("127.0.0.1", _port(url)), timeout=timeout) as sock:
        sock.sendall(request)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                return reply
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


def check_host_allow_list(url: str, method: str = "GET", message: Message | None = None, **request) -> None:
    """Every foreign Host gets 403 naming the Host; the server's own names pass this check."""
    port = _port(url)
    headers = request.pop("headers", {})
    for host in FOREIGN_HOSTS:
        host = host.format(port=port)
        answer = httpx.request(method, url, headers={**headers, "Host": host}, **request)
        assert answer.status_code == 403, (host, answer.status_code, answer.text[:200])
        if message is not None:
            assert "Host" in message(answer) and "not this server's address" in message(answer), message(answer)
    for host in OWN_HOSTS:
        answer = httpx.request(method, url, headers={**headers, "Host": host.format(port=port)}, **request)
        assert answer.status_code < 400, (host, answer.status_code, answer.text[:200])
    path = urlsplit(url).path or "/"
    # No Host at all (HTTP/1.0) is no name of this server either.
    reply = raw_request(url, f"{method} {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 403") or reply.startswith(b"HTTP/1.0 403"), reply[:200]


def check_browser_origins(url: str, method: str, message: Message | None = None, **request) -> None:
    """A request from any other origin (Origin) or site (Sec-Fetch-Site) gets 403; the server's own origin passes."""
    port = _port(url)
    headers = request.pop("headers", {})
    for origin in FOREIGN_ORIGINS:
        origin = origin.format(port=port)
        answer = httpx.request(method, url, headers={**headers, "Origin": origin}, **request)
        assert answer.status_code == 403, (origin, answer.status_code, answer.text[:200])
        if message is not None:
            assert "refused" in message(answer), message(answer)
    for site in CROSS_SITE:
        answer = httpx.request(method, url, headers={**headers, "Sec-Fetch-Site": site, "Sec-Fetch-Mode": "cors"},
                               **request)
        assert answer.status_code == 403, (site, answer.status_code)
        if message is not None:
            assert "cross-site" in message(answer), message(answer)
    same = httpx.request(method, url, headers={**headers, "Origin": f"http://127.0.0.1:{port}",
                                               "Sec-Fetch-Site": "same-origin"}, **request)
    assert same.status_code != 403, same.text[:200]


def _chunks(size: int, piece: int = 64 * 1024) -> Iterator[bytes]:
    yield b'{"text": "'
    for _ in range(size // piece):
        yield b"a" * piece
    yield b'"}'


def check_body_limit(url: str, limit: int, message: Message | None = None, headers: dict | None = None,
                     method: str = "POST") -> None:
    """A body past `limit` gets 413, whether its Content-Length says so or it arrives chunked without one."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    declared = httpx.request(method, url, content=b'{"text": "' + b"a" * limit + b'"}', headers=headers, timeout=60)
    assert declared.status_code == 413, (declared.status_code, declared.text[:200])
    if message is not None:
        assert "limit" in message(declared), message(declared)
    chunked = httpx.request(method, url, content=_chunks(limit + 1), headers=headers, timeout=60)
    assert chunked.status_code == 413, (chunked.status_code, chunked.text[:200])


BAD_TEXT = {
    "lone surrogate": b'{"text": "a\\ud800b"}',
    "lone low surrogate in a key": b'{"\\udc00": "x"}',
    "not UTF-8": b'{"text": "\xff\xfe"}',
    "Latin-1": '{"text": "caf\u00e9"}'.encode("latin-1"),
}


def nested(depth: int) -> bytes:
    return b'{"text": ' + b"[" * depth + b"]" * depth + b"}"


def check_bad_text(url: str, message: Message, headers: dict | None = None, method: str = "POST",
                   fields: dict[str, bytes] | None = None) -> None:
    """Text that is not Unicode, and JSON nested past 64 levels (or past what Python can parse), gets 400 with
    a message; `fields` adds surface-specific bodies (e.g. a lone surrogate in a `reason`)."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    bodies = {**BAD_TEXT, "65 levels": nested(65), "20000 levels": nested(20_000), **(fields or {})}
    for name, body in bodies.items():
        answer = httpx.request(method, url, content=body, headers=headers, timeout=30)
        assert answer.status_code == 400, (name, answer.status_code, answer.text[:300])
        text = message(answer)
        assert text and "\n" not in text, (name, text)
        assert any(word in text.lower() for word in ("surrogate", "utf-8", "nested")), (name, text)
