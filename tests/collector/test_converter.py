"""The conversion process: the same table as in process, and a child that dies or hangs costs only its batch's speed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.collector.otlp import request, span
from tests.collector.test_edges import fill_disk, small_disk  # noqa: F401 - small_disk: the fixture
from tracetune import store
from tracetune.collector import writer
from tracetune.collector.converter import ConversionProcess
from tracetune.collector.writer import ArrowFile


def _bodies(n: int = 30, spans: int = 40) -> tuple[list[bytes], list[int]]:
    bodies = []
    for i in range(n):
        batch = [span(f"op-{i}-{j}", attributes=[KeyValue(key="i", value=AnyValue(int_value=j)),
                                                 KeyValue(key="d", value=AnyValue(double_value=j / 3)),
                                                 KeyValue(key="s", value=AnyValue(string_value="é" * j))])
                 for j in range(spans)]
        bodies.append(request(batch, service=f"svc-{i % 3}").SerializeToString())
    return bodies, [spans] * n


@pytest.fixture
def conversion():
    process = ConversionProcess(timeout=30.0)
    yield process
    process.close()


def _table(part):
    """The table of what convert gave: the child's Arrow IPC file, or a table converted in process."""
    return part.table() if isinstance(part, ArrowFile) else part


def _pid(process: ConversionProcess) -> int:
    assert process._proc is not None and process._proc.poll() is None, "no child running"
    return process._proc.pid


def test_the_child_gives_the_table_the_writer_makes_in_process(conversion):
    bodies, spans = _bodies()
    expected = writer._to_arrow_in_chunks(bodies, spans)
    part = conversion.convert(bodies, spans)
    assert conversion.fallbacks == 0 and _pid(conversion) != os.getpid()
    assert isinstance(part, ArrowFile) and len(part) == sum(spans)
    assert part.table().equals(expected)  # same schema (map and list types included), same values, same order
    assert os.listdir(conversion._directory) == []  # nothing left in the memory file system


def test_a_batch_for_the_reference_converter_comes_back_as_none(conversion):
    bodies, spans = _bodies(3, 2)
    bad = request([span("zero ids", trace_id=bytes(16))]).SerializeToString()
    assert writer._to_arrow_in_chunks([*bodies, bad], [*spans, 1]) is None
    assert conversion.convert([*bodies, bad], [*spans, 1]) is None
    assert conversion.fallbacks == 0  # the child's answer, not a failure


def test_a_killed_child_costs_one_batch_in_process_then_a_new_child_takes_over(conversion, monkeypatch):
    bodies, spans = _bodies(8, 10)
    expected = writer._to_arrow_in_chunks(bodies, spans)
    assert isinstance(conversion.convert(bodies, spans), ArrowFile)
    first = _pid(conversion)
    os.kill(first, signal.SIGKILL)
    time.sleep(0.2)
    assert conversion.convert(bodies, spans).equals(expected)  # converted in process: a table, the same one
    assert conversion.fallbacks == 1
    monkeypatch.setattr(ConversionProcess, "RESTART_SECONDS", 0.0)
    conversion._next_start = 0.0
    assert _table(conversion.convert(bodies, spans)).equals(expected)
    assert conversion.fallbacks == 1 and _pid(conversion) != first


def test_a_hung_child_is_killed_after_the_timeout_and_the_batch_converted_in_process():
    conversion = ConversionProcess(timeout=1.0)
    try:
        assert conversion.start(wait=60)  # its imports are not part of the 1 s (a busy machine takes longer)
        bodies, spans = _bodies(4, 5)
        expected = writer._to_arrow_in_chunks(bodies, spans)
        assert isinstance(conversion.convert(bodies, spans), ArrowFile)
        hung = conversion._proc
        os.kill(hung.pid, signal.SIGSTOP)
        started = time.monotonic()
        assert conversion.convert(bodies, spans).equals(expected)
        assert conversion.fallbacks == 1 and time.monotonic() - started >= 1.0
        assert hung.poll() is not None  # killed and reaped, not left stopped
    finally:
        conversion.close()


