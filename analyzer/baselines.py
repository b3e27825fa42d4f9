"""Pinned drift baselines: the window a pipeline's drift is measured against while one is set.

A pipeline nobody pinned a baseline for is measured against its first hour of traffic (analyzer/drift.py,
`drift_references`), so a sustained change stays flagged until the owner moves the reference on purpose
(`set_baseline`). Clearing a baseline (`clear_baseline`) is the owner's choice of the preceding window of
the same length instead, which catches a change within minutes but forgets it once both windows hold the
new traffic. Stored versioned and append-only in `tracetune_drift_baselines`: the newest version per
pipeline wins, `active` 0 removes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tracetune.analyzer._time import utc

__all__ = ["Baseline", "BaselineError", "clear_baseline", "cleared_baselines", "first_traffic", "first_traffic_all",
           "get_baseline", "list_baselines", "set_baseline"]

MIN_BASELINE_SECONDS = 60  # shorter windows rarely hold the samples a verdict needs (min_samples, psi_min_samples)


class BaselineError(ValueError):
    """A baseline that cannot be set; the message is one line naming what to change."""


@dataclass(frozen=True)
class Baseline:
    """The reference window [start, end) of one pipeline's drift, at a version, with who set it and why."""

    pipeline: str
    start: datetime
    end: datetime
    version: int
    note: str = ""
    author: str = ""
    created_at: datetime | None = None

    def to_dict(self) -> dict[str, object]:
        return {"pipeline": self.pipeline, "start": self.start.isoformat(), "end": self.end.isoformat(),
                "version": self.version, "note": self.note, "author": self.author,
                "created_at": self.created_at.isoformat() if self.created_at else None}


_COLUMNS = ["pipeline", "version", "reference_start", "reference_end", "active", "note", "author"]
_LATEST_SQL = """
SELECT pipeline, version, reference_start, reference_end, active, note, author, created_at
FROM tracetune_drift_baselines
WHERE ({pipeline:String} = '' OR pipeline = {pipeline:String})
  AND (pipeline, version) IN (SELECT pipeline, max(version) FROM tracetune_drift_baselines
                              WHERE ({pipeline:String} = '' OR pipeline = {pipeline:String}) GROUP BY pipeline)
ORDER BY pipeline
"""
_FIRST_TRAFFIC_ALL_SQL = """
SELECT pipeline, min(minute) FROM tracetune_spans_1m
WHERE kind = 'root' AND pipeline != '' AND ({pipeline:String} = '' OR pipeline = {pipeline:String})
GROUP BY pipeline
"""
_FIRST_TRAFFIC_SQL = """
SELECT min(minute), count() FROM tracetune_spans_1m
WHERE pipeline = {pipeline:String} AND kind = 'root'
"""


def _latest(client, pipeline: str = "") -> dict[str, tuple[int, Baseline | None]]:
    """pipeline -> (newest version, its baseline or None when that version removed it)."""
    found: dict[str, tuple[int, Baseline | None]] = {}
    for name, version, start, end, active, note, author, created in client.query(
            _LATEST_SQL, parameters={"pipeline": pipeline}).result_rows:
        found[name] = (int(version), Baseline(name, utc(start), utc(end), int(version), note, author, utc(created))
                       if active else None)
    return found


def list_baselines(client, pipeline: str = "") -> dict[str, Baseline]:
    """Pipeline -> its pinned baseline, for every pipeline that has one (or just `pipeline`)."""
    return {name: b for name, (_, b) in _latest(client, pipeline).items() if b is not None}


def cleared_baselines(client, pipeline: str = "") -> set[str]:
    """Pipelines whose owner removed their baseline (their drift then uses the preceding window)."""
    return {name for name, (_, b) in _latest(client, pipeline).items() if b is None}


def get_baseline(client, pipeline: str) -> Baseline | None:
    """The pipeline's pinned baseline, or None (drift then uses the preceding window)."""
    return list_baselines(client, pipeline).get(pipeline)


def set_baseline(client, pipeline: str, start: datetime, end: datetime, note: str = "", author: str = "",
                 now: datetime | None = None, allow_future: bool = False) -> Baseline:
    """Pin [start, end) as the pipeline's drift reference; returns it with its version.

    BaselineError for an empty name, start not before end, a window under a minute, or one ending in the
    future unless allow_future (e.g. "the first hour of traffic" while that hour is still going on).
    """
    if not isinstance(pipeline, str) or not pipeline.strip():
        raise BaselineError(f"a baseline needs a pipeline name, got {pipeline!r}")
    start, end, now = utc(start), utc(end), utc(now or datetime.now(UTC))
    if not start < end:
        raise BaselineError(f"baseline start {start.isoformat()} must be before its end {end.isoformat()}")
    if (end - start).total_seconds() < MIN_BASELINE_SECONDS:
        raise BaselineError(f"a baseline of {(end - start).total_seconds():g} s is too short to judge drift against; "
                            f"give at least {MIN_BASELINE_SECONDS} s")
    if end > now + timedelta(seconds=1) and not allow_future:
        raise BaselineError(f"baseline end {end.isoformat()} is in the future; pin a window that has happened")
    latest = _latest(client, pipeline).get(pipeline)
    version = (latest[0] if latest else 0) + 1
    start, end = (moment.replace(microsecond=moment.microsecond // 1000 * 1000) for moment in (start, end))
    client.insert("tracetune_drift_baselines", [[pipeline, version, start, end, 1, note, author]],
                  column_names=_COLUMNS)
    return Baseline(pipeline, start, end, version, note, author, now)


def clear_baseline(client, pipeline: str, author: str = "") -> int | None:
    """Remove the pipeline's baseline (drift goes back to the preceding window); the version written, None if none."""
    latest = _latest(client, pipeline).get(pipeline)
    if latest is None or latest[1] is None:
        return None
    old = latest[1]
    client.insert("tracetune_drift_baselines", [[pipeline, latest[0] + 1, old.start, old.end, 0, "", author]],
                  column_names=_COLUMNS)
    return latest[0] + 1


def first_traffic(client, pipeline: str) -> datetime | None:
    """Start of the minute of the pipeline's first task (from the per-minute rollup), None if it has none."""
    first, count = client.query(_FIRST_TRAFFIC_SQL, parameters={"pipeline": pipeline}).result_rows[0]
    return utc(first) if count else None


def first_traffic_all(client, pipeline: str = "") -> dict[str, datetime]:
    """Pipeline -> start of the minute of its first task, for every pipeline with tasks (or just `pipeline`)."""
    return {name: utc(first) for name, first in client.query(
        _FIRST_TRAFFIC_ALL_SQL, parameters={"pipeline": pipeline}).result_rows}
