"""Alert rules, alert state, grouping and silences, as Prometheus and Alertmanager define them.

Rules (evaluated by the analyzer loop each interval) turn what the analyzer measured into
*conditions*: labelled, annotated facts that are true now.

- `slo_burn` → `SLOBurnRate` {pipeline, slo, severity page|ticket}: a multi-window burn-rate rule fires;
- `drift` → `FeatureDrift` {pipeline, step, feature, severity=ticket}: a drift statistic of a feature is over
  its threshold in two refreshes in a row (step latency never pages here: SLO burn rates own it);
- `cost` → `CostOverBudget` {pipeline, severity=ticket}: cost per 1k over the last hour is above the
  SLO's `cost_per_1k`;
- `tuner_rollback` → `TunerCanaryRolledBack` {pipeline, severity=ticket}: a canary was rolled back
  in the last hour.
- `tuner_proposal` → `TunerProposalWaiting` {pipeline, proposal, severity=page}: a tuner proposal that
  restores a missed objective waits for an operator's approval (approval modes, tuner/approval.py).
- `dead_letters` → `DeadLettersGrowing` {pipeline, step, severity=ticket}: a side effect was dead-lettered in
  the last hour and the step has letters nobody replayed or discarded yet.

Each alert is identified by its labels (`fingerprint`) and moves pending → firing (once its condition
has held for the rule's `for` duration) → resolved (when it stops holding); a pending alert whose
condition goes away is dropped without a word. Changes of state are appended to `tracetune_alert_state`.

Notifications group alerts by `group_by` labels (alertname, pipeline) and follow Alertmanager's
timers: a new group waits `group_wait` before its first notification (so alerts starting together
arrive together), a changed group waits `group_interval` after its last one, an unchanged firing group
is repeated every `repeat_interval`. Silences (label matchers with an end time) keep matching alerts
out of notifications. Notifications go to the durable, signed outbox of `analyzer.delivery`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl

from tracetune.analyzer import delivery
from tracetune.analyzer._time import utc
from tracetune.analyzer.dead_letters import Growth
from tracetune.analyzer.drift import LATENCY_FEATURE
from tracetune.store import next_seq

log = logging.getLogger("tracetune.analyzer")

__all__ = ["RULES", "RUNBOOK_URLS", "Alert", "Condition", "Timing", "Silence", "Matcher", "Engine", "advance",
           "group_notifications",
           "fingerprint", "group_key", "label_set", "slo_conditions", "drift_conditions", "cost_conditions",
           "tuner_conditions", "proposal_conditions", "dead_letter_conditions",
           "current_alerts", "add_silence", "expire_silence", "list_silences", "test_notification"]

RULES: dict[str, dict[str, Any]] = {
    "slo_burn": {"alertname": "SLOBurnRate", "for_seconds": 0.0},  # the burn-rate windows are the debounce
    # Drift in two refreshes in a row: one noisy window pages nobody, a real change pages within 2 minutes.
    "drift": {"alertname": "FeatureDrift", "for_seconds": 30.0},
    "cost": {"alertname": "CostOverBudget", "for_seconds": 300.0},
    "tuner_rollback": {"alertname": "TunerCanaryRolledBack", "for_seconds": 0.0},
    # A fix for a missed objective that only a person can let through: on-call hears of it at once.
    "tuner_proposal": {"alertname": "TunerProposalWaiting", "for_seconds": 0.0},
    "dead_letters": {"alertname": "DeadLettersGrowing", "for_seconds": 0.0},  # each letter is a lost effect
}
"""Every rule: its alertname and how long its condition must hold before the alert fires."""

RUNBOOKS = "docs/runbooks.md"
RUNBOOK_URLS: dict[str, str] = {
    "slo_burn": f"{RUNBOOKS}#slo-burn-rate",
    "drift": f"{RUNBOOKS}#feature-drift",
    "cost": f"{RUNBOOKS}#cost-over-budget",
    "tuner_rollback": f"{RUNBOOKS}#tuner-canary-rolled-back",
    "tuner_proposal": f"{RUNBOOKS}#tuner-proposal-waiting",
    "dead_letters": f"{RUNBOOKS}#dead-letters",
}
"""Every rule's `runbook_url` annotation: the section of docs/runbooks.md that says how to diagnose and fix it."""

