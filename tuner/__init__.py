"""Tuner: pipeline declarations and config versions served to the executors that poll them; SLOs; the
tuning loop that changes knobs to meet each SLO at the lowest cost, with every decision audited."""

from __future__ import annotations

import logging
import threading

from tracetune.base.settings import Settings

__all__ = ["serve", "token_for", "loop_settings"]

log = logging.getLogger("tracetune.tuner")


def token_for(settings: Settings) -> str:
    """The write token: TRACETUNE_TUNER_TOKEN, else one generated once and kept in <home>/tuner.token."""
    return settings.secret("tuner")


def serve(settings: Settings) -> None:
    from tracetune import store
    from tracetune.base.serving import allowed_hosts
    from tracetune.base.serving import serve as serve_app
    from tracetune.tuner import loop
    from tracetune.tuner.api import create_app
    from tracetune.tuner.routes import dead_letters

    store.wait_ready(settings, 60)
    app = create_app(lambda: store.connect(settings), token=token_for(settings),
                     hosts=allowed_hosts(settings.bind_host, settings.host_names),
                     max_body_bytes=settings.tuner_max_body_bytes)
    dead_letters.configure(app, settings.executor_url, settings.secret("executor"))  # where replays run
    log.info("write token in %s", settings.home / "tuner.token")
    stop = threading.Event()
    if settings.tuner_interval_seconds > 0:
        from tracetune.tuner import shadow

        shadow.configure(shadow.ShadowSettings.from_settings(settings))
        threading.Thread(target=loop.run, name="tuning-loop", daemon=True,
                         args=(lambda: store.connect(settings), loop_settings(settings), stop)).start()
    try:
        serve_app(app, settings.bind_host, settings.tuner_port)
    finally:
        stop.set()


def loop_settings(settings: Settings):
    """The loop's settings from the `tuner_*` settings."""
    from tracetune.tuner.loop import LoopSettings

    return LoopSettings.from_settings(settings)
