"""Soak: the store away for minutes under steady load; the collector's memory must stay flat, its log grow.

Starts an embedded store and a collector as their own processes (a temporary home, free ports), stops the
store, and sends `--rate` spans/s over OTLP/HTTP for `--minutes` from several sender processes, sampling
the collector's RSS and the log's size as it goes. Then the store comes back: the drain is timed, and the
rows stored are counted against the spans acknowledged. Prints the samples and a summary table.

    .venv/bin/python bench/wal_outage.py                      # 10 minutes at 20,000 spans/s
    .venv/bin/python bench/wal_outage.py --minutes 1 --rate 5000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import isolated_settings, stop_process

ROOT = Path(__file__).resolve().parent.parent


def _bodies(spans: int, count: int = 8) -> list[bytes]:
    """Requests shaped like an executor's: a root and steps with the tracetune and GenAI attributes."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    def kv(key: str, value: str) -> KeyValue:
        return KeyValue(key=key, value=AnyValue(string_value=value))

    out = []
    now = time.time_ns()
    for _ in range(count):
        items = []
        for i in range(spans):
            attrs = [kv("tracetune.pipeline", "triage"), kv("tracetune.tenant", "acme")]
            if i % 5:
                attrs += [kv("tracetune.step", ["normalize", "embed", "classify", "generate"][i % 5 - 1]),
                          kv("tracetune.route", "int8"), kv("gen_ai.request.model", "standin-small"),
                          kv("gen_ai.usage.input_tokens", "320")]
            items.append(Span(trace_id=os.urandom(16), span_id=os.urandom(8), name=f"op-{i % 5}", kind=1,
                              start_time_unix_nano=now + i, end_time_unix_nano=now + i + 3_000_000, attributes=attrs))
        resource = ResourceSpans(scope_spans=[ScopeSpans(spans=items)])
        resource.resource.attributes.append(kv("service.name", "bench-executor"))
        out.append(ExportTraceServiceRequest(resource_spans=[resource]).SerializeToString())
    return out


def _sender(url: str, token: str, bodies: list[bytes], spans: int, rate: float, deadline: float,
            acked, refused) -> None:
    """POST at `rate` spans/s until `deadline`; count acknowledged spans and refused requests."""
    headers = {"content-type": "application/x-protobuf", "authorization": f"Bearer {token}"}
    interval, next_at, i = spans / rate, time.monotonic(), 0
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < deadline:
            try:
                status = http.post(url, content=bodies[i % len(bodies)], headers=headers).status_code
            except httpx.HTTPError:
                status = 0
            if status == 200:
                with acked.get_lock():
                    acked.value += spans
            else:
                with refused.get_lock():
                    refused.value += 1
            i += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start(argv: list[str], settings, log: Path):
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")} | settings.as_env()
    return subprocess.Popen([sys.executable, "-m", "tracetune", *argv], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def _health(settings) -> dict | None:
    try:
        return httpx.get(f"{settings.collector_url}/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20_000, help="spans per second, all senders together")
    parser.add_argument("--spans", type=int, default=1000, help="spans per request")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--wal-max-gib", type=float, default=8.0, help="collector_wal_max_bytes, in GiB")
    args = parser.parse_args()
    if args.minutes <= 0 or args.rate <= 0 or args.spans <= 0 or args.senders <= 0:
        print("--minutes, --rate, --spans and --senders must be positive", file=sys.stderr)
        raise SystemExit(2)
    console = Console()
    home = Path(tempfile.mkdtemp(prefix="tt-wal-outage-"))
    settings = isolated_settings(home, collector_wal_max_bytes=int(args.wal_max_gib * (1 << 30)))
    from tracetune import store

    store_proc = _start(["store"], settings, home / "store.log")
    collector = None
    try:
        store.connect(settings, wait=60)
        collector = _start(["collector"], settings, home / "collector.log")
        deadline = time.monotonic() + 60
        while _health(settings) is None:
            if time.monotonic() > deadline or collector.poll() is not None:
                raise SystemExit(f"the collector did not start; see {home / 'collector.log'}")
            time.sleep(0.2)
        stop_process(store_proc)  # the outage begins
        bodies = _bodies(args.spans)
        acked, refused = multiprocessing.Value("q", 0), multiprocessing.Value("q", 0)
        seconds = args.minutes * 60
        end = time.monotonic() + seconds
        procs = [multiprocessing.Process(target=_sender, args=(
            f"{settings.collector_url}/v1/traces", settings.secret("collector"), bodies, args.spans,
            args.rate / args.senders, end, acked, refused)) for _ in range(args.senders)]
        for proc in procs:
            proc.start()
        samples: list[tuple[float, int, float, float]] = []
        started = time.monotonic()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("store away, sending", total=seconds)
            while time.monotonic() < end:
                time.sleep(min(10.0, max(0.0, end - time.monotonic())))
                health = _health(settings) or {}
                samples.append((time.monotonic() - started, acked.value, health.get("wal_bytes", 0) / 1e6,
                                _rss_mb(collector.pid)))
                progress.update(task, completed=min(seconds, time.monotonic() - started))
        for proc in procs:
            proc.join(60)
        peak = _rss_mb(collector.pid, "VmHWM")
        logged = (_health(settings) or {}).get("wal_bytes", 0)
        store_proc = _start(["store"], settings, home / "store.log")
        client = store.connect(settings, wait=60, ensure_schema=False)
        drain_start = time.monotonic()
        while (_health(settings) or {}).get("queued_rows", 1):
            time.sleep(1)
        drain = time.monotonic() - drain_start
        stored = client.query("SELECT count() FROM otel_traces").result_rows[0][0]

        table = Table(title=f"store away {args.minutes:g} min at {args.rate:,.0f} spans/s")
        for column in ("t (s)", "spans acked", "log waiting (MB)", "collector RSS (MB)"):
            table.add_column(column, justify="right")
        for t, n, mb, rss in samples[:: max(1, len(samples) // 20)] + samples[-1:]:
            table.add_row(f"{t:.0f}", f"{n:,}", f"{mb:,.0f}", f"{rss:,.0f}")
        console.print(table)
        summary = Table(title="summary")
        summary.add_column("measure")
        summary.add_column("value", justify="right")
        rows = [
            ("spans acknowledged / refused requests", f"{acked.value:,} / {refused.value:,}"),
            ("achieved rate (spans/s)", f"{acked.value / seconds:,.0f}"),
            ("log waiting at the end", f"{logged / 1e6:,.0f} MB ({logged / max(acked.value, 1):.0f} B/span)"),
            ("collector RSS first / last sample", f"{samples[0][3]:,.0f} / {samples[-1][3]:,.0f} MB"),
            ("collector peak RSS (VmHWM)", f"{peak:,.0f} MB"),
            ("drain after the store came back", f"{drain:,.1f} s ({acked.value / max(drain, 1e-9):,.0f} spans/s)"),
            ("rows stored / spans acknowledged", f"{stored:,} / {acked.value:,}"),
        ]
        for name, value in rows:
            summary.add_row(name, value)
        console.print(summary)
        if stored != acked.value:
            console.print(f"[red]{stored - acked.value:+,} rows against the spans acknowledged[/red]")
    finally:
        if collector is not None:
            stop_process(collector)
        stop_process(store_proc)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