GROUP_BY = ("alertname", "pipeline")
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt for an alert still firing
RESOLVED_KEPT = timedelta(hours=1)  # how long a resolved alert is still listed


_FNV64_OFFSET, _FNV64_PRIME = 14695981039346656037, 1099511628211
_SEPARATOR = 0xFF  # prometheus/common model.SeparatorByte: never in UTF-8, so names and values cannot run together


def fingerprint(labels: Mapping[str, str]) -> str:
    """The alert's id as Alertmanager computes it (prometheus/common `model.LabelSet.Fingerprint`): FNV-1a 64
    over the label names in sorted order, each name and value followed by the separator byte 0xFF, as
    16 hex digits (`Fingerprint.String`, `%016x`)."""
    h = _FNV64_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in (*part.encode(), _SEPARATOR):
                h = ((h ^ byte) * _FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


_GO_ESCAPES = {'"': '\\"', "\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
               "\t": "\\t", "\v": "\\v"}


def _go_quote(value: str) -> str:
    """A string as Go's strconv.Quote writes it: printable characters as they are, the rest escaped."""
    out = []
    for char in value:
        if char in _GO_ESCAPES:
            out.append(_GO_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        elif ord(char) < 0x80:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def label_set(labels: Mapping[str, str]) -> str:
    """A label set as prometheus/common's `LabelSet.String` writes it: `{alertname="FeatureDrift", pipeline="x"}`."""
    return "{" + ", ".join(f"{name}={_go_quote(labels[name])}" for name in sorted(labels)) + "}"


ROUTE_KEY = "{}"  # the root route's key: its matchers, none


def group_key(labels: Mapping[str, str], route_key: str = ROUTE_KEY) -> str:
    """A group's key as Alertmanager writes it into `groupKey` (dispatch `aggrGroup.GroupKey`): the route's
    key, a colon, the group labels: `{}:{alertname="FeatureDrift", pipeline="ticket_triage"}`."""
    return f"{route_key}:{label_set(labels)}"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Condition:
    """A rule's finding that holds now: labels (identity), annotations (the numbers), value."""

    rule: str
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float = 0.0

    @property
    def for_seconds(self) -> float:
        return float(RULES[self.rule]["for_seconds"])


@dataclass(frozen=True)
class Alert:
    """One alert and where it is in its life: pending, firing or resolved."""

    fingerprint: str
    rule: str
    labels: dict[str, str]
    annotations: dict[str, str]
    state: str
    active_at: datetime
    fired_at: datetime | None = None
    resolved_at: datetime | None = None
    value: float = 0.0

    def to_alertmanager(self, generator_url: str = "", runbook_base_url: str = "") -> dict[str, Any]:
        """The alert as an Alertmanager webhook (version 4) lists it; its `runbook_url` under `runbook_base_url`."""
        annotations = dict(self.annotations)
        if runbook_base_url and annotations.get("runbook_url", "").startswith(RUNBOOKS):
            annotations["runbook_url"] = runbook_base_url.rstrip("/") + "/" + annotations["runbook_url"]
        return {"status": "resolved" if self.state == "resolved" else "firing", "labels": dict(self.labels),
                "annotations": annotations, "startsAt": _iso(self.fired_at or self.active_at),
                "endsAt": _iso(self.resolved_at) if self.resolved_at else ZERO_TIME,
                "generatorURL": generator_url, "fingerprint": self.fingerprint}

    def silenced_by(self, silences: Iterable[Silence], now: datetime) -> list[str]:
        """The ids of the silences that keep this alert out of notifications at `now`."""
        return [s.silence_id for s in silences if s.silences(self.labels, now)]

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "rule": self.rule, "state": self.state, "labels": self.labels,
                "annotations": self.annotations, "active_at": _iso(self.active_at),
                "fired_at": _iso(self.fired_at) if self.fired_at else None,
                "resolved_at": _iso(self.resolved_at) if self.resolved_at else None, "value": self.value}


def advance(alerts: Mapping[str, Alert], conditions: Iterable[Condition], now: datetime) -> tuple[dict[str, Alert],
                                                                                                   list[Alert]]:
    """The alerts after one evaluation at `now`, and those whose state changed (to record them).

    A new condition starts pending (firing at once when its rule's `for` is 0); pending becomes firing
    once the condition has held for `for`; a firing alert whose condition is gone is resolved; a
    pending one is dropped (state `inactive` in the record). A resolved alert whose condition returns
    starts over."""
    result: dict[str, Alert] = {}
    changed: list[Alert] = []
    for condition in conditions:
        fp = fingerprint(condition.labels)
        before = alerts.get(fp)
        if before is None or before.state == "resolved":
            now_firing = condition.for_seconds <= 0
            alert = Alert(fp, condition.rule, dict(condition.labels), dict(condition.annotations),
                          "firing" if now_firing else "pending", now, now if now_firing else None, None,
                          condition.value)
            changed.append(alert)
        elif before.state == "pending" and (now - before.active_at).total_seconds() >= condition.for_seconds:
            alert = replace(before, state="firing", fired_at=now, annotations=dict(condition.annotations),
                            value=condition.value)
            changed.append(alert)
        else:
            alert = replace(before, annotations=dict(condition.annotations), value=condition.value)
        result[fp] = alert
    for fp, before in alerts.items():
        if fp in result:
            continue
        if before.state == "firing":
            alert = replace(before, state="resolved", resolved_at=now)
            changed.append(alert)
            result[fp] = alert
        elif before.state == "pending":
            changed.append(replace(before, state="inactive", resolved_at=now))
        elif before.resolved_at is not None and now - before.resolved_at < RESOLVED_KEPT:
            result[fp] = before
    return result, changed


# ---- silences ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Matcher:
    """`name` `=`/`!=`/`=~`/`!~` `value`, as in Alertmanager silences (regexes match the whole value)."""

    name: str
    value: str
    is_regex: bool = False
    is_equal: bool = True

    @classmethod
    def parse(cls, text: str) -> Matcher:
        """'pipeline=ticket_triage', 'severity!=page', 'alertname=~SLO.*'."""
        found = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*", text)
        if not found:
            raise ValueError(f"matcher {text!r} is not NAME=VALUE, NAME!=VALUE, NAME=~REGEX or NAME!~REGEX")
        name, op, value = found.groups()
        return cls(name, value.strip('"'), "~" in op, op.startswith("=")).checked()

    @classmethod
    def from_dict(cls, data: Any) -> Matcher:
        """Alertmanager's matcher object: {"name", "value", "isRegex", "isEqual"}."""
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str) \
                or not isinstance(data.get("value"), str):
            raise ValueError(f"matcher {data!r} needs a name and a value (strings)")
        return cls(data["name"], data["value"], bool(data.get("isRegex", False)),
                   bool(data.get("isEqual", True))).checked()

    def checked(self) -> Matcher:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ValueError(f"matcher label name {self.name!r} is not a label name")
        if self.is_regex:
            try:
                re.compile(self.value)
            except re.error as exc:
                raise ValueError(f"matcher {self}: {self.value!r} is not a regular expression ({exc})") from None
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        hit = re.fullmatch(self.value, actual) is not None if self.is_regex else actual == self.value
        return hit == self.is_equal

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "isRegex": self.is_regex, "isEqual": self.is_equal}

    def __str__(self) -> str:
        op = ("=" if self.is_equal else "!") + ("~" if self.is_regex else "" if self.is_equal else "=")
        return f"{self.name}{op}{self.value}"


