"""OTLP/protobuf request bodies to one otel_traces Arrow table, without a Python object per span (the fast path).

ptars decodes the bodies straight into Arrow (Rust), each attribute value (`AnyValue`) left as its
protobuf bytes; numpy reads the usual encodings out of those bytes (one string, bool, int or double
field) and Arrow compute builds the 22 columns. Any other value (bytes, arrays, maps, doubles from 1e9
up, NaN/Inf, several fields) is parsed by protobuf and written by `rows.value_string` one by one, as the
reference converter writes it (pdata's `AsString()`). A batch holding anything the reference converter
would reject, warn about or merge (bad ids or times, unknown kind/status, a key twice in one map) gives
None: convert that batch with `rows.convert` instead.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tracetune.collector.rows import COLUMNS, MAX_START_NS, SPAN_KINDS, STATUS_CODES, value_string


def _files_with_values_as_bytes() -> list[descriptor_pb2.FileDescriptorProto]:
    """The request's .proto files, dependencies first, with `KeyValue.value` turned into `repeated bytes`.

    Decoding a value into Arrow as a struct of AnyValue's eight fields is most of what ptars spends on a
    span; as bytes (the same wire encoding: a length-delimited field) it costs a fraction of that. Repeated,
    because protobuf merges a message field that comes twice: the occurrences joined are what it parses.
    """
    files: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def add(file) -> None:
        for dependency in file.dependencies:
            add(dependency)
        if file.name in seen:
            return
        seen.add(file.name)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        if file.name == KeyValue.DESCRIPTOR.file.name:
            (message,) = (m for m in proto.message_type if m.name == KeyValue.DESCRIPTOR.name)
            (field,) = (f for f in message.field if f.name == "value")
            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            field.label = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED  # each time the field is there
            field.ClearField("type_name")
        files.append(proto)

    add(ExportTraceServiceRequest.DESCRIPTOR.file)
    return files


def _handler():
    from ptars import HandlerPool

    pool = descriptor_pool.DescriptorPool()  # private: KeyValue stays what the rest of the process sees
    for proto in _files_with_values_as_bytes():
        pool.Add(proto)
    request = pool.FindMessageTypeByName(ExportTraceServiceRequest.DESCRIPTOR.full_name)
    return HandlerPool([request.file]).get_for_message(request)


try:
    _HANDLER = _handler()
except ImportError:  # pragma: no cover - a platform without ptars wheels: every batch takes rows.convert
    _HANDLER = None
_MAX_NS = (1 << 63) - 1  # DateTime64(9) ends here
_KINDS = pa.array(SPAN_KINDS)
_CODES = pa.array(STATUS_CODES)
_TS = pa.timestamp("ns")
_MAP = pa.map_(pa.string(), pa.string())
_HEX = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), dtype=np.uint16)  # byte -> its 2 digits
_CONSTANTS = pa.array(["false", "true", ""])


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
    if n == 0:
        return pa.array([], pa.string())
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[values.offset:values.offset + n + 1]
    data = (np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]:offsets[-1]] if data_buf is not None
            else np.empty(0, np.uint8))
    return pa.StringArray.from_buffers(n, pa.py_buffer(((offsets - offsets[0]) * 2).astype(np.int32)),
                                       pa.py_buffer(_HEX[data]))


def _maps(kvs: pa.ListArray) -> pa.MapArray:
    """list<KeyValue> per row (values as AnyValue bytes) -> map<string, string> of AsString values."""
    flat = kvs.values  # the whole child array; kvs.offsets say which part each row owns
    keys = flat.field("key")
    if _has_duplicate_keys(kvs.offsets, keys):
        raise _Refused("a key twice in one map")
    return pa.MapArray.from_arrays(kvs.offsets, keys, _value_strings(_joined(flat.field("value"))))


def _joined(occurrences: pa.ListArray) -> pa.BinaryArray:
    """Each KeyValue's value bytes: its one occurrence, or all of them joined (what protobuf would merge)."""
    offsets = occurrences.offsets.to_numpy()
    once = np.diff(offsets) == 1
    values = occurrences.flatten()
    if once.all():
        return values
    other = np.flatnonzero(~once)
    index = offsets[:-1] - offsets[0]
    index[other] = len(values) + np.arange(len(other))
    joined = pa.array([b"".join(occurrences[int(i)].as_py()) for i in other], pa.binary())
    return pa.concat_arrays([values, joined]).take(index)


def _varint2(data: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | bool]:
    """(value, bytes, ok) of a varint of one or two bytes at each position (ok False: longer)."""
    low = data[at].astype(np.int32)
    one = low < 0x80
    if one.all():
        return low, np.ones_like(low), True
    high = data[at + 1].astype(np.int32)
    return np.where(one, low, (low & 0x7F) | (high << 7)), 2 - one, one | (high < 0x80)


