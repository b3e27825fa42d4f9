"""The official OpenTelemetry SDK and OTLP/HTTP exporter, sending to a real collector process."""

from __future__ import annotations

import time

import httpx
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from tests.servers import start_process, stop_process, wait_until
from tracetune import store


def _rows(client, expected: int):
    def count():
        return client.query("SELECT count() FROM otel_traces").result_rows[0][0] >= expected

    wait_until(count, 30, message=f"{expected} rows in otel_traces")
    return list(client.query(
        "SELECT SpanName, TraceId, SpanId, ParentSpanId, SpanKind, ServiceName, Duration, StatusCode, "
        "StatusMessage, SpanAttributes, ResourceAttributes, ScopeName, Events.Name, Links.SpanId, "
        "toUnixTimestamp64Nano(Timestamp) FROM otel_traces"
    ).named_results())


def test_sdk_spans_arrive_exactly_once_with_their_fields(collector):
    settings = collector
    provider = TracerProvider(resource=Resource.create({"service.name": "sdk-test", "deployment.environment": "ci"}))
    exporter = OTLPSpanExporter(endpoint=f"{settings.collector_url}/v1/traces", headers=auth(settings))
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=64, schedule_delay_millis=50))
    tracer = provider.get_tracer("tests.collector", "1.2.3")

    n_tasks, sent = 40, {}
    for i in range(n_tasks):
        with tracer.start_as_current_span("task", kind=SpanKind.SERVER,
                                          attributes={"tracetune.pipeline": "p", "i": i}) as root:
            with tracer.start_as_current_span("step", attributes={"tracetune.step": "s", "ratio": 0.25,
                                                                   "ok": True, "tags": ["a", "b"]}) as child:
                child.add_event("checkpoint", {"n": i})
                time.sleep(0.001)
                if i % 10 == 0:
                    child.set_status(Status(StatusCode.ERROR, "boom"))
            with tracer.start_as_current_span("linked", links=[Link(child.get_span_context())]) as linked:
                pass
        sent[root.get_span_context().span_id] = (root, child, linked)
    provider.force_flush()
    provider.shutdown()

    client = store.connect(settings, ensure_schema=False)
    rows = _rows(client, 3 * n_tasks)
    # The writer counts a batch once its insert has returned, a moment after the store shows its rows.
    wait_until(lambda: httpx.get(f"{settings.collector_url}/health").json()["queued_rows"] == 0, 10,
               message="the collector's queue empty")
    health = httpx.get(f"{settings.collector_url}/health").json()
    assert health["queued_rows"] == 0 and health["rows_written"] == 3 * n_tasks
    assert len(rows) == 3 * n_tasks  # exactly N: nothing lost, nothing duplicated
    by_id = {r["SpanId"]: r for r in rows}
    assert len(by_id) == 3 * n_tasks

    for _root_id, (root, child, linked) in sent.items():
        r, c, l_ = (by_id[f"{s.get_span_context().span_id:016x}"] for s in (root, child, linked))
        trace_hex = f"{root.get_span_context().trace_id:032x}"
        assert r["TraceId"] == c["TraceId"] == l_["TraceId"] == trace_hex
        assert r["ParentSpanId"] == "" and c["ParentSpanId"] == l_["ParentSpanId"] == r["SpanId"]
        assert (r["SpanName"], c["SpanName"], l_["SpanName"]) == ("task", "step", "linked")
        assert r["SpanKind"] == "Server" and c["SpanKind"] == "Internal"
        # Durations are exact nanoseconds end - start, as the SDK measured them.
        assert c["Duration"] == child.end_time - child.start_time
        assert r["Duration"] == root.end_time - root.start_time >= c["Duration"] >= 1_000_000
        assert r["toUnixTimestamp64Nano(Timestamp)"] == root.start_time
        assert r["ServiceName"] == "sdk-test" and r["ResourceAttributes"]["deployment.environment"] == "ci"
        assert r["ScopeName"] == "tests.collector"
        assert c["SpanAttributes"]["tracetune.step"] == "s"
        assert c["SpanAttributes"]["ratio"] == "0.25" and c["SpanAttributes"]["ok"] == "true"
        assert c["SpanAttributes"]["tags"] == '["a","b"]'
        assert r["SpanAttributes"]["i"] == str(r["SpanAttributes"]["i"]) and "tracetune.pipeline" in r["SpanAttributes"]
        assert c["Events.Name"] == ["checkpoint"]
        assert l_["Links.SpanId"] == [c["SpanId"]]
        errored = int(r["SpanAttributes"]["i"]) % 10 == 0
        assert c["StatusCode"] == ("Error" if errored else "Unset")
        assert c["StatusMessage"] == ("boom" if errored else "")


