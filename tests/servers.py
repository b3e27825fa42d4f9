"""Real processes and servers for tests: free ports, `python -m tracetune ...` children, a uvicorn thread."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tracetune.base.settings import Settings
from tracetune.supervisor import private_log

_GIVEN: set[int] = set()  # ports this process handed out: the kernel may offer a just-closed one again


def free_port() -> int:
    """A port free on 127.0.0.1 now and not handed out before by this process (so one stack's ports differ)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def start_process(args: list[str], settings: Settings, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    env.update(settings.as_env())
    out = private_log(log)  # as the supervisor writes them: the owner's alone
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


def wait_until(predicate, timeout: float = 30, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


@functools.cache
def _server_class() -> type:
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server looking at `should_exit` every 10 ms instead of every 100 ms: a test stops a few
        hundred of them, each otherwise idle for ~0.1 s before its shutdown starts."""

        async def main_loop(self) -> None:
            counter = 0
            while not await self.on_tick(counter):  # its once-a-second work runs every 10th tick: 10 times a second
                counter = (counter + 1) % 864000
                await asyncio.sleep(0.01)

    return Server


class ThreadServer:
    """A real uvicorn server on 127.0.0.1 in a background thread (for apps built in the test)."""

    def __init__(self, app, port: int | None = None, header_timeout: float = 10.0):
        import threading

        import uvicorn

        from tracetune.base.serving import protocol_with_header_timeout

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = _server_class()(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                              lifespan="on", http=protocol_with_header_timeout(header_timeout)))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        wait_until(lambda: self._server.started, 20, 0.05, "server start")
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def _ready(url: str, proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"process exited early:\n{log.read_text()[-3000:]}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def running_stack(settings: Settings, logs: Path, executor_args: tuple[str, ...] = ()) -> Iterator[dict]:
    """Store, collector, tuner, stand-ins and an executor as real processes, each started once the one
    before answers its health URL; all stopped (last first) on exit. Yields the processes by name."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, args, url in (
            ("store", ["store"], f"{settings.store_url}/ping"),
            ("collector", ["collector"], f"{settings.collector_url}/health"),
            ("tuner", ["tuner"], f"{settings.tuner_url}/health"),
            ("standins", ["standins"], f"{settings.llm_base_url}/models"),
            ("executor", ["executor", *executor_args], f"{settings.executor_url}/health"),
        ):
            log = logs / f"{name}.log"
            procs[name] = start_process(args, settings, log)
            wait_until(lambda url=url, proc=procs[name], log=log: _ready(url, proc, log), 90, 0.2, f"{name} ready")
        yield procs
    finally:
        for proc in reversed(list(procs.values())):
            stop_process(proc)