@dataclass(frozen=True)
class Silence:
    """Alerts matching every matcher are not notified between `starts_at` and `ends_at`."""

    silence_id: str
    matchers: tuple[Matcher, ...]
    starts_at: datetime
    ends_at: datetime
    created_by: str = ""
    comment: str = ""

    def active(self, now: datetime) -> bool:
        return self.starts_at <= now < self.ends_at

    def silences(self, labels: Mapping[str, str], now: datetime) -> bool:
        return self.active(now) and all(m.matches(labels) for m in self.matchers)

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        state = "active" if self.active(now) else "expired" if now >= self.ends_at else "pending"
        return {"id": self.silence_id, "matchers": [m.to_dict() for m in self.matchers],
                "startsAt": _iso(self.starts_at), "endsAt": _iso(self.ends_at), "createdBy": self.created_by,
                "comment": self.comment, "status": {"state": state}}


# ---- grouping ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Alertmanager's route timers, in seconds (its defaults)."""

    group_wait: float = 30.0
    group_interval: float = 300.0
    repeat_interval: float = 4 * 3600.0


@dataclass
class Group:
    """What a group of alerts last told its receivers: when, and each alert's status then."""

    key: str
    labels: dict[str, str]
    first_seen_at: datetime
    last_notified_at: datetime | None = None
    notified: dict[str, str] = field(default_factory=dict)  # fingerprint -> firing / resolved


