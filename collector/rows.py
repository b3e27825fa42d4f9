"""OTLP spans to `otel_traces` rows, written exactly as the contrib clickhouseexporter writes them.

Ids become lower-case hex, kinds and status codes their proto enum names (`SPAN_KIND_SERVER`,
`STATUS_CODE_ERROR`), attribute values strings (`AsString()`: JSON for arrays and maps, base64 for
bytes), and `Duration` is end minus start in nanoseconds.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

COLUMNS = [
    "Timestamp", "TraceId", "SpanId", "ParentSpanId", "TraceState", "SpanName", "SpanKind",
    "ServiceName", "ResourceAttributes", "ScopeName", "ScopeVersion", "SpanAttributes", "Duration",
    "StatusCode", "StatusMessage", "Events.Timestamp", "Events.Name", "Events.Attributes",
    "Links.TraceId", "Links.SpanId", "Links.TraceState", "Links.Attributes",
]

_KINDS = {value: name for name, value in Span.SpanKind.items()}
_STATUS = {value: name for name, value in Status.StatusCode.items()}


def _plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_plain(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _plain(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return getattr(value, kind)


def value_string(value: AnyValue) -> str:
    """The string an attribute value is stored as (the collector's `Value.AsString()`)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return ""
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return repr(value.double_value)
    return json.dumps(_plain(value), separators=(",", ":"))


def _attributes(kvs) -> dict[str, str]:
    return {kv.key: value_string(kv.value) for kv in kvs}


def to_rows(request: ExportTraceServiceRequest) -> list[list[Any]]:
    """One row per span, columns in COLUMNS order."""
    rows: list[list[Any]] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = resource.get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            scope_name = scope_spans.scope.name
            scope_version = scope_spans.scope.version
            for span in scope_spans.spans:
                start = span.start_time_unix_nano
                duration = max(0, span.end_time_unix_nano - start)
                rows.append([
                    start,
                    span.trace_id.hex(),
                    span.span_id.hex(),
                    span.parent_span_id.hex(),
                    span.trace_state,
                    span.name,
                    _KINDS.get(span.kind, "SPAN_KIND_UNSPECIFIED"),
                    service,
                    resource,
                    scope_name,
                    scope_version,
                    _attributes(span.attributes),
                    duration,
                    _STATUS.get(span.status.code, "STATUS_CODE_UNSET"),
                    span.status.message,
                    [e.time_unix_nano for e in span.events],
                    [e.name for e in span.events],
                    [_attributes(e.attributes) for e in span.events],
                    [link.trace_id.hex() for link in span.links],
                    [link.span_id.hex() for link in span.links],
                    [link.trace_state for link in span.links],
                    [_attributes(link.attributes) for link in span.links],
                ])
    return rows


def span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)

