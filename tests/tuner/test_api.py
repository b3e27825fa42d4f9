"""Tuner API: config from ClickHouse, ETag / If-None-Match, new versions picked up."""

from __future__ import annotations

import dataclasses

import httpx

from tests.servers import ThreadServer
from tracetune import store
from tracetune.tuner import versions
from tracetune.tuner.api import create_app
from tracetune.tuner.config import PipelineConfig, StepConfig, default_config


def test_config_is_served_from_clickhouse_with_etag(db_settings):
    client = store.connect(db_settings, ensure_schema=False)
    with ThreadServer(create_app(lambda: store.connect(db_settings), ["ticket_triage"])) as server:
        url = f"{server.url}/v1/pipelines/ticket_triage/config"
        first = httpx.get(url)
        assert first.status_code == 200
        served = PipelineConfig.from_dict(first.json())
        assert served == default_config("ticket_triage")
        assert first.headers["etag"] == served.etag
        # The default was stored as version 1 in ClickHouse, by the tuner at start.
        assert versions.latest(client, "ticket_triage") == served

        again = httpx.get(url, headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""

        newer = dataclasses.replace(served, version=2, steps={"classify": StepConfig(32, 20.0, False)})
        versions.save(client, newer, author="test", reason="bigger batches")
        changed = httpx.get(url, headers={"If-None-Match": first.headers["etag"]})
        assert changed.status_code == 200 and changed.headers["etag"] != first.headers["etag"]
        assert PipelineConfig.from_dict(changed.json()).step("classify").batch_max_size == 32

        missing = httpx.get(f"{server.url}/v1/pipelines/nope/config")
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]
        assert httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_config_validation_names_the_bad_field():
    data = default_config("p").to_dict()
    data["steps"]["classify"]["batch_max_size"] = 0
    try:
        PipelineConfig.from_dict(data)
    except ValueError as exc:
        assert "steps.classify.batch_max_size" in str(exc)
    else:
        raise AssertionError("a batch size of 0 was accepted")


def test_slo_writes_need_the_token_and_are_validated(db_settings):
    slo = {"p95_ms": 400, "p99_ms": 900, "error_rate": 0.01}
    app = create_app(lambda: store.connect(db_settings), ["ticket_triage"], token="s3cret",
                     default_slos={"ticket_triage": {"p95_ms": 500.0}})
    with ThreadServer(app) as server:
        url = f"{server.url}/v1/pipelines/ticket_triage/slo"
        assert httpx.get(url).json()["p95_ms"] == 500.0  # the default, stored at start
        assert httpx.put(url, json=slo).status_code == 401
        assert httpx.put(url, json=slo, headers={"Authorization": "Bearer wrong"}).status_code == 401
        bad = httpx.put(url, json={"p95_ms": -1}, headers={"Authorization": "Bearer s3cret"})
        assert bad.status_code == 422 and "p95_ms" in bad.json()["detail"]
        ok = httpx.put(url, json=slo, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["version"] == 2
        assert httpx.get(url).json()["p99_ms"] == 900
        assert httpx.get(f"{server.url}/v1/pipelines/other/slo").status_code == 404
