"""Where a request's time goes: self time and critical path per step, from the spans of its trace.

Self time is a span's duration minus the union of its children's intervals (children may overlap;
each is clipped to the parent). The critical path runs back from the root's end: at each point the
child that ends last at or before it is on the path, recursively, and time where no child is on
the path belongs to the parent itself. A child that ended after the current point overlapped a
later one without blocking it, so it is not on the path: shortening it would not shorten the
request. A step is charged the path time of its span and its non-step descendants.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import NamedTuple

import polars as pl

from tracetune.analyzer.stats import parse_window

__all__ = ["MAX_TRACES", "ROOT_STEP", "STEP_BREAKDOWN_COLUMNS", "SpanRecord", "StepTime", "critical_path",
           "self_times", "step_breakdown", "step_times"]

ROOT_STEP = "(root)"  # the root's own time: outside every step (dispatch, gaps in which nothing runs)
MAX_TRACES = 2000  # traces sampled per step_breakdown call, spread over the window by trace-id hash


class SpanRecord(NamedTuple):
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    name: str = ""
    step: str = ""  # `tracetune.step`, '' for spans that are not steps


class StepTime(NamedTuple):
    span_id: str
    step: str  # ROOT_STEP for the root span
    duration_ns: int
    self_ns: int
    critical_ns: int
    share: float  # critical_ns / root duration


def _records(spans: Iterable) -> dict[str, SpanRecord]:
    """Span id -> record (first one wins on a duplicate id); tuples are accepted as records."""
    index: dict[str, SpanRecord] = {}
    for span in spans:
        record = span if isinstance(span, SpanRecord) else SpanRecord(*span)
        index.setdefault(record.span_id, record)
    return index


def _children(index: dict[str, SpanRecord]) -> dict[str, list[SpanRecord]]:
    """Parent id -> children, latest end first (ties: earliest start, then id, so results are stable)."""
    children: dict[str, list[SpanRecord]] = defaultdict(list)
    for record in index.values():
        if record.parent_id and record.parent_id in index and record.parent_id != record.span_id:
            children[record.parent_id].append(record)
    for kids in children.values():
        kids.sort(key=lambda r: (-r.end_ns, r.start_ns, r.span_id))
    return children


def _root(index: dict[str, SpanRecord], root_id: str | None) -> SpanRecord:
    if root_id is not None:
        if root_id not in index:
            raise ValueError(f"root span {root_id!r} is not among the spans")
        return index[root_id]
    roots = [r for r in index.values() if not r.parent_id] or [r for r in index.values() if r.parent_id not in index]
    if not roots:
        raise ValueError("no root span: every span has a parent among the spans")
    return max(roots, key=lambda r: (r.end_ns - r.start_ns, -r.start_ns))


def _covered(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of intervals."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is not None:
            start = max(start, reach)
        if end > start:
            total += end - start
        reach = end if reach is None else max(reach, end)
    return total


def self_times(spans: Iterable) -> dict[str, int]:
    """Span id -> self time (ns): duration minus the union of its children, each clipped to it."""
    index = _records(spans)
    children = _children(index)
    result = {}
    for span_id, record in index.items():
        start, end = record.start_ns, max(record.start_ns, record.end_ns)
        clipped = [(max(c.start_ns, start), min(c.end_ns, end)) for c in children.get(span_id, ())]
        result[span_id] = (end - start) - _covered(clipped)
    return result


def critical_path(spans: Iterable, root_id: str | None = None) -> list[tuple[str, int, int]]:
    """(span id, start ns, end ns) segments of the critical path, in time order, tiling the root span."""
    index = _records(spans)
    children = _children(index)
    root = _root(index, root_id)
    segments: list[tuple[str, int, int]] = []
    stack = [(root.span_id, root.start_ns, max(root.start_ns, root.end_ns))]
    seen: set[str] = set()
    while stack:  # explicit stack: deep traces must not hit the recursion limit
        span_id, lo, hi = stack.pop()
        if span_id in seen:
            continue
        seen.add(span_id)
        point = hi
        for child in children.get(span_id, ()):
            if point <= lo:
                break
            start, end = max(child.start_ns, lo), min(child.end_ns, hi)
            if end <= start or end > point:  # empty once clipped, or still running at the current point
                continue
            if end < point:
                segments.append((span_id, end, point))
            stack.append((child.span_id, start, end))
            point = start
        if point > lo:
            segments.append((span_id, lo, point))
    return sorted(segments, key=lambda s: (s[1], s[2]))


def step_times(spans: Iterable, root_id: str | None = None) -> list[StepTime]:
    """Self and critical-path time per step span, plus one ROOT_STEP row for the root's own time.

    A step's critical time includes its non-step descendants (an HTTP call inside an LLM step is
    that step's latency); shares over the rows add up to 1.
    """
    index = _records(spans)
    root = _root(index, root_id)
    selfs = self_times(index.values())
    owner_cache: dict[str, str] = {root.span_id: root.span_id}

    def owner(span_id: str) -> str:
        """The nearest step span at or above span_id, else the root (path spans all reach the root)."""
        chain = []
        while span_id not in owner_cache and not index[span_id].step:
            chain.append(span_id)
            span_id = index[span_id].parent_id
        found = owner_cache.get(span_id, span_id)
        for visited in chain:
            owner_cache[visited] = found
        return found

    critical: dict[str, int] = defaultdict(int)
    for span_id, start, end in critical_path(index.values(), root.span_id):
        critical[owner(span_id)] += end - start
    root_ns = max(0, root.end_ns - root.start_ns)
    rows = [root, *(r for r in index.values() if r.step and r.span_id != root.span_id)]
    return [StepTime(r.span_id, ROOT_STEP if r.span_id == root.span_id else r.step,
                     max(0, r.end_ns - r.start_ns), selfs[r.span_id], critical.get(r.span_id, 0),
                     critical.get(r.span_id, 0) / root_ns if root_ns else 0.0)
            for r in rows]


STEP_BREAKDOWN_SQL = """
WITH now64(9) - toIntervalSecond({window_seconds:UInt32}) AS window_start,
sampled AS (
    SELECT TraceId
    FROM otel_traces
    WHERE Timestamp >= window_start AND ParentSpanId = ''
      AND SpanAttributes['tracetune.pipeline'] != '' AND SpanAttributes['tracetune.step'] = ''
      AND ({pipeline:String} = '' OR SpanAttributes['tracetune.pipeline'] = {pipeline:String})
    ORDER BY cityHash64(TraceId)
    LIMIT {max_traces:UInt32}
)
SELECT TraceId AS trace_id, SpanId AS span_id, ParentSpanId AS parent_id,
       toInt64(toUnixTimestamp64Nano(Timestamp)) AS start_ns, start_ns + toInt64(Duration) AS end_ns,
       SpanName AS name, SpanAttributes['tracetune.step'] AS step, SpanAttributes['tracetune.pipeline'] AS pipeline
