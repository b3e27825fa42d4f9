"""Run a uvicorn server so that what follows it (flushing spans, writing queued rows) still runs.

uvicorn re-raises the SIGTERM/SIGINT it caught once the server has stopped; with Python's default
handlers that ends the process at once, skipping every `finally`. Harmless handlers installed first
make the re-raise a no-op, so `serve()` returns and the caller can flush.
"""

from __future__ import annotations

import signal
from typing import Any


def serve(app: Any, host: str, port: int, **options: Any) -> None:
    import uvicorn

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    options = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 5, **options}
    uvicorn.run(app, host=host, port=port, **options)
