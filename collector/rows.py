"""OTLP spans to `otel_traces` rows, validated, and written exactly as the contrib clickhouseexporter writes them.

Ids become lower-case hex; kinds and status codes pdata's names (`Server`, `Error`); attribute values
pdata's `Value.AsString()` (ints in decimal, doubles as ECMAScript numbers, bytes as base64, arrays and
maps as JSON); `Duration` is end minus start in nanoseconds. A span ClickHouse could not hold or that
breaks OTLP (ids of the wrong length, times outside `DateTime64(9)`, a start past the rollups'
`DateTime` (2106-02-07), end before start) is rejected with a reason and becomes a quarantine row
instead, so one bad span never blocks the rest.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

COLUMNS = [
    "Timestamp", "TraceId", "SpanId", "ParentSpanId", "TraceState", "SpanName", "SpanKind",
    "ServiceName", "ResourceAttributes", "ScopeName", "ScopeVersion", "SpanAttributes", "Duration",
    "StatusCode", "StatusMessage", "Events.Timestamp", "Events.Name", "Events.Attributes",
    "Links.TraceId", "Links.SpanId", "Links.TraceState", "Links.Attributes",
]
QUARANTINE_COLUMNS = ["received_at", "receiver", "reason", "service_name", "trace_id", "span_id", "span_name",
                      "span_json"]

# pdata's ptrace.SpanKind.String() and ptrace.StatusCode.String(), by proto enum value.
SPAN_KINDS: tuple[str, ...] = ("Unspecified", "Internal", "Server", "Client", "Producer", "Consumer")
STATUS_CODES: tuple[str, ...] = ("Unset", "Ok", "Error")

MAX_TIME_NS = (1 << 63) - 1  # DateTime64(9) ends at 2262-04-11 23:47:16.854775807 UTC
MAX_START_NS = (1 << 32) * 10**9 - 1  # the rollups' DateTime minute ends at 2106-02-07 06:28:15 UTC
_MAX_REASONS = 5  # reasons listed in one partial-success message
_ZERO16, _ZERO8 = bytes(16), bytes(8)
_KIND_COUNT, _CODE_COUNT = len(SPAN_KINDS), len(STATUS_CODES)


# ---- AsString -----------------------------------------------------------------------------------
def _number(value: float) -> str:
    """A double as Go's encoding/json (ECMAScript) writes it: 1 not 1.0, 1e+21, 1e-7."""
    if value == 0:
        return "0" if math.copysign(1, value) > 0 else "-0"
    text = repr(value)
    if 1e-6 <= abs(value) < 1e21:
        if "e" in text:
            text = format(Decimal(text), "f")
        return text[:-2] if text.endswith(".0") else text
    mantissa, exponent = text.split("e") if "e" in text else (text, "0")
    mantissa = mantissa[:-2] if mantissa.endswith(".0") else mantissa
    sign = "-" if exponent.startswith("-") else "+"
    return f"{mantissa}e{sign}{int(exponent.lstrip('+-'))}"


