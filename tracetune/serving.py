"""Run a uvicorn server so that what follows it (flushing spans, writing queued rows) still runs.

uvicorn re-raises the SIGTERM/SIGINT it caught once the server has stopped; with Python's default
handlers that ends the process at once, skipping every `finally`. Harmless handlers installed first
make the re-raise a no-op, so `serve()` returns and the caller can flush.
"""

from __future__ import annotations

import signal
from typing import Any

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
