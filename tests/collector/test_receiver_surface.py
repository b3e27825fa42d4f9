"""The OTLP/HTTP receiver as a web page or a careless client would meet it: foreign Host names, other sites'
pages, oversized and non-Unicode bodies; each refused with a google.rpc.Status saying why, nothing stored.
Its /metrics speaks OpenMetrics to a scraper that asks for it."""

from __future__ import annotations

import json

import httpx
import pytest
from google.rpc.status_pb2 import Status
from prometheus_client.parser import text_string_to_metric_families

from tests.collector.otlp import otlp_json, request, span
from tests.collector.test_receiver import PB, count, start_ingest, stop_ingest
from tests.servers import ThreadServer
from tests.surfaces import FOREIGN_HOSTS, OWN_HOSTS, check_body_limit, check_browser_origins, check_host_allow_list
from tracetune import store
from tracetune.collector.receivers import create_app

LIMIT = 64 * 1024
TOKEN = {"Authorization": "Bearer s3cret"}


def message(response: httpx.Response) -> str:
    if response.headers["content-type"].startswith("application/x-protobuf"):
        return Status.FromString(response.content).message
    return response.json()["message"]


@pytest.fixture
def receiver(db_settings, tmp_path):
    ingest = start_ingest(db_settings, tmp_path / "wal")
    with ThreadServer(create_app(ingest, max_body_bytes=LIMIT, body_timeout=2, token="s3cret")) as server:
        yield server.url, ingest.writer, store.connect(db_settings, ensure_schema=False)
    stop_ingest(ingest)


def refused(status: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("tracetune_collector_requests_refused_total",
                                     {"receiver": "http", "status": status}) or 0.0


def test_only_this_servers_names_reach_it(receiver):
    url, writer, client = receiver
    before = refused("403")
    check_host_allow_list(f"{url}/health")
    check_host_allow_list(f"{url}/metrics")
    check_host_allow_list(f"{url}/v1/traces", "POST", message, headers=TOKEN, json=otlp_json(1))
    wrong = httpx.post(f"{url}/v1/traces", content=request([span('named')]).SerializeToString(), headers={**PB, **TOKEN,
                                                                                           "Host": "evil.example"})
    assert wrong.status_code == 403 and Status.FromString(wrong.content).code == 7  # PERMISSION_DENIED
    assert refused("403") == before + 3 * (len(FOREIGN_HOSTS) + 1) + 1  # each counted like any refusal
    assert writer.flush(20) and count(client) == len(OWN_HOSTS)  # one accepted export per own name


def test_other_sites_pages_are_refused(receiver):
    url, writer, client = receiver
    check_browser_origins(f"{url}/v1/traces", "POST", message, headers=TOKEN, json=otlp_json(1))
    assert writer.flush(20) and count(client) == 1  # the same-origin export only


def test_bodies_past_the_limit_are_413(receiver):
    url, writer, client = receiver
    check_body_limit(f"{url}/v1/traces", LIMIT, message, TOKEN)
    assert writer.flush(20) and count(client) == 0


def test_text_that_is_not_unicode_is_400(receiver):
    url, writer, client = receiver
    name = json.dumps(otlp_json(1)).replace('"name": "', '"name": "\\ud800', 1).encode()
    assert b"\\ud800" in name
    attribute = json.dumps(otlp_json(1)).replace('"stringValue": "', '"stringValue": "\\udfff', 1).encode()
    assert b"\\udfff" in attribute
    for what, body in {"surrogate in a span name": name, "surrogate in an attribute": attribute,
                       "not UTF-8": json.dumps(otlp_json(1)).replace('"name": "', '"name": "\xe9', 1)
                       .encode("latin-1"),
                       "20000 levels": b'{"resourceSpans": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"}.items():
        answer = httpx.post(f"{url}/v1/traces", content=body, headers={**TOKEN, "Content-Type": "application/json"})
        assert answer.status_code == 400, (what, answer.text[:300])
        assert any(word in message(answer).lower() for word in ("surrogate", "utf-8", "nested")), message(answer)
    protobuf = request([span('named')]).SerializeToString()
    span_name = request([span('named')]).resource_spans[0].scope_spans[0].spans[0].name.encode()
    assert span_name in protobuf
    bad = protobuf.replace(span_name, b"\xff" * len(span_name), 1)
    answer = httpx.post(f"{url}/v1/traces", content=bad, headers={**TOKEN, **PB})
    assert answer.status_code == 400 and "UTF-8" in message(answer)
    assert writer.flush(20) and count(client) == 0


def test_metrics_speak_openmetrics_when_asked(receiver):
    url, _, _ = receiver
    plain = httpx.get(f"{url}/metrics")
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "tracetune_collector_requests_refused_total" in plain.text or \
        "tracetune_collector_spans_received_total" in plain.text
    assert "_created" not in plain.text
    families = {family.name for family in text_string_to_metric_families(plain.text)}
    assert "tracetune_collector_spans_received" in families
    open_metrics = httpx.get(f"{url}/metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                  "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"})  # what Prometheus sends
    assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")
