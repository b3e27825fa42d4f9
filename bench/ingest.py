"""Collector ingest at scale: ceilings, sustained OTLP/HTTP load from several senders, and lag.

Starts the embedded store and the collector as their own processes (free ports, a temporary home)
and, in one run, prints:

1. ceilings on the same generated spans: protobuf parse alone, and a Native insert of the same rows
   straight into the store (one insert the size of the collector's batch), combined 1/(1/a + 1/b);
2. spans/s sustained for --seconds by --senders processes POSTing pre-serialized
   ExportTraceServiceRequest bodies (200 spans, unique span ids) to /v1/traces, counting only 200
   answers and honouring 503/429 Retry-After; request latency, collector peak RSS, CPU of each side;
   then the wait until otel_traces holds every acknowledged span (lag, acked vs stored);
3. sustained / ceiling;
4. with --baseline REF: the same run first on revision REF's store and collector, then side by side;
   with --profile: the collector's CPU per span by stage (py-spy).

The collector is driven only through OTLP/HTTP, so the bench works whatever is behind the receiver.

    .venv/bin/python bench/ingest.py                 # 30 s, 4 senders
    .venv/bin/python bench/ingest.py --quick         # under a minute
    .venv/bin/python bench/ingest.py --set collector_batch_rows=20000
    .venv/bin/python bench/ingest.py --collector-cmd "python my_prototype.py"   # same env, same load
    .venv/bin/python bench/ingest.py --baseline main --profile   # main's store+collector, then this tree's
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import os
import queue
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from array import array
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import clickhouse_connect
import numpy as np
from google.protobuf.message import DecodeError
from harness import free_port, stop_process  # bench/harness.py: this script's folder
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracetune.base import settings as settings_mod  # noqa: E402
from tracetune.base.settings import Settings  # noqa: E402

SPANS_PER_REQUEST = 200
TEMPLATES = 16  # distinct request bodies; every send stamps fresh ids into one of them
TARGET_SPANS_PER_S = 100_000
TARGET_RATIO = 0.5
COLUMNS = [
    "Timestamp", "TraceId", "SpanId", "ParentSpanId", "TraceState", "SpanName", "SpanKind",
    "ServiceName", "ResourceAttributes", "ScopeName", "ScopeVersion", "SpanAttributes", "Duration",
    "StatusCode", "StatusMessage", "Events.Timestamp", "Events.Name", "Events.Attributes",
    "Links.TraceId", "Links.SpanId", "Links.TraceState", "Links.Attributes",
]
_TICK = os.sysconf("SC_CLK_TCK")
console = Console(width=None if sys.stdout.isatty() else 110)


# ---- workload --------------------------------------------------------------------------------------
_ROUTES = ["/api/orders", "/api/users/{id}", "/checkout", "/search", "/health", "/api/items/{id}/reviews"]
_NAMES = ["GET /api/orders", "POST /checkout", "db.query", "cache.get", "llm.generate", "embed", "classify"]


def _kv(key: str, value: Any) -> KeyValue:
    kv = KeyValue(key=key)
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    elif isinstance(value, float):
        kv.value.double_value = value
    else:
        kv.value.string_value = value
    return kv


@dataclass(frozen=True)
class Template:
    """One serialized request and where its id prefixes sit, so each send can get unique ids."""

    body: bytes
    stamp_at: np.ndarray  # byte offsets of every 4-byte id prefix (span, parent and trace ids)

    def stamped(self, sender: int, seq: int) -> bytes:
        """The body with every id prefix set to (sender, seq): unique span and trace ids per send."""
        buf = np.frombuffer(bytearray(self.body), dtype=np.uint8)
        stamp = np.frombuffer(((sender + 1) << 24 | (seq & 0xFFFFFF)).to_bytes(4, "big"), dtype=np.uint8)
        buf[self.stamp_at] = np.tile(stamp, len(self.stamp_at) // 4)
        return buf.tobytes()


def make_request(seed: int, span_mark: bytes, trace_mark: bytes) -> ExportTraceServiceRequest:
    """200 spans in traces of five, 12 attributes each (strings, ints, doubles, bools), a few events and links.

    Span ids are `span_mark + index`, trace ids `trace_mark + index`: the marks are what a send overwrites.
    """
    rnd = random.Random(seed)
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    for key, value in (("service.name", f"bench-svc-{seed % 3}"), ("service.version", "1.4.2"),
                       ("deployment.environment", "prod"), ("host.name", f"host-{seed % 7}"),
                       ("process.pid", 4242 + seed % 5)):
        resource_spans.resource.attributes.append(_kv(key, value))
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "tracetune.bench"
    scope_spans.scope.version = "0.1.0"
    now = time.time_ns() - rnd.randrange(10**9)
    root = b""
    for i in range(SPANS_PER_REQUEST):
        span = scope_spans.spans.add()
        span.trace_id = trace_mark + (i // 5 + 1).to_bytes(4, "big")
        span.span_id = span_mark + (i + 1).to_bytes(4, "big")
        if i % 5 == 0:
            root = span.span_id
        else:
            span.parent_span_id = root
        span.name = rnd.choice(_NAMES)
        span.kind = rnd.choice([1, 2, 3])
        start = now + i * 1000 + rnd.randrange(1000)
        span.start_time_unix_nano = start
        span.end_time_unix_nano = start + int(rnd.lognormvariate(15, 1.5))
        for key, value in (
            ("http.method", rnd.choice(["GET", "POST", "PUT"])),
            ("http.route", rnd.choice(_ROUTES)),
            ("http.status_code", rnd.choice([200, 200, 200, 404, 500])),
            ("tracetune.pipeline", rnd.choice(["triage", "search", "summarize"])),
            ("tracetune.tenant", rnd.choice(["acme", "globex", "initech", "umbrella"])),
            ("tracetune.cache", rnd.choice([True, False])),
            ("gen_ai.usage.input_tokens", rnd.randrange(50, 900)),
            ("gen_ai.usage.output_tokens", rnd.randrange(1, 300)),
            ("tracetune.confidence", round(rnd.random(), rnd.randrange(2, 17))),
            ("tracetune.cost_usd", rnd.random() / 1000),
            ("user.id", f"u-{rnd.randrange(10**6)}"),
            ("net.peer.name", f"10.0.{rnd.randrange(256)}.{rnd.randrange(256)}"),
        ):
            span.attributes.append(_kv(key, value))
        if i % 20 == 3:
            event = span.events.add()
            event.time_unix_nano = start + 10
            event.name = "exception"
            event.attributes.extend([_kv("exception.type", "ValueError"), _kv("exception.message", "bad input")])
            span.status.code = 2
            span.status.message = "bad input"
        if i % 50 == 7:
            link = span.links.add()
            link.trace_id = rnd.randbytes(16)
            link.span_id = rnd.randbytes(8)
            link.trace_state = "k=v"
            link.attributes.append(_kv("link.kind", "follows"))
    return request


def make_template(seed: int) -> Template:
    """A request whose id marks occur exactly where the ids are (retried with new marks otherwise)."""
    rnd = random.Random(seed)
    while True:
        span_mark, trace_mark = rnd.randbytes(4), rnd.randbytes(12)
        body = make_request(seed, span_mark, trace_mark).SerializeToString()
        offsets = [*_find_all(body, span_mark), *_find_all(body, trace_mark)]
        expected = SPANS_PER_REQUEST * 2 - SPANS_PER_REQUEST // 5 + SPANS_PER_REQUEST  # span, parent, trace
        if len(offsets) == expected:
            at = np.array(sorted(offsets), dtype=np.int64)
            return Template(body, (at[:, None] + np.arange(4)).ravel())


def _find_all(body: bytes, mark: bytes) -> list[int]:
    found, at = [], body.find(mark)
    while at >= 0:
        found.append(at)
        at = body.find(mark, at + 1)
    return found


def _columns(request: ExportTraceServiceRequest) -> list[list[Any]]:
    """otel_traces columns for the Native-insert ceiling (values as the exporter writes them, roughly)."""
    kinds = ("Unspecified", "Internal", "Server", "Client", "Producer", "Consumer")
    codes = ("Unset", "Ok", "Error")

    def attrs(kvs) -> dict[str, str]:
        out = {}
        for kv in kvs:
            kind = kv.value.WhichOneof("value")
            value = getattr(kv.value, kind) if kind else ""
            out[kv.key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return out

    cols: list[list[Any]] = [[] for _ in COLUMNS]
    for rs in request.resource_spans:
        resource = attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                row = [s.start_time_unix_nano, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                       s.trace_state, s.name, kinds[s.kind], resource.get("service.name", ""), resource,
                       ss.scope.name, ss.scope.version, attrs(s.attributes),
                       s.end_time_unix_nano - s.start_time_unix_nano, codes[s.status.code], s.status.message,
                       [e.time_unix_nano for e in s.events], [e.name for e in s.events],
                       [attrs(e.attributes) for e in s.events], [x.trace_id.hex() for x in s.links],
                       [x.span_id.hex() for x in s.links], [x.trace_state for x in s.links],
                       [attrs(x.attributes) for x in s.links]]
                for col, value in zip(cols, row, strict=True):
                    col.append(value)
    return cols


# ---- processes ------------------------------------------------------------------------------------
def make_settings(home: Path, overrides: dict[str, str]) -> Settings:
    """Settings on free ports under `home`; a bearer token for the collector when it takes one."""
    known = {f.name for f in fields(Settings)}
    ports = {name: free_port() for name in known if name.endswith("_port")}
    values: dict[str, Any] = {"home": str(home), **ports}
    if "collector_token" in known:
        values["collector_token"] = secrets.token_urlsafe(16)
    values.update(overrides)
    return settings_mod.load(config_file=home / "none.toml", environ={}, **values)


@dataclass(frozen=True)
class Tree:
    """Where the store and collector run from: this checkout, or another revision's files (--baseline)."""

    label: str
    cwd: Path = ROOT
    pythonpath: str = ""  # a folder whose `tracetune` is that revision's, first on the path
    # Settings handed to its processes: None, every one; else only these (home, ports, token, --set ...),
    # so another revision runs with its own defaults (its batch size, ...), not this tree's
    pinned: frozenset[str] | None = None


