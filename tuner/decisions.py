"""The tuner's decision audit and per-pipeline state, in ClickHouse (all append-only).

Every config change the tuner or a person makes is a `Decision` row in `tracetune_decisions` (config
before and after, reason, predicted effect). A reason's first line is one sentence a product owner
reads ("Escalated fewer tasks (...): -0.0021 USD per 1k (-28%), quality 0.936 against the 0.93 floor,
p95 unchanged at 180 ms"), the lines after it how the policies got there; `history` gives both apart.
What was measured afterwards is appended to `tracetune_decision_observations`. `tracetune_tuner_state`
says whether the loop may touch a pipeline (frozen, or pinned by hand). Newest wins by (time, seq);
`seq` grows within the process, so rows written in the same microsecond keep their order.

`record` also counts the decision in `tracetune_tuner_decisions_total{pipeline,kind}` and sets
`tracetune_tuner_config_version{pipeline}`: callers (the API, the loop) only call `record`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import Counter, Gauge

from tracetune.store import next_seq

__all__ = ["KINDS", "Decision", "TunerState", "record", "observe", "history", "last_decision", "state",
           "set_state", "describe_change", "sentence", "summary", "DECISIONS_TOTAL", "CONFIG_VERSION"]

KINDS: tuple[str, ...] = ("tune", "pin", "change", "rollback", "freeze", "unfreeze", "canary_start",
                          "canary_promote", "canary_rollback", "canary_cancel", "declaration",
                          "proposal", "proposal_approve", "proposal_reject", "proposal_expire", "proposal_stale",
                          "approval_mode", "shadow_start", "shadow_pass", "shadow_reject", "shadow_cancel")
"""Every kind of decision: what the loop decided, or what a person or an executor did through the API."""

DECISIONS_TOTAL = Counter("tracetune_tuner_decisions", "Tuner decisions recorded, by kind", ["pipeline", "kind"])
CONFIG_VERSION = Gauge("tracetune_tuner_config_version", "Config version the tuner serves", ["pipeline"])


@dataclass(frozen=True)
class Decision:
    """One change to a pipeline's config (or to whether it may change), as the audit keeps it.

    Configs are `PipelineConfig.to_dict()` forms; `predicted` maps metric names (e.g. p95_ms,
    cost_per_1k) to the values the decision expected, to be compared with what `observe` records.
    """

    pipeline: str
    kind: str
    version_before: int
    version_after: int
    config_before: dict
    config_after: dict
    reason: str
    predicted: dict[str, float] = field(default_factory=dict)
    author: str = "tuner"
    decision_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    decided_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"decision kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.decided_at.tzinfo is None:
            raise ValueError("decided_at must be timezone-aware (e.g. datetime.now(UTC))")


@dataclass(frozen=True)
class TunerState:
    """Whether the tuner loop may change a pipeline: `frozen` -> it changes nothing; `pinned` -> a config
    set by hand holds until unpinned (`POST /unfreeze`)."""

    frozen: bool = False
    pinned: bool = False
    reason: str = ""
    author: str = ""


_DECISION_COLUMNS = ["decided_at", "seq", "decision_id", "pipeline", "kind", "version_before", "version_after",
                     "config_before", "config_after", "reason", "predicted", "author"]

DECISIONS_SQL = """
SELECT decision_id, kind, version_before, version_after, config_before, config_after, reason,
       predicted, author, toUnixTimestamp64Micro(decided_at)
FROM tracetune_decisions
WHERE pipeline = {pipeline:String} AND (empty({kinds:Array(String)}) OR has({kinds:Array(String)}, kind))
ORDER BY decided_at DESC, seq DESC
LIMIT {limit:UInt32}
"""

OBSERVATIONS_SQL = """
SELECT decision_id, observed FROM tracetune_decision_observations
WHERE pipeline = {pipeline:String} AND has({ids:Array(String)}, decision_id)
ORDER BY observed_at, seq
"""

DECISION_PIPELINE_SQL = """
SELECT pipeline FROM tracetune_decisions WHERE decision_id = {decision_id:String} LIMIT 1
"""

STATE_SQL = """
SELECT frozen, pinned, reason, author FROM tracetune_tuner_state
WHERE pipeline = {pipeline:String}
ORDER BY changed_at DESC, seq DESC LIMIT 1
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# ---- what a product owner reads -------------------------------------------------------------------

