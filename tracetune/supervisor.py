"""The process supervisor behind `tracetune up` and `tracetune demo`.

Starts each component as its own process (so chDB, uvicorn and Streamlit each own theirs), waits
until each answers on its port, prints where everything is, and on Ctrl-C / SIGTERM stops them in
reverse order so that spans in flight are flushed and nothing is left listening.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import httpx

from tracetune.base.settings import Settings


class StartError(RuntimeError):
    """A component could not start; the message says which and why."""


@dataclass
class Component:
    name: str
    args: list[str]
    port: int | None  # None: no port of its own (ready once started)
    ready_url: str
    url: str
    proc: subprocess.Popen | None = None
    log: Path | None = None


def dashboard_command(settings: Settings) -> list[str]:
    """`streamlit run` for the dashboard with the same Host allow-list as the APIs (Streamlit checks it on the
    WebSocket that carries every page's data), same-origin WebSockets only (enableCORS) and XSRF protection."""
    from tracetune.base.serving import allowed_hosts

    app = resources.files("tracetune.dashboard").joinpath("app.py")  # inside the package, wheel or source
    hosts = allowed_hosts(settings.bind_host, settings.host_names)
    return [sys.executable, "-m", "streamlit", "run", str(app),
            "--server.port", str(settings.dashboard_port), "--server.address", settings.bind_host,
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer",
            "--server.enableCORS", "true", "--server.enableXsrfProtection", "true",
            *(arg for host in sorted(hosts or ["*"]) for arg in ("--server.allowedHosts", host))]


def components(settings: Settings, load_rate: float, with_dashboard: bool = True,
               load_args: tuple[str, ...] = ()) -> list[Component]:
    """Everything `up` runs, in start order; with a load rate, the load generator last (given
    `load_args`, e.g. its pipeline and pattern)."""
    tracetune = [sys.executable, "-m", "tracetune"]
    parts = []
    if settings.embedded:
        parts.append(Component("store", tracetune + ["store"], settings.store_port,
                               f"{settings.store_url}/ping", settings.store_url))
    parts += [
        Component("collector", tracetune + ["collector"], settings.collector_port,
                  f"{settings.collector_url}/health", f"{settings.collector_url}/v1/traces (OTLP/HTTP), "
                  f"{settings.bind_host}:{settings.collector_grpc_port} (OTLP/gRPC), token in "
                  f"{settings.home / 'collector.token'}"),
        Component("tuner", tracetune + ["tuner"], settings.tuner_port, f"{settings.tuner_url}/health",
                  f"{settings.tuner_url}/docs"),
    ]
    if not settings.llm_url or not settings.crm_url:
        parts.append(Component("standins", tracetune + ["standins"], settings.llm_port,
                               f"http://{settings.bind_host}:{settings.llm_port}/v1/models",
                               f"{settings.llm_base_url} (LLM), {settings.crm_base_url} (CRM)"))
    parts.append(Component("executor", tracetune + ["executor"], settings.executor_port,
                           f"{settings.executor_url}/health", f"{settings.executor_url}/v1/pipelines/"
                           f"<pipeline>/tasks (token in {settings.home / 'executor.token'}), "
                           f"{settings.executor_metrics_url}"))
    parts.append(Component("analyzer", tracetune + ["analyzer"], None, "",
                           f"drift and SLO refresh every {settings.analyzer_interval_seconds:g} s"))
    if with_dashboard:
        parts.append(Component("dashboard", dashboard_command(settings), settings.dashboard_port,
                               f"{settings.dashboard_url}/_stcore/health", settings.dashboard_url))
    if load_rate > 0:
        parts.append(Component("load", tracetune + ["load", "--rate", str(load_rate), "--no-progress", *load_args],
                               None, "", f"{load_rate:g} requests/s, Poisson arrivals"))
    return parts


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _tail(path: Path | None, lines: int = 25) -> str:
    if not path or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int):
    """A pre-exec hook: the child gets SIGTERM when this process ends, however it ends (even SIGKILL).

    Each child runs in its own session (Ctrl-C reaches only the supervisor, which stops them in
    order), so without this a killed supervisor would leave them all holding their ports. Linux
    keeps the parent-death signal across exec; elsewhere there is no such hook and this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def private_log(path: Path):
    """`path` opened for writing from its start, readable by its owner only (0600), even if it existed wider."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


