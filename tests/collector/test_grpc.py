"""The OTLP/gRPC receiver on a real grpc server on 127.0.0.1, driven by the official SDK exporter and raw stubs."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from google.rpc.error_details_pb2 import RetryInfo
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from prometheus_client import REGISTRY

from tests.servers import free_port
from tracetune.collector import grpc as receiver
from tracetune.collector.grpc import SERVICE, serve_grpc
from tracetune.collector.ingest import ExportResult, Ingest, IngestError

MAX_MESSAGE_BYTES = 64 * 1024
EXPORT = f"/{SERVICE}/Export"
ATTRIBUTES = {
    "str": "héllo", "bool": True, "int": -(2**62), "float": 0.25,
    "strs": ("a", "", "ü"), "bools": (True, False), "ints": (1, -2, 3), "floats": (1.5, -0.0, 1e300),
}


class RecordingIngest(Ingest):
    """Records every request; raises the queued IngestErrors first; answers `result` (default: all accepted)."""

    def __init__(self, result: ExportResult | None = None):
        self.result = result
        self.refusals: list[BaseException] = []
        self.requests: list[ExportTraceServiceRequest] = []
        self.received_ns: list[int | None] = []
        self.calls: list[float] = []
        self._lock = threading.Lock()

    def export(self, request: ExportTraceServiceRequest, received_ns: int | None = None, receiver: str = "http",
               payload: bytes | None = None) -> ExportResult:
        assert receiver == "grpc" and payload is not None
        assert ExportTraceServiceRequest.FromString(payload) == request  # the WAL logs these bytes as they came
        with self._lock:
            self.calls.append(time.monotonic())
            if self.refusals:
                raise self.refusals.pop(0)
            self.requests.append(request)
            self.received_ns.append(received_ns)
        spans = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return self.result or ExportResult(accepted_spans=spans)

    async def export_async(self, request, received_ns, receiver, payload, pool) -> ExportResult:
        return await asyncio.get_running_loop().run_in_executor(pool, self.export, request, received_ns, receiver,
                                                                payload)

    def spans(self) -> dict:
        return {span.name: span for request in self.requests for rs in request.resource_spans
                for ss in rs.scope_spans for span in ss.spans}


@contextmanager
def serving(ingest: Ingest, **options) -> Iterator[str]:
    port = free_port()
    options.setdefault("workers", 2)
    server = serve_grpc(ingest, "127.0.0.1", port, max_message_bytes=MAX_MESSAGE_BYTES, **options)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.fixture
def ingest() -> RecordingIngest:
    return RecordingIngest()


@pytest.fixture
def target(ingest) -> Iterator[str]:
    with serving(ingest) as address:
        yield address


@pytest.fixture
def stub(target) -> Iterator[TraceServiceStub]:
    with grpc.insecure_channel(target) as channel:
        yield TraceServiceStub(channel)


def finished_spans() -> list[ReadableSpan]:
    """A parent with every attribute type and an event, a child linked to a third span, all ended."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "grpc-test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tests.collector.grpc", "1.2.3")
    with tracer.start_as_current_span("other") as other:
        pass
    with tracer.start_as_current_span("parent", kind=SpanKind.SERVER, attributes=ATTRIBUTES) as parent:
        parent.add_event("retry", {"attempt": 2, "backoff_s": 0.5, "codes": ("a", "b")})
        with tracer.start_as_current_span("child", links=[Link(other.get_span_context(), {"why": "batch"})]) as child:
            child.set_status(Status(StatusCode.ERROR, "boom"))
    provider.shutdown()
    return list(memory.get_finished_spans())


def a_request(spans: int = 1, attribute: str = "") -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for i in range(spans):
        span = scope.spans.add(name=f"s{i}", trace_id=bytes(range(16)), span_id=bytes(range(8)))
        if attribute:
            span.attributes.add(key="blob").value.string_value = attribute
    return request


def value(any_value: AnyValue):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(value(item) for item in any_value.array_value.values)
    return getattr(any_value, kind)