def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def describe_change(step: str, knob: str, before: Any, after: Any) -> str:
    """One knob change in words ("Escalated fewer tasks: escalate threshold 0.6 -> 0.45")."""
    if knob == "route_weights" and isinstance(after, dict):
        old = before if isinstance(before, dict) else {}
        gained = max(after, key=lambda r: float(after[r]) - float(old.get(r, 0.0)))
        return (f"Sent more of {step} to {gained} ({float(old.get(gained, 0.0)):.2f} -> {float(after[gained]):.2f} "
                f"of its traffic)")
    if knob == "cascade_threshold":
        fewer = float(after) < float(before)
        return f"Escalated {'fewer' if fewer else 'more'} tasks ({step} threshold {_value(before)} -> {_value(after)})"
    if knob == "cache_enabled":
        return f"Turned {step}'s cache {'on' if after else 'off'}"
    names = {"batch_max_size": "batches of up to", "batch_max_wait_ms": "batch wait (ms)",
             "cache_ttl_seconds": "cache TTL (s)", "cache_max_entries": "cache entries",
             "max_concurrency": "calls at once", "length_bucketing": "length bucketing",
             "timeout_seconds": "timeout (s)"}
    return f"Set {step}'s {names.get(knob, knob)} {_value(before)} -> {_value(after)}"


def sentence(actions: list[str], before: dict[str, float], after: dict[str, float],
             targets: dict[str, float]) -> str:
    """The one sentence a decision leads with: what changed, then cost, quality and p95 as predicted.

    `before` and `after` hold pipeline figures (cost_per_1k, quality, p95_ms); a figure absent from
    `after` is not predicted to move. `targets` holds the SLO's p95_ms and quality_floor."""
    what = "; ".join(actions[:1] + [a[0].lower() + a[1:] for a in actions[1:]]) or "No change"
    parts = []
    cost_now, cost = before.get("cost_per_1k"), after.get("cost_per_1k")
    if cost_now is not None and cost is not None:
        share = f" ({(cost - cost_now) / cost_now:+.0%})" if cost_now else ""
        parts.append(f"{cost - cost_now:+.4f} USD per 1k{share}")
    quality = after.get("quality", before.get("quality"))
    if quality is not None:
        floor = targets.get("quality_floor")
        parts.append(f"quality {quality:.3f}" + (f" against the {floor:g} floor" if floor is not None else ""))
    p95_now, p95 = before.get("p95_ms"), after.get("p95_ms")
    target = targets.get("p95_ms")
    against = f" (target {target:g} ms)" if target is not None else ""
    if p95 is not None and p95 != p95 and p95_now is not None:  # NaN: moved, but no model predicts how far
        parts.append(f"p95 {p95_now:.0f} ms now{against}, not predicted")
    elif p95 is not None and p95_now is not None and abs(p95 - p95_now) >= 0.05 * max(p95_now, 1.0):
        parts.append(f"p95 {p95_now:.0f} -> {p95:.0f} ms{against}")
    elif p95_now is not None:
        parts.append(f"p95 unchanged at {p95_now:.0f} ms{against}")
    return what + (": " + ", ".join(parts) if parts else "")


def summary(reason: str) -> str:
    """The first line of a reason: the sentence; the lines after it are the policies' workings."""
    return reason.split("\n", 1)[0]


def _metrics(values: dict) -> dict[str, float]:
    return {str(name): float(value) for name, value in values.items()}