def _group_of(alert: Alert, group_by: Sequence[str]) -> tuple[str, dict[str, str]]:
    labels = {name: alert.labels[name] for name in group_by if name in alert.labels}
    return group_key(labels), labels


def _reason(group: Group, status: Mapping[str, str]) -> str:
    """Why a due notification goes out, in Alertmanager's words (notify `DedupStage.needsUpdate`)."""
    firing = {fp for fp, s in status.items() if s == "firing"}
    if group.last_notified_at is None or (firing - set(group.notified) and not group.notified):
        return "first notification"
    if firing - set(group.notified):
        return "new alerts added"
    if not firing:
        return "all alerts resolved"
    if set(group.notified) - firing:
        return "some alerts resolved"
    return "repeat interval elapsed"


def group_notifications(alerts: Iterable[Alert], groups: dict[str, Group], silences: Sequence[Silence],
                        now: datetime, timing: Timing = Timing(), group_by: Sequence[str] = GROUP_BY,
                        receiver: str = "tracetune", external_url: str = "",
                        runbook_base_url: str = "") -> list[delivery.Notification]:
    """The notifications due at `now`; updates `groups` as if they were sent.

    Silenced alerts are left out; a resolved alert is told only to a group that was told it fired.
    """
    members: dict[str, list[Alert]] = {}
    labels_of: dict[str, dict[str, str]] = {}
    for alert in alerts:
        if alert.state not in ("firing", "resolved") or alert.silenced_by(silences, now):
            continue
        key, labels = _group_of(alert, group_by)
        group = groups.get(key)
        if alert.state == "resolved" and (group is None or group.notified.get(alert.fingerprint) != "firing"):
            continue
        members.setdefault(key, []).append(alert)
        labels_of[key] = labels
    due = []
    for key, found in members.items():
        group = groups.setdefault(key, Group(key, labels_of[key], now))
        status = {a.fingerprint: "resolved" if a.state == "resolved" else "firing" for a in found}
        waited = (now - (group.last_notified_at or group.first_seen_at)).total_seconds()
        if group.last_notified_at is None:
            ready = waited >= timing.group_wait
        elif status != group.notified:
            ready = waited >= timing.group_interval
        else:
            ready = "firing" in status.values() and waited >= timing.repeat_interval
        if not ready:
            continue
        reason = _reason(group, status)
        found.sort(key=lambda a: (a.state == "resolved", a.fired_at or a.active_at, a.fingerprint))
        body = [a.to_alertmanager(external_url, runbook_base_url) for a in found]
        common_labels = {k: v for k, v in found[0].labels.items() if all(a.labels.get(k) == v for a in found)}
        common_annotations = {k: v for k, v in body[0]["annotations"].items()
                              if all(a["annotations"].get(k) == v for a in body)}
        due.append(delivery.Notification(
            receiver=receiver, group_key=key, status="firing" if "firing" in status.values() else "resolved",
            alerts=body, group_labels=dict(group.labels), common_labels=common_labels,
            common_annotations=common_annotations, external_url=external_url, truncated_alerts=0,
            notification_reason=reason))
        group.last_notified_at = now
        group.notified = {fp: s for fp, s in status.items() if s == "firing"}
    for key in [k for k, g in groups.items() if k not in members and not g.notified]:
        del groups[key]  # nothing left to tell: a new alert starts a new group (with its group_wait)
    return due


# ---- rules ----------------------------------------------------------------------------------------------

def _link(external_url: str, page: str, pipeline: str) -> str:
    return f"{external_url.rstrip('/')}/?page={page}&pipeline={pipeline}" if external_url else ""


