"""The fast path (protobuf bodies to Arrow columns) stores exactly what the reference converter stores."""

from __future__ import annotations

import math
from unittest.mock import patch

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from tracetune.collector import columns, rows, writer
from tracetune.collector.rows import COLUMNS

_DOUBLES = st.one_of(st.sampled_from([0.0, -0.0, 1.0, 0.1, 1e9, 1e15, 1e16, 1e21, 1e-7, 5e-324, math.inf, -math.inf,
                                      math.nan, 123456789012345.6]), st.floats(allow_nan=False))
_STRINGS = st.one_of(st.sampled_from(["", "x", "héllo ☃", "<&>", 'a"b\\c\n', "\u2028"]), st.text(max_size=12))
_SCALAR = st.one_of(
    _STRINGS.map(lambda s: AnyValue(string_value=s)), st.booleans().map(lambda b: AnyValue(bool_value=b)),
    st.integers(min_value=-2**63, max_value=2**63 - 1).map(lambda i: AnyValue(int_value=i)),
    _DOUBLES.map(lambda d: AnyValue(double_value=d)), st.binary(max_size=8).map(lambda b: AnyValue(bytes_value=b)),
    st.just(AnyValue()),
)
_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3).map(lambda vs: AnyValue(array_value=ArrayValue(values=vs))),
    st.lists(st.tuples(st.sampled_from("abc"), inner), max_size=3).map(
        lambda kvs: AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in kvs])))),
    max_leaves=6)


_ID16 = st.binary(min_size=16, max_size=16).map(lambda b: b if any(b) else b"\1" + b[1:])
_ID8 = st.binary(min_size=8, max_size=8).map(lambda b: b if any(b) else b"\1" + b[1:])


def _attrs(keys):
    return st.lists(st.tuples(st.sampled_from(keys), _VALUE), max_size=len(keys), unique_by=lambda kv: kv[0]).map(
        lambda kvs: [KeyValue(key=k, value=v) for k, v in kvs])


@st.composite
def _span(draw) -> Span:
    start = draw(st.integers(min_value=1, max_value=rows.MAX_START_NS))  # valid: up to the rollups' last minute
    span = Span(trace_id=draw(_ID16), span_id=draw(_ID8),
                parent_span_id=draw(st.sampled_from([b"", b"\1" * 8])), name=draw(st.sampled_from(["a", "b", ""])),
                kind=draw(st.integers(min_value=0, max_value=5)), trace_state=draw(st.sampled_from(["", "k=v"])),
                start_time_unix_nano=start, end_time_unix_nano=start + draw(st.integers(min_value=0, max_value=10**9)),
                attributes=draw(_attrs([f"k{i}" for i in range(8)])))
    span.status.code = draw(st.integers(min_value=0, max_value=2))
    span.status.message = draw(st.sampled_from(["", "err"]))
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        span.events.add(time_unix_nano=draw(st.integers(min_value=0, max_value=2**62)), name="e",
                        attributes=draw(_attrs(["x", "y"])))
    for _ in range(draw(st.integers(min_value=0, max_value=1))):
        span.links.add(trace_id=b"\2" * 16, span_id=b"\3" * 8, attributes=draw(_attrs(["z"])))
    return span


@st.composite
def _request(draw) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        resource = ResourceSpans()
        resource.resource.attributes.extend(draw(_attrs(["service.name", "a", "b"])))
        for _ in range(draw(st.integers(min_value=0, max_value=2))):
            scope = ScopeSpans(spans=draw(st.lists(_span(), max_size=4)))
            scope.scope.name, scope.scope.version = draw(st.sampled_from([("", ""), ("s", "1")]))
            resource.scope_spans.append(scope)
        request.resource_spans.append(resource)
    return request


def _as_rows(table: pa.Table) -> list[list]:
    """Arrow back to the reference's row shape (timestamps as ns, maps as dicts)."""
    out = []
    for record in table.to_pylist():
        row = [record[c] for c in COLUMNS]
        row[0] = pa.scalar(row[0], pa.timestamp("ns")).value
        row[15] = [pa.scalar(t, pa.timestamp("ns")).value for t in row[15]]
        row[8], row[11] = dict(row[8]), dict(row[11])
        row[17], row[21] = [dict(m) for m in row[17]], [dict(m) for m in row[21]]
        out.append(row)
    return out


