"""The collector at the edges, as real processes on a real file system: a damaged log record, a full disk,
SIGTERM with the store away, one count per refusal. Every case ends with every acknowledged span stored
exactly once, except the spans of a damaged record, which are reported."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.collector.otlp import batch, request, span
from tests.collector.test_durability import PB, drained, start_collector, start_store, stored_ids
from tests.conftest import make_settings
from tests.servers import free_port, stop_process, wait_until
from tracetune import store
from tracetune.collector.ingest import Ingest
from tracetune.collector.wal import WriteAheadLog
from tracetune.collector.writer import SpanWriter


def post(settings, spans: int = 100) -> tuple[httpx.Response, set[str]]:
    request, ids = batch(spans)
    headers = {**PB, "authorization": f"Bearer {settings.secret('collector')}"}
    return httpx.post(f"{settings.collector_url}/v1/traces", content=request.SerializeToString(), headers=headers,
                      timeout=30), ids


def metric(settings, name: str, **labels: str) -> float:
    text = httpx.get(f"{settings.collector_url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_damaged_record_costs_only_its_own_spans_which_are_reported(tmp_path):
    """4 bytes overwritten in the middle of a segment while the collector is stopped: the records after it
    are stored, the damaged one is reported (tracetune_wal_damage, metric, log) and its segment kept aside."""
    settings = make_settings(tmp_path / "home", collector_flush_seconds=0.2)
    store_proc = start_store(settings, tmp_path / "store.log")
    collector = start_collector(settings, tmp_path / "c1.log")
    try:
        stop_process(store_proc)  # the store is away: acknowledged requests wait in the log
        requests = []
        for _ in range(40):
            response, ids = post(settings)
            assert response.status_code == 200
            requests.append(ids)
        stop_process(collector, timeout=30)
        segment = max((tmp_path / "home" / "wal").glob("seg-*.wal"), key=lambda p: p.stat().st_size)
        middle = segment.stat().st_size // 2
        with open(segment, "r+b") as handle:
            handle.seek(middle)
            handle.write(b"\xde\xad\xbe\xef")

        store_proc = start_store(settings, tmp_path / "store.log")
        collector = start_collector(settings, tmp_path / "c2.log")
        wait_until(lambda: drained(settings), 60, message="the log written")
        client = store.connect(settings, ensure_schema=False)
        ids, total = stored_ids(client)
        assert total == len(ids), f"{total - len(ids)} spans stored twice"
        acked = set().union(*requests)
        missing = acked - ids
        assert missing in requests, f"{len(missing)} spans missing, not one damaged request of 100"
        rows = client.query("SELECT segment, start_byte, end_byte, spans, message FROM tracetune_wal_damage"
                            ).result_rows
        assert len(rows) == 1
        name, start, end, spans, message = rows[0]
        assert name == segment.name and start <= middle < end and spans == 100 and "100 spans" in message
        assert metric(settings, "tracetune_collector_wal_damaged_records_total") == 1
        assert "damaged write-ahead log record" in (tmp_path / "c2.log").read_text()
        wait_until(lambda: (tmp_path / "home" / "wal" / "damaged" / segment.name).exists(), 20,
                   message="the damaged segment kept aside")
        assert not segment.exists()
    finally:
        stop_process(collector)
        stop_process(store_proc)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a 4 MiB tmpfs for the full-disk test needs root")
    path = tmp_path / "home" / "wal"
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(path: Path, leave: int = 0) -> Path:
    """A filler file taking all but `leave` bytes of the file system at `path`."""
    filler = path / "filler"
    free = shutil.disk_usage(path).free - leave
    with open(filler, "ab") as handle, contextlib.suppress(OSError):
        while free > 0:
            handle.write(b"\0" * min(free, 1 << 16))
            handle.flush()
            free -= 1 << 16
    return filler


def test_a_full_disk_is_a_refusal_never_a_lie(tmp_path, small_disk):
    settings = make_settings(tmp_path / "home", collector_flush_seconds=0.2)
    store_proc = start_store(settings, tmp_path / "store.log")
    collector = start_collector(settings, tmp_path / "c1.log")
    acked: set[str] = set()
    statuses: list[int] = []
    try:
        fill_disk(small_disk, leave=1 << 20)  # 1 MiB left for the log
        stop_process(store_proc)
        while statuses.count(503) < 20:  # the log fills: refusals, not lies
            response, ids = post(settings)
            statuses.append(response.status_code)
            if response.status_code == 200:
                acked |= ids
            else:
                assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        # The writer lives: it goes on trying the store away (the log can fill before its first try ends).
        wait_until(lambda: httpx.get(f"{settings.collector_url}/health", timeout=5).json()["insert_failures"] > 0,
                   20, message="a failed insert")
        assert statuses.count(200) >= 5
        refused_before = metric(settings, "tracetune_collector_requests_refused_total", status="503")
        assert refused_before == statuses.count(503)  # one count per refusal

        # The store is back: the writer drains, the space comes back, requests are taken again.
        store_proc = start_store(settings, tmp_path / "store.log")
        wait_until(lambda: drained(settings), 60, message="the log written")

        def accepted() -> bool:
            response, ids = post(settings)
            if response.status_code == 200:
                acked.update(ids)
            return response.status_code == 200
        wait_until(accepted, 20, interval=0.5, message="a request taken once the store drained the log")

        # Restart with the disk entirely full: the collector starts, answers health, refuses writes.
        stop_process(collector, timeout=30)
        assert collector.returncode == 0
        filler2 = fill_disk(small_disk)
        filler2 = filler2.rename(small_disk / "filler2")
        filler_more = fill_disk(small_disk)  # whatever the first filler's last write left
        collector = start_collector(settings, tmp_path / "c2.log")
        assert httpx.get(f"{settings.collector_url}/health", timeout=5).status_code == 200
        response, _ = post(settings)
        assert response.status_code == 503
        filler2.unlink()
        filler_more.unlink()
        wait_until(accepted, 20, interval=0.5, message="a request taken once there is room")
        wait_until(lambda: drained(settings), 60, message="the log written")
        client = store.connect(settings, ensure_schema=False)
        ids, total = stored_ids(client)
        assert total == len(ids), f"{total - len(ids)} spans stored twice"
        assert not acked - ids, f"{len(acked - ids)} acknowledged spans missing"
        assert len(ids) == len(acked)  # and nothing refused was stored (its sender would retry it: a duplicate)
    finally:
        stop_process(collector)
        stop_process(store_proc)


def test_sigterm_with_the_store_away_ends_within_the_documented_time(tmp_path):
    settings = make_settings(tmp_path / "home", collector_flush_seconds=0.2)
    store_proc = start_store(settings, tmp_path / "store.log")
    collector = start_collector(settings, tmp_path / "c1.log")
    try:
        stop_process(store_proc)
        acked: set[str] = set()
        for _ in range(5):
            response, ids = post(settings)
            assert response.status_code == 200
            acked |= ids
        wait_until(lambda: httpx.get(f"{settings.collector_url}/health").json()["insert_failures"] > 0, 20,
                   message="a failed insert")
        started = time.monotonic()
        collector.send_signal(signal.SIGTERM)
        collector.wait(60)
        took = time.monotonic() - started
        print(f"SIGTERM with the store away: exited after {took:.1f} s (collector_stop_seconds "
              f"{settings.collector_stop_seconds:g})")
        assert collector.returncode == 0
        assert took <= settings.collector_stop_seconds + 1.5  # the documented bound, and a second to exit
        store_proc = start_store(settings, tmp_path / "store.log")
        collector = start_collector(settings, tmp_path / "c2.log")
        wait_until(lambda: drained(settings), 60, message="the log written")
        ids, total = stored_ids(store.connect(settings, ensure_schema=False))
        assert total == len(ids) and acked <= ids
    finally:
        stop_process(collector)
        stop_process(store_proc)


def test_a_span_past_2106_is_quarantined_not_rolled_up_into_another_minute(db_settings, tmp_path):
    """DateTime (the rollups' minute) ends at 2106-02-07 06:28:15: a later start would wrap around; a span dated
    2200 is refused with a reason, in spans and rollups alike, while one just before the end is counted there."""
    client = store.connect(db_settings, ensure_schema=False)
    wal = WriteAheadLog(tmp_path / "wal")
    writer = SpanWriter(lambda: store.connect(db_settings, ensure_schema=False), wal, flush_seconds=0.05).start()
    ingest = Ingest(wal, writer)
    pipeline = [KeyValue(key="tracetune.pipeline", value=AnyValue(string_value="future"))]
    late = span("late", start=7_258_118_400 * 10**9, attributes=pipeline)  # 2200-01-01
    edge = span("edge", start=4_294_967_200 * 10**9, attributes=pipeline)  # 2106-02-07 06:26:40
    result = ingest.export(request([late, edge]))
    assert (result.accepted_spans, result.rejected_spans) == (1, 1) and "2106-02-07" in result.error_message
    assert writer.flush(20)
    writer.stop()
    wal.close()
    assert client.query("SELECT SpanName FROM otel_traces").result_rows == [("edge",)]
    assert client.query("SELECT span_name FROM tracetune_quarantine").result_rows == [("late",)]
    assert client.query("SELECT toString(minute), requests FROM tracetune_spans_1m WHERE pipeline = 'future'"
                        ).result_rows == [("2106-02-07 06:26:00", 1)]


def test_each_refusal_is_counted_once(db_settings, tmp_path):
    from tests.servers import ThreadServer
    from tracetune.collector.receivers import create_app

    down = db_settings.replace(store_port=free_port())  # nothing listens: every insert fails, the log fills
    wal = WriteAheadLog(tmp_path / "wal", max_bytes=1)
    writer = SpanWriter(lambda: store.connect(down, ensure_schema=False), wal, flush_seconds=0.05).start()
    with ThreadServer(create_app(Ingest(wal, writer), max_body_bytes=1 << 20)) as server:
        def refused() -> float:
            text = httpx.get(f"{server.url}/metrics").text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("tracetune_collector_requests_refused_total") and 'status="503"' in line)
        before = refused()
        statuses = [httpx.post(f"{server.url}/v1/traces", content=batch(10)[0].SerializeToString(),
                               headers=PB).status_code for _ in range(4)]
        assert statuses == [200, 503, 503, 503]
        assert refused() - before == 3
    writer.stop(0.5)
    wal.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_an_outage_rides_on_disk_not_in_memory(tmp_path):
    """With the store away, acknowledged requests wait in the log while the collector's memory stays flat (the
    queue holds where each request lies, not the request). bench/wal_outage.py is the 10-minute soak."""
    settings = make_settings(tmp_path / "home", collector_flush_seconds=0.2)
    store_proc = start_store(settings, tmp_path / "store.log")
    collector = start_collector(settings, tmp_path / "c1.log")

    body = batch(2000)[0].SerializeToString()  # one body sent again and again: the sender stays cheap
    headers = {**PB, "authorization": f"Bearer {settings.secret('collector')}"}
    acked = 0

    def send(n: int) -> None:
        nonlocal acked
        with httpx.Client(timeout=30) as http:
            for _ in range(n):
                assert http.post(f"{settings.collector_url}/v1/traces", content=body, headers=headers
                                 ).status_code == 200
                acked += 2000

    def logged_mb() -> float:
        return httpx.get(f"{settings.collector_url}/health", timeout=5).json()["wal_bytes"] / 1e6

    try:
        stop_process(store_proc)
        # warm: imports, buffers, the allocator's arenas, and the writer's pipeline: a batch it retries and the
        # next one converted (collector_batch_rows each, held however long the store is away), given time to
        # finish converting
        send(max(40, 3 * settings.collector_batch_rows // 2000))
        time.sleep(3)
        before, logged_before = rss_mb(collector.pid), logged_mb()
        send(160)
        grown, logged = rss_mb(collector.pid) - before, logged_mb() - logged_before
        print(f"store away: {acked:,} spans, {logged_mb():.0f} MB waiting in the log; over the last "
              f"{logged:.0f} MB the collector's RSS went {before:.0f} -> {before + grown:.0f} MB")
        assert logged > 20
        assert grown < logged / 2, f"RSS grew {grown:.0f} MB for {logged:.0f} MB logged: the queue is in memory"
        store_proc = start_store(settings, tmp_path / "store.log")
        wait_until(lambda: drained(settings), 120, message="the log written")
        client = store.connect(settings, ensure_schema=False)
        assert client.query("SELECT count() FROM otel_traces").result_rows[0][0] == acked
    finally:
        stop_process(collector)
        stop_process(store_proc)
