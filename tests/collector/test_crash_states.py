"""Every crash state a POSIX file system allows, recovered: each acknowledged span stored once, rolled up once.

A run of the collector's log/checkpoint protocol (8 acknowledged requests, small segments so they rotate
and are deleted, batches inserted and committed) is recorded operation by operation (crash_states.py).
Each crash state is recovered by a fresh WriteAheadLog + SpanWriter, with ClickHouse holding exactly the
inserts it had taken before the crash. The store in the exhaustive pass is a model of ClickHouse's insert
deduplication (a token seen before is dropped, whatever the rows); a sample of the states whose recovery
re-sends a batch that had landed is then recovered against the real embedded store, rollups included.
"""

from __future__ import annotations

import collections
import shutil
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.collector.crash_states import CrashState, Op, RecordingOps, crash_states
from tests.collector.otlp import T0, request, span
from tracetune import store
from tracetune.collector.ingest import Ingest
from tracetune.collector.rows import COLUMNS
from tracetune.collector.wal import WriteAheadLog
from tracetune.collector.writer import INSERT_SETTINGS, SpanWriter

SPAN_ID = COLUMNS.index("SpanId")
REQUESTS, SPANS, SENDERS = 16, 5, 2



class ModelStore:
    """ClickHouse's insert deduplication as a client: per table, an insert whose token was seen is dropped."""

    def __init__(self, ops: RecordingOps | None = None, taken: list[Op] = ()):
        self.ops = ops
        self.tokens: dict[str, set[str]] = collections.defaultdict(set)
        self.span_ids: collections.Counter[str] = collections.Counter()
        self.dropped = 0  # inserts dropped as already taken (a batch re-sent after a crash)
        for op in taken:
            self._take(*op.args)

    def _take(self, table: str, token: str, ids: tuple[str, ...]) -> None:
        if token in self.tokens[table]:
            self.dropped += 1
            return
        self.tokens[table].add(token)
        if table == "otel_traces":
            self.span_ids.update(ids)

    def _insert(self, table: str, ids: tuple[str, ...], settings: dict) -> None:
        token = settings["insert_deduplication_token"]
        if self.ops is None:
            self._take(table, token, ids)
            return
        with self.ops.lock:  # the insert and its mark are one step of the trace
            self._take(table, token, ids)
            self.ops.mark("insert", table, token, ids)

    def insert(self, table, data, column_names=None, settings=None):
        ids = tuple(row[SPAN_ID] for row in data) if table == "otel_traces" else ()
        self._insert(table, ids, settings)

    recorded: dict[str, pa.Table] = {}  # token -> the Arrow table a recorded run inserted

    def insert_arrow(self, table, data: pa.Table, settings=None):
        if self.ops is not None:
            ModelStore.recorded[settings["insert_deduplication_token"]] = data
        self._insert(table, tuple(data.column("SpanId").to_pylist()), settings)


def pipeline_request(n: int):
    spans = [span(f"task-{i}", T0 + i * 1000, attributes=[
        KeyValue(key="tracetune.pipeline", value=AnyValue(string_value="crash"))]) for i in range(n)]
    return request(spans), frozenset(s.span_id.hex() for s in spans)


