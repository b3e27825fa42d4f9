"""Hostile input: slow connections are cut, and fuzzed bodies and headers never get a 5xx or stall the writer."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.collector.otlp import batch, request
from tests.collector.test_receiver import start_ingest, stop_ingest
from tests.servers import ThreadServer
from tracetune import store
from tracetune.collector.receivers import create_app


@pytest.fixture(scope="module")
def server(store_settings, tmp_path_factory):
    import uuid

    db = store_settings.replace(database=f"t_{uuid.uuid4().hex[:12]}")
    store.connect(db)
    ingest = start_ingest(db, tmp_path_factory.mktemp("wal") / "wal")
    with ThreadServer(create_app(ingest, max_body_bytes=256 * 1024, body_timeout=1.0), header_timeout=1.0) as srv:
        yield srv, ingest, store.connect(db, ensure_schema=False)
    stop_ingest(ingest)


def test_slow_and_silent_connections_are_closed(server):
    srv, _, _ = server
    socks = []
    for i in range(50):
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        if i % 2:
            sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n")  # headers that never finish
        socks.append(sock)
    started = time.monotonic()
    for sock in socks:
        assert sock.recv(1024) == b""  # closed by the server, without an answer
        sock.close()
    assert time.monotonic() - started < 8
    # and the server still serves
    ok, _ = batch(3)
    r = httpx.post(f"{srv.url}/v1/traces", content=ok.SerializeToString(),
                   headers={"content-type": "application/x-protobuf"})
    assert r.status_code == 200


_text = st.text(max_size=30)
_bytes = st.binary(max_size=20)
_u64 = st.integers(min_value=0, max_value=2**64 - 1)
_span = st.builds(
    Span, trace_id=st.one_of(_bytes, st.binary(min_size=16, max_size=16)),
    span_id=st.one_of(_bytes, st.binary(min_size=8, max_size=8)), parent_span_id=_bytes, name=_text,
    kind=st.integers(min_value=0, max_value=2**31 - 1), start_time_unix_nano=_u64, end_time_unix_nano=_u64,
    trace_state=_text,
)


def _post(srv, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/traces", content=body, headers=headers, timeout=10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spans=st.lists(_span, max_size=8))
def test_fuzzed_spans_never_get_a_5xx(server, spans):
    srv, ingest, _ = server
    body = request(spans).SerializeToString()
    r = _post(srv, body, {"content-type": "application/x-protobuf"})
    assert r.status_code == 200, r.content
    assert not ingest.writer.stalled


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=2000), st.text(max_size=500).map(str.encode)),
       content_type=st.sampled_from(["application/x-protobuf", "application/json", "application/json; charset=utf-8",
                                     "text/plain", "", "application/x-protobuf; x=1"]),
       encoding=st.sampled_from(["", "gzip", "deflate", "identity", "br", "gzip, gzip"]))
def test_fuzzed_bodies_and_headers_never_get_a_5xx(server, body, content_type, encoding):
    srv, ingest, _ = server
    headers = {"content-type": content_type, **({"content-encoding": encoding} if encoding else {})}
    r = _post(srv, body, headers)
    assert r.status_code < 500, (r.status_code, r.content)
    assert not ingest.writer.stalled


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_valid_protobuf_never_gets_a_5xx(server, data):
    srv, ingest, _ = server
    good, _ = batch(3)
    body = bytearray(good.SerializeToString())
    for _ in range(data.draw(st.integers(min_value=1, max_value=6))):
        at = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
        body[at] = data.draw(st.integers(min_value=0, max_value=255))
    r = _post(srv, bytes(body), {"content-type": "application/x-protobuf"})
    assert r.status_code in (200, 400), (r.status_code, r.content)


def test_after_the_fuzzing_every_valid_span_landed_and_the_writer_is_healthy(server):
    srv, ingest, client = server
    good, ids = batch(50)
    assert _post(srv, good.SerializeToString(), {"content-type": "application/x-protobuf"}).status_code == 200
    assert ingest.writer.flush(60)
    stored = {r[0] for r in client.query("SELECT SpanId FROM otel_traces").result_rows}
    assert ids <= stored
    assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"