def checkout(ref: str, into: Path, pinned: frozenset[str]) -> Tree:
    """Revision `ref` (a git ref of this repository, or a folder holding a checkout), importable as tracetune.

    The components live at the root beside tracetune/ (pyproject's package-dir); a folder of links puts
    them under one `tracetune` the way the installed package has them, so `python -m tracetune` run from
    there imports that revision's code and schema, with this environment's libraries.
    """
    import tomllib

    source = Path(ref)
    if not source.is_dir():
        source = into / "tree"
        source.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], capture_output=True)
        if archive.returncode != 0:
            raise ValueError(f"--baseline {ref!r}: not a folder and not a git revision of {ROOT} "
                             f"({archive.stderr.decode(errors='replace').strip().splitlines()[-1:]})")
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    source = source.resolve()
    if not (source / "pyproject.toml").is_file() or not (source / "tracetune").is_dir():
        raise ValueError(f"--baseline {ref!r}: {source} is not a tracetune checkout")
    links = into / "links"
    top = links / "tracetune"
    top.mkdir(parents=True)
    for item in (source / "tracetune").iterdir():
        (top / item.name).symlink_to(item)
    folders = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in folders.items():
        if name.count(".") == 1:
            (top / name.split(".")[1]).symlink_to(source / folder)
    return Tree(f"baseline {ref}", links, str(links), pinned)