def _json_string(text: str) -> str:
    """A string as pdata's JSON encoder writes it (Go's encoding/json with SetEscapeHTML(false))."""
    return json.dumps(text, ensure_ascii=False).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _json(value: AnyValue) -> str:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return _json_string(value.string_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return _number(value.double_value) if math.isfinite(value.double_value) else "null"
    if kind == "bytes_value":
        return '"' + base64.b64encode(value.bytes_value).decode() + '"'
    if kind == "array_value":
        return "[" + ",".join(_json(v) for v in value.array_value.values) + "]"
    if kind == "kvlist_value":
        items = {kv.key: kv.value for kv in value.kvlist_value.values}  # last duplicate wins, as in pdata
        return "{" + ",".join(f"{_json_string(k)}:{_json(items[k])}" for k in sorted(items)) + "}"
    return "null"


def value_string(value: AnyValue) -> str:
    """The string an attribute value is stored as: pdata's `Value.AsString()`."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind is None:
        return ""
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        number = value.double_value
        if not math.isfinite(number):
            return f"json: unsupported value: {'NaN' if number != number else ('+Inf' if number > 0 else '-Inf')}"
        return _number(number)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    if not _all_finite(value):  # Go's json.Marshal refuses NaN and ±Inf; pdata ignores the error: ""
        return ""
    return _json(value)


def _all_finite(value: AnyValue) -> bool:
    """Whether every double inside an array or map value is finite."""
    kind = value.WhichOneof("value")
    if kind == "double_value":
        return math.isfinite(value.double_value)
    if kind == "array_value":
        return all(_all_finite(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return all(_all_finite(kv.value) for kv in value.kvlist_value.values)
    return True


def _attributes(kvs) -> dict[str, str]:
    out = {}
    for kv in kvs:
        value = kv.value
        out[kv.key] = value.string_value if value.WhichOneof("value") == "string_value" else value_string(value)
    return out


# ---- validation -----------------------------------------------------------------------------------
def span_problem(span) -> str:
    """Why ClickHouse cannot hold this span as OTLP defines it, or '' when it is fine."""
    if len(span.trace_id) != 16 or not any(span.trace_id):
        return f"trace_id must be 16 bytes and not all zero (got {len(span.trace_id)} bytes)"
    if len(span.span_id) != 8 or not any(span.span_id):
        return f"span_id must be 8 bytes and not all zero (got {len(span.span_id)} bytes)"
    if len(span.parent_span_id) not in (0, 8):
        return f"parent_span_id must be empty or 8 bytes (got {len(span.parent_span_id)} bytes)"
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if start == 0:
        return "start_time_unix_nano is not set"
    if start > MAX_TIME_NS or end > MAX_TIME_NS:
        return f"start/end time {max(start, end)} ns is past 2262-04-11, the end of DateTime64(9)"
    if start > MAX_START_NS:
        return (f"start time {start} ns is past 2106-02-07 06:28:15 UTC, the end of the rollups' DateTime "
                "(it would be counted in the wrong minute)")
    if end < start:
        return f"end_time_unix_nano {end} is before start_time_unix_nano {start}"
    for event in span.events:
        if event.time_unix_nano > MAX_TIME_NS:
            return f"event {event.name!r} time {event.time_unix_nano} ns is past the end of DateTime64(9)"
    for link in span.links:
        if len(link.trace_id) != 16 or len(link.span_id) != 8:
            return (f"link ids must be 16 and 8 bytes (got {len(link.trace_id)} and {len(link.span_id)})")
    return ""


def valid(request: ExportTraceServiceRequest) -> bool:
    """True when `convert` would take every span as it is (no rejection, no warning): the fast path."""
    return checked_span_count(request) is not None


def checked_span_count(request: ExportTraceServiceRequest) -> int | None:
    """The request's span count when every span is `valid`, else None; one pass, scalars only.

    Attributes never make a span invalid. Each field is read once: reading a field of a upb message costs
    about as much as the comparisons on it.
    """
    count = 0
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            spans = scope_spans.spans
            for span in spans:
                trace_id = span.trace_id
                span_id = span.span_id
                start = span.start_time_unix_nano
                end = span.end_time_unix_nano
                if (len(trace_id) != 16 or len(span_id) != 8 or trace_id == _ZERO16 or span_id == _ZERO8
                        or len(span.parent_span_id) not in (0, 8) or not 0 < start <= end <= MAX_TIME_NS
                        or start > MAX_START_NS
                        or not 0 <= span.kind < _KIND_COUNT or not 0 <= span.status.code < _CODE_COUNT):
                    return None
                events = span.events
                if events and any(e.time_unix_nano > MAX_TIME_NS for e in events):
                    return None
                links = span.links
                if links and any(len(x.trace_id) != 16 or len(x.span_id) != 8 for x in links):
                    return None
            count += len(spans)
    return count


@dataclass
class Converted:
    """One request's rows: spans to store, spans quarantined with a reason, and what to tell the sender."""

    rows: list[list[Any]] = field(default_factory=list)
    quarantine: list[list[Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.quarantine)

    def message(self) -> str:
        """OTLP partial_success.error_message: counts and the first few reasons."""
        if not self.warnings:
            return ""
        shown = "; ".join(self.warnings[:_MAX_REASONS])
        more = f"; and {len(self.warnings) - _MAX_REASONS} more" if len(self.warnings) > _MAX_REASONS else ""
        head = f"rejected {self.rejected} of {self.rejected + len(self.rows)} spans: " if self.rejected else ""
        return head + shown + more


def convert(request: ExportTraceServiceRequest, received_ns: int = 0, receiver: str = "http") -> Converted:
    """Validate every span and turn the good ones into rows (columns in COLUMNS order)."""
    out = Converted()
    rows = out.rows
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = resource.get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            scope_name = scope_spans.scope.name
            scope_version = scope_spans.scope.version
            for span in scope_spans.spans:
                problem = span_problem(span)
                if problem:
                    out.warnings.append(f"span {span.name!r}: {problem}")
                    out.quarantine.append([
                        received_ns // 1_000_000, receiver, problem, service, span.trace_id.hex(),
                        span.span_id.hex(), span.name,
                        json_format.MessageToJson(span, indent=None),
                    ])
                    continue
                kind, code = span.kind, span.status.code
                if not 0 <= kind < len(SPAN_KINDS):
                    out.warnings.append(f"span {span.name!r}: unknown kind {kind} stored as Unspecified")
                    kind = 0
                if not 0 <= code < len(STATUS_CODES):
                    out.warnings.append(f"span {span.name!r}: unknown status code {code} stored as Unset")
                    code = 0
                start = span.start_time_unix_nano
                events, links = span.events, span.links
                rows.append([
                    start,
                    span.trace_id.hex(),
                    span.span_id.hex(),
                    span.parent_span_id.hex(),
                    span.trace_state,
                    span.name,
                    SPAN_KINDS[kind],
                    service,
                    resource,
                    scope_name,
                    scope_version,
                    _attributes(span.attributes),
                    span.end_time_unix_nano - start,
                    STATUS_CODES[code],
                    span.status.message,
                    [e.time_unix_nano for e in events],
                    [e.name for e in events],
                    [_attributes(e.attributes) for e in events],
                    [link.trace_id.hex() for link in links],
                    [link.span_id.hex() for link in links],
                    [link.trace_state for link in links],
                    [_attributes(link.attributes) for link in links],
                ])
    return out