def slo_conditions(status: pl.DataFrame, external_url: str = "") -> list[Condition]:
    """One condition per (pipeline, SLO kind, severity) with a firing burn-rate rule (analyzer.slo_status rows)."""
    found: dict[tuple[str, str, str], dict] = {}
    for row in status.filter(pl.col("firing")).iter_rows(named=True):
        key = (row["pipeline"], row["slo"], row["severity"])
        best = found.get(key)
        if best is None or row["long_burn_rate"] / row["factor"] > best["long_burn_rate"] / best["factor"]:
            found[key] = row
    conditions = []
    for (pipeline, slo, severity), row in sorted(found.items()):
        target = f" ({row['target_ms']:g} ms)" if row["target_ms"] is not None else ""
        left = row["budget_remaining"]
        description = (f"{pipeline} {slo}{target}: the error budget burns {row['long_burn_rate']:.1f}x over "
                       f"{row['long_window']} and {row['short_burn_rate']:.1f}x over {row['short_window']} "
                       f"(rule: both above {row['factor']:.1f}x); "
                       f"{'unknown' if left is None else f'{left:.0%}'} of the {row['period_days']:g}-day "
                       f"budget left")
        conditions.append(Condition("slo_burn", {
            "alertname": RULES["slo_burn"]["alertname"], "pipeline": pipeline, "slo": slo, "severity": severity,
            "rule": "slo_burn"}, {
            "summary": f"{pipeline}: {slo} SLO burning {row['long_burn_rate']:.1f}x its budget ({severity})",
            "description": description, "dashboard": _link(external_url, "slo", pipeline),
            "runbook_url": RUNBOOK_URLS["slo_burn"]},
            float(row["long_burn_rate"])))
    return conditions


def drift_conditions(drift: pl.DataFrame, external_url: str = "") -> list[Condition]:
    """One condition per (pipeline, step, feature) with a statistic in `drift` status (analyzer.compute_drift rows).

    Step latency (feature `latency_ms`) is shown as drift but never pages: SLO burn-rate alerts own latency,
    and a wobble the SLO tolerates (CPU contention moves a step's latency by 20% at once) is noise."""
    conditions = []
    if drift.is_empty():
        return conditions
    rows = drift.filter((pl.col("status") == "drift") & (pl.col("feature") != LATENCY_FEATURE)).sort(
        ["pipeline", "step", "feature", "statistic"])
    seen = set()
    for row in rows.iter_rows(named=True):
        key = (row["pipeline"], row["step"], row["feature"])
        if key in seen:
            continue
        seen.add(key)
        pipeline, step, feature = key
        p = f", p={row['p_value']:.2g}" if row.get("p_value") is not None and row["p_value"] == row["p_value"] else ""
        conditions.append(Condition("drift", {
            "alertname": RULES["drift"]["alertname"], "pipeline": pipeline, "step": step, "feature": feature,
            "severity": "ticket", "rule": "drift"}, {
            "summary": f"{pipeline}: {step} {feature} drifted ({row['statistic']} {row['value']:.3g})",
            "description": f"{feature} of step {step}: {row['statistic']} = {row['value']:.4g}{p} on "
                           f"{row['n_current']} current against {row['n_reference']} reference samples"
                           + (f" ({row['reference']})" if row.get("reference") else ""),
            "dashboard": _link(external_url, "drift", pipeline),
            "runbook_url": RUNBOOK_URLS["drift"]}, float(row["value"])))
    return conditions


def cost_conditions(costs: Mapping[str, float], budgets: Mapping[str, float], window: str = "1h",
                    external_url: str = "") -> list[Condition]:
    """Pipelines whose cost per 1k requests over `window` is above their SLO's `cost_per_1k` budget."""
    conditions = []
    for pipeline, budget in sorted(budgets.items()):
        actual = costs.get(pipeline)
        if actual is None or actual <= budget:
            continue
        conditions.append(Condition("cost", {
            "alertname": RULES["cost"]["alertname"], "pipeline": pipeline, "severity": "ticket", "rule": "cost"}, {
            "summary": f"{pipeline}: cost {actual:.4g} per 1k requests, budget {budget:.4g}",
            "description": f"over the last {window} {pipeline} cost {actual:.4g} USD per 1k requests, "
                           f"{actual / budget - 1:.0%} above its budget of {budget:.4g}" if budget else
                           f"over the last {window} {pipeline} cost {actual:.4g} USD per 1k requests; its budget is 0",
            "dashboard": _link(external_url, "cost", pipeline),
            "runbook_url": RUNBOOK_URLS["cost"]}, float(actual)))
    return conditions


ROLLBACKS_SQL = """
SELECT pipeline, argMax(version_before, decided_at) AS version, argMax(reason, decided_at) AS reason,
       max(decided_at) AS at
FROM tracetune_decisions
WHERE kind = 'canary_rollback' AND decided_at >= {since:DateTime64(6)}
GROUP BY pipeline ORDER BY pipeline
"""


