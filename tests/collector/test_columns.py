"""The fast path (protobuf bodies to Arrow columns) stores exactly what the reference converter stores."""

from __future__ import annotations

import math
import struct
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


# ---- attribute values as the wire carries them ----------------------------------------------------
# The fast path reads AnyValue's bytes itself (one string, bool, int or double field) and leaves every
# other encoding to protobuf. These requests are written byte by byte, so they hold what no SDK writes
# but protobuf accepts: fields out of order, a field twice, several oneof fields, unknown fields, long
# and non-minimal varints, a KeyValue whose value comes twice (protobuf merges the two).
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _padded_varint(value: int, extra: int) -> bytes:
    """A varint with `extra` redundant continuation bytes (protobuf reads it as the same number)."""
    plain = bytearray(_varint(value))
    if extra and len(plain) + extra <= 10:
        plain[-1] |= 0x80
        plain += b"\x80" * (extra - 1) + b"\x00"
    return bytes(plain)


def _len_field(number: int, payload: bytes, extra: int = 0) -> bytes:
    return _varint(number << 3 | 2) + _padded_varint(len(payload), extra) + payload


_PADDING = st.integers(min_value=0, max_value=2)
_TEXT = st.one_of(_STRINGS, st.text(min_size=120, max_size=140), st.sampled_from(["ü" * 9000]))


@st.composite
def _value_field(draw) -> bytes:
    """One field of an AnyValue, as bytes."""
    kind = draw(st.sampled_from(["string", "bool", "int", "double", "bytes", "array", "kvlist", "strindex",
                                 "unknown"]))
    if kind == "string":
        return _len_field(1, draw(_TEXT).encode(), draw(_PADDING))
    if kind == "bool":
        return b"\x10" + _padded_varint(draw(st.sampled_from([0, 1, 2, 300])), draw(_PADDING))
    if kind == "int":
        value = draw(st.one_of(st.integers(min_value=-2**63, max_value=2**63 - 1),
                               st.sampled_from([0, 1, 127, 128, -1, 2**63 - 1, -2**63])))
        return b"\x18" + _padded_varint(value, draw(_PADDING))
    if kind == "double":
        return b"\x21" + struct.pack("<d", draw(_DOUBLES))
    if kind == "bytes":
        return _len_field(7, draw(st.binary(max_size=6)))
    if kind == "array":
        return _len_field(5, ArrayValue(values=draw(st.lists(_SCALAR, max_size=2))).SerializeToString())
    if kind == "kvlist":
        return _len_field(6, KeyValueList(values=[KeyValue(key="k", value=v) for v in draw(
            st.lists(_SCALAR, max_size=2))]).SerializeToString())
    if kind == "strindex":
        return b"\x40" + _varint(draw(st.integers(min_value=0, max_value=5)))
    return draw(st.sampled_from([b"\x48\x05", _len_field(15, b"??"), b"\x55\x01\x02\x03\x04"]))  # unknown fields


@st.composite
def _key_value(draw, key: str) -> bytes:
    """A KeyValue: its key, and its value field 0 to 2 times, each an AnyValue of 0 to 3 fields."""
    values = [_len_field(2, b"".join(draw(st.lists(_value_field(), max_size=3))), draw(_PADDING))
              for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2])))]
    fields = [_len_field(1, key.encode(), draw(_PADDING)), *values]
    if draw(st.booleans()):
        fields.reverse()  # value before key
    return b"".join(fields)


@st.composite
def _wire_request(draw) -> bytes:
    spans = []
    for index in range(draw(st.integers(min_value=1, max_value=3))):
        span = Span(trace_id=b"\1" * 16, span_id=bytes([index + 1]) * 8, start_time_unix_nano=1,
                    end_time_unix_nano=2, name=f"s{index}")
        keys = draw(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=5, unique=True))
        spans.append(span.SerializeToString() + b"".join(_len_field(9, draw(_key_value(k))) for k in keys))
    scope = b"".join(_len_field(2, s) for s in spans)
    resource = _len_field(1, _len_field(1, draw(_key_value("service.name")))) + _len_field(2, scope)
    return _len_field(1, resource)


@settings(max_examples=300, deadline=None)
@given(body=_wire_request())
def test_attribute_values_in_any_encoding_are_the_reference_values(body):
    request = ExportTraceServiceRequest.FromString(body)  # protobuf accepts it: the collector would log it
    expected = rows.convert(request).rows
    table = columns.to_arrow([body])
    assert table is not None
    assert repr(_as_rows(table)) == repr(expected)


def test_usual_values_are_read_without_protobuf():
    """Strings, ints, bools and doubles below 1e9 as SDKs write them never go through the slow path."""
    span = Span(trace_id=b"\1" * 16, span_id=b"\1" * 8, start_time_unix_nano=1, end_time_unix_nano=2)
    span.attributes.extend([KeyValue(key="s", value=AnyValue(string_value="x" * 200)),
                            KeyValue(key="e", value=AnyValue(string_value="")),
                            KeyValue(key="i", value=AnyValue(int_value=-5)),
                            KeyValue(key="j", value=AnyValue(int_value=7)),
                            KeyValue(key="b", value=AnyValue(bool_value=True)),
                            KeyValue(key="d", value=AnyValue(double_value=0.25)), KeyValue(key="n", value=AnyValue())])
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])])
    with patch.object(columns, "AnyValue", **{"FromString.side_effect": AssertionError("slow path taken")}):
        table = columns.to_arrow([request.SerializeToString()])
    assert table is not None
    assert dict(table.column("SpanAttributes")[0].as_py()) == {"s": "x" * 200, "e": "", "i": "-5", "j": "7",
                                                                "b": "true", "d": "0.25", "n": ""}