def test_sigterm_flushes_queued_spans_before_the_collector_exits(db_settings, tmp_path):
    # A flush interval far longer than the test: rows reach ClickHouse only through the shutdown flush.
    settings = db_settings.replace(home=tmp_path / "home", collector_flush_seconds=600, collector_batch_rows=100_000)
    proc = start_process(["collector"], settings, tmp_path / "collector.log")
    wait_until(lambda: _health(settings) is not None, 60, message="collector /health")
    provider = TracerProvider(resource=Resource.create({"service.name": "sigterm-test"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{settings.collector_url}/v1/traces",
                                                                         headers=auth(settings))))
    tracer = provider.get_tracer("tests.collector")
    for i in range(25):
        with tracer.start_as_current_span(f"s{i}"):
            pass
    provider.shutdown()
    assert _health(settings)["queued_rows"] == 25
    stop_process(proc)  # SIGTERM
    assert proc.returncode == 0
    client = store.connect(settings, ensure_schema=False)
    assert client.query("SELECT count() FROM otel_traces").result_rows[0][0] == 25


def auth(settings) -> dict[str, str]:
    return {"authorization": f"Bearer {settings.secret('collector')}"}


def _health(settings):
    try:
        return httpx.get(f"{settings.collector_url}/health").json()
    except httpx.HTTPError:
        return None


def test_sdk_grpc_exporter_with_every_attribute_type_events_and_links(collector):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

    settings = collector
    provider = TracerProvider(resource=Resource.create({"service.name": "grpc-test"}))
    exporter = GrpcSpanExporter(endpoint=f"127.0.0.1:{settings.collector_grpc_port}", insecure=True,
                                headers=tuple(auth(settings).items()))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    tracer = provider.get_tracer("tests.grpc")
    attributes = {"s": "text <&>", "b": False, "i": -7, "f": 1.0, "g": 0.1, "big": 1e21, "tiny": 1.5e-7,
                  "ss": ["a", "b"], "bs": [True, False], "is": [1, 2], "fs": [0.5, 2.0]}
    with tracer.start_as_current_span("first") as first:
        pass
    with tracer.start_as_current_span("second", kind=SpanKind.CLIENT, attributes=attributes,
                                      links=[Link(first.get_span_context(), {"why": "follows"})]) as second:
        second.add_event("retry", {"attempt": 2, "ok": True})
        second.set_status(Status(StatusCode.ERROR, "gave up"))
    provider.shutdown()

    rows = {r["SpanName"]: r for r in _rows(store.connect(settings, ensure_schema=False), 2)}
    row = rows["second"]
    assert row["SpanKind"] == "Client" and row["StatusCode"] == "Error" and row["StatusMessage"] == "gave up"
    # pdata's AsString(): what the contrib clickhouseexporter stores for each type.
    assert row["SpanAttributes"] == {"s": "text <&>", "b": "false", "i": "-7", "f": "1", "g": "0.1", "big": "1e+21",
                                     "tiny": "1.5e-7", "ss": '["a","b"]', "bs": "[true,false]", "is": "[1,2]",
                                     "fs": "[0.5,2]"}
    assert row["Events.Name"] == ["retry"] and row["Links.SpanId"] == [rows["first"]["SpanId"]]
    assert row["Duration"] == second.end_time - second.start_time
    assert row["toUnixTimestamp64Nano(Timestamp)"] == second.start_time


def test_overload_far_past_capacity_with_sdk_retries_stores_every_exported_span_once(db_settings, tmp_path):
    """A queue of 300 spans against four SDK exporters: 503s, retries, and nothing acknowledged is lost."""
    import threading

    from opentelemetry.sdk.trace.export import SpanExportResult

    settings = db_settings.replace(home=tmp_path / "home", collector_flush_seconds=0.3, collector_max_queue_rows=300,
                                   collector_batch_rows=300)
    proc = start_process(["collector"], settings, tmp_path / "collector.log")
    wait_until(lambda: _health(settings) is not None, 60, message="collector /health")
    exported: set[str] = set()
    lock = threading.Lock()

    class Recording(OTLPSpanExporter):
        def export(self, spans):
            result = super().export(spans)
            if result is SpanExportResult.SUCCESS:
                with lock:
                    exported.update(f"{s.context.span_id:016x}" for s in spans)
            return result

    def run(worker: int) -> None:
        provider = TracerProvider(resource=Resource.create({"service.name": f"overload-{worker}"}))
        exporter = Recording(endpoint=f"{settings.collector_url}/v1/traces", headers=auth(settings), timeout=30)
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=10_000, max_export_batch_size=200,
                                                       schedule_delay_millis=10))
        tracer = provider.get_tracer("overload")
        for i in range(750):
            with tracer.start_as_current_span(f"op{i % 5}"):
                pass
        provider.shutdown()

    try:
        workers = [threading.Thread(target=run, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        metrics = httpx.get(f"{settings.collector_url}/metrics").text
        refused = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("tracetune_collector_requests_refused_total") and 'status="503"' in line)
        assert refused > 0  # the load really was past capacity
        client = store.connect(settings, ensure_schema=False)
        wait_until(lambda: _health(settings)["queued_rows"] == 0, 60, message="queue drained")
        rows = client.query("SELECT SpanId FROM otel_traces").result_rows
        stored = [r[0] for r in rows]
        assert len(stored) == len(set(stored))  # nothing twice
        assert exported and exported <= set(stored)  # every span the SDK saw acknowledged is there
    finally:
        stop_process(proc)
