"""OTLP/HTTP receiver contract: JSON and protobuf in, clear errors for bad input, partial success for bad spans."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)

from tests.collector.otlp import TRACE, batch, otlp_json, request, span
from tests.servers import ThreadServer, free_port, wait_until
from tracetune import store
from tracetune.collector.ingest import Ingest
from tracetune.collector.receivers import JSON, create_app, parse
from tracetune.collector.wal import WriteAheadLog
from tracetune.collector.writer import SpanWriter

PB = {"content-type": "application/x-protobuf"}


def start_ingest(settings, wal_dir, **writer_options) -> Ingest:
    wal = WriteAheadLog(wal_dir)
    options = {"batch_rows": 100, "flush_seconds": 0.05, **writer_options}
    writer = SpanWriter(lambda: store.connect(settings, ensure_schema=False), wal, **options)
    ingest = Ingest(wal, writer)
    ingest.replay()
    writer.start()
    return ingest


def stop_ingest(ingest: Ingest, timeout: float = 30) -> None:
    ingest.writer.stop(timeout)
    ingest.wal.close()


@pytest.fixture
def receiver(db_settings, tmp_path):
    ingest = start_ingest(db_settings, tmp_path / "wal")
    with ThreadServer(create_app(ingest, max_body_bytes=64 * 1024, body_timeout=2)) as server:
        yield server, ingest.writer, store.connect(db_settings, ensure_schema=False)
    stop_ingest(ingest)


def count(client, table: str = "otel_traces") -> int:
    return client.query(f"SELECT count() FROM {table}").result_rows[0][0]


def test_json_and_protobuf_bodies_become_rows(receiver):
    server, writer, client = receiver
    r = httpx.post(f"{server.url}/v1/traces", json=otlp_json(3))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {}  # no partial success: every span accepted
    message = parse(json.dumps(otlp_json(2, "ab" * 16)).encode(), JSON)  # the receiver's own OTLP/JSON reading
    r = httpx.post(f"{server.url}/v1/traces", content=gzip.compress(message.SerializeToString()),
                   headers={**PB, "content-encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    assert not ExportTraceServiceResponse.FromString(r.content).HasField("partial_success")
    assert writer.flush(20)
    rows = client.query("SELECT TraceId, SpanId, ParentSpanId, SpanKind, Duration, StatusCode, StatusMessage, "
                        "ServiceName, SpanAttributes['n'] FROM otel_traces ORDER BY TraceId, SpanId").result_rows
    assert len(rows) == 5
    # Written as the contrib clickhouseexporter writes them (pdata's String()).
    assert rows[0] == (TRACE, "0000000000000001", "", "Server", 250_000_000, "Unset", "", "json-svc", "0")
    assert rows[1][2:4] == ("0000000000000001", "Internal") and rows[1][5:7] == ("Error", "bad")
    assert {r[0] for r in rows[3:]} == {"ab" * 16}


def _nested(depth: int) -> bytes:
    return ('{"resourceSpans": [{"resource": {"attributes": [{"key": "k", "value": '
            + '{"kvlistValue": {"values": [{"key": "k", "value": ' * depth + '{}' + '}]}}' * depth
            + '}]}}]}').encode()


@pytest.mark.parametrize("content_type, body, encoding, status", [
    ("application/x-protobuf", b"\xff\xff\xff not protobuf", "", 400),
    ("application/json", b"{not json", "", 400),
    ("application/json", json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}), "", 400),
    ("application/json", json.dumps({"resourceSpans": "nope"}), "", 400),
    ("application/json", b"[" * 1000 + b"]" * 1000, "", 400),
    ("application/json", _nested(400), "", 400),
    ("application/json", gzip.compress(json.dumps(otlp_json(3)).encode(), mtime=0)[:-12], "gzip", 400),  # truncated
    ("application/json", gzip.compress(b'{"resourceSpans": []}', mtime=0) * 2, "gzip", 400),  # two members
    ("application/json", b"{}", "br", 415),
    ("text/plain", b"hello", "", 415),
])
def test_bad_input_gets_a_clear_error_and_writes_nothing(receiver, content_type, body, encoding, status):
    server, writer, client = receiver
    headers = {"content-type": content_type, **({"content-encoding": encoding} if encoding else {})}
    r = httpx.post(f"{server.url}/v1/traces", content=body, headers=headers)
    assert r.status_code == status
    reply_json = content_type != "application/x-protobuf"
    message = r.json()["message"] if reply_json else Status.FromString(r.content).message
    assert message  # says what was wrong
    assert writer.flush(5) and count(client) == 0


def test_oversized_body_is_413(receiver):
    server, _, _ = receiver
    big = json.dumps(otlp_json(400)).encode()
    assert len(big) > 64 * 1024
    r = httpx.post(f"{server.url}/v1/traces", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["message"]
    bomb = gzip.compress(b"{" + b" " * (1024 * 1024) + b"}")
    r = httpx.post(f"{server.url}/v1/traces", content=bomb,
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 413


def test_a_body_that_never_finishes_gets_408(receiver):
    import socket

    server, _, _ = receiver
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-protobuf\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b"\x0a")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408")


POISON = {
    "short trace id": {"trace_id": b"\x01\x02\x03"},
    "no ids": {"trace_id": b"", "span_id": b""},
    "zero trace id": {"trace_id": bytes(16)},
    "long parent id": {"parent_span_id": b"\x01" * 9},
    "start past DateTime64": {"start_time_unix_nano": 2**63 + 5, "end_time_unix_nano": 2**63 + 6},
    "end past DateTime64": {"end_time_unix_nano": 2**64 - 1},
    "end before start": {"end_time_unix_nano": 1_600_000_000_000_000_000},
    "no start": {"start_time_unix_nano": 0},
}


@pytest.mark.parametrize("problem", list(POISON))
def test_a_bad_span_is_rejected_with_a_reason_and_the_rest_lands(receiver, problem):
    server, writer, client = receiver
    good, ids = batch(20)
    bad = span("poison", **POISON[problem])
    good.resource_spans[0].scope_spans[0].spans.insert(7, bad)
    r = httpx.post(f"{server.url}/v1/traces", content=good.SerializeToString(), headers=PB)
    assert r.status_code == 200
    partial = ExportTraceServiceResponse.FromString(r.content).partial_success
    assert partial.rejected_spans == 1 and "poison" in partial.error_message
    # Normal traffic after it lands too: nothing waits behind the bad span.
    after, more = batch(30)
    assert httpx.post(f"{server.url}/v1/traces", content=after.SerializeToString(), headers=PB).status_code == 200
    assert writer.flush(20)
    stored = {row[0] for row in client.query("SELECT SpanId FROM otel_traces").result_rows}
    assert stored == ids | more
    quarantined = client.query("SELECT receiver, reason, span_name, span_json FROM tracetune_quarantine").result_rows
    assert len(quarantined) == 1 and quarantined[0][0] == "http" and quarantined[0][2] == "poison"
    assert quarantined[0][1] and json.loads(quarantined[0][3])["name"] == "poison"


def test_json_timestamp_past_datetime64_is_rejected_not_stalled(receiver):
    server, writer, client = receiver
    body = otlp_json(3)
    body["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["startTimeUnixNano"] = "1e19"
    r = httpx.post(f"{server.url}/v1/traces", json=body)
    assert r.status_code == 200 and r.json()["partialSuccess"]["rejectedSpans"] == "1"
    assert writer.flush(20) and count(client) == 2 and count(client, "tracetune_quarantine") == 1


def test_unknown_enum_values_are_stored_as_unspecified_with_a_warning(receiver):
    server, writer, client = receiver
    odd = request([span("odd-kind", kind=9), span("odd-status", status={"code": 7})])
    r = httpx.post(f"{server.url}/v1/traces", content=odd.SerializeToString(), headers=PB)
    partial = ExportTraceServiceResponse.FromString(r.content).partial_success
    assert r.status_code == 200 and partial.rejected_spans == 0 and "unknown kind 9" in partial.error_message
    assert writer.flush(20)
    rows = dict(client.query("SELECT SpanName, (SpanKind, StatusCode) FROM otel_traces").result_rows)
    assert rows == {"odd-kind": ("Unspecified", "Unset"), "odd-status": ("Internal", "Unset")}


def test_spans_on_many_dates_all_land(receiver):
    """One request on 101 dates: more partitions than one ClickHouse insert allows, yet every span lands."""
    server, writer, client = receiver
    day = 86_400 * 10**9
    spans = request([span(f"d{i}", start=1_700_000_000 * 10**9 + i * day) for i in range(101)])
    assert httpx.post(f"{server.url}/v1/traces", content=spans.SerializeToString(), headers=PB).status_code == 200
    assert writer.flush(60) and count(client) == 101 and count(client, "tracetune_quarantine") == 0


def test_full_queue_is_503_and_acknowledged_spans_survive_an_outage_and_a_restart(db_settings, tmp_path):
    down = db_settings.replace(store_port=free_port())  # nothing listens there: ClickHouse is "down"
    ingest = start_ingest(down, tmp_path / "wal", batch_rows=10, max_queue_rows=5)
    with ThreadServer(create_app(ingest, max_body_bytes=1 << 20)) as server:
        assert httpx.post(f"{server.url}/v1/traces", json=otlp_json(4)).status_code == 200
        r = httpx.post(f"{server.url}/v1/traces", json=otlp_json(4, "cd" * 16))
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        wait_until(lambda: ingest.writer.insert_failures >= 1, 20, message="a failed insert")
        assert httpx.get(f"{server.url}/health").json()["queued_rows"] == 4
    stop_ingest(ingest, timeout=1)

    # ClickHouse is back: a new collector on the same log writes the acknowledged spans, once.
    ingest = start_ingest(db_settings, tmp_path / "wal")
    assert ingest.writer.flush(20)
    stop_ingest(ingest)
    client = store.connect(db_settings, ensure_schema=False)
    assert client.query("SELECT TraceId, count() FROM otel_traces GROUP BY TraceId").result_rows == [(TRACE, 4)]
    assert not ingest.wal.pending_bytes


def test_health_says_stalled_when_the_writer_makes_no_progress(db_settings, tmp_path):
    down = db_settings.replace(store_port=free_port())
    ingest = start_ingest(down, tmp_path / "wal", stall_seconds=0.5)
    with ThreadServer(create_app(ingest, max_body_bytes=1 << 20)) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.post(f"{server.url}/v1/traces", json=otlp_json(2)).status_code == 200
        wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 503, 10, message="stalled health")
        assert httpx.get(f"{server.url}/health").json()["status"] == "stalled"
    stop_ingest(ingest, timeout=0.5)


def test_metrics_count_received_accepted_rejected_and_written(receiver):
    server, writer, _ = receiver

    def metric(text: str, name: str, label: str = "") -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and label in line)

    before = httpx.get(f"{server.url}/metrics").text
    good, _ = batch(5)
    good.resource_spans[0].scope_spans[0].spans.append(span("bad", trace_id=b"\x01"))
    httpx.post(f"{server.url}/v1/traces", content=good.SerializeToString(), headers=PB)
    assert writer.flush(20)
    after = httpx.get(f"{server.url}/metrics").text
    for name, label, delta in [("tracetune_collector_spans_received_total", "", 6),
                               ("tracetune_collector_spans_accepted_total", "", 5),
                               ("tracetune_collector_spans_rejected_total", 'reason="trace_id"', 1),
                               ("tracetune_collector_spans_written_total", "", 5)]:
        assert metric(after, name, label) - metric(before, name, label) == delta, name
    assert "tracetune_collector_insert_duration_seconds_bucket" in after
    assert "tracetune_collector_wal_bytes" in after


def test_writes_need_the_bearer_token(db_settings, tmp_path):
    ingest = start_ingest(db_settings, tmp_path / "wal")
    with ThreadServer(create_app(ingest, max_body_bytes=1 << 20, token="s3cret")) as server:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
            r = httpx.post(f"{server.url}/v1/traces", json=otlp_json(2), headers=headers)
            assert r.status_code == 401 and "token" in r.json()["message"]
        assert httpx.get(f"{server.url}/health").status_code == 200  # reads stay open on loopback
        r = httpx.post(f"{server.url}/v1/traces", json=otlp_json(2), headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert ingest.writer.flush(20)
        assert ingest.writer.rows_written == 2
    stop_ingest(ingest)


def test_a_batch_the_fast_path_cannot_take_is_stored_by_the_reference_converter(receiver):
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    server, writer, client = receiver
    odd = span("dup-key")
    odd.attributes.extend([KeyValue(key="k", value=AnyValue(string_value="last"))])  # "k" twice
    plain, ids = batch(5)
    for message in (request([odd]), plain):
        assert httpx.post(f"{server.url}/v1/traces", content=message.SerializeToString(), headers=PB).status_code == 200
    assert writer.flush(20)
    stored = dict(client.query("SELECT SpanName, SpanAttributes['k'] FROM otel_traces").result_rows)
    assert stored["dup-key"] == "last" and len(stored) >= 2 and count(client) == 6