def attributes(key_values) -> dict:
    return {kv.key: value(kv.value) for kv in key_values}


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def retry_delay(error: grpc.RpcError) -> int | None:
    status = rpc_status.from_call(error)
    assert status is not None and status.code == error.code().value[0] and status.message == error.details()
    for detail in status.details:
        if detail.Is(RetryInfo.DESCRIPTOR):
            info = RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds
    return None


def test_sdk_exports_every_attribute_type_event_and_link_intact(target, ingest):
    spans = finished_spans()
    exporter = OTLPSpanExporter(endpoint=target, insecure=True)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    exporter.shutdown()

    got = ingest.spans()
    assert set(got) == {"other", "parent", "child"}
    assert ingest.received_ns[0] == pytest.approx(time.time_ns(), abs=10e9)
    resource = ingest.requests[0].resource_spans[0]
    assert attributes(resource.resource.attributes)["service.name"] == "grpc-test"
    assert (resource.scope_spans[0].scope.name, resource.scope_spans[0].scope.version) == ("tests.collector.grpc",
                                                                                          "1.2.3")
    parent, child, other = got["parent"], got["child"], got["other"]
    assert attributes(parent.attributes) == ATTRIBUTES
    assert parent.kind == parent.SPAN_KIND_SERVER
    (event,) = parent.events
    assert event.name == "retry" and attributes(event.attributes) == {"attempt": 2, "backoff_s": 0.5,
                                                                       "codes": ("a", "b")}
    assert child.parent_span_id == parent.span_id and child.trace_id == parent.trace_id
    assert (child.status.code, child.status.message) == (child.status.STATUS_CODE_ERROR, "boom")
    (link,) = child.links
    assert (link.trace_id, link.span_id) == (other.trace_id, other.span_id)
    assert attributes(link.attributes) == {"why": "batch"}
    sent = {span.name: span for span in spans}
    assert parent.start_time_unix_nano == sent["parent"].start_time
    assert parent.span_id == sent["parent"].context.span_id.to_bytes(8, "big")


