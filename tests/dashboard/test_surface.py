"""The dashboard as `tracetune up` starts it, met by a web page on another site or behind a re-bound DNS name.

Streamlit serves every page's data over one WebSocket (/_stcore/stream). `dashboard_command` gives it the
same Host allow-list as the APIs (`server.allowedHosts`) and keeps its CORS and XSRF protection on, so a
foreign Host or another site's page cannot open that WebSocket. What Streamlit does not let us close: a page
served from localhost or 127.0.0.1 on another port may open it (Streamlit trusts loopback origins), and its
static files and /_stcore/health answer any Host (they hold no data; Streamlit checks Host on WebSockets only).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import make_settings
from tests.dashboard import browser
from tests.surfaces import FOREIGN_HOSTS, FOREIGN_ORIGINS, raw_request
from tracetune.base.settings import Settings
from tracetune.supervisor import dashboard_command


@pytest.fixture
def dashboard(tmp_path) -> Iterator[Settings]:
    settings = make_settings(tmp_path / "home")
    with browser.running_dashboard(settings, tmp_path, 60):
        yield settings


def open_stream(settings: Settings, host: str, origin: str | None = None) -> bytes:
    """The first line of the answer to a WebSocket handshake on /_stcore/stream, as a browser sends it."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET /_stcore/stream HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: streamlit"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    reply = raw_request(settings.dashboard_url, ("\r\n".join(lines) + "\r\n\r\n").encode())
    return reply.split(b"\r\n", 1)[0]


def test_the_command_carries_the_host_allow_list_and_keeps_protection_on(tmp_path):
    command = dashboard_command(make_settings(tmp_path, allowed_hosts="dash.internal"))
    given = [command[i + 1] for i, arg in enumerate(command) if arg == "--server.allowedHosts"]
    assert sorted(given) == ["127.0.0.1", "::1", "dash.internal", "localhost"]
    assert command[command.index("--server.enableCORS") + 1] == "true"
    assert command[command.index("--server.enableXsrfProtection") + 1] == "true"
    everywhere = dashboard_command(make_settings(tmp_path, bind_host="0.0.0.0"))
    assert [everywhere[i + 1] for i, arg in enumerate(everywhere) if arg == "--server.allowedHosts"] == ["*"]


def test_the_data_websocket_opens_only_for_this_servers_names_and_origin(dashboard):
    port = dashboard.dashboard_port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert open_stream(dashboard, host) == b"HTTP/1.1 101 Switching Protocols", host
        assert open_stream(dashboard, host, f"http://{host}") == b"HTTP/1.1 101 Switching Protocols", host
    for host in FOREIGN_HOSTS:
        host = host.format(port=port)
        status = open_stream(dashboard, host, f"http://{host}")  # a re-bound page: its own origin
        assert not status.startswith(b"HTTP/1.1 101"), (host, status)
    for origin in FOREIGN_ORIGINS:
        origin = origin.format(port=port)
        status = open_stream(dashboard, f"127.0.0.1:{port}", origin)
        if origin.startswith("http://localhost:"):
            # Streamlit's own rule: any page on localhost / 127.0.0.1 (any port) may connect (docs/dashboard.md).
            assert status.startswith(b"HTTP/1.1 101"), (origin, status)
        else:
            assert not status.startswith(b"HTTP/1.1 101"), (origin, status)


def test_no_cross_origin_reads_over_plain_http(dashboard):
    answer = httpx.get(f"{dashboard.dashboard_url}/_stcore/health", headers={"Origin": "http://evil.example"})
    assert answer.headers.get("access-control-allow-origin") in (None, f"http://127.0.0.1:{dashboard.dashboard_port}")
    # Uploads (the one write over HTTP) need the XSRF cookie and token of a page Streamlit served.
    upload = httpx.put(f"{dashboard.dashboard_url}/_stcore/upload_file/session/file", files={"file": b"x"},
                       headers={"Origin": "http://evil.example"})
    assert upload.status_code in (400, 403, 404, 405), upload.status_code