def record_run(root: Path, ops: RecordingOps) -> list[Op]:
    """The protocol as the collector runs it, recorded: exports from two senders (group commit), batches,
    commits, segment rotation and deletion."""
    wal = WriteAheadLog(root, segment_bytes=1500, ops=ops)
    model = ModelStore(ops)
    writer = SpanWriter(lambda: model, wal, batch_rows=2 * SPANS, flush_seconds=0.01)
    ingest = Ingest(wal, writer)
    ingest.replay()
    writer.start()

    def send(pause: float) -> None:
        for _ in range(REQUESTS // SENDERS):
            r, ids = pipeline_request(SPANS)
            ingest.export(r)
            ops.mark("ack", ids)
            time.sleep(pause)

    # Concurrent appends share fsyncs; one sender paced past the flush interval, so batches differ in size
    # and a batch re-sent after a crash must be the same batch (its checkpointed range), not a regrouping.
    senders = [threading.Thread(target=send, args=(pause,)) for pause in (0.0, 0.03)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(30)
    assert writer.flush(20)
    writer.stop()
    wal.close()
    return ops.trace


def recover(state: CrashState, trace: list[Op], directory: Path, client_factory=None) -> tuple[ModelStore | None, str]:
    """Recover one crash state; the model store afterwards (None with a real client) and '' or what went wrong."""
    state.materialize(directory)
    model = None
    if client_factory is None:
        model = ModelStore(taken=[op for op in trace[:state.at] if op.kind == "insert"])
        client_factory = lambda: model
    try:
        wal = WriteAheadLog(directory)
    except Exception as exc:  # noqa: BLE001 - a state recovery cannot open is a failure to report
        return model, f"recovery refused to open the log: {exc}"
    writer = SpanWriter(client_factory, wal, batch_rows=2 * SPANS, flush_seconds=0.01)
    Ingest(wal, writer).replay()
    writer.start()
    ok = writer.flush(20)
    writer.stop(5)
    wal.close()
    return model, "" if ok else "recovery did not drain"


def check(model: ModelStore, trace: list[Op], at: int) -> str:
    acked = set().union(*(op.args[0] for op in trace[:at] if op.kind == "ack"))
    missing = [i for i in acked if model.span_ids[i] == 0]
    twice = [i for i, n in model.span_ids.items() if n > 1]
    if missing or twice:
        return f"{len(missing)} acknowledged spans missing, {len(twice)} stored twice"
    return ""


def explore(tmp_path: Path, ops: RecordingOps, stop_after: int = 0
            ) -> tuple[int, list[str], list[Op], list[CrashState]]:
    """Recover every crash state of a recorded run: (states tried, failures, trace, states that re-send a batch)."""
    trace = record_run(tmp_path / "run", ops)
    failures: list[str] = []
    resent: list[CrashState] = []
    tried = 0
    for state in crash_states(trace):
        tried += 1
        directory = tmp_path / "state"
        model, problem = recover(state, trace, directory)
        shutil.rmtree(directory)
        problem = problem or check(model, trace, state.at)
        if model is not None and model.dropped:
            resent.append(state)
        if problem:
            failures.append(f"{state.how}: {problem}")
            if len(failures) == stop_after:
                break
    return tried, failures, trace, resent


def test_every_crash_state_recovers_each_acknowledged_span_once(tmp_path):
    tried, failures, trace, resent = explore(tmp_path, RecordingOps(tmp_path / "run"))
    kinds = collections.Counter(op.kind for op in trace)
    print(f"\ncrash states: {tried} tried, {len(failures)} failed ({len(resent)} re-send a batch that had landed); "
          f"trace of {len(trace)} operations {dict(kinds)}")
    assert kinds["ack"] == REQUESTS and kinds["insert"] >= 3 and kinds["rename"] >= 1 and kinds["unlink"] >= 1
    assert tried > 100
    assert not failures, "\n".join(failures[:20])


class NoDirectoryFsync(RecordingOps):
    """The log without its directory fsyncs: what the explorer must catch."""

    def fsync_dir(self, path):
        pass


def test_the_explorer_finds_the_loss_when_the_directory_is_not_fsynced(tmp_path):
    tried, failures, _, _ = explore(tmp_path, NoDirectoryFsync(tmp_path / "run"), stop_after=3)
    print(f"\nwithout directory fsyncs: the first failures among {tried} crash states:\n" + "\n".join(failures))
    assert failures and any("missing" in f for f in failures)


def test_crash_states_that_resend_a_landed_batch_are_rolled_up_once_in_the_real_store(store_settings, tmp_path):
    """The model's verdict, checked against ClickHouse itself (tokens, materialized views) on a sample of states
    where a batch had landed before the crash and recovery sends it again."""
    ops = RecordingOps(tmp_path / "run")
    trace = record_run(tmp_path / "run", ops)
    sample = []
    for state in crash_states(trace):
        model, problem = recover(state, trace, tmp_path / "probe")
        shutil.rmtree(tmp_path / "probe")
        if not problem and model.dropped:  # recovery re-sent a batch ClickHouse had taken
            sample.append(state)
    sample = sample[:: max(1, len(sample) // 4)][:4]
    assert sample
    for state in sample:
        settings = store_settings.replace(database=f"t_{uuid.uuid4().hex[:12]}")
        client = store.connect(settings)
        for op in trace[:state.at]:  # what ClickHouse had taken before the crash, with the same tokens
            if op.kind == "insert" and op.args[0] == "otel_traces":
                client.insert_arrow("otel_traces", ModelStore.recorded[op.args[1]],
                                    settings={"insert_deduplication_token": op.args[1], **INSERT_SETTINGS})
        _, problem = recover(state, trace, tmp_path / f"real-{state.at}",
                             client_factory=lambda s=settings: store.connect(s, ensure_schema=False))
        assert not problem, problem
        acked = set().union(*(op.args[0] for op in trace[:state.at] if op.kind == "ack"))
        stored = [r[0] for r in client.query("SELECT SpanId FROM otel_traces").result_rows]
        assert len(stored) == len(set(stored)) and acked <= set(stored), state.how
        rollup = client.query("SELECT sum(requests) FROM tracetune_spans_1m WHERE pipeline = 'crash'").result_rows
        assert rollup[0][0] == len(stored), f"{state.how}: rollup {rollup[0][0]} for {len(stored)} spans"
    print(f"\nreal store: {len(sample)} crash states re-sending a landed batch, each stored and rolled up once")
