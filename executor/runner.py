"""The executor process: the configured pipelines behind the task API and /metrics, each kept on
the tuner's config. Pipelines are loaded by import string (`package.module:attribute`)."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from typing import Any

from tracetune.base.settings import Settings
from tracetune.executor.pipelines import Pipeline

log = logging.getLogger("tracetune.executor")


class PipelineLoadError(ValueError):
    """An import string that does not lead to a pipeline; the message says which part failed."""


def load_pipeline(target: str, settings: Settings | None = None) -> Pipeline:
    """The pipeline `target` names: `package.module:attribute`, where the attribute is a `Pipeline`
    or a function returning one (called with `settings` if it takes an argument)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise PipelineLoadError(f"pipeline {target!r} must look like package.module:attribute")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules in the working directory load
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PipelineLoadError(f"pipeline {target!r}: no module named {exc.name!r} (run from the folder that "
                                    f"holds it, or put it on PYTHONPATH)") from None
        raise
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise PipelineLoadError(f"pipeline {target!r}: {module_name} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Pipeline) and callable(obj):
        takes_settings = bool(inspect.signature(obj).parameters)
        obj = obj(settings) if takes_settings else obj()
    if not isinstance(obj, Pipeline):
        raise PipelineLoadError(f"pipeline {target!r} is a {type(obj).__name__}, not a tracetune.executor.Pipeline "
                                f"(or a function returning one)")
    return obj


def load_pipelines(targets: list[str], settings: Settings | None = None) -> dict[str, Pipeline]:
    pipelines: dict[str, Pipeline] = {}
    for target in targets:
        pipeline = load_pipeline(target, settings)
        if pipeline.name in pipelines:
            raise PipelineLoadError(f"two pipelines are named {pipeline.name!r} ({target} and another); "
                                    f"names must be unique per executor")
        pipelines[pipeline.name] = pipeline
    return pipelines


def run(settings: Settings, targets: list[str] | None = None) -> None:
    from tracetune.base.serving import allowed_hosts
    from tracetune.base.serving import serve as serve_app
    from tracetune.executor.api import create_app
    from tracetune.executor.telemetry import setup_tracing
    from tracetune.executor.tuning import ConfigPoller

    pipelines = load_pipelines(targets or settings.pipeline_targets, settings)
    provider = setup_tracing(settings.collector_url, token=settings.secret("collector"))
    token = settings.secret("tuner")
    pollers = [ConfigPoller(settings.tuner_url, p, token, settings.executor_config_poll_seconds).start()
               for p in pipelines.values()]
    log.info("executor ready: %s", ", ".join(f"{p.name} (config version {p.config.version})"
                                              for p in pipelines.values()))
    try:
        app = create_app(pipelines, settings.executor_max_in_flight, token=settings.secret("executor"),
                         hosts=allowed_hosts(settings.bind_host, settings.host_names),
                         max_body_bytes=settings.executor_max_body_bytes)
        serve_app(app, settings.bind_host, settings.executor_port, timeout_graceful_shutdown=30)
    finally:
        for poller in pollers:
            poller.stop()
        for pipeline in pipelines.values():
            pipeline.close()
        provider.force_flush(30_000)
        provider.shutdown()