def test_signals_for_the_collector_leave_the_child_to_finish_its_work(conversion):
    """SIGINT/SIGTERM to the process group: the collector drains its queue at stop, the child still converts."""
    bodies, spans = _bodies(4, 5)
    assert conversion.convert(bodies, spans) is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        os.kill(_pid(conversion), signum)
    time.sleep(0.3)
    assert conversion.convert(bodies, spans) is not None and conversion.fallbacks == 0


def test_close_stops_the_child_and_removes_its_folder():
    conversion = ConversionProcess()
    bodies, spans = _bodies(2, 2)
    assert conversion.convert(bodies, spans) is not None
    child = conversion._proc
    conversion.close()
    assert child.poll() is not None and not conversion._directory.exists()


def test_start_waits_until_the_child_is_ready():
    conversion = ConversionProcess()
    try:
        assert conversion.start(wait=60.0) and conversion._ready and _pid(conversion)
        bodies, spans = _bodies(2, 2)
        assert conversion.convert(bodies, spans) is not None and conversion.fallbacks == 0
    finally:
        conversion.close()


def test_a_child_whose_parent_is_gone_removes_the_folder():
    """stdin closes when the collector dies: the child leaves nothing in the memory file system."""
    conversion = ConversionProcess()
    try:
        assert conversion.start(wait=60.0)
        child = conversion._proc
        child.stdin.close()  # what the collector's death does to the pipe
        child.wait(30)
        assert not conversion._directory.exists()
    finally:
        conversion.close()


def test_folders_of_killed_collectors_are_removed_at_the_next_start(tmp_path, monkeypatch):
    import subprocess

    from tracetune.collector import converter

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f"tracetune-convert-{gone.pid}-abc"
    live = tmp_path / f"tracetune-convert-{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "1.bodies").write_bytes(b"x")
    monkeypatch.setattr(converter, "_MEMORY_DIRS", (str(tmp_path),))
    conversion = ConversionProcess()
    try:
        assert not stale.exists() and live.exists() and conversion._directory.parent == tmp_path
    finally:
        conversion.close()


# ---- the writer with a conversion process, against the real store --------------------------------------
@pytest.fixture
def ingest_with_child(db_settings, tmp_path):
    from tests.collector.test_receiver import start_ingest, stop_ingest

    conversion = ConversionProcess()
    ingest = start_ingest(db_settings, tmp_path / "wal", batch_rows=10_000, flush_seconds=0.2,
                          to_arrow=conversion.convert)
    yield ingest, store.connect(db_settings, ensure_schema=False), conversion
    stop_ingest(ingest)
    conversion.close()


def test_the_childs_file_is_inserted_as_it_is_and_every_span_lands_once(ingest_with_child, caplog):
    ingest, client, conversion = ingest_with_child
    caplog.set_level("WARNING", "tracetune.collector")
    sent = [request([span(f"op-{i}-{j}", attributes=[KeyValue(key="j", value=AnyValue(int_value=j))])
                     for j in range(50)]) for i in range(20)]
    for each in sent:
        assert ingest.export(each).accepted_spans == 50
    assert ingest.writer.flush(60) and conversion.fallbacks == 0
    assert not [r for r in caplog.records if "refused" in r.getMessage()]  # whole, not split after a refusal
    stored = client.query("SELECT SpanName, SpanAttributes['j'], ServiceName FROM otel_traces "
                          "ORDER BY SpanName").result_rows
    assert stored == sorted((f"op-{i}-{j}", str(j), "test-svc") for i in range(20) for j in range(50))


