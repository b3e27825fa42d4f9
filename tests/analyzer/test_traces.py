"""Self time and critical path on hand-built traces, and the per-step breakdown over stored spans."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.spans import COLUMNS, span_row
from tracetune.analyzer.traces import (
    ROOT_STEP,
    SpanRecord,
    StepTime,
    critical_path,
    self_times,
    step_breakdown,
    step_times,
)


def rec(span_id: str, parent: str, start: int, end: int, step: str = "") -> SpanRecord:
    return SpanRecord(span_id, parent, start, end, step or span_id, step)


def on_path(spans, root_id=None) -> dict[str, int]:
    totals: dict[str, int] = {}
    for span_id, start, end in critical_path(spans, root_id):
        totals[span_id] = totals.get(span_id, 0) + end - start
    return totals


def shares(spans) -> dict[str, float]:
    return {t.step: t.share for t in step_times(spans)}


def assert_tiles(segments, start: int, end: int) -> None:
    assert segments[0][1] == start and segments[-1][2] == end
    assert all(a[2] == b[1] for a, b in zip(segments, segments[1:], strict=False))


def test_sequential_steps_with_gaps_in_which_nothing_runs():
    spans = [rec("R", "", 0, 100), rec("A", "R", 5, 30, "embed"), rec("B", "R", 30, 80, "classify"),
             rec("C", "R", 90, 100, "respond")]
    assert self_times(spans) == {"R": 15, "A": 25, "B": 50, "C": 10}
    path = critical_path(spans)
    assert path == [("R", 0, 5), ("A", 5, 30), ("B", 30, 80), ("R", 80, 90), ("C", 90, 100)]
    assert shares(spans) == {ROOT_STEP: 0.15, "embed": 0.25, "classify": 0.5, "respond": 0.1}


def test_parallel_overlapping_children():
    # A and B overlap, C runs inside both: the union counts once, and only B is on the path (A and C
    # ended after B started, so they did not hold it up).
    spans = [rec("R", "", 0, 100), rec("A", "R", 0, 60, "a"), rec("B", "R", 10, 90, "b"), rec("C", "R", 20, 50, "c")]
    assert self_times(spans)["R"] == 10
    assert on_path(spans) == {"R": 20, "B": 80}
    assert shares(spans) == {ROOT_STEP: 0.2, "a": 0.0, "b": 0.8, "c": 0.0}


def test_fan_out_then_join_follows_the_slowest_branch():
    spans = [rec("R", "", 0, 100), rec("A", "R", 0, 40, "fast"), rec("B", "R", 0, 70, "slow"),
             rec("C", "R", 70, 100, "merge")]
    assert on_path(spans) == {"B": 70, "C": 30}
    assert self_times(spans)["R"] == 0
    assert shares(spans)["fast"] == 0 and shares(spans)["slow"] == 0.7


def test_nested_children_count_toward_their_step():
    # An LLM step whose HTTP call (and that call's own child) run inside it.
    spans = [rec("R", "", 0, 100), rec("L", "R", 10, 90, "respond"), rec("H", "L", 20, 80),
             rec("H2", "H", 30, 40), rec("P", "R", 90, 100, "notify")]
    assert self_times(spans) == {"R": 10, "L": 20, "H": 50, "H2": 10, "P": 10}
    assert on_path(spans) == {"R": 10, "L": 20, "H": 50, "H2": 10, "P": 10}
    times = {t.step: t for t in step_times(spans)}
    assert times["respond"].self_ns == 20 and times["respond"].critical_ns == 80 and times["respond"].share == 0.8
    assert times[ROOT_STEP].critical_ns == 10 and times["notify"].share == 0.1
    assert set(times) == {ROOT_STEP, "respond", "notify"}  # H and H2 are not steps


def test_a_child_that_outlives_its_parent_is_clipped():
    # X runs past the end of step A; step B runs past the end of the root.
    spans = [rec("R", "", 0, 100), rec("A", "R", 0, 50, "a"), rec("X", "A", 40, 70), rec("B", "R", 60, 120, "b")]
    assert self_times(spans) == {"R": 10, "A": 40, "X": 30, "B": 60}
    path = critical_path(spans)
    assert path == [("A", 0, 40), ("X", 40, 50), ("R", 50, 60), ("B", 60, 100)]
    times = {t.step: t for t in step_times(spans)}
    assert times["a"].critical_ns == 50 and times["b"].critical_ns == 40 and times[ROOT_STEP].critical_ns == 10


def test_a_child_starting_before_its_parent_and_empty_spans():
    spans = [rec("R", "", 10, 50), rec("A", "R", 0, 20, "early"), rec("Z", "R", 30, 30, "instant"),
             rec("O", "missing", 0, 5, "orphan")]
    assert self_times(spans)["R"] == 30 and self_times(spans)["Z"] == 0
    assert critical_path(spans) == [("A", 10, 20), ("R", 20, 50)]
    assert shares(spans) == {ROOT_STEP: 0.75, "early": 0.25, "instant": 0.0, "orphan": 0.0}


def test_a_root_with_no_children_and_plain_tuples():
    assert critical_path([("R", "", 0, 10, "root", "")]) == [("R", 0, 10)]
    assert step_times([("R", "", 0, 10, "root", "")]) == [StepTime("R", ROOT_STEP, 10, 10, 10, 1.0)]
    with pytest.raises(ValueError, match="not among the spans"):
        critical_path([rec("R", "", 0, 10)], root_id="nope")


def test_random_traces_tile_the_root_and_self_time_matches_a_brute_force_count():
    rng = np.random.default_rng(7)
    for _ in range(200):
        spans = [rec("s0", "", 0, 60)]
        for i in range(1, int(rng.integers(1, 12))):
            parent = spans[int(rng.integers(0, len(spans)))]
            start = int(rng.integers(parent.start_ns - 5, parent.end_ns + 1))
            end = start + int(rng.integers(0, 40))
            spans.append(rec(f"s{i}", parent.span_id, start, end, f"step{i}" if rng.random() < 0.6 else ""))
        segments = critical_path(spans)
        assert_tiles(segments, 0, 60)
        assert sum(t.share for t in step_times(spans)) == pytest.approx(1.0)
        selfs = self_times(spans)
        for span in spans:
            children = [c for c in spans if c.parent_id == span.span_id]
            busy = sum(1 for t in range(span.start_ns, span.end_ns)
                       if any(c.start_ns <= t < c.end_ns for c in children))
            assert selfs[span.span_id] == (span.end_ns - span.start_ns) - busy
        # Every segment lies inside its own span.
        index = {s.span_id: s for s in spans}
        assert all(index[sid].start_ns <= a and b <= index[sid].end_ns for sid, a, b in segments)


def stored(trace: str, span_id: str, parent: str, start_ms: float, end_ms: float, base: int, attrs: dict) -> list:
    return span_row(base + int(start_ms * 1e6), trace_id=trace, span_id=span_id, parent=parent,
                    name=attrs.get("tracetune.step", "x"), attrs=attrs, duration=int((end_ms - start_ms) * 1e6))


def test_step_breakdown_over_stored_traces(client):
    """Three requests with a 50 ms respond step and one with 400 ms: respond dominates, most of all in the tail."""
    now = time.time_ns() - 30 * 10**9
    rows = []
    for k, respond_ms in enumerate((50, 50, 50, 400)):
        trace, base = f"trace{k}", now + k * 10**9
        end = 40 + respond_ms
        rows += [
            stored(trace, f"{trace}-R", "", 0, end + 10, base, {"tracetune.pipeline": "triage"}),
            stored(trace, f"{trace}-e", f"{trace}-R", 0, 10, base, {"tracetune.pipeline": "triage",
                                                                     "tracetune.step": "embed"}),
            stored(trace, f"{trace}-c", f"{trace}-R", 10, 40, base, {"tracetune.pipeline": "triage",
                                                                      "tracetune.step": "classify"}),
            stored(trace, f"{trace}-r", f"{trace}-R", 40, end, base, {"tracetune.pipeline": "triage",
                                                                       "tracetune.step": "respond"}),
        ]
    rows.append(stored("trace0", "trace0-io", "trace0-c", 15, 35, now, {}))  # classify's own child, in one trace
    rows.append(stored("other", "other-R", "", 0, 5, now, {"tracetune.pipeline": "search"}))
    rows.append(stored("batch", "batch-1", "", 0, 5, now, {"tracetune.batch_size": "4"}))  # not a request
    client.insert("otel_traces", rows, column_names=COLUMNS)

    frame = step_breakdown(client, "5m", pipeline="triage")
    assert frame["step"].to_list() == ["respond", "classify", ROOT_STEP, "embed"]  # by share, then name
    rows_by_step = {row["step"]: row for row in frame.iter_rows(named=True)}
    total_ms = 3 * 100 + 450
    respond, classify = rows_by_step["respond"], rows_by_step["classify"]
    assert respond["spans"] == 4 and respond["traces"] == 4 and respond["sampled_traces"] == 4
    assert respond["mean_self_ms"] == pytest.approx(137.5) and respond["mean_critical_ms"] == pytest.approx(137.5)
    assert respond["critical_share"] == pytest.approx(550 / total_ms)
    assert respond["tail_share"] == pytest.approx(400 / 450)
    assert classify["mean_self_ms"] == pytest.approx((10 + 30 * 3) / 4)  # the child is not classify's self time
    assert classify["mean_critical_ms"] == pytest.approx(30)  # but it is classify's latency
    assert rows_by_step[ROOT_STEP]["mean_critical_ms"] == pytest.approx(10)
    assert frame["critical_share"].sum() == pytest.approx(1.0) and frame["tail_share"].sum() == pytest.approx(1.0)
    assert frame["mean_critical_ms"].sum() == pytest.approx(total_ms / 4)  # the mean request latency

    assert set(step_breakdown(client, "5m")["pipeline"]) == {"triage", "search"}
    assert step_breakdown(client, "5m", pipeline="triage", max_traces=2)["sampled_traces"].max() == 2
    empty = step_breakdown(client, "5m", pipeline="nothing")
    assert empty.is_empty() and "critical_share" in empty.columns
