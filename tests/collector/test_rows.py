"""Attribute values as pdata's Value.AsString() writes them (what the contrib clickhouseexporter stores)."""

from __future__ import annotations

import math

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from tracetune.collector.rows import MAX_START_NS, MAX_TIME_NS, checked_span_count, convert, value_string


def _array(*values: AnyValue) -> AnyValue:
    return AnyValue(array_value=ArrayValue(values=list(values)))


def _map(**values: AnyValue) -> AnyValue:
    return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in values.items()]))


@pytest.mark.parametrize("value, stored", [
    (AnyValue(string_value="plain <&>"), "plain <&>"),
    (AnyValue(bool_value=True), "true"),
    (AnyValue(int_value=-2**63), "-9223372036854775808"),
    (AnyValue(double_value=1.0), "1"),
    (AnyValue(double_value=0.25), "0.25"),
    (AnyValue(double_value=-0.0), "-0"),
    (AnyValue(double_value=1e20), "100000000000000000000"),
    (AnyValue(double_value=1e21), "1e+21"),
    (AnyValue(double_value=1.5e-7), "1.5e-7"),
    (AnyValue(double_value=1e-6), "0.000001"),
    (AnyValue(double_value=math.nan), "json: unsupported value: NaN"),
    (AnyValue(bytes_value=b"\x00\xffhi"), "AP9oaQ=="),  # base64, no JSON quotes
    (AnyValue(), ""),
    (_array(AnyValue(int_value=1), AnyValue(double_value=2.0), AnyValue(string_value="<&\u2028")),
     '[1,2,"<&\\u2028"]'),  # no HTML escaping (pdata's SetEscapeHTML(false)); U+2028 escaped as Go always does
    (_array(AnyValue(bytes_value=b"hi"), AnyValue()), '["aGk=",null]'),
    (_map(b=AnyValue(bool_value=False), a=_array()), '{"a":[],"b":false}'),  # keys sorted, as Go's encoding/json
    # pdata: `jsonStr, _ := json.Marshal(v.Slice().AsRaw())`; Go refuses NaN and ±Inf, so the whole value is ""
    (_array(AnyValue(int_value=1), AnyValue(double_value=math.nan)), ""),
    (_map(a=_array(AnyValue(double_value=math.inf))), ""),
])
def test_value_string_is_pdata_as_string(value, stored):
    assert value_string(value) == stored


_T0 = 1_700_000_000 * 10**9


@pytest.mark.parametrize("fields, takes", [
    ({}, True),
    ({"kind": 5}, True), ({"kind": 6}, False),  # Consumer is the last kind pdata names
    ({"status": Status(code=2)}, True), ({"status": Status(code=3)}, False),
    ({"parent_span_id": b"\x01" * 8}, True), ({"parent_span_id": b"\x01" * 7}, False),
    ({"trace_id": b"\x01" * 15}, False), ({"trace_id": bytes(16)}, False),
    ({"span_id": b"\x01" * 9}, False), ({"span_id": bytes(8)}, False),
    ({"start_time_unix_nano": 0, "end_time_unix_nano": 0}, False),
    ({"end_time_unix_nano": _T0 - 1}, False), ({"end_time_unix_nano": _T0}, True),
    ({"end_time_unix_nano": MAX_TIME_NS}, True), ({"end_time_unix_nano": MAX_TIME_NS + 1}, False),
    ({"start_time_unix_nano": MAX_START_NS, "end_time_unix_nano": MAX_START_NS}, True),
    ({"start_time_unix_nano": MAX_START_NS + 1, "end_time_unix_nano": MAX_START_NS + 1}, False),
    ({"events": [Span.Event(time_unix_nano=MAX_TIME_NS)]}, True),
    ({"events": [Span.Event(), Span.Event(time_unix_nano=MAX_TIME_NS + 1)]}, False),
    ({"links": [Span.Link(trace_id=b"\x02" * 16, span_id=b"\x02" * 8)]}, True),
    ({"links": [Span.Link(trace_id=b"\x02" * 16, span_id=b"\x02" * 7)]}, False),
])
def test_the_fast_path_takes_a_span_exactly_when_the_reference_takes_it_as_it_is(fields, takes):
    """checked_span_count (the request-time check) on either side of every edge: it counts a request only
    when the reference converter would store every span without a rejection or a warning."""
    span = {"trace_id": b"\x01" * 16, "span_id": b"\x01" * 8, "start_time_unix_nano": _T0,
            "end_time_unix_nano": _T0 + 1, "name": "edge", **fields}
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(
        spans=[Span(trace_id=b"\x03" * 16, span_id=b"\x03" * 8, start_time_unix_nano=_T0, end_time_unix_nano=_T0),
               Span(**span)])])])
    converted = convert(request)
    assert (not converted.rejected and not converted.warnings) is takes
    assert checked_span_count(request) == (2 if takes else None)