class Supervisor:
    def __init__(self, settings: Settings, parts: list[Component], echo=print):
        self.settings = settings
        self.parts = parts
        self.echo = echo
        self.log_dir = settings.home / "logs"

    def check_ports(self) -> None:
        for part in self.parts:
            extra = {"standins": [self.settings.crm_port], "collector": [self.settings.collector_grpc_port]}
            ports = [part.port] + extra.get(part.name, [])
            busy = [p for p in ports if p is not None and _port_in_use(self.settings.bind_host, p)]
            if busy:
                part.port = busy[0]
                field = {"store": "STORE_PORT", "collector": "COLLECTOR_PORT", "tuner": "TUNER_PORT",
                         "standins": "LLM_PORT", "executor": "EXECUTOR_PORT",
                         "dashboard": "DASHBOARD_PORT"}[part.name]
                if part.name == "standins" and part.port == self.settings.crm_port:
                    field = "CRM_PORT"
                if part.name == "collector" and part.port == self.settings.collector_grpc_port:
                    field = "COLLECTOR_GRPC_PORT"
                raise StartError(f"port {part.port} for the {part.name} is already in use; stop what is using it "
                                 f"or set TRACETUNE_{field} to a free port")

    def start(self, timeout: float = 120.0) -> None:
        self.check_ports()
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_dir.chmod(0o700)  # logs carry queries, tokens' failures and data: the owner's alone
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
        env.update(self.settings.as_env())
        env.setdefault("PYTHONUNBUFFERED", "1")
        for part in self.parts:
            part.log = self.log_dir / f"{part.name}.log"
            with private_log(part.log) as out:
                part.proc = subprocess.Popen(part.args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=_die_with_parent(os.getpid()))
            self._wait_ready(part, timeout)
            self.echo(f"  {part.name:<10} {part.url}")

    def _wait_ready(self, part: Component, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if not part.ready_url:
            time.sleep(0.5)
            if part.proc.poll() is not None:
                raise StartError(f"the {part.name} exited with code {part.proc.returncode} while starting; "
                                 f"its log ({part.log}) ends with:\n{_tail(part.log)}")
            return
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if part.proc.poll() is not None:
                    raise StartError(f"the {part.name} exited with code {part.proc.returncode} while starting; "
                                     f"its log ({part.log}) ends with:\n{_tail(part.log)}")
                try:
                    if client.get(part.ready_url).status_code < 500:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        raise StartError(f"the {part.name} did not answer on {part.ready_url} within {timeout:.0f}s; "
                         f"its log ({part.log}) ends with:\n{_tail(part.log)}")

    def dead(self) -> Component | None:
        return next((p for p in self.parts if p.proc and p.proc.poll() is not None), None)

    def stop_one(self, part: Component, timeout: float = 30.0) -> None:
        if part.proc is None or part.proc.poll() is not None:
            return
        try:
            os.killpg(part.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            part.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(part.proc.pid, signal.SIGKILL)
            part.proc.wait(10)

    def stop(self) -> None:
        for part in reversed(self.parts):
            self.stop_one(part)


def _install_stop_handlers(stop: threading.Event) -> None:
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())


def _watch(supervisor: Supervisor, stop: threading.Event, every: float, on_tick=None) -> int:
    """Wait until stopped; 1 if a component died on its own, else 0."""
    while not stop.wait(every):
        dead = supervisor.dead()
        if dead:
            supervisor.echo(f"the {dead.name} stopped unexpectedly (exit {dead.proc.returncode}); "
                            f"its log ends with:\n{_tail(dead.log)}")
            return 1
        if on_tick:
            on_tick()
    return 0


def _password_source(settings: Settings, readonly: bool) -> str:
    """Where a store password comes from, for the start-up message (never the password itself)."""
    if readonly:
        return "store_reader_password" if settings.store_reader_password else str(settings.store_password_file(True))
    return "store_password" if settings.store_password else str(settings.store_password_file(False))


def _hold_home(settings: Settings):
    """An exclusive lock on `<home>/supervisor.lock` for this supervisor's life (the open file), or the pid of
    the supervisor that holds it: one stack per home, whose store, logs and write-ahead log are its own."""
    import fcntl

    settings.home.mkdir(parents=True, exist_ok=True)
    path = settings.home / "supervisor.lock"
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        return holder
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _run(settings: Settings, load_rate: float, body, load_args: tuple[str, ...] = ()) -> int:
    from tracetune.terminal import console

    out = console()
    held = _hold_home(settings)
    if isinstance(held, str):  # checked before any log is opened: the running stack's are left as they are
        print(f"Error: a tracetune stack (supervisor pid {held}) is already running with home {settings.home}; "
              "stop it first, or give this one its own home (TRACETUNE_HOME) and ports", file=sys.stderr)
        return 2
    from tracetune.base import stacks

    supervisor = Supervisor(settings, components(settings, load_rate, load_args=load_args), echo=out.print)
    stop = threading.Event()
    try:
        recorded = stacks.record(settings)  # commands started in other folders find this stack by it
    except OSError as exc:
        recorded = None
        out.print(f"[yellow]warning:[/yellow] commands in other folders will not find this stack: {exc}")
    _install_stop_handlers(stop)
    out.print(f"[bold]tracetune[/bold] starting (logs in {supervisor.log_dir})")
    try:
        if any(target.startswith("tracetune.demo.") for target in settings.pipeline_targets):
            from tracetune.demo.models import build_models

            build_models(settings.models_dir, progress=True)  # first run only: the executor then starts at once
        supervisor.start()
        if settings.embedded:
            out.print(f"  store users: default (password in {_password_source(settings, False)}), read-only reader "
                      f"(password in {_password_source(settings, True)}); see docs/store.md")
        return body(supervisor, stop, out)
    except StartError as exc:
        out.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        supervisor.stop()
        if recorded is not None:
            stacks.remove(recorded)
        out.print("stopped every process tracetune started")
        held.close()


def up(settings: Settings) -> int:
    def body(supervisor: Supervisor, stop: threading.Event, out) -> int:
        out.print("tracetune is up; Ctrl-C stops it")
        return _watch(supervisor, stop, 1.0)

    return _run(settings, 0.0, body)


DEMO_RAW_SECONDS = 15 * 60


def demo_window(run_start: float, now: float) -> tuple[int, str]:
    """(seconds, source) covering exactly this demo run: raw spans (the rollups round out to whole
    minutes, which would count the previous run's last minute), rollups once the run is long."""
    seconds = max(1, math.ceil(now - run_start))
    return seconds, "raw" if seconds < DEMO_RAW_SECONDS else "rollup"


# The demo pipelines `tracetune demo --pipeline` runs: (import string, pipeline name, load pattern, default rate).
DEMOS: dict[str, tuple[str, str, str, float | None]] = {
    "triage": ("tracetune.demo.triage:ticket_triage", "ticket_triage", "steady", None),  # rate: settings load_rate
    "rag": ("tracetune.demo.rag:rag_answering", "rag_answering", "daily_bursts", 2.0),
}


def demo(settings: Settings, duration: float | None = None, pipeline: str = "triage",
         rate: float | None = None) -> int:
    """The whole loop under load on one demo pipeline (DEMOS); a live per-step table, or `duration` s then
    the final table."""
    from tracetune import analyzer, store
    from tracetune.terminal import step_table

    target, name, pattern, default_rate = DEMOS[pipeline]
    rate = rate or default_rate or settings.load_rate or 20.0
    settings = settings.replace(pipelines=target)
    run_start = time.time()  # spans before this belong to an earlier run

    def table(client, title: str):
        since, source = demo_window(run_start, time.time())
        return step_table(analyzer.step_stats(client, since, source=source), title=title)

    def body(supervisor: Supervisor, stop: threading.Event, out) -> int:
        client = store.connect(settings, ensure_schema=False)
        out.print(f"demo load: {rate:g} requests/s ({pattern}) on pipeline {name}")
        if duration is not None:
            timer = threading.Timer(duration, stop.set)
            timer.daemon = True
            timer.start()
            code = _watch(supervisor, stop, 0.5)
            if code:
                return code
            # Flush the path spans take: load stops sending, executor exports, collector writes.
            for part in ("load", "executor", "analyzer", "collector"):
                supervisor.stop_one(next(p for p in supervisor.parts if p.name == part))
            out.print(table(client, f"per-step latency, {duration:g} s of demo load"))
            return 0

        from rich.live import Live

        out.print("Ctrl-C stops the demo")
        with Live(table(client, "per-step latency (refreshing)"), console=out,
                  refresh_per_second=1) as live:
            def tick() -> None:
                try:
                    live.update(table(client, "per-step latency since start (refreshing every 2 s)"))
                except Exception as exc:  # noqa: BLE001 - keep the demo running while ClickHouse is briefly busy
                    live.console.print(f"[yellow]stats unavailable: {exc}[/yellow]")
            return _watch(supervisor, stop, 2.0, tick)

    return _run(settings.replace(load_rate=rate), rate, body, ("--pipeline", name, "--pattern", pattern))
