"""OTLP/HTTP receiver contract: JSON and protobuf in, clear errors for bad input, nothing lost."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import store
from collector.receivers import create_app
from collector.writer import SpanWriter
from tests.conftest import ThreadServer, free_port, wait_until

TRACE = "5b8efff798038103d269b633813fc60c"


def otlp_json(n: int, trace_id: str = TRACE) -> dict:
    spans = [{
        "traceId": trace_id, "spanId": f"{i + 1:016x}", "parentSpanId": "" if i == 0 else f"{1:016x}",
        "name": f"span-{i}", "kind": 2 if i == 0 else 1,
        "startTimeUnixNano": str(1_700_000_000_000_000_000 + i), "endTimeUnixNano": str(1_700_000_000_250_000_000 + i),
        "attributes": [{"key": "tracetune.step", "value": {"stringValue": "s"}},
                       {"key": "n", "value": {"intValue": str(i)}}],
        "status": {"code": 2 if i == 1 else 0, "message": "bad" if i == 1 else ""},
    } for i in range(n)]
    service = {"key": "service.name", "value": {"stringValue": "json-svc"}}
    return {"resourceSpans": [{"resource": {"attributes": [service]},
                               "scopeSpans": [{"scope": {"name": "manual"}, "spans": spans}]}]}


@pytest.fixture
def receiver(db_settings):
    writer = SpanWriter(lambda: store.connect(db_settings, ensure_schema=False), batch_rows=100,
                        flush_seconds=0.1).start()
    with ThreadServer(create_app(writer, max_body_bytes=64 * 1024)) as server:
        yield server, writer, store.connect(db_settings, ensure_schema=False)
    writer.stop()


def test_json_and_protobuf_bodies_become_rows(receiver):
    server, writer, client = receiver
    body = otlp_json(3)
    r = httpx.post(f"{server.url}/v1/traces", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    message = ExportTraceServiceRequest()
    from google.protobuf import json_format

    from collector.receivers import _hex_ids_to_base64
    json_format.ParseDict(_hex_ids_to_base64(otlp_json(2, "ab" * 16)), message)
    r = httpx.post(f"{server.url}/v1/traces", content=gzip.compress(message.SerializeToString()),
                   headers={"content-type": "application/x-protobuf", "content-encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    assert writer.flush(20)
    rows = client.query("SELECT TraceId, SpanId, ParentSpanId, SpanKind, Duration, StatusCode, StatusMessage, "
                        "ServiceName, SpanAttributes['n'] FROM otel_traces ORDER BY TraceId, SpanId").result_rows
    assert len(rows) == 5
    assert rows[0] == (TRACE, "0000000000000001", "", "SPAN_KIND_SERVER", 250_000_000, "STATUS_CODE_UNSET", "",
                       "json-svc", "0")
    assert rows[1][2] == "0000000000000001" and rows[1][5:7] == ("STATUS_CODE_ERROR", "bad")
    assert {r[0] for r in rows[3:]} == {"ab" * 16}


@pytest.mark.parametrize("content_type, body, status", [
    ("application/x-protobuf", b"\xff\xff\xff not protobuf", 400),
    ("application/json", b"{not json", 400),
    ("application/json", json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}), 400),
    ("application/json", json.dumps({"resourceSpans": "nope"}), 400),
    ("text/plain", b"hello", 415),
])
def test_bad_input_gets_a_clear_error_and_writes_nothing(receiver, content_type, body, status):
    server, writer, client = receiver
    r = httpx.post(f"{server.url}/v1/traces", content=body, headers={"content-type": content_type})
    assert r.status_code == status
    reply_json = content_type != "application/x-protobuf"
    message = r.json()["message"] if reply_json else Status.FromString(r.content).message
    assert message  # says what was wrong
    assert writer.flush(5) and client.query("SELECT count() FROM otel_traces").result_rows[0][0] == 0


def test_oversized_body_is_413(receiver):
    server, writer, _ = receiver
    big = json.dumps(otlp_json(400)).encode()
    assert len(big) > 64 * 1024
    r = httpx.post(f"{server.url}/v1/traces", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["message"]
    bomb = gzip.compress(b"{" + b" " * (1024 * 1024) + b"}")
    r = httpx.post(f"{server.url}/v1/traces", content=bomb,
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 413


def test_full_queue_is_503_with_retry_after_and_accepted_spans_survive_an_outage(db_settings, tmp_path):
    down = db_settings.replace(store_port=free_port())  # nothing listens there: ClickHouse is "down"
    spill = tmp_path / "spill"
    writer = SpanWriter(lambda: store.connect(down, ensure_schema=False), batch_rows=10, flush_seconds=0.05,
                        max_queue_rows=5, spill_dir=spill).start()
    with ThreadServer(create_app(writer, max_body_bytes=1 << 20)) as server:
        assert httpx.post(f"{server.url}/v1/traces", json=otlp_json(4)).status_code == 200
        r = httpx.post(f"{server.url}/v1/traces", json=otlp_json(4, "cd" * 16))
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        wait_until(lambda: writer.insert_failures >= 1, 20, message="a failed insert")
    writer.shutdown_retry_seconds = 0.5
    writer.stop(timeout=60)
    assert writer.rows_spilled == 4 and len(list(spill.glob("*.jsonl"))) == 1

    # ClickHouse is back: a new writer replays the spill, and the accepted spans arrive, once.
    writer = SpanWriter(lambda: store.connect(db_settings, ensure_schema=False), flush_seconds=0.05,
                        spill_dir=spill).start()
    assert writer.flush(20)
    writer.stop()
    client = store.connect(db_settings, ensure_schema=False)
    assert client.query("SELECT TraceId, count() FROM otel_traces GROUP BY TraceId").result_rows == [(TRACE, 4)]
    assert not list(spill.glob("*.jsonl"))
