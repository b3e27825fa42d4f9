"""Tuner: config versions per pipeline, served over HTTP to the executors that poll it; SLOs."""

from __future__ import annotations

import logging

from tracetune.settings import Settings

__all__ = ["serve", "token_for", "DEMO_SLO"]

log = logging.getLogger("tracetune.tuner")

# The SLO a pipeline starts with until its owner sets one (PUT /v1/pipelines/{p}/slo).
DEMO_SLO = {"p95_ms": 500.0, "p99_ms": 1500.0, "error_rate": 0.02, "cost_per_1k": 0.5, "quality_floor": 0.85}


def token_for(settings: Settings) -> str:
    """The write token: TRACETUNE_TUNER_TOKEN, else one generated once and kept in <home>/tuner.token."""
    return settings.secret("tuner")


def serve(settings: Settings) -> None:
    from tracetune import store
    from tracetune.serving import serve as serve_app
    from tracetune.tuner.api import create_app

    store.wait_ready(settings, 60)
    app = create_app(lambda: store.connect(settings), [settings.pipeline], token=token_for(settings),
                     default_slos={settings.pipeline: DEMO_SLO})
    log.info("write token in %s", settings.home / "tuner.token")
    serve_app(app, settings.bind_host, settings.tuner_port)
