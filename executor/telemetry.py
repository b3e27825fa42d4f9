"""OpenTelemetry SDK set-up: spans go to the collector over OTLP/HTTP (protobuf); and the tracer a step's
own calls (an LLM's CLIENT span) are traced with, the pipeline's."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def setup_tracing(collector_url: str, service_name: str = "tracetune-executor", token: str = "") -> TracerProvider:
    resource = Resource.create({
        "service.name": service_name,
        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
        "telemetry.sdk.language": "python",
    })
    provider = TracerProvider(resource=resource)
    headers = {"authorization": f"Bearer {token}"} if token else None
    exporter = OTLPSpanExporter(endpoint=collector_url.rstrip("/") + "/v1/traces", timeout=10, headers=headers)
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=50_000, schedule_delay_millis=500,
                                                   max_export_batch_size=2_000))
    trace.set_tracer_provider(provider)
    return provider


_TRACER: ContextVar[trace.Tracer | None] = ContextVar("tracetune_tracer", default=None)


@contextmanager
def using_tracer(tracer: trace.Tracer) -> Iterator[None]:
    """Spans a step's calls start (e.g. `chat {model}`) use `tracer`, the pipeline's, while this lasts."""
    token = _TRACER.set(tracer)
    try:
        yield
    finally:
        _TRACER.reset(token)


def current_tracer() -> trace.Tracer:
    """The tracer of the pipeline running this step (`using_tracer`), else the global provider's."""
    return _TRACER.get() or trace.get_tracer("tracetune.executor")