@settings(max_examples=150, deadline=None)
@given(requests=st.lists(_request(), min_size=1, max_size=3))
def test_arrow_columns_equal_the_reference_rows(requests):
    bodies = [r.SerializeToString() for r in requests]
    expected = [row for r in requests for row in rows.convert(r).rows]
    table = columns.to_arrow(bodies)
    assert table is not None  # every span is valid and no map repeats a key: the fast path takes it
    assert repr(_as_rows(table)) == repr(expected)


def test_a_batch_with_a_rejected_span_is_left_to_the_reference():
    bad = ExportTraceServiceRequest()
    bad.resource_spans.add().scope_spans.add().spans.add(trace_id=b"\1" * 3, span_id=b"\1" * 8,
                                                         start_time_unix_nano=1, end_time_unix_nano=2)
    assert not rows.valid(bad)
    assert columns.to_arrow([bad.SerializeToString()]) is None


def test_valid_agrees_with_the_reference():
    good = ExportTraceServiceRequest()
    good.resource_spans.add().scope_spans.add().spans.add(trace_id=b"\1" * 16, span_id=b"\1" * 8,
                                                          start_time_unix_nano=1, end_time_unix_nano=2, kind=9)
    converted = rows.convert(good)
    assert not rows.valid(good) and converted.warnings  # an unknown kind is stored with a warning


def test_a_key_twice_in_one_map_is_left_to_the_reference():
    """pdata keeps the last of a repeated key; the reference does too, so such a batch goes there."""
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add(
        trace_id=b"\1" * 16, span_id=b"\1" * 8, start_time_unix_nano=1, end_time_unix_nano=2)
    span.attributes.extend([KeyValue(key="k", value=AnyValue(string_value="first")),
                            KeyValue(key="k", value=AnyValue(string_value="last"))])
    assert rows.valid(request) and columns.to_arrow([request.SerializeToString()]) is None
    assert rows.convert(request).rows[0][COLUMNS.index("SpanAttributes")] == {"k": "last"}


def _span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


@settings(max_examples=80, deadline=None)
@given(requests=st.lists(_request(), min_size=1, max_size=6), chunk=st.integers(min_value=1, max_value=6))
def test_a_batch_converted_in_chunks_is_the_reference_rows(requests, chunk):
    """The writer converts a large insert CONVERT_SPANS spans at a time: same rows, same order, one table."""
    bodies = [r.SerializeToString() for r in requests]
    expected = [row for r in requests for row in rows.convert(r).rows]
    with patch.object(writer, "CONVERT_SPANS", chunk):
        table = writer._to_arrow_in_chunks(bodies, [_span_count(r) for r in requests])
    assert table is not None
    assert repr(_as_rows(table)) == repr(expected)


def test_one_chunk_for_the_reference_sends_the_whole_part_there():
    """As when converted in one go: a batch retried after a crash is then the same rows under the same token."""
    good = ExportTraceServiceRequest()
    good.resource_spans.add().scope_spans.add().spans.add(trace_id=b"\1" * 16, span_id=b"\1" * 8,
                                                          start_time_unix_nano=1, end_time_unix_nano=2)
    twice = ExportTraceServiceRequest()
    span = twice.resource_spans.add().scope_spans.add().spans.add(
        trace_id=b"\1" * 16, span_id=b"\2" * 8, start_time_unix_nano=1, end_time_unix_nano=2)
    span.attributes.extend([KeyValue(key="k", value=AnyValue(string_value="a")),
                            KeyValue(key="k", value=AnyValue(string_value="b"))])
    bodies = [good.SerializeToString()] * 3 + [twice.SerializeToString()]
    with patch.object(writer, "CONVERT_SPANS", 2):
        assert writer._to_arrow_in_chunks(bodies[:3], [1, 1, 1]).num_rows == 3  # two chunks, one table
        assert writer._to_arrow_in_chunks(bodies, [1, 1, 1, 1]) is None
