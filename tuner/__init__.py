"""Tuner: pipeline declarations and config versions, served over HTTP to the executors that poll them; SLOs."""

from __future__ import annotations

import logging

from tracetune.settings import Settings

__all__ = ["serve", "token_for"]

log = logging.getLogger("tracetune.tuner")


def token_for(settings: Settings) -> str:
    """The write token: TRACETUNE_TUNER_TOKEN, else one generated once and kept in <home>/tuner.token."""
    return settings.secret("tuner")


def serve(settings: Settings) -> None:
    from tracetune import store
    from tracetune.serving import serve as serve_app
    from tracetune.tuner.api import create_app

    store.wait_ready(settings, 60)
    app = create_app(lambda: store.connect(settings), token=token_for(settings))
    log.info("write token in %s", settings.home / "tuner.token")
    serve_app(app, settings.bind_host, settings.tuner_port)
