"""The executor process: pipelines behind an HTTP API with /metrics, polling the tuner for config."""

from __future__ import annotations

import logging

from tracetune.executor.pipelines import Pipeline, TicketTriage
from tracetune.settings import Settings

log = logging.getLogger("tracetune.executor")

VARIANTS = ("fp32", "int8")


def build_pipeline(settings: Settings, tracer=None, dead_letters=None) -> Pipeline:
    """The configured pipeline with its models, LLM cascade and CRM side effect wired to settings."""
    from tracetune.executor.effects import DeadLetters, crm_followups
    from tracetune.executor.llm import ChatClient
    from tracetune.executor.models import TicketClassifier, build_models

    if settings.pipeline != TicketTriage.name:
        raise SystemExit(f"unknown pipeline {settings.pipeline!r}; this executor runs: {TicketTriage.name}")
    build_models(settings.models_dir)
    classifiers = {v: TicketClassifier(settings.models_dir, variant=v) for v in VARIANTS}
    llm = ChatClient(settings.llm_base_url, settings.llm_model, api_key=settings.llm_api_key)
    if dead_letters is None:
        from tracetune import store
        dead_letters = DeadLetters(lambda: store.connect(settings, ensure_schema=False))
    followups = crm_followups(settings.crm_base_url, pipeline=TicketTriage.name, dead_letters=dead_letters)
    return TicketTriage(classifiers, tracer=tracer, llm=llm.classify, followups=followups)


def run(settings: Settings) -> None:
    from tracetune.executor.api import create_app
    from tracetune.executor.telemetry import setup_tracing
    from tracetune.executor.tuning import ConfigPoller
    from tracetune.serving import serve as serve_app

    provider = setup_tracing(settings.collector_url, token=settings.secret("collector"))
    pipeline = build_pipeline(settings)
    poller = ConfigPoller(settings.tuner_url, pipeline.name, pipeline.apply_config,
                          settings.executor_config_poll_seconds).start()
    log.warning("executor ready: pipeline %s, config version %s", pipeline.name, pipeline.config.version)
    try:
        serve_app(create_app({pipeline.name: pipeline}, settings.executor_max_in_flight), settings.bind_host,
                  settings.executor_port, timeout_graceful_shutdown=30)
    finally:
        poller.stop()
        pipeline.close()
        provider.force_flush(30_000)
        provider.shutdown()