def test_sdk_gzip_compression_from_the_environment(target, ingest, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    exporter = OTLPSpanExporter(endpoint=target, insecure=True)
    assert exporter.export(finished_spans()) is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert attributes(ingest.spans()["parent"].attributes) == ATTRIBUTES


def test_gzip_request_is_limited_after_decompression(target, ingest):
    """A small gzip body that inflates past the limit is refused: no decompression bomb gets to Ingest."""
    with grpc.insecure_channel(target, compression=grpc.Compression.Gzip) as channel:
        stub = TraceServiceStub(channel)
        assert stub.Export(a_request(attribute="x" * (MAX_MESSAGE_BYTES // 2))) is not None
        error = rpc_error(stub.Export, a_request(attribute="x" * (2 * MAX_MESSAGE_BYTES)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(ingest.requests) == 1


def test_oversized_request_is_resource_exhausted_without_retry_info(stub, ingest):
    error = rpc_error(stub.Export, a_request(attribute="x" * MAX_MESSAGE_BYTES))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rpc_status.from_call(error) is None  # grpc's own refusal, no RetryInfo: not retryable, per the spec
    assert ingest.calls == []


def test_full_success_leaves_partial_success_unset(stub, ingest):
    response = stub.Export(a_request(spans=3))
    assert not response.HasField("partial_success")
    assert [len(r.resource_spans[0].scope_spans[0].spans) for r in ingest.requests] == [3]


@pytest.mark.parametrize(("result", "rejected", "message"), [
    (ExportResult(accepted_spans=1, rejected_spans=2, error_message="2 spans have no trace id"), 2,
     "2 spans have no trace id"),
    (ExportResult(accepted_spans=3, error_message="service.name missing; using unknown_service"), 0,
     "service.name missing; using unknown_service"),
    (ExportResult(accepted_spans=0, rejected_spans=3), 3, "3 spans rejected"),
])
def test_partial_success_reaches_the_client(stub, ingest, result, rejected, message):
    ingest.result = result
    response = stub.Export(a_request(spans=3))
    assert response.HasField("partial_success")
    assert (response.partial_success.rejected_spans, response.partial_success.error_message) == (rejected, message)


@pytest.mark.parametrize(("status", "retry_after", "code", "delay"), [
    (400, None, grpc.StatusCode.INVALID_ARGUMENT, None),
    (413, None, grpc.StatusCode.INVALID_ARGUMENT, None),
    (415, None, grpc.StatusCode.INVALID_ARGUMENT, None),
    (429, 3, grpc.StatusCode.RESOURCE_EXHAUSTED, 3),
    (429, None, grpc.StatusCode.RESOURCE_EXHAUSTED, 1),
    (503, 7, grpc.StatusCode.UNAVAILABLE, 7),
    (503, None, grpc.StatusCode.UNAVAILABLE, None),
    (500, None, grpc.StatusCode.INTERNAL, None),
])
def test_ingest_refusals_map_to_grpc_status_and_retry_info(stub, ingest, status, retry_after, code, delay):
    ingest.refusals.append(IngestError(status, f"refused with {status}", retry_after))
    error = rpc_error(stub.Export, a_request())
    assert (error.code(), error.details()) == (code, f"refused with {status}")
    assert retry_delay(error) == delay
    trailers = dict(error.trailing_metadata())
    assert ("google.rpc.retryinfo-bin" in trailers) == (delay is not None)  # what the Python SDK reads


def test_sdk_retries_unavailable_after_the_retry_info_delay_then_succeeds(target, ingest):
    ingest.refusals += [IngestError(503, "write-ahead log full", retry_after=0)] * 2
    exporter = OTLPSpanExporter(endpoint=target, insecure=True, timeout=5)
    assert exporter.export(finished_spans()) is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert len(ingest.calls) == 3 and set(ingest.spans()) == {"other", "parent", "child"}
    # RetryInfo said 0 s; without it the SDK would have backed off ≥ 0.8 s then ≥ 1.6 s.
    assert ingest.calls[-1] - ingest.calls[0] < 1.0


def test_sdk_does_not_retry_invalid_argument(target, ingest):
    ingest.refusals.append(IngestError(400, "span 3 has an 8-byte trace id"))
    exporter = OTLPSpanExporter(endpoint=target, insecure=True, timeout=5)
    assert exporter.export(finished_spans()) is SpanExportResult.FAILURE
    exporter.shutdown()
    assert len(ingest.calls) == 1


def test_unexpected_ingest_failure_is_internal_and_the_server_goes_on(stub, ingest):
    ingest.refusals.append(RuntimeError("disk on fire"))
    error = rpc_error(stub.Export, a_request())
    assert error.code() is grpc.StatusCode.INTERNAL and "disk on fire" not in error.details()
    assert not stub.Export(a_request()).HasField("partial_success")


def test_token_is_required_when_set(ingest):
    with serving(ingest, token="s3cret") as target, grpc.insecure_channel(target) as channel:
        stub = TraceServiceStub(channel)
        for metadata in [None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")],
                         [("authorization", "Basic s3cret")], [("x-token", "s3cret")]]:
            error = rpc_error(stub.Export, a_request(), metadata=metadata)
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "authorization: Bearer <token>" in error.details()
        assert ingest.calls == []
        stub.Export(a_request(), metadata=[("authorization", "Bearer s3cret")])
        exporter = OTLPSpanExporter(endpoint=target, insecure=True, headers={"authorization": "Bearer s3cret"})
        assert exporter.export(finished_spans()) is SpanExportResult.SUCCESS
        exporter.shutdown()
    assert len(ingest.requests) == 2


def test_port_in_use_is_one_clear_error(ingest):
    with serving(ingest) as target:
        port = int(target.rsplit(":", 1)[1])
        with pytest.raises(OSError, match=f"cannot listen for OTLP/gRPC on 127.0.0.1:{port}"):
            serve_grpc(ingest, "127.0.0.1", port, max_message_bytes=MAX_MESSAGE_BYTES)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(OSError, match="port is in use"):
            serve_grpc(ingest, "127.0.0.1", sock.getsockname()[1], max_message_bytes=MAX_MESSAGE_BYTES)


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _stalled_export(port: int) -> socket.socket:
    """A raw HTTP/2 client that starts an Export, sends 10 of the 100 bytes it announces, then says nothing."""
    headers = [(":method", "POST"), (":scheme", "http"), (":path", EXPORT), (":authority", f"127.0.0.1:{port}"),
               ("content-type", "application/grpc"), ("te", "trailers")]
    block = b"".join(b"\0" + bytes([len(k)]) + k.encode() + bytes([len(v)]) + v.encode() for k, v in headers)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"") + _frame(1, 4, 1, block)
                 + _frame(0, 0, 1, b"\0\0\0\0\x64" + b"\x0a" * 10))
    return sock


def _still_open(sock: socket.socket) -> bool:
    """Whether the server has not closed `sock` (what it sent so far, e.g. its SETTINGS, is read and dropped)."""
    sock.setblocking(False)
    while True:
        try:
            if sock.recv(65536) == b"":
                return False
        except BlockingIOError:
            return True


def test_stalled_streams_do_not_starve_legitimate_exports(ingest):
    """16 streams that announce a message and never finish it, against 2 worker threads: an export sent
    meanwhile is answered (a request waits for its message as a coroutine, not on a worker thread), and
    the stalled streams are still open, not cut off by a connection limit."""
    with serving(ingest, workers=2) as target:
        port = int(target.rsplit(":", 1)[1])
        stalled = [_stalled_export(port) for _ in range(16)]
        try:
            time.sleep(0.3)  # every stalled stream has reached the server
            with grpc.insecure_channel(target) as channel:
                TraceServiceStub(channel).Export(a_request(), timeout=10)
            assert all(_still_open(sock) for sock in stalled)  # nothing closed them to make room
        finally:
            for sock in stalled:
                sock.close()
    assert len(ingest.requests) == 1


def test_a_wrong_token_is_counted_as_a_refused_request(ingest):
    def refused() -> float:
        return REGISTRY.get_sample_value("tracetune_collector_requests_refused_total",
                                         {"receiver": "grpc", "status": "401"}) or 0.0

    before = refused()
    with serving(ingest, token="s3cret") as target, grpc.insecure_channel(target) as channel:
        error = rpc_error(TraceServiceStub(channel).Export, a_request(), metadata=[("authorization", "Bearer no")])
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert refused() == before + 1


def test_a_client_that_stalls_mid_message_is_cut_off_by_connection_age(ingest, monkeypatch):
    """The connection age limit ends a stalled stream, so it holds no memory for ever."""
    monkeypatch.setitem(receiver.CONNECTION_LIMITS, "grpc.max_connection_age_ms", 500)
    monkeypatch.setitem(receiver.CONNECTION_LIMITS, "grpc.max_connection_age_grace_ms", 500)
    with serving(ingest, workers=1) as target, _stalled_export(int(target.rsplit(":", 1)[1])):
        time.sleep(0.2)  # the only worker now waits for the rest of the message
        with grpc.insecure_channel(target) as channel:
            TraceServiceStub(channel).Export(a_request(), timeout=5)
    assert len(ingest.requests) == 1


VALID = a_request(spans=2, attribute="abc").SerializeToString()


def _mutate(edits: list[tuple[int, int]], cut: int) -> bytes:
    body = bytearray(VALID)
    for position, byte in edits:
        body[position % len(body)] = byte
    return bytes(body[:cut])


BODIES = st.one_of(
    st.binary(max_size=512),
    st.builds(_mutate, st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=4),
              st.integers(0, len(VALID))),
)


def test_random_bytes_never_crash_the_server(ingest):
    with serving(ingest) as target, grpc.insecure_channel(target) as channel:
        export = channel.unary_unary(EXPORT)  # identity (de)serializers: raw bytes on the wire

        @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(BODIES)
        def check(body: bytes):
            try:
                export(body, timeout=5)
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
                assert "not a valid ExportTraceServiceRequest" in error.details()

        check()
        assert TraceServiceStub(channel).Export(a_request()) is not None
