"""OpenTelemetry SDK set-up: spans go to the collector over OTLP/HTTP (protobuf)."""

from __future__ import annotations

import os
import socket

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
