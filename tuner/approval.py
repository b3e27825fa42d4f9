"""Approval modes: who decides what the tuning loop proposes.

Each pipeline has an approval policy (`config.Approval`), declared in its spec and changeable through the
tuner API (`set_policy`; the newer of the two wins): `auto` tries a proposal at once unless it is of a
change class the owner marked (a knob, or a move larger than a share), `approve` makes every proposal wait
for an operator, `observe` records proposals with their predictions and never applies one.

`gate` is the loop's one hook, where a plan is about to be tried: it lets the plan go, or records it as a
proposal (a row in `tracetune_proposals` and a `proposal` decision) and holds the pipeline while one
waits. An operator then `approve`s it — applied exactly as proposed through the loop's own path (a canary
when it was proposed with one) — or `reject`s it; a pending proposal `expire`s after its time. A proposal
made on a config no longer in force is never applied: approving it records it `stale` and the loop
proposes again on the config in force. Every outcome is a decision row saying who and why.

An outcome is recorded once, across replicas: a replica answering a proposal first holds a short lease
named after it (`store.lease`, the protocol that picks the active tuner), reads the proposal again and
appends its outcome only if none is there yet. So a replica approving while another expires the same
proposal agree on one outcome, and only the one that recorded it acts on it.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tracetune.store.lease import Lease
from tracetune.tuner import canary, decisions, versions
from tracetune.tuner.config import Approval, ConfigError, PipelineConfig, PipelineSpec, same_way

__all__ = ["ApprovalError", "Proposal", "OPEN", "CLOSED", "policy", "set_policy", "marked", "gate", "approve",
           "reject", "expire_due", "proposals", "proposal", "describe"]

log = logging.getLogger("tracetune.tuner")

OPEN = ("pending", "observed")
"""How a proposal opens: waiting for an operator, or recorded only (observe mode)."""
CLOSED = ("approved", "rejected", "expired", "stale")
"""How a pending proposal ends; the first outcome recorded is the one."""

CLAIM_LEASE_SECONDS = 10.0
"""How long a replica may hold a proposal while recording its outcome (a replica that dies holding it
blocks the others for this long at most)."""
CLAIM_WAIT_SECONDS = 15.0
"""How long an answer waits for another replica that holds the proposal, before answering 503."""


class ApprovalError(Exception):
    """An approval or rejection that cannot happen: `status` 404 (no such proposal), 409 (not pending, stale,
    or the pipeline is frozen or pinned) or 503 (another replica is answering it now), and one sentence
    saying why and what to do."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Proposal:
    """One proposal of the loop: the knob changes on top of `base_version`, the loop's reason (its first line
    the sentence a product owner reads) and predictions, the objectives it restores (`violated`), why it
    waits, and how it ended (who decided and why)."""

    number: int
    pipeline: str
    status: str  # pending, observed, approved, rejected, expired (also when overdue and not yet recorded), stale
    base_version: int
    changes: dict[str, dict[str, Any]]
    reason: str
    predicted: dict[str, float]
    violated: tuple[str, ...]
    waits_for: str
    canary_share: float
    proposed_at: datetime
    expires_at: datetime
    decided_at: datetime | None = None
    decided_by: str = ""
    note: str = ""

    @property
    def summary(self) -> str:
        return decisions.summary(self.reason)

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "pipeline": self.pipeline, "status": self.status,
                "base_version": self.base_version, "changes": self.changes, "summary": self.summary,
                "reason": self.reason, "predicted": self.predicted, "violated": list(self.violated),
                "waits_for": self.waits_for, "canary_share": self.canary_share,
                "proposed_at": self.proposed_at.isoformat(), "expires_at": self.expires_at.isoformat(),
                "decided_at": self.decided_at.isoformat() if self.decided_at else None,
                "decided_by": self.decided_by, "note": self.note}


# ---- the policy in force ---------------------------------------------------------------------------

POLICY_SQL = """
SELECT approval, author, reason, toUnixTimestamp64Micro(changed_at) FROM tracetune_approval_modes
WHERE pipeline = {pipeline:String} ORDER BY changed_at DESC LIMIT 1
"""

SPECS_SQL = """
SELECT spec, toUnixTimestamp64Micro(toDateTime64(registered_at, 6)) FROM tracetune_pipeline_specs
WHERE pipeline = {pipeline:String} ORDER BY registered_at DESC
"""


