"""Fixtures that start real things: the embedded store as its own process, on free ports."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracetune import settings as settings_mod
from tracetune import store
from tracetune.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_settings(home: Path, **overrides) -> Settings:
    """Settings on free ports under `home`, ignoring any tracetune.toml or TRACETUNE_* of the caller."""
    ports = {name: free_port() for name in ("store_port", "collector_port", "collector_grpc_port", "tuner_port",
                                            "executor_port", "dashboard_port", "llm_port")}
    # Explicit store passwords, so settings moved to another home still reach the session's store.
    passwords = {"store_password": secrets.token_urlsafe(16), "store_reader_password": secrets.token_urlsafe(16)}
    values = {"home": str(home), **ports, **passwords, **overrides}
    return settings_mod.load(config_file=home / "none.toml", environ={}, **values)


def start_process(args: list[str], settings: Settings, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    env.update(settings.as_env())
    out = log.open("wb")
    return subprocess.Popen([sys.executable, "-m", "tracetune", *args], env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


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


def wait_until(predicate, timeout: float = 30, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class ThreadServer:
    """A real uvicorn server on 127.0.0.1 in a background thread (for apps built in the test)."""

    def __init__(self, app, port: int | None = None, header_timeout: float = 10.0):
        import threading

        import uvicorn

        from tracetune.serving import protocol_with_header_timeout

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     lifespan="on", http=protocol_with_header_timeout(header_timeout)))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        wait_until(lambda: self._server.started, 20, 0.05, "server start")
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The demo models, built once per session with the real training and ONNX export."""
    from tracetune.executor.models import build_models

    path = tmp_path_factory.mktemp("models")
    build_models(path)
    return path