def record(client, decision: Decision) -> None:
    """Append `decision` to the audit, count it, and set the served-version gauge to `version_after`
    (unless it starts a canary)."""
    client.insert("tracetune_decisions", [[
        decision.decided_at, next_seq(), decision.decision_id, decision.pipeline, decision.kind,
        decision.version_before, decision.version_after, json.dumps(decision.config_before),
        json.dumps(decision.config_after), decision.reason, _metrics(decision.predicted), decision.author,
    ]], column_names=_DECISION_COLUMNS)
    DECISIONS_TOTAL.labels(decision.pipeline, decision.kind).inc()
    if decision.kind != "canary_start":  # a canary's version is on trial, not served to every task
        CONFIG_VERSION.labels(decision.pipeline).set(decision.version_after)


def observe(client, decision_id: str, observed: dict[str, float]) -> None:
    """Append what was measured after the decision; later observations override earlier ones metric by
    metric. LookupError if no decision has that id."""
    rows = client.query(DECISION_PIPELINE_SQL, parameters={"decision_id": decision_id}).result_rows
    if not rows:
        raise LookupError(f"no decision {decision_id!r} in tracetune_decisions; record() it first")
    client.insert("tracetune_decision_observations",
                  [[datetime.now(UTC), next_seq(), decision_id, rows[0][0], _metrics(observed)]],
                  column_names=["observed_at", "seq", "decision_id", "pipeline", "observed"])


def _decisions(client, pipeline: str, kinds: tuple[str, ...], limit: int) -> list[dict]:
    rows = client.query(DECISIONS_SQL, parameters={"pipeline": pipeline, "kinds": list(kinds),
                                                   "limit": max(0, int(limit))}).result_rows
    found = [{"pipeline": pipeline, "kind": kind, "version_before": int(before), "version_after": int(after),
              "config_before": json.loads(config_before), "config_after": json.loads(config_after),
              "reason": reason, "predicted": dict(predicted), "author": author, "decision_id": decision_id,
              "decided_at": _EPOCH + timedelta(microseconds=micros), "observed": {},
              "summary": summary(reason), "details": reason.partition("\n")[2]}
             for (decision_id, kind, before, after, config_before, config_after, reason, predicted, author,
                  micros) in rows]
    if found:
        by_id = {d["decision_id"]: d for d in found}
        for decision_id, observed in client.query(OBSERVATIONS_SQL, parameters={
                "pipeline": pipeline, "ids": list(by_id)}).result_rows:
            by_id[decision_id]["observed"].update(observed)
    return found


def history(client, pipeline: str, limit: int = 100, kinds: tuple[str, ...] = ()) -> list[dict]:
    """The pipeline's decisions (of one of `kinds`, if given), newest first: every `Decision` field plus
    `observed` ({} if none yet)."""
    return _decisions(client, pipeline, tuple(kinds), limit)


def last_decision(client, pipeline: str, kinds: tuple[str, ...] = ()) -> dict | None:
    """The pipeline's newest decision (of one of `kinds`, if given), as `history` gives it, or None."""
    found = _decisions(client, pipeline, tuple(kinds), 1)
    return found[0] if found else None


def state(client, pipeline: str) -> TunerState:
    """The pipeline's tuner state; a pipeline never frozen or pinned gets `TunerState()`."""
    rows = client.query(STATE_SQL, parameters={"pipeline": pipeline}).result_rows
    if not rows:
        return TunerState()
    frozen, pinned, reason, author = rows[0]
    return TunerState(bool(frozen), bool(pinned), reason, author)


def set_state(client, pipeline: str, *, frozen: bool, pinned: bool, author: str, reason: str) -> TunerState:
    """Append the pipeline's new state and return it (it wins over every earlier row)."""
    new = TunerState(frozen=bool(frozen), pinned=bool(pinned), reason=reason, author=author)
    client.insert("tracetune_tuner_state",
                  [[datetime.now(UTC), next_seq(), pipeline, new.frozen, new.pinned, new.reason, new.author]],
                  column_names=["changed_at", "seq", "pipeline", "frozen", "pinned", "reason", "author"])
    return new
