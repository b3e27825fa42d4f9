"""Fixtures for speaking the store's HTTP interface directly, as curl, Grafana and other clients do."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tracetune.base.settings import Settings


@pytest.fixture
def http(db_settings: Settings) -> Iterator[httpx.Client]:
    """A plain HTTP client on the store as its `default` user, in the test's own database."""
    target = db_settings.clickhouse_target()
    with httpx.Client(base_url=f"http://{target['host']}:{target['port']}",
                      auth=(target["username"], target["password"]),
                      params={"database": db_settings.database}, timeout=60) as client:
        yield client
