"""OTLP request builders shared by the collector tests (JSON as the spec writes it, and protobuf)."""

from __future__ import annotations

import os

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

TRACE = "5b8efff798038103d269b633813fc60c"
T0 = 1_700_000_000_000_000_000


def otlp_json(n: int, trace_id: str = TRACE) -> dict:
    spans = [{
        "traceId": trace_id, "spanId": f"{i + 1:016x}", "parentSpanId": "" if i == 0 else f"{1:016x}",
        "name": f"span-{i}", "kind": 2 if i == 0 else 1,
        "startTimeUnixNano": str(T0 + i), "endTimeUnixNano": str(T0 + 250_000_000 + i),
        "attributes": [{"key": "tracetune.step", "value": {"stringValue": "s"}},
                       {"key": "n", "value": {"intValue": str(i)}}],
        "status": {"code": 2 if i == 1 else 0, "message": "bad" if i == 1 else ""},
    } for i in range(n)]
    service = {"key": "service.name", "value": {"stringValue": "json-svc"}}
    return {"resourceSpans": [{"resource": {"attributes": [service]},
                               "scopeSpans": [{"scope": {"name": "manual"}, "spans": spans}]}]}


def span(name: str = "s", start: int = T0, duration: int = 1_000_000, **fields) -> Span:
    """A valid span with fresh unique ids; keyword fields override any Span field."""
    values = {"trace_id": os.urandom(16), "span_id": os.urandom(8),
              "name": name, "kind": Span.SPAN_KIND_INTERNAL, "start_time_unix_nano": start,
              "end_time_unix_nano": start + duration,
              "attributes": [KeyValue(key="k", value=AnyValue(string_value="v"))]}
    values.update(fields)
    return Span(**values)


def request(spans: list[Span], service: str = "test-svc") -> ExportTraceServiceRequest:
    resource = ResourceSpans()
    resource.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=service)))
    resource.scope_spans.append(ScopeSpans(spans=spans))
    return ExportTraceServiceRequest(resource_spans=[resource])


def batch(n: int, service: str = "test-svc", start: int = T0) -> tuple[ExportTraceServiceRequest, set[str]]:
    """A request of n valid spans and the hex ids of its spans."""
    spans = [span(f"op-{i % 7}", start + i * 1000) for i in range(n)]
    return request(spans, service), {s.span_id.hex() for s in spans}
