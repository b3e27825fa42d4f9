"""Tuner: config versions per pipeline, served over HTTP to the executors that poll it."""

from __future__ import annotations

from tracetune.settings import Settings

__all__ = ["serve"]


def serve(settings: Settings) -> None:
    import uvicorn

    import store
    from tuner.api import create_app

    store.wait_ready(settings, 60)
    app = create_app(lambda: store.connect(settings), [settings.pipeline])
    uvicorn.run(app, host=settings.bind_host, port=settings.tuner_port, log_level="warning",
                access_log=False, timeout_graceful_shutdown=5)