FROM otel_traces
WHERE Timestamp >= window_start AND TraceId IN (SELECT TraceId FROM sampled)
ORDER BY trace_id, start_ns
"""

STEP_BREAKDOWN_COLUMNS = {"pipeline": pl.Utf8, "step": pl.Utf8, "spans": pl.Int64, "traces": pl.Int64,
                          "mean_self_ms": pl.Float64, "mean_critical_ms": pl.Float64,
                          "critical_share": pl.Float64, "tail_share": pl.Float64, "sampled_traces": pl.Int64}


def step_breakdown(client, since: str | int = "15m", pipeline: str = "", max_traces: int = MAX_TRACES) -> pl.DataFrame:
    """Per pipeline and step: which one the requests' latency is spent in.

    Up to `max_traces` requests are sampled (by trace-id hash, so spread over the window).
    mean_self_ms is per step span; mean_critical_ms is per sampled request (0 where the step did not
    run), so a pipeline's rows add up to its mean request latency; critical_share is the step's part
    of all sampled request time (rows add up to 1) and tail_share the same over the slowest 5% of
    sampled requests. The ROOT_STEP row is time spent outside every step.
    """
    seconds = since if isinstance(since, int) else parse_window(since)
    result = client.query(STEP_BREAKDOWN_SQL, parameters={"window_seconds": seconds, "pipeline": pipeline,
                                                          "max_traces": max(1, int(max_traces))})
    traces: dict[str, list[tuple]] = defaultdict(list)
    for row in result.result_rows:
        traces[row[0]].append(row)
    rows = []
    for trace_id, spans in traces.items():
        root = next((s for s in spans if not s[2] and s[7] and not s[6]), None)
        if root is None:
            continue
        records = [SpanRecord(*s[1:7]) for s in spans]
        root_ns = max(0, root[4] - root[3])
        for timing in step_times(records, root[1]):
            rows.append((root[7], trace_id, root_ns, timing.step, timing.self_ns, timing.critical_ns))
    if not rows:
        return pl.DataFrame(schema=STEP_BREAKDOWN_COLUMNS)
    frame = pl.DataFrame(rows, schema=["pipeline", "trace_id", "root_ns", "step", "self_ns", "critical_ns"],
                         orient="row")
    per_trace = frame.unique(["pipeline", "trace_id"]).select("pipeline", "trace_id", "root_ns")
    tail_cut = per_trace.group_by("pipeline").agg(
        sampled_traces=pl.len(), total_ns=pl.col("root_ns").sum(),
        tail_ns=pl.col("root_ns").quantile(0.95, "nearest"))
    per_trace = per_trace.join(tail_cut, on="pipeline").with_columns(tail=pl.col("root_ns") >= pl.col("tail_ns"))
    tail_total = per_trace.filter("tail").group_by("pipeline").agg(tail_total_ns=pl.col("root_ns").sum())
    frame = frame.join(per_trace.select("pipeline", "trace_id", "tail"), on=["pipeline", "trace_id"])
    out = (frame.group_by("pipeline", "step").agg(
        spans=pl.len(), traces=pl.col("trace_id").n_unique(), mean_self_ms=pl.col("self_ns").mean() / 1e6,
        critical_ns=pl.col("critical_ns").sum(), tail_critical_ns=pl.col("critical_ns").filter("tail").sum())
        .join(tail_cut, on="pipeline").join(tail_total, on="pipeline", how="left")
        .with_columns(
            mean_critical_ms=pl.col("critical_ns") / pl.col("sampled_traces") / 1e6,
            critical_share=pl.when(pl.col("total_ns") > 0).then(pl.col("critical_ns") / pl.col("total_ns")),
            tail_share=pl.when(pl.col("tail_total_ns") > 0).then(pl.col("tail_critical_ns") / pl.col("tail_total_ns")))
        .select([pl.col(name).cast(dtype) for name, dtype in STEP_BREAKDOWN_COLUMNS.items()])
        .sort(["pipeline", "critical_share", "step"], descending=[False, True, False], nulls_last=True))
    return out