def tuner_conditions(client, now: datetime, window: timedelta = timedelta(hours=1),
                     external_url: str = "") -> list[Condition]:
    """Pipelines whose tuner rolled a canary back within `window` (read from the decision audit)."""
    rows = client.query(ROLLBACKS_SQL, parameters={"since": (now - window).replace(tzinfo=None)}).result_rows
    return [Condition("tuner_rollback", {
        "alertname": RULES["tuner_rollback"]["alertname"], "pipeline": pipeline, "severity": "ticket",
        "rule": "tuner_rollback"}, {
        "summary": f"{pipeline}: the tuner rolled back canary version {version}",
        "description": f"canary version {version} of {pipeline} was rolled back at {at}: {reason}",
        "dashboard": _link(external_url, "tuner", pipeline),
            "runbook_url": RUNBOOK_URLS["tuner_rollback"]}, float(version))
        for pipeline, version, reason, at in rows]


# Proposals still pending (no outcome claimed, not past their time) that restore a missed objective: the
# table tuner/approval.py writes (store/sql/130_*); its first row opens a proposal, the earliest claim ends it.
WAITING_PROPOSALS_SQL = """
SELECT proposal, any(pipeline) AS pipeline,
       argMinIf(reason, (changed_at, claim), status = 'pending') AS reason,
       argMinIf(violated, (changed_at, claim), status = 'pending') AS violated,
       argMinIf(expires_at, (changed_at, claim), status = 'pending') AS expires
FROM tracetune_proposals
GROUP BY proposal
HAVING countIf(status = 'pending') > 0 AND countIf(status NOT IN ('pending', 'observed')) = 0
   AND notEmpty(violated) AND expires > {now:DateTime64(6)}
ORDER BY proposal
"""


def proposal_conditions(client, now: datetime, external_url: str = "") -> list[Condition]:
    """Tuner proposals waiting for an operator's approval that restore an objective the pipeline misses."""
    rows = client.query(WAITING_PROPOSALS_SQL, parameters={"now": now.astimezone(UTC).replace(tzinfo=None)}
                        ).result_rows
    return [Condition("tuner_proposal", {
        "alertname": RULES["tuner_proposal"]["alertname"], "pipeline": pipeline, "proposal": str(number),
        "severity": "page", "rule": "tuner_proposal"}, {
        "summary": f"{pipeline}: tuner proposal {number} restores {', '.join(violated)} and waits for approval",
        "description": f"{reason.split(chr(10), 1)[0]} (until {expires:%Y-%m-%d %H:%M} UTC; "
                       f"`tracetune tuner approve {number} --reason ...` or `tracetune tuner reject {number} ...`)",
        "dashboard": _link(external_url, "tuner", pipeline),
        "runbook_url": RUNBOOK_URLS["tuner_proposal"]}, float(number))
        for number, pipeline, reason, violated, expires in rows]


def dead_letter_conditions(growth: Iterable[Growth], window: str = "1h",
                           external_url: str = "") -> list[Condition]:
    """Pipeline steps with open dead letters of which at least one arrived within `window`
    (analyzer.dead_letters.growth rows): new lost effects, until an operator replays or discards them."""
    return [Condition("dead_letters", {
        "alertname": RULES["dead_letters"]["alertname"], "pipeline": g.pipeline, "step": g.step, "severity": "ticket",
        "rule": "dead_letters"}, {
        "summary": f"{g.pipeline}: {g.new} new dead letter{'s' if g.new != 1 else ''} in {g.step} "
                   f"({g.open} open)",
        "description": f"{g.new} side effect{'s' if g.new != 1 else ''} of step {g.step} gave up within the last "
                       f"{window} ({g.open} open in all, newest at {_iso(g.newest)}); last error: {g.error}",
        "dashboard": _link(external_url, "dead_letters", g.pipeline),
        "runbook_url": RUNBOOK_URLS["dead_letters"]}, float(g.open))
        for g in growth if g.new > 0 and g.open > 0]


# ---- storage ---------------------------------------------------------------------------------------

_STATE_COLUMNS = ["changed_at", "seq", "fingerprint", "rule", "labels", "annotations", "state", "active_at",
                  "fired_at", "resolved_at", "value"]