def test_a_file_the_store_refuses_is_split_and_every_span_still_lands(ingest_with_child):
    """101 dates in one insert: more partitions than the store takes at once, so the part is split in halves."""
    ingest, client, conversion = ingest_with_child
    day = 86_400 * 10**9
    ingest.export(request([span(f"d{i}", start=1_700_000_000 * 10**9 + i * day) for i in range(101)]))
    assert ingest.writer.flush(60) and conversion.fallbacks == 0
    assert client.query("SELECT count(), uniqExact(SpanName) FROM otel_traces").result_rows == [(101, 101)]
    assert client.query("SELECT count() FROM tracetune_quarantine").result_rows == [(0,)]


def test_a_small_memory_file_system_is_passed_over_for_the_temporary_folder(monkeypatch):
    """A container's /dev/shm of 64 MiB could not hold a large batch's files: the system's temporary folder then."""
    import tempfile

    from tracetune.collector import converter

    monkeypatch.setattr(converter, "_MEMORY_DIR_MIN_FREE", 1 << 62)
    conversion = ConversionProcess()
    try:
        assert conversion._directory.parent == Path(tempfile.gettempdir())
        bodies, spans = _bodies(2, 2)
        assert isinstance(conversion.convert(bodies, spans), ArrowFile) and conversion.fallbacks == 0
    finally:
        conversion.close()


def test_a_refused_file_that_cannot_be_read_back_is_converted_again_and_every_span_lands(db_settings, tmp_path,
                                                                                         caplog):
    """A file damaged after the child wrote it: the store refuses it, it cannot be read back to be split, so the
    writer converts the batch again from the log in its own process; the batch is not held behind it."""
    from tests.collector.test_receiver import start_ingest, stop_ingest
    from tracetune.collector.writer import ArrowFile

    conversion = ConversionProcess()

    def damaged(bodies: list[bytes], spans: list[int]):
        made = conversion.convert(bodies, spans)
        assert isinstance(made, ArrowFile)
        return ArrowFile(b"\0" * len(made.body), made.rows)

    caplog.set_level("ERROR", "tracetune.collector")
    ingest = start_ingest(db_settings, tmp_path / "wal", batch_rows=10_000, flush_seconds=0.2, to_arrow=damaged)
    try:
        client = store.connect(db_settings, ensure_schema=False)
        for i in range(3):
            assert ingest.export(request([span(f"op-{i}-{j}") for j in range(40)])).accepted_spans == 40
        assert ingest.writer.flush(60)
        assert client.query("SELECT count(), uniqExact(SpanName) FROM otel_traces").result_rows == [(120, 120)]
        assert client.query("SELECT count() FROM tracetune_quarantine").result_rows == [(0,)]
        assert any("cannot be read back" in r.getMessage() for r in caplog.records)
    finally:
        stop_ingest(ingest)
        conversion.close()


def test_a_full_scratch_folder_costs_its_batch_an_in_process_conversion(small_disk, monkeypatch):  # noqa: F811
    """The memory file system the bodies go through has no room (a 4 MiB tmpfs, filled): that batch is converted in
    the collector, the same table; once there is room, a new child converts again."""
    from tracetune.collector import converter

    monkeypatch.setattr(converter, "_MEMORY_DIRS", (str(small_disk),))
    monkeypatch.setattr(converter, "_MEMORY_DIR_MIN_FREE", 0)
    monkeypatch.setattr(ConversionProcess, "RESTART_SECONDS", 0.0)
    conversion = ConversionProcess(timeout=30.0)
    try:
        assert conversion._directory.parent == small_disk and conversion.start(wait=60)
        bodies, spans = _bodies(30, 40)
        expected = writer._to_arrow_in_chunks(bodies, spans)
        filler = fill_disk(small_disk)
        assert conversion.convert(bodies, spans).equals(expected)  # a table converted in process
        assert conversion.fallbacks == 1
        filler.unlink()
        assert _table(conversion.convert(bodies, spans)).equals(expected)
        assert conversion.fallbacks == 1  # the child's file again
    finally:
        conversion.close()
