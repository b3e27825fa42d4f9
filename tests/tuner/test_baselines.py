"""Drift baselines over HTTP (tuner/routes/baselines.py), on the tuner app as create_app builds it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.servers import ThreadServer
from tests.spans import COLUMNS, span_row
from tracetune import store
from tracetune.analyzer import get_baseline
from tracetune.tuner.api import create_app

TOKEN = {"Authorization": "Bearer s3cret"}


@pytest.fixture
def tuner(db_settings) -> Iterator[tuple[str, store.Client]]:
    app = create_app(lambda: store.connect(db_settings, ensure_schema=False), token="s3cret")
    with ThreadServer(app) as server:
        yield f"{server.url}/v1/pipelines", store.connect(db_settings, ensure_schema=False)


def test_pin_read_and_remove_a_baseline(tuner):
    url, client = tuner
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    window = {"start": start.isoformat(), "end": (start + timedelta(hours=1)).isoformat(), "note": "quiet hour"}
    assert httpx.put(f"{url}/triage/drift/baseline", json=window).status_code == 401
    assert httpx.get(f"{url}/triage/drift/baseline").status_code == 404

    pinned = httpx.put(f"{url}/triage/drift/baseline", json=window, headers=TOKEN)
    assert pinned.status_code == 200, pinned.text
    assert (pinned.json()["version"], pinned.json()["note"], pinned.json()["author"]) == (1, "quiet hour", "api")
    read = httpx.get(f"{url}/triage/drift/baseline").json()
    assert datetime.fromisoformat(read["start"].replace("Z", "+00:00")) == start
    assert get_baseline(client, "triage").end == start + timedelta(hours=1)

    last = httpx.put(f"{url}/triage/drift/baseline", json={"last": "30m"}, headers=TOKEN).json()
    assert last["version"] == 2
    assert httpx.delete(f"{url}/triage/drift/baseline", headers=TOKEN).json() == {
        "pipeline": "triage", "version": 3, "deleted": True}
    assert httpx.delete(f"{url}/triage/drift/baseline", headers=TOKEN).status_code == 404
    assert get_baseline(client, "triage") is None


def test_first_traffic_and_mistakes_are_one_line(tuner):
    url, client = tuner
    assert httpx.put(f"{url}/triage/drift/baseline", json={"first": "1h"}, headers=TOKEN).status_code == 404
    begin = datetime.now(UTC) - timedelta(hours=2)
    client.insert("otel_traces", [span_row(int(begin.timestamp() * 1e9), attrs={"tracetune.pipeline": "triage"},
                                           duration=10**6)], column_names=COLUMNS)
    first = httpx.put(f"{url}/triage/drift/baseline", json={"first": "1h"}, headers=TOKEN).json()
    assert first["start"].startswith(begin.strftime("%Y-%m-%dT%H:%M"))
    for body, status, fragment in (
            ({"first": "1h", "last": "1h"}, 422, "give one of"),
            ({"start": begin.isoformat()}, 422, "go together"),
            ({"last": "1 fortnight"}, 422, "30s, 5m"),
            ({"last": "10s"}, 422, "too short"),
            ({"start": begin.isoformat(), "end": (begin + timedelta(days=1)).isoformat()}, 422, "in the future"),
            ({"window": "1h"}, 422, "window")):
        answer = httpx.put(f"{url}/triage/drift/baseline", json=body, headers=TOKEN)
        assert answer.status_code == status and fragment in answer.json()["detail"], (body, answer.text)
        assert "\n" not in answer.json()["detail"]
