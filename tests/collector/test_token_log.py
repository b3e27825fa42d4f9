"""An OTel SDK without the collector's token gets 401 and may print only that: the collector logs one line
(at most once a minute) naming the missing token and where it is."""

from __future__ import annotations

import logging

import httpx

from tests.collector.otlp import otlp_json
from tests.collector.test_receiver import start_ingest, stop_ingest
from tests.servers import ThreadServer
from tracetune.collector.receivers import create_app


def test_a_refused_token_is_logged_once_a_minute_naming_where_the_token_is(db_settings, tmp_path, caplog):
    ingest = start_ingest(db_settings, tmp_path / "wal")
    try:
        with caplog.at_level(logging.WARNING, logger="tracetune.collector"), \
                ThreadServer(create_app(ingest, max_body_bytes=1 << 20, token="s3cret")) as server:
            for _ in range(5):  # an SDK retrying
                assert httpx.post(f"{server.url}/v1/traces", json=otlp_json(2)).status_code == 401
    finally:
        stop_ingest(ingest)
    lines = [r.getMessage() for r in caplog.records if r.name == "tracetune.collector"]
    assert len(lines) == 1, lines
    assert "no bearer token" in lines[0] and "<home>/collector.token" in lines[0]
    assert "OTEL_EXPORTER_OTLP_HEADERS" in lines[0] and "s3cret" not in lines[0]