STATE_SQL = """
SELECT fingerprint, argMax(rule, (changed_at, seq)), argMax(labels, (changed_at, seq)),
       argMax(annotations, (changed_at, seq)), argMax(state, (changed_at, seq)) AS state,
       argMax(active_at, (changed_at, seq)), argMax(fired_at, (changed_at, seq)),
       argMax(resolved_at, (changed_at, seq)), argMax(value, (changed_at, seq))
FROM tracetune_alert_state
GROUP BY fingerprint
HAVING state != 'inactive'
"""


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else utc(moment)


def _record(client, changed: Sequence[Alert], now: datetime) -> None:
    if changed:
        client.insert("tracetune_alert_state", [[
            now, next_seq(), a.fingerprint, a.rule, a.labels, a.annotations, a.state, a.active_at, a.fired_at,
            a.resolved_at, a.value] for a in changed], column_names=_STATE_COLUMNS)


def current_alerts(client, now: datetime | None = None) -> dict[str, Alert]:
    """Every pending or firing alert, and those resolved within the last hour, by fingerprint."""
    now = now or datetime.now(UTC)
    found = {}
    for fp, rule, labels, notes, state, active, fired, resolved, value in client.query(STATE_SQL).result_rows:
        alert = Alert(fp, rule, dict(labels), dict(notes), state, _utc(active), _utc(fired), _utc(resolved),
                      float(value))
        if state == "resolved" and (alert.resolved_at is None or now - alert.resolved_at >= RESOLVED_KEPT):
            continue
        found[fingerprint(alert.labels)] = replace(alert, fingerprint=fingerprint(alert.labels))  # ids of old releases
    return found


SILENCES_SQL = """
SELECT silence_id, argMax(matchers, (changed_at, seq)), argMax(starts_at, (changed_at, seq)),
       argMax(ends_at, (changed_at, seq)) AS ends, argMax(created_by, (changed_at, seq)),
       argMax(comment, (changed_at, seq))
FROM tracetune_alert_silences
GROUP BY silence_id
HAVING ends >= {since:DateTime64(6)}
ORDER BY ends DESC
"""


def list_silences(client, now: datetime | None = None, expired_within: timedelta = timedelta(days=1)) -> list[Silence]:
    """Active and pending silences, and those that ended within `expired_within`."""
    now = now or datetime.now(UTC)
    rows = client.query(SILENCES_SQL, parameters={"since": (now - expired_within).replace(tzinfo=None)}).result_rows
    return [Silence(sid, tuple(Matcher(m["name"], m["value"], m["isRegex"], m["isEqual"]) for m in json.loads(ms)),
                    _utc(starts), _utc(ends), by, comment) for sid, ms, starts, ends, by, comment in rows]


def _write_silence(client, silence: Silence) -> None:
    client.insert("tracetune_alert_silences", [[
        datetime.now(UTC), next_seq(), silence.silence_id, json.dumps([m.to_dict() for m in silence.matchers]),
        silence.starts_at, silence.ends_at, silence.created_by, silence.comment]],
        column_names=["changed_at", "seq", "silence_id", "matchers", "starts_at", "ends_at", "created_by", "comment"])


def add_silence(client, matchers: Sequence[Matcher], ends_at: datetime, *, starts_at: datetime | None = None,
                created_by: str = "", comment: str = "") -> Silence:
    """Store a silence; ValueError without matchers or with an end before its start."""
    starts_at = starts_at or datetime.now(UTC)
    if not matchers:
        raise ValueError("a silence needs at least one matcher, e.g. pipeline=ticket_triage")
    if ends_at <= starts_at:
        raise ValueError(f"a silence must end after it starts ({_iso(starts_at)}), got {_iso(ends_at)}")
    silence = Silence(uuid.uuid4().hex, tuple(matchers), starts_at, ends_at, created_by, comment)
    _write_silence(client, silence)
    return silence


def expire_silence(client, silence_id: str, now: datetime | None = None) -> Silence:
    """End a silence now; LookupError for an unknown id."""
    now = now or datetime.now(UTC)
    found = [s for s in list_silences(client, now, expired_within=timedelta(days=3650)) if s.silence_id == silence_id]
    if not found:
        raise LookupError(f"no silence {silence_id!r}")
    ended = replace(found[0], ends_at=min(found[0].ends_at, now))
    _write_silence(client, ended)
    return ended