def _strings(data_buf: pa.Buffer, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
    """The bytes starts[i]:ends[i] of the buffer (in order, not overlapping) as UTF-8 strings.

    One binary array over the buffer whose even elements are the wanted slices and odd ones the gaps
    between them, then a take of the even ones: Arrow copies the bytes, no Python per value.
    """
    n = len(starts)
    if n == 0:
        return pa.array([], pa.string())
    bounds = np.empty(2 * n, np.int32)
    bounds[0::2], bounds[1::2] = starts, ends
    spans = pa.BinaryArray.from_buffers(pa.binary(), 2 * n - 1, [None, pa.py_buffer(bounds), data_buf])
    return pc.take(spans, np.arange(0, 2 * n, 2, dtype=np.int32)).cast(pa.string())  # checks UTF-8


_PAD = np.zeros(32, np.uint8)  # past the data: the reads of a value's last bytes stay in bounds


def _value_strings(values: pa.BinaryArray) -> pa.Array:
    """pdata's AsString() of serialized AnyValues, read with numpy where the encoding is the usual one.

    Read here: nothing, or exactly one field that is a string (length under 16 KiB), a bool (0 or 1), an
    int or a double below 1e9 (which Arrow prints as ECMAScript does). Anything else (bytes, arrays, maps,
    other doubles, a field twice, several fields, unknown fields) is parsed by protobuf and written by
    rows.value_string, one value at a time, so every value is what the reference converter stores.
    """
    n = len(values)
    if n == 0:
        return pa.array([], pa.string())
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[values.offset:values.offset + n + 1]
    raw = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    data = np.concatenate([raw[:offsets[-1]], _PAD])
    begin, end = offsets[:-1], offsets[1:]
    size = end - begin
    # Reads below are at most 11 bytes past a value's start; a value's own size is checked before its
    # bytes decide anything, so bytes of the next value (or the padding) never do.
    tag = np.where(size > 0, data[begin], 0)
    inner = begin + 1
    is_string = tag == 0x0A  # 0x0A <length> <bytes> to the end
    text_start = begin
    if is_string.any():
        text_len, text_n, text_ok = _varint2(data, np.where(is_string, inner, begin))
        text_start = np.where(is_string, inner + text_n, begin)
        is_string &= text_ok & (size >= 2) & (text_start + text_len == end)
    is_bool = (tag == 0x10) & (size == 2) & (data[inner] <= 1)  # 0x10 then 0 or 1
    is_int = (tag == 0x18) & (size >= 2) & (size <= 11)  # 0x18 <varint> to the end: two's complement
    ints = np.zeros(0, np.uint64)
    if is_int.any():
        rows = np.flatnonzero(is_int)
        width, at = size[rows] - 1, inner[rows]
        value = np.zeros(len(rows), np.uint64)
        fits = (width < 10) | (data[at + 9] <= 1)  # ten bytes carry 64 bits: the last one holds one bit
        for k in range(int(width.max())):
            byte = data[at + k]
            used = k < width
            fits &= ~used | ((byte >= 0x80) == (k < width - 1))  # more bytes follow exactly until the last
            value |= np.where(used, byte & 0x7F, 0).astype(np.uint64) << np.uint64(7 * k)
        is_int[rows] = fits
        ints = value[fits]
    is_double = (tag == 0x21) & (size == 9)  # 0x21 <8 bytes, little-endian>
    doubles = np.zeros(0, np.float64)
    if is_double.any():
        rows = np.flatnonzero(is_double)
        found = data[inner[rows, None] + np.arange(8)].view("<f8").ravel()
        with np.errstate(invalid="ignore"):
            small = np.abs(found) < 1e9
        is_double[rows] = small
        doubles = found[small]

    # Each value's text is taken from one pool: strings, ints, doubles, "false", "true", "", then the slow ones.
    where = np.empty(n, np.int64)
    pool = []
    for kind, make in ((is_string, lambda r: _strings(data_buf, text_start[r], end[r])),
                       (is_int, lambda r: pc.cast(pa.array(ints.view(np.int64)), pa.string())),
                       (is_double, lambda r: pc.cast(pa.array(doubles), pa.string()))):
        rows = np.flatnonzero(kind)
        if len(rows):
            where[rows] = sum(map(len, pool)) + np.arange(len(rows))
            pool.append(make(rows))
    constants = sum(map(len, pool))
    pool.append(_CONSTANTS)
    where[is_bool] = constants + data[inner[is_bool]].astype(np.int64)
    empty = size == 0
    where[empty] = constants + 2
    slow = np.flatnonzero(~(empty | is_string | is_bool | is_int | is_double))
    if len(slow):
        try:
            parsed = [AnyValue.FromString(values[int(i)].as_py()) for i in slow]
        except DecodeError as exc:
            raise _Refused(f"an attribute value that is not an AnyValue: {exc}") from None
        where[slow] = constants + len(_CONSTANTS) + np.arange(len(slow))
        pool.append(pa.array([value_string(value) for value in parsed], pa.string()))
    return pa.concat_arrays(pool).take(where)


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