@dataclass(frozen=True)
class Policy:
    """The approval policy in force for a pipeline, and where it came from (`declaration` or `api`)."""

    pipeline: str
    approval: Approval
    source: str
    author: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, **self.approval.to_dict(), "source": self.source, "author": self.author,
                "reason": self.reason}


def policy(client, pipeline: str) -> Policy:
    """The pipeline's approval policy: the one set through the API, unless the declaration changed its
    approval since (a redeployed executor declaring the same policy does not undo an operator's change)."""
    declared, since = Approval(), 0
    for text, registered in client.query(SPECS_SQL, parameters={"pipeline": pipeline}).result_rows:
        approval = PipelineSpec.from_dict(json.loads(text)).approval
        if since and approval != declared:
            break  # an older declaration with another policy: `declared` has held since `since`
        declared, since = approval, int(registered)
    rows = client.query(POLICY_SQL, parameters={"pipeline": pipeline}).result_rows
    if rows and int(rows[0][3]) >= since:
        text, author, reason, _ = rows[0]
        return Policy(pipeline, Approval.from_dict(json.loads(text)), "api", author, reason)
    return Policy(pipeline, declared, "declaration", "declaration")


def set_policy(client, spec: PipelineSpec, approval: Approval, author: str, reason: str) -> Policy:
    """Store `approval` as the pipeline's policy (ConfigError naming a knob the pipeline does not declare),
    with an `approval_mode` decision. Pending proposals stay pending: the policy decides what waits next."""
    approval.check(spec.steps)
    with versions.write_lock:
        before = policy(client, spec.pipeline)
        client.insert("tracetune_approval_modes", [[spec.pipeline, json.dumps(approval.to_dict()), author, reason]],
                      column_names=["pipeline", "approval", "author", "reason"])
        config = versions.latest(client, spec.pipeline) or spec.defaults()
        decisions.record(client, decisions.Decision(
            spec.pipeline, "approval_mode", config.version, config.version, config.to_dict(), config.to_dict(),
            f"Approval mode {before.approval.mode} -> {approval.mode}{_rules(approval)}"
            + (f": {reason}" if reason else ""), author=author))
    return Policy(spec.pipeline, approval, "api", author, reason)


def describe(approval: Approval) -> str:
    """The change classes marked for approval, in words ("" when none is)."""
    return " and ".join(([f"moves of {', '.join(approval.knobs)}"] if approval.knobs else []) + (
        [f"moves over {approval.max_change:.0%}"] if approval.max_change is not None else []))


def _rules(approval: Approval) -> str:
    marks = describe(approval)
    return f" ({marks} wait for approval)" if marks and approval.mode == "auto" else ""


def _moved_share(before: Any, after: Any) -> float | None:
    """How far a knob moves, as a share: of its current value for a number, of traffic for route weights
    (half the sum of the weights' differences, normalised); None for a switch (on/off)."""
    if isinstance(after, dict):
        old = before if isinstance(before, dict) else {}
        total_old, total_new = sum(map(float, old.values())) or 1.0, sum(map(float, after.values())) or 1.0
        names = set(old) | set(after)
        return 0.5 * sum(abs(float(after.get(n, 0)) / total_new - float(old.get(n, 0)) / total_old) for n in names)
    if isinstance(after, bool) or isinstance(before, bool) or before is None:
        return None
    if float(before) == 0:
        return math.inf if float(after) != 0 else 0.0
    return abs(float(after) - float(before)) / abs(float(before))


