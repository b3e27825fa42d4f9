"""OTLP/protobuf request bodies to one otel_traces Arrow table, without a Python object per span (the fast path).

ptars decodes the bodies straight into Arrow (Rust); Arrow compute and numpy build the 22 columns.
Values Arrow cannot write exactly as pdata's `AsString()` (bytes, arrays, maps, doubles from 1e9
up, NaN/Inf) are patched one by one with `rows.value_string`. A batch holding anything the reference
converter would reject, warn about or merge (bad ids or times, unknown kind/status, a key twice in
one map) gives None: convert that batch with `rows.convert` instead.
"""

from __future__ import annotations

import base64

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from tracetune.collector.rows import COLUMNS, MAX_START_NS, SPAN_KINDS, STATUS_CODES, value_string

try:
    from ptars import HandlerPool

    _HANDLER = HandlerPool([ExportTraceServiceRequest.DESCRIPTOR.file]).get_for_message(
        ExportTraceServiceRequest.DESCRIPTOR)
except ImportError:  # pragma: no cover - a platform without ptars wheels: every batch takes rows.convert
    _HANDLER = None
_MAX_NS = (1 << 63) - 1  # DateTime64(9) ends here
_KINDS = pa.array(SPAN_KINDS)
_CODES = pa.array(STATUS_CODES)
_TS = pa.timestamp("ns")
_MAP = pa.map_(pa.string(), pa.string())
_HEX = np.array([list(f"{i:02x}".encode()) for i in range(256)], dtype=np.uint8)


class _Refused(Exception):
    """The batch needs the reference converter."""


def to_arrow(bodies: list[bytes]) -> pa.Table | None:
    """The otel_traces columns of every span in these ExportTraceServiceRequest bodies, or None."""
    if _HANDLER is None:
        return None
    try:
        return _table(_HANDLER.list_to_record_batch(bodies))
    except (_Refused, pa.ArrowException, ValueError):
        return None


def _table(batch: pa.RecordBatch) -> pa.Table:
    rs_list = batch.column("resource_spans")
    rs = rs_list.flatten()
    ss_list = rs.field("scope_spans")
    ss = ss_list.flatten()
    sp_list = ss.field("spans")
    sp = sp_list.flatten()
    sp_ss = pc.list_parent_indices(sp_list)  # span -> its scope_spans
    sp_rs = pc.take(pc.list_parent_indices(ss_list), sp_ss)  # span -> its resource_spans

    resources = _maps(rs.field("resource").flatten()[0]) if len(rs) else pa.array([], _MAP)
    service = pc.fill_null(pc.map_lookup(resources, "service.name", "first"), "")
    scope_name, scope_version = (pc.fill_null(a, "") for a in ss.field("scope").flatten()[:2])

    # Span fields in field-number order (ptars' column order).
    (trace_id, span_id, trace_state, parent, name, kind, start, end, attrs, _, events, _, links, _, status,
     _) = sp.flatten()
    status_message, code = status.flatten()
    code = pc.fill_null(code, 0)
    _check_spans(trace_id, span_id, parent, kind, code, start, end)
    ev_time, ev_name, ev_attrs, _ = events.values.flatten()
    lk_trace, lk_span, lk_state, lk_attrs, _, _ = links.values.flatten()
    if len(ev_time) and pc.max(ev_time).as_py() > _MAX_NS:
        raise _Refused("event time past DateTime64(9)")
    if len(lk_trace) and not (_all(pc.equal(pc.binary_length(lk_trace), 16))
                              and _all(pc.equal(pc.binary_length(lk_span), 8))):
        raise _Refused("link ids of the wrong length")

    def per_event(values):
        return pa.ListArray.from_arrays(events.offsets, values)

    def per_link(values):
        return pa.ListArray.from_arrays(links.offsets, values)

    columns = [
        _times(start), _hex(trace_id), _hex(span_id), _hex(parent), trace_state, name, pc.take(_KINDS, kind),
        pc.take(service, sp_rs), pc.take(resources, sp_rs), pc.take(scope_name, sp_ss),
        pc.take(scope_version, sp_ss), _maps(attrs), pc.subtract(end, start), pc.take(_CODES, code),
        pc.fill_null(status_message, ""),
        per_event(_times(ev_time)), per_event(ev_name), per_event(_maps(ev_attrs)),
        per_link(_hex(lk_trace)), per_link(_hex(lk_span)), per_link(lk_state), per_link(_maps(lk_attrs)),
    ]
    return pa.table(columns, names=COLUMNS)


def _all(mask: pa.Array) -> bool:
    return bool(pc.all(mask, min_count=0).as_py())  # True for no spans at all