def start_process(argv: list[str], settings: Settings, log: Path, tree: Tree = Tree("this tree")) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    names = {f.name for f in fields(Settings)} if tree.pinned is None else tree.pinned
    env.update({k: v for k, v in settings.as_env().items() if k.removeprefix("TRACETUNE_").lower() in names})
    if tree.pythonpath:
        env["PYTHONPATH"] = tree.pythonpath
    return subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tree.cwd)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Until `url` answers at all (any status: a stalled collector still listens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{url} did not come up (exit code {proc.poll()}); log {log}:\n{tail}")


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    """Live child processes of `pid` (the collector's conversion process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[1] == str(pid):
            found.append(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU so far of a process (all its threads), its live children and the ones it reaped."""
    stat = _stat(pid)
    if stat is None:
        return float("nan")
    return sum(int(x) for x in stat[11:15]) / _TICK + children_cpu_seconds(pid)  # utime, stime, cutime, cstime


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU so far of a process's live children (py-spy samples the process, not them)."""
    ticks = 0
    for child in _children(pid):
        if (child_stat := _stat(child)) is not None:
            ticks += int(child_stat[11]) + int(child_stat[12])
    return ticks / _TICK


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process plus its live children's (their peaks added, so at most this much at once)."""
    total = float("nan")
    for each in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total = (0.0 if total != total else total) + int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def clickhouse(settings: Settings, database: str | None = None):
    target = settings.clickhouse_target()
    return clickhouse_connect.get_client(host=target["host"], port=target["port"], username=target["username"],
                                         password=target["password"], database=database or target["database"],
                                         autogenerate_session_id=False, send_receive_timeout=300)


# ---- ceilings -------------------------------------------------------------------------------------
@dataclass
class Ceilings:
    """What each half of ingest manages alone on the same spans, and both in sequence."""

    parse_spans_per_s: float
    insert_rows: int
    insert_rows_per_s: float = float("nan")
    insert_store_cpu_us: float = float("nan")  # store CPU per row
    insert_error: str = ""

    @property
    def combined(self) -> float:
        if not self.insert_rows_per_s > 0:
            return float("nan")
        return 1 / (1 / self.parse_spans_per_s + 1 / self.insert_rows_per_s)


def measure_ceilings(settings: Settings, templates: list[Template], store_pid: int, seconds: float,
                     tree: Tree = Tree("this tree")) -> Ceilings:
    """Parse alone, then one Native insert the size of the collector's batch, repeated, into a scratch database
    with the tree's schema and materialized views (its own `tracetune store migrate`)."""
    spans, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for template in templates:
            ExportTraceServiceRequest().ParseFromString(template.body)
        spans += SPANS_PER_REQUEST * len(templates)
    result = Ceilings(spans / (time.perf_counter() - start), settings.collector_batch_rows)

    scratch = settings.replace(database="bench_ceiling")
    try:
        log = Path(settings.home) / "ceiling-migrate.log"
        migrate = start_process([sys.executable, "-m", "tracetune", "store", "migrate"], scratch, log, tree)
        if migrate.wait(300) != 0:
            raise RuntimeError(f"store migrate failed: {log.read_text(errors='replace')[-300:]}")
        client = clickhouse(scratch)
        client.command("CREATE TABLE bench_src AS otel_traces ENGINE = Memory")
        cols = ", ".join(f"`{c}`" for c in COLUMNS)
        requests = []
        for template in templates:
            request = ExportTraceServiceRequest()
            request.ParseFromString(template.body)
            requests.append(request)
        rows = 0
        while rows < result.insert_rows:  # small inserts: the source only has to hold the rows
            chunk = _columns(requests[(rows // SPANS_PER_REQUEST) % len(requests)])
            client.insert("bench_src", chunk, column_names=COLUMNS, column_oriented=True)
            rows += SPANS_PER_REQUEST
        native = client.raw_query(f"SELECT {cols} FROM bench_src LIMIT {result.insert_rows} FORMAT Native")
        inserted, cpu0, start = 0, cpu_seconds(store_pid), time.perf_counter()
        while inserted < 3 * result.insert_rows or time.perf_counter() - start < seconds:
            # a token per insert, as the collector sends: the same block again must be stored again here
            client.raw_insert("otel_traces", COLUMNS, native, fmt="Native",
                              settings={"insert_deduplication_token": f"ceiling-{inserted}"})
            inserted += result.insert_rows
        elapsed = time.perf_counter() - start
        result.insert_rows_per_s = inserted / elapsed
        result.insert_store_cpu_us = (cpu_seconds(store_pid) - cpu0) / inserted * 1e6
    except Exception as exc:  # noqa: BLE001 - a broken store is a result to print, not a crash
        result.insert_error = str(exc).splitlines()[0][:200]
    finally:
        try:
            clickhouse(settings).command("DROP DATABASE IF EXISTS bench_ceiling")
        except Exception:  # noqa: BLE001
            pass
    return result


# ---- senders --------------------------------------------------------------------------------------
_STATUS_SLOTS = (200, 400, 401, 408, 413, 429, 500, 503, 0)  # 0: anything else / connection errors


@dataclass
class SenderResult:
    """One sender process's tally, sent back to the parent when its time is up."""

    latencies: array
    statuses: dict[int, int]
    rejected_spans: int
    ambiguous_spans: int  # request failed mid-flight: the collector may or may not have it
    cpu_seconds: float


def _sender(index: int, url: str, token: str, templates: list[Template], start_at: float, deadline: float,
            acked: Any, results: Any) -> None:
    """POST stamped bodies until `deadline`; count spans of 200 answers into `acked`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    host, port = url.split("//")[1].split(":")
    headers = {"Content-Type": "application/x-protobuf"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    latencies, statuses = array("d"), dict.fromkeys(_STATUS_SLOTS, 0)
    rejected = ambiguous = seq = 0
    body = templates[0].stamped(index, seq)
    while time.time() < start_at:
        time.sleep(0.005)
    while time.time() < deadline:
        began = time.perf_counter()
        try:
            conn.request("POST", "/v1/traces", body, headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            statuses[0] += 1
            ambiguous += SPANS_PER_REQUEST  # never resent: a resend could store it twice
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            time.sleep(0.2)
            seq += 1
            body = templates[seq % len(templates)].stamped(index, seq)
            continue
        status = response.status
        statuses[status if status in statuses else 0] += 1
        if status in (429, 503):  # refused whole: safe to resend the same body after Retry-After
            retry_after = response.getheader("Retry-After", "1")
            wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else 1.0
            time.sleep(max(0.0, min(wait, deadline - time.time())))
            continue
        if status == 200:
            latencies.append(time.perf_counter() - began)
            reply = ExportTraceServiceResponse()
            try:
                reply.ParseFromString(data)
            except DecodeError:  # a 200 without a protobuf body: take it as "all accepted"
                reply.Clear()
            refused = reply.partial_success.rejected_spans
            rejected += refused
            with acked.get_lock():
                acked.value += SPANS_PER_REQUEST - refused
        else:
            time.sleep(0.05)
        seq += 1
        body = templates[seq % len(templates)].stamped(index, seq)
    results.put(SenderResult(latencies, statuses, rejected, ambiguous, time.process_time()))


@dataclass
class LoadResult:
    """The sending phase: acknowledged spans, answers, latency, and what each process spent."""

    seconds: float
    acked: int
    latencies: list[float]
    statuses: dict[int, int]
    rejected: int
    ambiguous: int
    collector_cpu: float
    store_cpu: float
    sender_cpu: float
    collector_rss_mb: float
    store_rss_mb: float
    cpu_start: tuple[float, float] = (float("nan"), float("nan"))  # collector, store CPU when sending began

    @property
    def spans_per_s(self) -> float:
        return self.acked / self.seconds


def run_load(settings: Settings, templates: list[Template], senders: int, seconds: float,
             collector_pid: int, store_pid: int) -> LoadResult:
    ctx = mp.get_context("fork")
    acked, results = ctx.Value("q", 0), ctx.Queue()
    start_at = time.time() + 1.0
    deadline = start_at + seconds
    token = getattr(settings, "collector_token", "")
    procs = [ctx.Process(target=_sender, args=(i, settings.collector_url, token, templates, start_at, deadline,
                                                acked, results), daemon=True) for i in range(senders)]
    for proc in procs:
        proc.start()
    while time.time() < start_at:
        time.sleep(0.01)
    cpu0 = cpu_seconds(collector_pid), cpu_seconds(store_pid)
    with Progress(TextColumn("[bold]sending"), BarColumn(), TextColumn("{task.description}"),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task("", total=seconds)
        while time.time() < deadline:
            elapsed = time.time() - start_at
            progress.update(task, completed=elapsed,
                            description=f"{acked.value:>10,} spans acked  {acked.value / max(elapsed, 1e-3):>9,.0f}/s")
            time.sleep(0.25)
    collected = []
    for _ in procs:  # each sender finishes the request it has in flight
        try:
            collected.append(results.get(timeout=120))
        except queue.Empty:
            console.print("[red]a sender process did not report (crashed?); its spans are in `acked` only[/]")
    elapsed = time.time() - start_at
    cpu1 = cpu_seconds(collector_pid), cpu_seconds(store_pid)
    for proc in procs:
        proc.join(10)
    statuses = {code: sum(r.statuses[code] for r in collected) for code in _STATUS_SLOTS}
    return LoadResult(
        seconds=elapsed, acked=acked.value, latencies=sorted(x for r in collected for x in r.latencies),
        statuses=statuses, rejected=sum(r.rejected_spans for r in collected),
        ambiguous=sum(r.ambiguous_spans for r in collected), collector_cpu=cpu1[0] - cpu0[0],
        store_cpu=cpu1[1] - cpu0[1], sender_cpu=sum(r.cpu_seconds for r in collected),
        collector_rss_mb=peak_rss_mb(collector_pid), store_rss_mb=peak_rss_mb(store_pid), cpu_start=cpu0,
    )


@dataclass
class Drain:
    """How otel_traces caught up with what the collector acknowledged."""

    stored: int
    stored_at_end: int
    lag_seconds: float  # from the end of sending until stored == acked (nan: never)
    distinct_span_ids: int
    collector_cpu: float = float("nan")  # CPU seconds from the start of sending until the drain ended
    store_cpu: float = float("nan")
    # store CPU seconds from the start of sending until no merge has run for SETTLE_SECONDS (the merges a
    # larger part defers past the drain count too), and how long after the drain that was (nan: never)
    store_cpu_settled: float = float("nan")
    settle_seconds: float = float("nan")


SETTLE_SECONDS = 3.0


def wait_merges(settings: Settings, timeout: float) -> float:
    """Seconds until no merge has run in the store's database for SETTLE_SECONDS (nan after `timeout`)."""
    client = clickhouse(settings)
    database = settings.clickhouse_target()["database"]
    start = quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < SETTLE_SECONDS:
        if time.monotonic() - start > timeout:
            return float("nan")
        time.sleep(0.25)
        if int(client.command("SELECT count() FROM system.merges WHERE database = {db:String}",
                              parameters={"db": database})):
            quiet_since = time.monotonic()
    return quiet_since - start


def wait_stored(settings: Settings, acked: int, timeout: float) -> Drain:
    """Poll otel_traces until it holds `acked` spans, or until nothing arrives for `timeout` seconds."""
    client = clickhouse(settings)
    count = lambda: int(client.command("SELECT count() FROM otel_traces"))
    start = time.monotonic()
    first = last = count()
    lag, last_change = float("nan"), start
    with Progress(TextColumn("[bold]draining"), BarColumn(), TextColumn("{task.description}"), console=console,
                  transient=True) as progress:
        task = progress.add_task("", total=max(acked, 1))
        while True:
            if last >= acked:
                lag = time.monotonic() - start
                break
            if time.monotonic() - last_change > timeout:
                break
            time.sleep(0.25)
            now = count()
            if now != last:
                last, last_change = now, time.monotonic()
            progress.update(task, completed=now, description=f"{now:,} of {acked:,} stored")
    time.sleep(0.5)  # anything past `acked` (duplicates) shows up too
    stored = count()
    distinct = int(client.command("SELECT uniqExact(SpanId) FROM otel_traces"))
    return Drain(stored, first, lag, distinct)


# ---- collector profile (--profile) ----------------------------------------------------------------
# Where a sample's innermost frames say the thread waits (not CPU): left out of the shares.
_WAITING = ("EpollSelector.select", "FileOps.fdatasync", "Condition.wait", "Queue.get", "Event.wait",
            "_worker (concurrent/futures/thread.py",  # an idle executor thread, in SimpleQueue.get
            "ConversionProcess._ask")  # waiting for the conversion process's answer (select)
# A busy sample's stage: the first stage (in this order) one of whose names is in its stack.
STAGES = [
    ("validation scan (rows.checked_span_count)", ("checked_span_count",)),
    ("protobuf parse (upb; receivers.parse)", ("parse (tracetune/collector/receivers.py",
                                               "parse (collector/receivers.py")),
    ("log append: record CRC, pwrite, group commit", ("WriteAheadLog.append", "_Committer.")),
    ("to Arrow by the conversion process: bodies out, its file read in", ("ConversionProcess.",)),
    ("to Arrow: ptars + Arrow compute (columns.to_arrow)", ("to_arrow",)),
    ("reference converter (rows.convert)", ("convert (",)),
    ("log read-back of a batch (WriteAheadLog.read)", ("WriteAheadLog.read",)),
    ("insert: Arrow IPC + HTTP to the store", ("SpanWriter._insert", "Client.insert_arrow", "Client.insert",
                                               "Client.raw_insert")),
    ("log checkpoint, commit, segment release", ("WriteAheadLog.commit", "WriteAheadLog.begin")),
    ("hand-off to worker threads (anyio or an executor)", ("run_sync_in_worker_thread", "WorkerThread.run",
                                                          "_WorkItem.run", "_worker (")),
    ("HTTP server (uvicorn, starlette, asyncio)", ("BaseEventLoop._run_once",)),
]


def start_profile(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling the collector (every thread, without pausing it) until SIGINT."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert spy is not None  # main() checked
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "50", "--nonblocking", "--threads",
                             "--format", "raw", "--output", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def stop_profile(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def profile_stages(collapsed: Path) -> tuple[dict[str, int], int]:
    """Busy samples per stage from py-spy's collapsed stacks, and the waiting samples left out."""
    stages: dict[str, int] = {}
    waiting = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames[-1].startswith(_WAITING):
            waiting += int(count)
            continue
        name = next((stage for stage, keys in STAGES if any(k in f for f in frames for k in keys)), "other")
        stages[name] = stages.get(name, 0) + int(count)
    return stages, waiting


def report_profile(collapsed: Path, cpu: float, spans: int, children_cpu: float = 0.0) -> None:
    """The collector's CPU per span (sending + drain) split by the profile's shares of busy samples; its
    children's CPU (the conversion process, not sampled) is a row of its own."""
    if not collapsed.exists():
        console.print(f"[red]no profile written ({collapsed})[/]")
        return
    stages, waiting = profile_stages(collapsed)
    busy = sum(stages.values())
    table = Table(title=f"Collector CPU by stage (py-spy, {busy:,} busy samples; {waiting:,} waiting left out): "
                        f"{cpu / max(spans, 1) * 1e6:.1f} µs per stored span, sending + drain")
    table.add_column("stage")
    table.add_column("share", justify="right")
    table.add_column("µs/span", justify="right")
    sampled = cpu - children_cpu
    for name, count in sorted(stages.items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{count / busy:.1%}", f"{count / busy * sampled / max(spans, 1) * 1e6:.2f}")
    if children_cpu:
        table.add_row("child processes (the conversion to Arrow): their CPU, not sampled", "",
                      f"{children_cpu / max(spans, 1) * 1e6:.2f}")
    console.print(table)
    console.print("Shares are of samples in which a thread ran Python or was in native code; a thread waiting "
                  "for the GIL counts as busy, so the shares are the profile's, the µs/span totals measured.")


# ---- report ---------------------------------------------------------------------------------------
def _pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p / 100 * len(values)))] * 1e3 if values else float("nan")


def _met(ok: bool) -> str:
    return "[green]met[/]" if ok else "[red]not met[/]"


def _rate(x: float) -> str:
    return "n/a" if x != x else f"{x:,.0f}"


def report(args: argparse.Namespace, ceilings: Ceilings, load: LoadResult, drain: Drain | None) -> None:
    table = Table(title="1. Ceilings on the same generated spans (200 spans/request, 12 attributes/span)")
    for name in ("", "spans/s", "note"):
        table.add_column(name, justify="right" if name == "spans/s" else "left")
    table.add_row("protobuf parse alone", _rate(ceilings.parse_spans_per_s),
                  "ExportTraceServiceRequest.ParseFromString")
    table.add_row("Native insert into the store", _rate(ceilings.insert_rows_per_s),
                  ceilings.insert_error or f"{ceilings.insert_rows:,} rows/insert (collector_batch_rows), "
                                           f"store CPU {ceilings.insert_store_cpu_us:.1f} µs/row")
    table.add_row("combined ceiling 1/(1/a+1/b)", _rate(ceilings.combined), "")
    console.print(table)

    cores = lambda cpu: f"{cpu / load.seconds:.2f} cores ({cpu / max(load.acked, 1) * 1e6:.1f} µs/span)"
    table = Table(title=f"2. Sustained: {args.senders} senders for {load.seconds:.1f} s")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("spans acknowledged (200 answers)", f"{load.acked:,}")
    table.add_row("sustained spans/s", _rate(load.spans_per_s))
    table.add_row("request latency p50 / p99", f"{_pct(load.latencies, 50):.1f} / {_pct(load.latencies, 99):.1f} ms")
    answers = ", ".join(f"{'error' if code == 0 else code}: {n:,}" for code, n in load.statuses.items() if n)
    table.add_row("answers", answers or "none")
    table.add_row("spans rejected in 200 answers (partial success)", f"{load.rejected:,}")
    table.add_row("spans in failed requests (not resent)", f"{load.ambiguous:,}")
    table.add_row("collector CPU (+ children)", cores(load.collector_cpu))
    table.add_row("store CPU", cores(load.store_cpu))
    table.add_row("senders CPU", cores(load.sender_cpu))
    table.add_row("peak RSS collector (+ children) / store (VmHWM)",
                  f"{load.collector_rss_mb:,.0f} / {load.store_rss_mb:,.0f} MB")
    if drain is not None:
        match = drain.stored == load.acked
        table.add_row("stored when sending stopped", f"{drain.stored_at_end:,} "
                      f"({drain.stored_at_end / load.seconds:,.0f}/s while sending)")
        table.add_row("lag until stored = acked", "never (timed out)" if drain.lag_seconds != drain.lag_seconds
                      else f"{drain.lag_seconds:.1f} s")
        table.add_row("acked vs stored", f"{load.acked:,} vs {drain.stored:,}: "
                      + ("[green]exact match[/]" if match else f"[red]differ by {drain.stored - load.acked:+,}[/]"))
        table.add_row("distinct span ids stored", f"{drain.distinct_span_ids:,}"
                      + ("" if drain.distinct_span_ids == drain.stored else " [red](duplicates)[/]"))
        per_stored = lambda cpu: f"{cpu / max(drain.stored, 1) * 1e6:.1f} µs/span"
        table.add_row("collector / store CPU per stored span, sending + drain",
                      f"{per_stored(drain.collector_cpu)} / {per_stored(drain.store_cpu)}")
        table.add_row("store CPU per stored span until merges settled",
                      f"{per_stored(drain.store_cpu_settled)} ({drain.settle_seconds:.1f} s after the drain)")
    console.print(table)

    table = Table(title="3. Sustained vs ceiling")
    table.add_column("")
    table.add_column("spans/s", justify="right")
    table.add_column(f"≥ {TARGET_SPANS_PER_S:,}/s", justify="right")
    table.add_column("/ ceiling", justify="right")
    table.add_column(f"≥ {TARGET_RATIO}", justify="right")
    rates = [("sustained (acked while sending)", load.spans_per_s)]
    if drain is not None and drain.lag_seconds == drain.lag_seconds:  # the queue drained: count its time too
        rates.append(("acked / (sending + drain lag)", load.acked / (load.seconds + drain.lag_seconds)))
    for name, rate in rates:
        ratio = rate / ceilings.combined if ceilings.combined > 0 else float("nan")
        table.add_row(name, _rate(rate), _met(rate >= TARGET_SPANS_PER_S), "n/a" if ratio != ratio else f"{ratio:.2f}",
                      _met(ratio >= TARGET_RATIO))
    console.print(table)


@dataclass
class Run:
    """One tree's whole run: ceilings, the sending phase and the drain."""

    tree: Tree
    ceilings: Ceilings
    load: LoadResult
    drain: Drain | None


def compare(before: Run, after: Run) -> None:
    """The headline figures of two trees, measured in this one run, side by side."""
    table = Table(title=f"4. Before and after, same load, same machine: {before.tree.label} vs {after.tree.label}")
    for name in ("", before.tree.label, after.tree.label, "after / before"):
        table.add_column(name, justify="left" if not name else "right")

    def end_to_end(run: Run) -> float:
        lag = run.drain.lag_seconds if run.drain is not None else float("nan")
        return run.load.acked / (run.load.seconds + lag) if lag == lag else float("nan")

    def per_span(cpu: float, run: Run) -> float:
        return cpu / max(run.drain.stored if run.drain is not None else 0, 1) * 1e6

    rows = [
        ("sustained spans/s (acked while sending)", lambda r: r.load.spans_per_s, _rate),
        ("end to end spans/s (acked / (sending + drain lag))", end_to_end, _rate),
        ("collector CPU µs per stored span, sending + drain", lambda r: per_span(r.drain.collector_cpu, r),
         lambda x: f"{x:.1f}"),
        ("store CPU µs per stored span, sending + drain", lambda r: per_span(r.drain.store_cpu, r),
         lambda x: f"{x:.1f}"),
        ("both", lambda r: per_span(r.drain.collector_cpu + r.drain.store_cpu, r), lambda x: f"{x:.1f}"),
        ("store CPU µs per stored span until merges settled", lambda r: per_span(r.drain.store_cpu_settled, r),
         lambda x: f"{x:.1f}"),
        ("both, store until merges settled",
         lambda r: per_span(r.drain.collector_cpu + r.drain.store_cpu_settled, r), lambda x: f"{x:.1f}"),
        ("request latency p99 ms", lambda r: _pct(r.load.latencies, 99), lambda x: f"{x:.1f}"),
        ("peak RSS collector MB", lambda r: r.load.collector_rss_mb, lambda x: f"{x:,.0f}"),
        ("peak RSS store MB", lambda r: r.load.store_rss_mb, lambda x: f"{x:,.0f}"),
        ("Native insert ceiling rows/s", lambda r: r.ceilings.insert_rows_per_s, _rate),
        ("store CPU µs/row of that insert", lambda r: r.ceilings.insert_store_cpu_us, lambda x: f"{x:.1f}"),
    ]
    for name, value, show in rows:
        a, b = value(before), value(after)
        ratio = b / a if a == a and b == b and a else float("nan")
        table.add_row(name, show(a), show(b), "n/a" if ratio != ratio else f"{ratio:.2f}")
    exact = lambda r: ("yes" if r.drain is not None and r.drain.stored == r.load.acked == r.drain.distinct_span_ids
                       else "[red]no[/]")
    table.add_row("acked = stored, no duplicates", exact(before), exact(after), "")
    console.print(table)


def run_tree(args: argparse.Namespace, tree: Tree, overrides: dict[str, str], templates: list[Template],
             ceiling_seconds: float) -> Run | None:
    """Start the tree's store and collector in a temporary home, measure, stop them; None if they failed."""
    home = Path(tempfile.mkdtemp(prefix="tracetune-bench-"))
    settings = make_settings(home, overrides)
    batch = (f"{settings.collector_batch_rows:,} rows" if tree.pinned is None or "collector_batch_rows" in tree.pinned
             else "rows: the revision's default")
    console.print(f"[bold]{tree.label}[/]: home {home}  store :{settings.store_port}  collector "
                  f":{settings.collector_port}  batch {batch}  {os.cpu_count()} CPUs  "
                  f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    procs: list[subprocess.Popen] = []
    try:
        store_proc = start_process([sys.executable, "-m", "tracetune", "store"], settings, home / "store.log", tree)
        procs.append(store_proc)
        wait_http(f"{settings.store_url}/ping", store_proc, home / "store.log")
        collector_argv = shlex.split(args.collector_cmd) or [sys.executable, "-m", "tracetune", "collector"]
        collector_proc = start_process(collector_argv, settings, home / "collector.log", tree)
        procs.insert(0, collector_proc)
        wait_http(f"{settings.collector_url}/health", collector_proc, home / "collector.log")

        ceilings = measure_ceilings(settings, templates, store_proc.pid, ceiling_seconds, tree)
        children_cpu0 = children_cpu_seconds(collector_proc.pid)
        profile = start_profile(collector_proc.pid, home / "collector.pyspy") if args.profile else None
        try:
            load = run_load(settings, templates, args.senders, args.seconds, collector_proc.pid, store_proc.pid)
            drain = wait_stored(settings, load.acked, args.drain_timeout)
        finally:
            if profile is not None:
                stop_profile(profile)
        drain.collector_cpu = cpu_seconds(collector_proc.pid) - load.cpu_start[0]
        drain.store_cpu = cpu_seconds(store_proc.pid) - load.cpu_start[1]
        drain.settle_seconds = wait_merges(settings, 60.0)
        drain.store_cpu_settled = cpu_seconds(store_proc.pid) - load.cpu_start[1]
        console.print(f"[bold]{tree.label}[/] (load average after: "
                      f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
        report(args, ceilings, load, drain)
        if profile is not None:
            report_profile(home / "collector.pyspy", drain.collector_cpu, drain.stored,
                           children_cpu_seconds(collector_proc.pid) - children_cpu0)
        if collector_proc.poll() is not None:
            console.print(f"[red]collector exited ({collector_proc.returncode}); log {home / 'collector.log'}[/]")
        return Run(tree, ceilings, load, drain)
    except RuntimeError as exc:
        console.print(f"[red]{tree.label}: {exc}[/]")
        return None
    finally:
        for proc in procs:
            stop_process(proc)
        if args.keep:
            console.print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the senders send")
    parser.add_argument("--senders", type=int, default=4, help="sender processes")
    parser.add_argument("--quick", action="store_true", help="short run (under a minute): 15 s of load")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="give up waiting for stored = acked after this many seconds without progress")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a collector/store setting, e.g. --set collector_batch_rows=20000")
    parser.add_argument("--collector-cmd", default="",
                        help="run this instead of `python -m tracetune collector` (a prototype speaking OTLP/HTTP; "
                             "it gets the same TRACETUNE_* environment)")
    parser.add_argument("--baseline", default="", metavar="REF",
                        help="first run the same bench on another revision's store and collector (a git ref of "
                             "this repository, e.g. main, or a folder holding a checkout), then this tree's, and "
                             "print both side by side")
    parser.add_argument("--profile", action="store_true",
                        help="sample the collector with py-spy while sending and draining, and print its CPU per "
                             "span by stage (py-spy: pip install -e '.[bench]')")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (data, logs)")
    args = parser.parse_args()
    if args.profile and not shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"):
        parser.error("--profile needs py-spy: pip install -e '.[bench]'")
    if args.quick:
        args.seconds, args.drain_timeout = min(args.seconds, 15.0), min(args.drain_timeout, 20.0)
    ceiling_seconds = 1.0 if args.quick else 3.0

    known = sorted(f.name for f in fields(Settings) if not f.name.startswith("_"))
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            parser.error(f"--set {item!r}: expected FIELD=VALUE, FIELD one of {', '.join(known)}")
        overrides[name] = value
    scratch = Path(tempfile.mkdtemp(prefix="tracetune-bench-trees-"))
    try:
        try:
            make_settings(scratch, overrides)
            pinned = frozenset({"home", "database", "collector_token", *overrides,
                                *(f.name for f in fields(Settings) if f.name.endswith("_port"))})
            trees = [Tree("this tree")]
            if args.baseline:
                trees.insert(0, checkout(args.baseline, scratch, pinned))
        except (settings_mod.SettingsError, ValueError) as exc:
            parser.error(str(exc))
        templates = [make_template(seed) for seed in range(TEMPLATES)]
        runs = [run_tree(args, tree, overrides, templates, ceiling_seconds) for tree in trees]
        if len(runs) == 2 and all(runs):
            compare(*runs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