GROUPS_SQL = """
SELECT group_key, argMax(labels, (changed_at, seq)), argMax(first_seen_at, (changed_at, seq)),
       argMax(last_notified_at, (changed_at, seq)), argMax(notified, (changed_at, seq)) AS notified
FROM tracetune_alert_groups
GROUP BY group_key
HAVING notified != '{}'
"""


def _load_groups(client) -> dict[str, Group]:
    groups = {}
    for key, labels, first, last, notified in client.query(GROUPS_SQL).result_rows:
        if key != group_key(dict(labels)):  # written by an older release (JSON keys, SHA-256 ids): take it over
            continue
        groups[key] = Group(key, dict(labels), _utc(first), _utc(last), json.loads(notified))
    return groups


def _save_groups(client, groups: Iterable[Group], now: datetime) -> None:
    rows = [[now, next_seq(), g.key, g.labels, g.first_seen_at, g.last_notified_at,
             json.dumps(g.notified, sort_keys=True)] for g in groups]
    if rows:
        client.insert("tracetune_alert_groups", rows, column_names=[
            "changed_at", "seq", "group_key", "labels", "first_seen_at", "last_notified_at", "notified"])


# ---- the engine ------------------------------------------------------------------------------------

class Engine:
    """Alert state, grouping and hand-over to the outbox, for the one process that evaluates (the analyzer).

    `evaluate(conditions)` advances the alerts (each analyzer interval); `notify()` sends the group
    notifications that are due (call it every few seconds: group_wait is shorter than an interval).
    State, groups and silences live in ClickHouse, so a restarted analyzer goes on where it was."""

    def __init__(self, client, receivers: Sequence[delivery.Receiver], timing: Timing = Timing(),
                 external_url: str = "", group_by: Sequence[str] = GROUP_BY, runbook_base_url: str = ""):
        self.client = client
        self.receivers = list(receivers)
        self.timing = timing
        self.external_url = external_url
        self.runbook_base_url = runbook_base_url
        self.group_by = tuple(group_by)
        self._lock = threading.Lock()
        self.alerts = current_alerts(client)
        self.groups = _load_groups(client)

    def evaluate(self, conditions: Iterable[Condition], now: datetime | None = None) -> list[Alert]:
        """Advance every alert on this evaluation's conditions; the alerts whose state changed."""
        now = now or datetime.now(UTC)
        with self._lock:
            self.alerts, changed = advance(self.alerts, conditions, now)
            _record(self.client, changed, now)
        for alert in changed:
            log.log(logging.WARNING if alert.state == "firing" else logging.INFO, "alert %s %s: %s",
                    alert.labels.get("alertname"), alert.state, alert.annotations.get("summary", ""))
        return changed

    def notify(self, now: datetime | None = None) -> list[delivery.Notification]:
        """Hand the group notifications due now to the outbox (written before anything is sent)."""
        now = now or datetime.now(UTC)
        with self._lock:
            silences = list_silences(self.client, now)
            before = {k: (g.last_notified_at, dict(g.notified)) for k, g in self.groups.items()}
            due = group_notifications(self.alerts.values(), self.groups, silences, now, self.timing, self.group_by,
                                      external_url=self.external_url, runbook_base_url=self.runbook_base_url)
            for notification in due:
                delivery.enqueue(self.client, notification, self.receivers)
            changed = [g for k, g in self.groups.items() if before.get(k) != (g.last_notified_at, g.notified)]
            gone = [Group(k, {}, now, last, {}) for k, (last, notified) in before.items()
                    if k not in self.groups and notified]
            _save_groups(self.client, [*changed, *gone], now)
        return due


def test_notification(external_url: str = "", now: datetime | None = None) -> delivery.Notification:
    """A firing test alert, to check that receivers get, verify and show what tracetune sends."""
    now = now or datetime.now(UTC)
    labels = {"alertname": "TracetuneTest", "severity": "info", "rule": "test"}
    alert = Alert(fingerprint(labels), "test", labels, {
        "summary": "tracetune test alert", "description": "sent by `tracetune alerts test`; nothing is wrong"},
        "firing", now, now)
    return delivery.Notification(receiver="tracetune", group_key=group_key({"alertname": "TracetuneTest"}),
                                 status="firing", alerts=[alert.to_alertmanager(external_url)],
                                 group_labels={"alertname": "TracetuneTest"}, common_labels=labels,
                                 common_annotations=dict(alert.annotations), external_url=external_url,
                                 truncated_alerts=0, notification_reason="first notification")