def _check_spans(trace_id, span_id, parent, kind, code, start, end) -> None:
    """Refuse what rows.span_problem rejects or rows.convert warns about (the reference says why)."""
    ok = pc.and_(pc.and_(pc.greater(start, 0), pc.less_equal(start, end)), pc.less_equal(end, _MAX_NS))
    ok = pc.and_(ok, pc.less_equal(start, MAX_START_NS))  # the rollups' DateTime minute ends in 2106
    ok = pc.and_(ok, pc.and_(pc.equal(pc.binary_length(trace_id), 16), pc.equal(pc.binary_length(span_id), 8)))
    ok = pc.and_(ok, pc.and_(pc.not_equal(trace_id, b"\0" * 16), pc.not_equal(span_id, b"\0" * 8)))
    ok = pc.and_(ok, pc.is_in(pc.binary_length(parent), pa.array([0, 8], pa.int32())))
    ok = pc.and_(ok, pc.and_(pc.is_in(kind, pa.array(range(len(SPAN_KINDS)), pa.int32())),
                             pc.is_in(code, pa.array(range(len(STATUS_CODES)), pa.int32()))))
    if not _all(ok):
        raise _Refused("a span the reference rejects or warns about")


def _times(values: pa.Array) -> pa.Array:
    """Nanoseconds (uint64, checked <= 2^63-1) as timestamp[ns] for DateTime64(9)."""
    return pc.cast(values, pa.int64()).view(_TS)


def _hex(values: pa.Array) -> pa.Array:
    """Lower-case hex of every binary value: hex is per byte, so the offsets just double."""
    n = len(values)
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[values.offset:values.offset + n + 1]
    data = (np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]:offsets[-1]] if data_buf is not None
            else np.empty(0, np.uint8))
    text = _HEX[data].ravel()
    return pa.StringArray.from_buffers(n, pa.py_buffer(((offsets - offsets[0]) * 2).astype(np.int32)),
                                       pa.py_buffer(text.tobytes()))


def _maps(kvs: pa.ListArray) -> pa.MapArray:
    """list<KeyValue> per row -> map<string, string> of AsString values."""
    flat = kvs.values  # the whole child array; kvs.offsets say which part each row owns
    keys = flat.field("key")
    # AnyValue's oneof in field-number order; flatten() merges "no value at all" into each child
    string, boolean, integer, double, array, kvlist, raw, strindex = flat.field("value").flatten()
    text = pc.coalesce(string, pc.cast(integer, pa.string()), pc.cast(double, pa.string()),
                       pc.if_else(boolean, "true", "false"), "")
    # Arrow prints doubles as ECMAScript does below 1e10 (1, 0.1, 1e-7; but 1e+10, not 10000000000):
    # from 1e9 up, and NaN/Inf, the value goes through Python
    slow = pc.or_(pc.or_(pc.is_valid(array), pc.is_valid(kvlist)), pc.or_(pc.is_valid(raw), pc.is_valid(strindex)))
    slow = pc.or_(slow, pc.fill_null(pc.invert(pc.less(pc.abs(double), 1e9)), False))
    if pc.any(slow).as_py():
        parts = (string, boolean, integer, double, array, kvlist, raw, strindex)
        fixed = [_slow_value(*(p[i].as_py() for p in parts)) for i in pc.indices_nonzero(slow).to_pylist()]
        text = pc.replace_with_mask(text, slow, pa.array(fixed, pa.string()))
    if _has_duplicate_keys(kvs.offsets, keys):
        raise _Refused("a key twice in one map")
    return pa.MapArray.from_arrays(kvs.offsets, keys, text)


def _slow_value(string, boolean, integer, double, array, kvlist, raw, strindex) -> str:
    if raw is not None:
        return base64.b64encode(raw).decode()
    value = AnyValue()
    if double is not None:
        value.double_value = double
    elif array is not None:  # ptars keeps nested values serialized
        value.array_value.CopyFrom(ArrayValue(values=[AnyValue.FromString(b) for b in array["values"]]))
    elif kvlist is not None:
        value.kvlist_value.CopyFrom(KeyValueList(values=[KeyValue.FromString(b) for b in kvlist["values"]]))
    elif strindex is not None:
        value.string_value_strindex = strindex
    return value_string(value)


def _has_duplicate_keys(offsets: pa.Array, keys: pa.Array) -> bool:
    """Whether one map holds a key twice: a 64-bit set per map when the batch has <= 64 distinct keys."""
    off = offsets.to_numpy()
    first, last = int(off[0]), int(off[-1])
    if last == first:
        return False
    encoded = pc.dictionary_encode(keys.slice(first, last - first))
    codes = encoded.indices.to_numpy().astype(np.int64)
    lengths = np.diff(off)
    if len(encoded.dictionary) <= 64:
        nonempty = lengths > 0
        bits = np.left_shift(np.uint64(1), codes.astype(np.uint64))
        per_map = np.bitwise_or.reduceat(bits, (off[:-1] - first)[nonempty])
        return bool((np.bitwise_count(per_map) != lengths[nonempty]).any())
    owner = np.repeat(np.arange(len(lengths)), lengths)
    pairs = np.sort(owner * len(encoded.dictionary) + codes)
    return bool((pairs[1:] == pairs[:-1]).any())