def marked(approval: Approval, config: PipelineConfig, changes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The changes of a class the owner marked as needing approval, each in words ([] when none is)."""
    found = []
    for step, values in changes.items():
        for knob, value in values.items():
            if knob in approval.knobs or f"{step}.{knob}" in approval.knobs:
                found.append(f"{step}.{knob} is marked for approval")
                continue
            share = _moved_share(config.knob(step, knob), value)
            if approval.max_change is not None and share is not None and share > approval.max_change:
                found.append(f"{step}.{knob} moves {share:.0%}, more than {approval.max_change:.0%}")
    return found


# ---- proposals in the store --------------------------------------------------------------------------

_OPENED = "status IN ('pending', 'observed')"
_ENDED = "status NOT IN ('pending', 'observed')"

PROPOSALS_SQL = f"""
SELECT proposal, any(pipeline) AS p, argMinIf(status, (changed_at, claim), {_OPENED}) AS opened,
       argMinIf(status, (changed_at, claim), {_ENDED}) AS ended, countIf({_ENDED}) AS claims,
       argMinIf(base_version, (changed_at, claim), {_OPENED}), argMinIf(changes, (changed_at, claim), {_OPENED}),
       argMinIf(reason, (changed_at, claim), {_OPENED}), argMinIf(predicted, (changed_at, claim), {_OPENED}),
       argMinIf(violated, (changed_at, claim), {_OPENED}), argMinIf(waits_for, (changed_at, claim), {_OPENED}),
       argMinIf(canary_share, (changed_at, claim), {_OPENED}),
       toUnixTimestamp64Micro(minIf(changed_at, {_OPENED})) AS proposed,
       toUnixTimestamp64Micro(argMinIf(expires_at, (changed_at, claim), {_OPENED})) AS expires,
       toUnixTimestamp64Micro(minIf(changed_at, {_ENDED})), argMinIf(author, (changed_at, claim), {_ENDED}),
       argMinIf(note, (changed_at, claim), {_ENDED}),
       argMinIf(expires_at, (changed_at, claim), {_OPENED}) <= now64(6) AS overdue
FROM tracetune_proposals
WHERE (empty({{pipeline:String}}) OR pipeline = {{pipeline:String}})
  AND ({{number:UInt64}} = 0 OR proposal = {{number:UInt64}})
GROUP BY proposal
HAVING proposed > 0
ORDER BY proposal DESC
LIMIT {{limit:UInt32}}
"""

TOP_SQL = "SELECT max(proposal) FROM tracetune_proposals"

_COLUMNS = ["claim", "proposal", "pipeline", "status", "base_version", "changes", "reason", "predicted", "violated",
            "waits_for", "canary_share", "expiry_seconds", "author", "note"]


def _time(micros: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(micros))


def _row(row: tuple) -> Proposal:
    (number, pipeline, opened, ended, claims, base, changes, reason, predicted, violated, waits_for, share, proposed,
     expires, decided, author, note, overdue) = row
    status = ended if claims else "expired" if opened == "pending" and overdue else opened
    return Proposal(int(number), pipeline, status, int(base), json.loads(changes), reason, dict(predicted),
                    tuple(violated), waits_for, float(share), _time(proposed), _time(expires),
                    _time(decided) if claims else None, author if claims else "", note if claims else "")


def proposals(client, pipeline: str = "", status: str | None = None, limit: int = 100) -> list[Proposal]:
    """Proposals newest first (of one pipeline, in one status, when given). A pending one past its time is
    `expired` here before the loop records its expiry."""
    rows = client.query(PROPOSALS_SQL, parameters={"pipeline": pipeline, "number": 0,
                                                   "limit": 100_000 if status else limit}).result_rows
    found = [_row(r) for r in rows]
    return [p for p in found if status is None or p.status == status][:limit]


def proposal(client, number: int) -> Proposal | None:
    """Proposal `number`, or None."""
    rows = client.query(PROPOSALS_SQL, parameters={"pipeline": "", "number": int(number), "limit": 1}).result_rows
    return _row(rows[0]) if rows and number > 0 else None


def _claim(client, found: Proposal, status: str, author: str, note: str,
           wait: float = CLAIM_WAIT_SECONDS) -> bool:
    """Record that `found` ended as `status`, unless it has already ended: True when this call recorded the
    outcome (and the caller acts on it), False when another replica or an earlier call had.

    Replicas share no lock, so the outcome is written under a lease named after the proposal: only its
    holder reads the proposal again and appends the outcome, so two replicas can never both record one.
    ApprovalError 503 when another replica holds the proposal for longer than `wait` seconds."""
    lease = Lease(client, f"proposal:{found.number}", seconds=CLAIM_LEASE_SECONDS)
    deadline = time.monotonic() + wait
    while True:
        if lease.acquire():
            try:
                now = proposal(client, found.number)
                if now is None or now.decided_at is not None:
                    return False
                if lease.holding():  # the write starts inside the term: the lease's margin covers it
                    client.insert("tracetune_proposals",
                                  [[uuid.uuid4().hex, found.number, found.pipeline, status, found.base_version,
                                    "{}", "", {}, [], "", 0.0, 0.0, author, note]], column_names=_COLUMNS)
                    return True
            finally:
                lease.release()
        now = proposal(client, found.number)
        if now is None or now.decided_at is not None:
            return False
        if time.monotonic() >= deadline:
            raise ApprovalError(503, f"proposal {found.number} is being answered by another tuner replica; "
                                     "try again in a few seconds")
        time.sleep(0.2)


def _open(client, pipeline: str, status: str, base: PipelineConfig, changes: dict, reason: str,
          predicted: Mapping[str, float], violated: list[str], waits_for: str, share: float,
          expiry_seconds: float) -> Proposal:
    top = client.query(TOP_SQL).result_rows
    number = int(top[0][0] or 0) + 1 if top else 1
    client.insert("tracetune_proposals", [[uuid.uuid4().hex, number, pipeline, status, base.version,
                                           json.dumps(changes), reason, {k: float(v) for k, v in predicted.items()},
                                           list(violated), waits_for, share, expiry_seconds, "tuner", ""]],
                  column_names=_COLUMNS)
    return proposal(client, number)


# ---- the loop's hook ------------------------------------------------------------------------------------

def gate(client, spec: PipelineSpec, config: PipelineConfig, plan, predicted: Mapping[str, float], settings,
         now: datetime | None = None) -> tuple[bool, decisions.Decision | None]:
    """Whether the loop holds `plan` instead of trying it, and the decision recorded for it (a `proposal`, or
    None when nothing new was recorded). Called with `versions.write_lock` held, just before the loop starts
    a canary or applies a change; `plan` is the loop's Plan (changes, reason, violated), `settings` its
    LoopSettings (canary share, expiry, how long a rejection holds).

    Holds while a proposal of the pipeline waits (a second would be made on the same config); drops moves
    an operator rejected within `rejected_memory_seconds` (the same knob the same way); then by the policy:
    `observe` records the proposal (once per config and change until it expires), `approve` — or `auto` with
    a marked change — records it as pending."""
    now = now or datetime.now(UTC)
    expire_due(client, spec.pipeline)
    if proposals(client, spec.pipeline, "pending", limit=1):
        return True, None
    _drop_rejected(client, spec.pipeline, config, plan, now, settings.rejected_memory_seconds)
    if not plan.changes:
        return True, None
    rules = policy(client, spec.pipeline).approval
    marks = marked(rules, config, plan.changes) if rules.mode == "auto" else []
    if rules.mode == "auto" and not marks:
        return False, None
    expiry = float(settings.approval_expiry_seconds)
    if rules.mode == "observe":
        last = next(iter(proposals(client, spec.pipeline, "observed", limit=1)), None)
        if last is not None and last.base_version == config.version and last.changes == plan.changes \
                and (now - last.proposed_at).total_seconds() < expiry:
            return True, None  # the same proposal on the same config: recorded once
    waits_for = "observe mode: proposals are recorded, never applied" if rules.mode == "observe" else \
        "approve mode: every proposal waits for an operator" if rules.mode == "approve" else "; ".join(marks)
    found = _open(client, spec.pipeline, "observed" if rules.mode == "observe" else "pending", config, plan.changes,
                  plan.reason, predicted, list(plan.violated), waits_for, settings.canary_share, expiry)
    summary, _, details = plan.reason.partition("\n")
    lead = f"Observed only (proposal {found.number})" if rules.mode == "observe" else \
        f"Waiting for approval (proposal {found.number}, until {found.expires_at:%Y-%m-%d %H:%M} UTC)"
    decision = decisions.Decision(spec.pipeline, "proposal", config.version, config.version, config.to_dict(),
                                  _proposed(spec, config, plan.changes).to_dict(),
                                  f"{lead}: {summary[0].lower()}{summary[1:]}\n{waits_for}\n{details}".rstrip(),
                                  predicted=dict(predicted))
    decisions.record(client, decision)
    log.info("%s %s proposal %d (%s): %s", "observed" if rules.mode == "observe" else "holding", spec.pipeline,
             found.number, waits_for, summary)
    return True, decision


def _proposed(spec: PipelineSpec, config: PipelineConfig, changes: dict) -> PipelineConfig:
    """The config a proposal would serve (numbered as the config it is made on: it is not stored)."""
    merged = spec.merge(config, changes)
    return PipelineConfig(merged.pipeline, config.version, merged.steps)



def _drop_rejected(client, pipeline: str, config: PipelineConfig, plan, now: datetime, memory_seconds: float) -> None:
    """Take out of `plan` the knob moves an operator rejected lately (the same knob, the same way)."""
    dropped = []
    for rejected in proposals(client, pipeline, "rejected", limit=20):
        if rejected.decided_at is None or (now - rejected.decided_at).total_seconds() >= memory_seconds:
            continue
        for step, values in list(plan.changes.items()):
            for knob, value in list(values.items()):
                if knob in rejected.changes.get(step, {}) and same_way(
                        config.knob(step, knob), rejected.changes[step][knob], value):
                    plan.drop(step, knob)
                    dropped.append(f"{step}.{knob}")
    if dropped:
        plan.reasons.append(f"left {', '.join(dropped)} alone: an operator rejected that move lately")


# ---- operators' answers ---------------------------------------------------------------------------------

def _pending(client, number: int) -> Proposal:
    found = proposal(client, number)
    if found is None:
        raise ApprovalError(404, f"no proposal {number}; `tracetune tuner pending` lists those waiting")
    if found.status == "expired" and found.decided_at is None:
        _expire(client, found)
    if found.status != "pending":
        by = f" by {found.decided_by}" if found.decided_by else ""
        when = f" at {found.decided_at:%Y-%m-%d %H:%M:%S} UTC" if found.decided_at else \
            f" at {found.expires_at:%Y-%m-%d %H:%M:%S} UTC" if found.status == "expired" else ""
        raise ApprovalError(409, f"proposal {number} is {found.status}{by}{when}, not pending: nothing was changed")
    return found


def approve(client, number: int, author: str, note: str) -> list[decisions.Decision]:
    """Apply pending proposal `number` exactly as proposed, as the loop would have: a canary of it on the share
    it was proposed with, else the change for every task. Returns the decisions recorded (`proposal_approve`,
    then `canary_start` or `tune`). ApprovalError 404/409 when it is not pending, when the pipeline is frozen
    or pinned (it stays pending), or when the config changed since (recorded `stale`, nothing applied)."""
    with versions.write_lock:
        found = _pending(client, number)
        state = decisions.state(client, found.pipeline)
        if state.frozen or state.pinned:
            raise ApprovalError(409, f"{found.pipeline} is {'frozen' if state.frozen else 'pinned'} ({state.reason}); "
                                     f"unfreeze it first: proposal {number} stays pending")
        spec, in_force = versions.latest_spec(client, found.pipeline), versions.latest(client, found.pipeline)
        why_stale = _stale(client, found, spec, in_force)
        if why_stale:
            if _claim(client, found, "stale", author, note):
                base = in_force or PipelineConfig(found.pipeline, found.base_version)
                decisions.record(client, decisions.Decision(
                    found.pipeline, "proposal_stale", found.base_version, base.version, base.to_dict(), base.to_dict(),
                    f"Proposal {number} not applied: {why_stale}; the loop proposes again on the config in force "
                    f"(approval asked by {author}: {note})", author=author))
            raise ApprovalError(409, f"proposal {number} is stale: {why_stale}; nothing was changed, and the "
                                     "loop proposes again on the config in force")
        if not _claim(client, found, "approved", author, note):
            raise ApprovalError(409, f"proposal {number} was decided by someone else a moment ago: nothing was "
                                     "changed here; `tracetune tuner pending` shows its outcome")
        return _apply(client, spec, in_force, found, author, note)


def _stale(client, found: Proposal, spec: PipelineSpec | None, in_force: PipelineConfig | None) -> str:
    """Why `found` may not be applied as proposed ("" when it may): it was made on another config."""
    if spec is None or in_force is None:
        return f"{found.pipeline} is not declared any more"
    if in_force.version != found.base_version:
        last = decisions.last_decision(client, found.pipeline, ("tune", "pin", "change", "rollback", "canary_promote",
                                                                "declaration"))
        how = f" ({last['kind']} by {last['author']})" if last and last["version_after"] == in_force.version else ""
        return f"it was made on config version {found.base_version} and version {in_force.version} is in force now{how}"
    if canary.running(client, found.pipeline) is not None:
        return "a canary is on trial now"
    try:
        spec.merge(in_force, found.changes)
    except ConfigError as exc:
        return f"it no longer fits the declaration ({exc})"
    return ""


def _apply(client, spec: PipelineSpec, config: PipelineConfig, found: Proposal, author: str,
           note: str) -> list[decisions.Decision]:
    """The loop's own way of trying a plan (tune_once): a canary on the proposal's share, else every task."""
    reason = found.reason
    summary, _, details = reason.partition("\n")
    if found.canary_share > 0:
        trial = canary.start(client, spec, config, found.changes, found.canary_share, reason)
        new, kind = trial.config, "canary_start"
        text = f"Trying on {found.canary_share:.0%} of tasks: {summary[0].lower()}{summary[1:]}\n{details}"
    else:
        new, kind, text = versions.change(client, spec, found.changes, author="tuner", reason=reason), "tune", reason
    in_force = new.version if kind == "tune" else config.version  # a canary's version is on trial, not in force
    approved = decisions.Decision(found.pipeline, "proposal_approve", config.version, in_force, config.to_dict(),
                                  new.to_dict(), f"Proposal {found.number} approved by {author}: {note}\n{summary}",
                                  predicted=found.predicted, author=author)
    applied = decisions.Decision(found.pipeline, kind, config.version, new.version, config.to_dict(), new.to_dict(),
                                 f"{text}\napproved by {author} (proposal {found.number}): {note}".rstrip(),
                                 predicted=found.predicted)
    decisions.record(client, approved)
    decisions.record(client, applied)
    log.info("approved %s proposal %d by %s: %s version %d", found.pipeline, found.number, author,
             "trying" if kind == "canary_start" else "tuned", new.version)
    return [approved, applied]


def reject(client, number: int, author: str, note: str) -> decisions.Decision:
    """Reject pending proposal `number`: nothing changes, and the loop does not propose the same moves again
    for `rejected_memory_seconds`. Returns the `proposal_reject` decision; ApprovalError when not pending."""
    with versions.write_lock:
        found = _pending(client, number)
        if not _claim(client, found, "rejected", author, note):
            raise ApprovalError(409, f"proposal {number} was decided by someone else a moment ago; "
                                     "`tracetune tuner pending` shows its outcome")
        config = versions.latest(client, found.pipeline) or PipelineConfig(found.pipeline, found.base_version)
        decision = decisions.Decision(found.pipeline, "proposal_reject", found.base_version, config.version,
                                      config.to_dict(), config.to_dict(),
                                      f"Proposal {number} rejected by {author}: {note}\n{found.summary}",
                                      predicted=found.predicted, author=author)
        decisions.record(client, decision)
    log.info("rejected %s proposal %d by %s: %s", found.pipeline, number, author, note)
    return decision


def _expire(client, found: Proposal) -> decisions.Decision | None:
    try:
        if not _claim(client, found, "expired", "tuner", "unanswered in time"):
            return None
    except ApprovalError:  # another replica is answering it now: its outcome, or the next look's expiry
        return None
    config = versions.latest(client, found.pipeline) or PipelineConfig(found.pipeline, found.base_version)
    hours = (found.expires_at - found.proposed_at).total_seconds() / 3600
    decision = decisions.Decision(found.pipeline, "proposal_expire", found.base_version, config.version,
                                  config.to_dict(), config.to_dict(),
                                  f"Proposal {found.number} expired unanswered after {hours:.3g} h "
                                  f"(made {found.proposed_at:%Y-%m-%d %H:%M} UTC)\n{found.summary}",
                                  predicted=found.predicted)
    decisions.record(client, decision)
    log.info("%s proposal %d expired unanswered", found.pipeline, found.number)
    return decision


def expire_due(client, pipeline: str = "") -> list[decisions.Decision]:
    """Record the expiry of every pending proposal past its time (of one pipeline, when given)."""
    with versions.write_lock:
        due = [p for p in proposals(client, pipeline, "expired", limit=1000) if p.decided_at is None]
        return [d for d in (_expire(client, p) for p in due) if d is not None]

