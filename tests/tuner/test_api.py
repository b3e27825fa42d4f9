"""Tuner API: config from ClickHouse, ETag / If-None-Match, new versions picked up."""

from __future__ import annotations

import dataclasses

import httpx

import store
from tests.conftest import ThreadServer
from tuner import versions
from tuner.api import create_app
from tuner.config import PipelineConfig, StepConfig, default_config


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
