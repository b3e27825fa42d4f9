"""Fixtures that start real things: the embedded store as its own process, on free ports."""

from __future__ import annotations

import fcntl
import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, start_process, stop_process, wait_until
from tracetune import settings as settings_mod
from tracetune import store
from tracetune.settings import Settings


def make_settings(home: Path, **overrides) -> Settings:
    """Settings on free ports under `home`, ignoring any tracetune.toml or TRACETUNE_* of the caller."""
    ports = {name: free_port() for name in ("store_port", "collector_port", "collector_grpc_port", "tuner_port",
                                            "executor_port", "dashboard_port", "llm_port", "crm_port")}
    # Explicit store passwords, so settings moved to another home still reach the session's store.
    passwords = {"store_password": secrets.token_urlsafe(16), "store_reader_password": secrets.token_urlsafe(16)}
    values = {"home": str(home), **ports, **passwords, **overrides}
    return settings_mod.load(config_file=home / "none.toml", environ={}, **values)


@pytest.fixture(scope="session")
def store_settings(tmp_path_factory) -> Iterator[Settings]:
    """One embedded store process for the whole session; tests take their own database."""
    home = tmp_path_factory.mktemp("store-home")
    settings = make_settings(home)
    proc = start_process(["store"], settings, home / "store.log")
    try:
        store.wait_ready(settings, 60)
    except TimeoutError:
        stop_process(proc)
        raise RuntimeError("embedded store did not start:\n" + (home / "store.log").read_text()[-3000:]) from None
    yield settings
    stop_process(proc)


@pytest.fixture
def db_settings(store_settings: Settings) -> Settings:
    """Settings pointing at a fresh database (with the schema applied) in the session store."""
    settings = store_settings.replace(database=f"t_{uuid.uuid4().hex[:12]}")
    store.connect(settings)
    return settings


@pytest.fixture
def client(db_settings: Settings):
    return store.connect(db_settings, ensure_schema=False)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The demo models, built once per test run with the real training and ONNX export.

    Under pytest-xdist every worker asks for them: the first builds them into a folder the workers
    share (under a lock), the others find them built and reuse them."""
    from tracetune.demo.models import build_models

    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else \
        tmp_path_factory.getbasetemp()
    path = shared / "models"
    path.mkdir(exist_ok=True)
    with open(shared / "models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_models(path)
    return path


@pytest.fixture
def collector(db_settings, tmp_path) -> Iterator[Settings]:
    """A real collector process writing into the test's database; its settings (URL, token in its home)."""
    import httpx

    settings = db_settings.replace(home=tmp_path / "home", collector_flush_seconds=0.2)
    proc = start_process(["collector"], settings, tmp_path / "collector.log")

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "collector.log").read_text())
        try:
            return httpx.get(f"{settings.collector_url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 60, message="collector /health")
    yield settings
    stop_process(proc)
