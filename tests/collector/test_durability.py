"""An acknowledgement is a promise: real collector and store processes killed mid-stream lose and double nothing."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import httpx
import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.collector.otlp import T0, batch, request, span
from tests.conftest import make_settings
from tests.servers import start_process, stop_process, wait_until
from tracetune import store
from tracetune.collector.ingest import Ingest
from tracetune.collector.wal import WriteAheadLog
from tracetune.collector.writer import SpanWriter

PB = {"content-type": "application/x-protobuf"}


def start_collector(settings, log):
    proc = start_process(["collector"], settings, log)

    def ready():
        if proc.poll() is not None:
            raise AssertionError(log.read_text()[-3000:])
        try:
            return httpx.get(f"{settings.collector_url}/health", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    wait_until(ready, 60, message="collector /health")
    return proc


def start_store(settings, log):
    proc = start_process(["store"], settings, log)
    store.wait_ready(settings, 60)
    return proc


def own_store_and_collector(tmp_path):
    """Settings in a fresh home, with its own store process (so the test may stop it) and collector."""
    settings = make_settings(tmp_path / "home", collector_flush_seconds=0.2)
    store_proc = start_store(settings, tmp_path / "store.log")
    return settings, store_proc, start_collector(settings, tmp_path / "c1.log")


class Sender:
    """Posts 100-span requests until stopped; remembers the span ids of every acknowledged request."""

    def __init__(self, settings):
        self.url = f"{settings.collector_url}/v1/traces"
        self.headers = {**PB, "authorization": f"Bearer {settings.secret('collector')}"}
        self.acked: set[str] = set()
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                request, ids = batch(100)
                try:
                    r = http.post(self.url, content=request.SerializeToString(), headers=self.headers)
                except httpx.HTTPError:
                    self.refused += 1
                    self._stop.wait(0.05)
                    continue
                if r.status_code == 200:
                    self.acked |= ids
                else:
                    self.refused += 1
                    self._stop.wait(0.05)

    def __enter__(self) -> Sender:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(20)


def stored_ids(client) -> tuple[set[str], int]:
    rows = client.query("SELECT SpanId FROM otel_traces").result_rows
    return {r[0] for r in rows}, len(rows)


def assert_exactly_once(client, acked: set[str]) -> None:
    ids, total = stored_ids(client)
    assert total == len(ids), f"{total - len(ids)} spans stored twice"
    missing = acked - ids
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged spans are missing"


def drained(settings) -> bool:
    try:
        return httpx.get(f"{settings.collector_url}/health", timeout=2).json()["queued_rows"] == 0
    except httpx.HTTPError:
        return False


def test_sigkill_of_the_collector_mid_stream_loses_nothing_acknowledged(db_settings, tmp_path):
    settings = db_settings.replace(home=tmp_path / "home", collector_flush_seconds=0.2)
    proc = start_collector(settings, tmp_path / "c1.log")
    with Sender(settings) as sender:
        wait_until(lambda: len(sender.acked) >= 5000, 60, message="5000 acknowledged spans")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    proc = start_collector(settings, tmp_path / "c2.log")
    try:
        wait_until(lambda: drained(settings), 60, message="the replayed log written")
        assert_exactly_once(store.connect(settings, ensure_schema=False), sender.acked)
    finally:
        stop_process(proc)


def test_sigkill_of_the_collector_while_the_store_is_down_loses_nothing_acknowledged(tmp_path):
    settings, store_proc, collector = own_store_and_collector(tmp_path)
    try:
        with Sender(settings) as sender:
            wait_until(lambda: len(sender.acked) >= 2000, 60, message="2000 acknowledged spans")
            os.killpg(store_proc.pid, signal.SIGKILL)  # the store dies ...
            store_proc.wait(10)
            acked_before = len(sender.acked)
            wait_until(lambda: len(sender.acked) >= acked_before + 3000, 60,
                       message="spans acknowledged while the store is down")
            os.kill(collector.pid, signal.SIGKILL)  # ... then the collector, with spans only in its log
            collector.wait(10)
        store_proc = start_store(settings, tmp_path / "store.log")
        collector = start_collector(settings, tmp_path / "c2.log")
        wait_until(lambda: drained(settings), 90, message="the replayed log written")
        assert_exactly_once(store.connect(settings, ensure_schema=False), sender.acked)
    finally:
        stop_process(collector)
        stop_process(store_proc)


def test_sigterm_while_the_store_is_down_keeps_everything_for_the_next_start(tmp_path):
    settings = make_settings(tmp_path / "home", collector_flush_seconds=0.2)
    store_proc = start_store(settings, tmp_path / "store.log")
    store.connect(settings)
    stop_process(store_proc)  # schema made, store gone
    collector = start_process(["collector"], settings.replace(), tmp_path / "c1.log")
    try:
        # The collector waits for the store at start; bring it up, take spans, then take it down again.
        store_proc = start_process(["store"], settings, tmp_path / "store.log")
        wait_until(lambda: drained(settings), 60, message="collector up")
        stop_process(store_proc)
        request, ids = batch(500)
        r = httpx.post(f"{settings.collector_url}/v1/traces", content=request.SerializeToString(),
                       headers={**PB, "authorization": f"Bearer {settings.secret('collector')}"})
        assert r.status_code == 200
        stop_process(collector, timeout=60)  # SIGTERM: it tries for a while, then exits, keeping the log
        assert collector.returncode == 0
        store_proc = start_store(settings, tmp_path / "store.log")
        collector = start_collector(settings, tmp_path / "c2.log")
        wait_until(lambda: drained(settings), 60, message="the replayed log written")
        assert_exactly_once(store.connect(settings, ensure_schema=False), ids)
    finally:
        stop_process(collector)
        stop_process(store_proc)


class DiesAfterInsert:
    """A ClickHouse client whose first insert into otel_traces lands, after which the process "dies": the call
    never returns, so the writer never commits the batch. `fresh_tokens` replaces every dedup token with a new
    one (the control: without deduplication the retried batch must be counted twice)."""

    def __init__(self, client, fresh_tokens: bool = False, die: bool = True):
        self.client, self.fresh_tokens, self.die = client, fresh_tokens, die
        self.landed, self.dead = threading.Event(), threading.Event()

    def _settings(self, settings: dict) -> dict:
        return {**settings, "insert_deduplication_token": uuid.uuid4().hex} if self.fresh_tokens else settings

    def insert(self, table, data, settings, **kwargs):
        self.client.insert(table, data, settings=self._settings(settings), **kwargs)
        self._die(table)

    def insert_arrow(self, table, data, settings):
        self.client.insert_arrow(table, data, settings=self._settings(settings))
        self._die(table)

    def _die(self, table: str) -> None:
        if self.die and table == "otel_traces" and not self.landed.is_set():
            self.landed.set()
            self.dead.wait(60)
            raise ConnectionError("the process is gone")


def pipeline_batch(n: int) -> tuple:
    """n root spans of pipeline `dedup`, which the rollup view counts (kind 'root')."""
    spans = [span(f"task-{i}", T0 + i * 1000, attributes=[
        KeyValue(key="tracetune.pipeline", value=AnyValue(string_value="dedup"))]) for i in range(n)]
    return request(spans), {s.span_id.hex() for s in spans}


@pytest.mark.parametrize("fresh_tokens", [False, True], ids=["with-dedup", "control-without-dedup"])
def test_a_batch_inserted_just_before_a_crash_is_stored_and_rolled_up_once(db_settings, tmp_path, fresh_tokens):
    """The crash falls between ClickHouse taking the insert and the checkpoint saying so; the restart re-sends
    the same batch with the same token. The control run, with a new token per insert, counts it twice."""
    client = store.connect(db_settings, ensure_schema=False)
    dying = DiesAfterInsert(store.connect(db_settings, ensure_schema=False), fresh_tokens)
    wal = WriteAheadLog(tmp_path / "wal")
    writer = SpanWriter(lambda: dying, wal, flush_seconds=0.05)
    ingest = Ingest(wal, writer)
    requests = [pipeline_batch(50) for _ in range(3)]
    for r, _ in requests:
        ingest.export(r)
    writer.start()
    assert dying.landed.wait(20)
    writer.stop(0.2)  # gives up: the batch is in ClickHouse, the log still says it is in flight
    wal.close()
    dying.dead.set()
    assert stored_ids(client)[1] == 150

    wal = WriteAheadLog(tmp_path / "wal")
    assert wal.intent is not None
    client_after = DiesAfterInsert(store.connect(db_settings, ensure_schema=False), fresh_tokens, die=False)
    writer = SpanWriter(lambda: client_after, wal, flush_seconds=0.05)
    Ingest(wal, writer).replay()
    writer.start()
    assert writer.flush(20)
    writer.stop()
    wal.close()
    rollup = client.query("SELECT sum(requests) FROM tracetune_spans_1m WHERE pipeline = 'dedup'").result_rows[0][0]
    if fresh_tokens:
        assert stored_ids(client)[1] == 300 and rollup == 300  # the test can fail: this is what it guards against
    else:
        assert_exactly_once(client, set().union(*(ids for _, ids in requests)))
        assert rollup == 150


@pytest.mark.parametrize("tail", [b"\x10\x00\x00\x00", b"TTw1" + b"\x00" * 40 + b"abc", b"\x00" * 4096])
def test_a_torn_record_at_the_end_of_the_log_is_cut_and_the_rest_replays(tmp_path, tail):
    wal = WriteAheadLog(tmp_path / "wal")
    lsns = [wal.append(f"record {i}".encode()) for i in range(3)]
    wal.close()
    segment = sorted((tmp_path / "wal").glob("seg-*.wal"))[0]
    size = segment.stat().st_size
    with open(segment, "ab") as handle:
        handle.write(tail)  # a write the crash interrupted (never acknowledged)
    wal = WriteAheadLog(tmp_path / "wal")
    assert [(r.lsn, r.payload) for r in wal.replay()] == [(lsn, f"record {i}".encode()) for i, lsn in enumerate(lsns)]
    assert segment.stat().st_size == size and not wal.damage  # cut, and not reported as damage
    assert wal.append(b"next") == lsns[-1] + 1
    wal.close()
    wal = WriteAheadLog(tmp_path / "wal")  # a later start does not take the cut tail for damage either
    assert not wal.damage and len(list(wal.replay())) == 4
    wal.close()


def test_a_second_collector_on_the_same_log_is_refused(tmp_path):
    from tracetune.collector.wal import WalError

    wal = WriteAheadLog(tmp_path / "wal")
    with pytest.raises(WalError, match="in use"):
        WriteAheadLog(tmp_path / "wal")
    wal.close()


def test_the_store_stopped_for_a_while_under_load_loses_and_doubles_nothing(tmp_path):
    settings, store_proc, collector = own_store_and_collector(tmp_path)
    try:
        with Sender(settings) as sender:
            wait_until(lambda: len(sender.acked) >= 2000, 60, message="2000 acknowledged spans")
            stop_process(store_proc)  # SIGTERM: the store is away for 10 s under load
            time.sleep(10)
            acked_during_outage = len(sender.acked)
            store_proc = start_store(settings, tmp_path / "store.log")
            wait_until(lambda: len(sender.acked) >= acked_during_outage + 2000, 60, message="traffic after")
        wait_until(lambda: drained(settings), 60, message="everything written")
        assert_exactly_once(store.connect(settings, ensure_schema=False), sender.acked)
        assert httpx.get(f"{settings.collector_url}/health").json()["insert_failures"] > 0  # it was really away
    finally:
        stop_process(collector)
        stop_process(store_proc)


def test_concurrent_appends_across_segment_rotations_all_replay(tmp_path):
    """Group commit and rotation together: many threads, tiny segments, every record back in order."""
    wal = WriteAheadLog(tmp_path / "wal", segment_bytes=4096)
    written: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(200):
            payload = f"{n}:{i}".encode() * 20
            lsn = wal.append(payload)
            with lock:
                written.append((lsn, payload))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wal.close()
    assert len(list((tmp_path / "wal").glob("seg-*.wal"))) > 10
    wal = WriteAheadLog(tmp_path / "wal")
    assert [(r.lsn, r.payload) for r in wal.replay()] == sorted(written)
    wal.close()


class AwayWhileSet:
    """A real store client whose span inserts fail as a lost connection would while `away` is set."""

    def __init__(self, client):
        self.client = client
        self.away = threading.Event()
        self.away.set()

    def insert(self, table, data, settings, **kwargs):
        self.client.insert(table, data, settings=settings, **kwargs)

    def insert_arrow(self, table, data, settings):
        if table == "otel_traces" and self.away.is_set():
            raise ConnectionError("the store is away")
        self.client.insert_arrow(table, data, settings=settings)


def test_bodies_kept_in_memory_are_the_logged_ones_within_their_bound_and_none_while_inserts_fail(
        db_settings, tmp_path, monkeypatch):
    """The writer takes a queued request from memory only up to HOLD_BYTES, and none from a failed insert on;
    the rest it reads back from the log. Either way each span is stored once, as the log holds it."""
    from tracetune.collector import writer as writer_module
    from tracetune.collector.writer import decode_record

    client = store.connect(db_settings, ensure_schema=False)
    requests = [batch(40)[0] for _ in range(6)]
    size = len(requests[0].SerializeToString())
    monkeypatch.setattr(writer_module, "HOLD_BYTES", 2 * size + size // 2)  # room for two bodies
    wal = WriteAheadLog(tmp_path / "wal")
    flaky = AwayWhileSet(store.connect(db_settings, ensure_schema=False))
    writer = SpanWriter(lambda: flaky, wal, flush_seconds=0.05)
    ingest = Ingest(wal, writer)
    reads = []
    read = wal.read
    monkeypatch.setattr(wal, "read", lambda location: reads.append(location) or read(location))
    for r in requests[:3]:
        ingest.export(r)
    queued = list(writer._queue)
    assert [e.request is not None for e in queued] == [True, True, False]
    for entry in queued[:2]:  # what memory holds is what the log holds
        assert entry.request == decode_record(read(entry.location))
    writer.start()
    wait_until(lambda: writer.insert_failures >= 1, 20, message="a failed insert")
    for r in requests[3:]:  # taken while the inserts fail: read back from the log
        ingest.export(r)
    assert all(e.request is None for e in writer._queue)
    flaky.away.clear()
    assert writer.flush(30)
    writer.stop()
    wal.close()
    assert len(reads) == 4 and writer._held_bytes == 0
    assert_exactly_once(client, {s.span_id.hex() for r in requests for s in r.resource_spans[0].scope_spans[0].spans})
    assert stored_ids(client)[1] == 240
