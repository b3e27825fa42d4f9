"""Tuner: each pipeline's config in force, its approval mode and the proposals waiting for an operator, the
decision timeline with predicted vs observed effect, canaries in flight; pin, freeze, unfreeze, rollback,
approve and reject a proposal through the tuner's API with a token the operator pastes, after a review step.

Reads go to the store (the tuner's read functions on the read-only client). Writes go to the tuner's
HTTP API only, with the token the operator typed into this session: the dashboard server holds no
token of its own, so a visitor without one can look but not change anything.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import altair as alt
import httpx
import polars as pl
import streamlit as st

from tracetune.dashboard import charts, frames, ui
from tracetune.dashboard.context import Context, run
from tracetune.dashboard.queries import StoreUnavailable, cached, prefetch, show_unavailable
from tracetune.tuner import approval, canary, decisions, versions
from tracetune.tuner.config import PipelineConfig

ACTIONS = {
    "pin": "Pin a config: hold these knob values; the tuner loop leaves the pipeline alone until unfrozen.",
    "freeze": "Freeze: the tuner loop stops changing the pipeline (a canary on trial is cancelled).",
    "unfreeze": "Unfreeze: the tuner loop may change the pipeline again (clears frozen and pinned).",
    "rollback": "Roll back to an earlier version's knob values, stored as the next version; the tuner is frozen.",
    "approve": "Approve a waiting proposal: applied exactly as proposed (a canary of it when proposed with one).",
    "reject": "Reject a waiting proposal: nothing changes, and the tuner leaves those moves alone for an hour.",
}
_PATHS = {"pin": "/v1/pipelines/{pipeline}/config", "freeze": "/v1/pipelines/{pipeline}/freeze",
          "unfreeze": "/v1/pipelines/{pipeline}/unfreeze", "rollback": "/v1/pipelines/{pipeline}/rollback",
          "approve": "/v1/proposals/{proposal}/approve", "reject": "/v1/proposals/{proposal}/reject"}
TIMEOUT_SECONDS = 15


def config_table(config: PipelineConfig) -> pl.DataFrame:
    """One row per step and knob of a config, the value as people read it (frames.knob_text)."""
    rows = [{"step": step, "knob": knob, "value": frames.knob_text(value)}
            for step, knobs in config.to_dict()["steps"].items() for knob, value in knobs.items()]
    return pl.DataFrame(rows, schema={"step": pl.Utf8, "knob": pl.Utf8, "value": pl.Utf8})


def changes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> pl.DataFrame:
    """The knobs whose value differs between two step -> knob -> value maps: step, knob, now, after."""
    rows = []
    for step in sorted(set(before) | set(after)):
        for knob in sorted(set(before.get(step, {})) | set(after.get(step, {}))):
            old, new = before.get(step, {}).get(knob), after.get(step, {}).get(knob, before.get(step, {}).get(knob))
            if old != new:
                rows.append({"step": step, "knob": knob, "now": frames.knob_text(old), "after": frames.knob_text(new)})
    return pl.DataFrame(rows, schema={"step": pl.Utf8, "knob": pl.Utf8, "now": pl.Utf8, "after": pl.Utf8})


KIND_WORDS = {"tune": "tuned", "pin": "pinned by hand", "change": "changed by hand", "rollback": "rolled back",
              "freeze": "froze the tuner", "unfreeze": "let the tuner tune again", "canary_start": "canary started",
              "canary_promote": "canary promoted", "canary_rollback": "canary rolled back",
              "canary_cancel": "canary cancelled", "declaration": "declared by the executor",
              "proposal": "proposed", "proposal_approve": "proposal approved", "proposal_reject": "proposal rejected",
              "proposal_expire": "proposal expired", "proposal_stale": "stale proposal not applied",
              "approval_mode": "approval mode set", "shadow_start": "shadow trial started",
              "shadow_pass": "shadow trial passed", "shadow_reject": "shadow trial rejected",
              "shadow_cancel": "shadow trial cancelled"}


def proposal_table(waiting: list[approval.Proposal], config: PipelineConfig | None) -> pl.DataFrame:
    """The proposals waiting for an operator in words: number, when made and until when, what changes (now ->
    after), the one sentence with its predictions, the objectives it restores and why it waits."""
    rows = []
    for p in waiting:
        diff = changes(config.to_dict()["steps"] if config else {}, p.changes)
        rows.append({"#": str(p.number), "made (UTC)": frames.format_time(p.proposed_at),
                     "expires (UTC)": frames.format_time(p.expires_at),
                     "what changes": "; ".join(f"{r['step']}.{r['knob']} {r['now']} → {r['after']}"
                                               for r in diff.iter_rows(named=True)) or frames.MISSING,
                     "sentence": frames.readable(p.summary), "restores": ", ".join(p.violated) or "—",
                     "waits for": p.waits_for})
    return pl.DataFrame(rows, schema={c: pl.Utf8 for c in ("#", "made (UTC)", "expires (UTC)", "what changes",
                                                          "sentence", "restores", "waits for")})


def decision_table(history: list[dict]) -> pl.DataFrame:
    """Every decision in words, newest first: when, what (kind, versions, who), the knobs it changed, why (its
    one-sentence summary when the tuner wrote one, then the reason with dicts and long decimals spelled out),
    and its effect (before, predicted, observed; frames.decision_effect)."""
    rows = []
    for d in history:
        # the tuner's one sentence (an older one-line reason is all sentence); its workings follow
        summary = frames.readable(d.get("summary") or "")
        details = d["details"] if "details" in d else d["reason"]
        why = frames.readable(details).replace("\n", "; ") if details else ""
        why = "" if why == summary else why
        rows.append({
            "when (UTC)": frames.format_time(d["decided_at"]),
            "decision": f"{KIND_WORDS.get(d['kind'], d['kind'])}: version {d['version_before']} → "
                        f"{d['version_after']}, by {d['author']}",
            "what changed": frames.decision_change(d["config_before"], d["config_after"]),
            "why": f"{summary} ({why})" if summary and why else summary or why or frames.MISSING,
            "effect": frames.decision_effect(d["predicted"], d["observed"]) or "nothing predicted or measured"})
    return pl.DataFrame(rows, schema={c: pl.Utf8 for c in ("when (UTC)", "decision", "what changed", "why", "effect")})


def call_tuner(tuner_url: str, token: str, pipeline: str, action: str, body: dict[str, Any],
               proposal: int | None = None) -> tuple[bool, str]:
    """POST the action to the tuner with the operator's token; (ok, the answer in one line)."""
    url = tuner_url + _PATHS[action].format(pipeline=pipeline, proposal=proposal)
    try:
        answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        return False, f"Cannot reach the tuner at {tuner_url} ({type(exc).__name__}): is `tracetune up` running?"
    try:
        data = answer.json()
    except ValueError:
        data = {}
    if answer.status_code != 200:
        detail = data.get("detail") if isinstance(data, dict) else None
        return False, f"The tuner refused ({answer.status_code}): {detail or answer.reason_phrase}"
    if action in ("pin", "rollback"):
        return True, f"Done: {pipeline} now serves config version {data.get('version')} ({action})."
    if action == "approve":
        trial = [d for d in data.get("decisions", []) if d.get("kind") == "canary_start"]
        what = f"canary version {trial[0]['version_after']} is on trial" if trial else \
            f"config version {data.get('version')} is in force"
        return True, f"Done: proposal {proposal} approved; {pipeline}'s {what}."
    if action == "reject":
        return True, f"Done: proposal {proposal} rejected; {pipeline} keeps its config."
    return True, (f"Done: {pipeline} is {'frozen' if data.get('frozen') else 'not frozen'}"
                  f"{' and pinned' if data.get('pinned') else ''}.")


def _plan(ctx: Context, pipeline: str, config: PipelineConfig, action: str) -> dict[str, Any] | None:
    """The inputs of an action and what it will change; None while the inputs are not usable (said why)."""
    reason = st.text_input("Reason (kept in the decision audit)", key="tuner_reason")
    if action in ("approve", "reject"):
        return _answer_plan(ctx, pipeline, config, action, reason)
    if action == "pin":
        text = st.text_area("Knob values to hold, by step (JSON; `{}` pins the config in force as it is)",
                            value=json.dumps(config.to_dict()["steps"], indent=1), key=f"tuner_pin_{pipeline}",
                            height=200)
        try:
            steps = json.loads(text)
            if not isinstance(steps, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            st.error(f"The knob values are not a JSON object of step -> knob -> value: {exc}")
            return None
        return {"body": {"steps": steps, "reason": reason}, "diff": changes(config.to_dict()["steps"], steps)}
    if action == "rollback":
        earlier = cached(ctx.settings, versions.latest, pipeline=pipeline, below=config.version)
        version = st.number_input("Version to go back to", min_value=1, max_value=max(1, config.version),
                                  value=earlier.version if earlier else 1, step=1, key=f"tuner_version_{pipeline}")
        target = cached(ctx.settings, versions.at, pipeline=pipeline, version=int(version))
        if target is None:
            st.error(f"{pipeline} has no version {int(version)}.")
            return None
        return {"body": {"version": int(version), "reason": reason},
                "diff": changes(config.to_dict()["steps"], target.to_dict()["steps"])}
    return {"body": {"reason": reason}, "diff": None}


def _answer_plan(ctx: Context, pipeline: str, config: PipelineConfig, action: str, reason: str) -> dict | None:
    """Which waiting proposal to approve or reject, by whom and why; its changes for the review step."""
    waiting = cached(ctx.settings, approval.proposals, pipeline=pipeline, status="pending")
    if not waiting:
        st.info(f"No proposal of {pipeline} waits for an answer.")
        return None
    by_number = {p.number: p for p in waiting}
    number = st.selectbox("Proposal", list(by_number), key=f"tuner_proposal_{pipeline}",
                          format_func=lambda n: f"#{n}: {frames.readable(by_number[n].summary)}")
    by = st.text_input("Your name (kept in the decision audit)", key="tuner_by")
    if not reason.strip() or not by.strip():
        st.caption(f"Say who you are and why: both are kept with the {action}.")
        return None
    found = by_number[number]
    return {"body": {"reason": reason, "by": by}, "proposal": number,
            "diff": changes(config.to_dict()["steps"], found.changes), "sentence": frames.readable(found.summary)}


def _actions(ctx: Context, pipeline: str, config: PipelineConfig) -> None:
    st.subheader(f"Change {pipeline}")
    st.text_input("Tuner token", type="password", key="tuner_token",
                  help="The tuner's write token (`TRACETUNE_TUNER_TOKEN`, or <home>/tuner.token). Kept in this "
                       "browser session only; the dashboard sends it to the tuner with each change.")
    action = st.radio("Action", list(ACTIONS), horizontal=True, key="tuner_action")
    st.caption(ACTIONS[action])
    plan = _plan(ctx, pipeline, config, action)
    if plan is None:
        _show_answer()  # e.g. the proposal just approved: none waits any more, but the answer is shown
        return
    pending = st.session_state.get("tuner_pending")
    if st.button(f"Review {action}", key="tuner_review"):
        st.session_state["tuner_pending"] = pending = {"pipeline": pipeline, "action": action, **plan,
                                                       "version": config.version}
        st.session_state.pop("tuner_answer", None)
    if pending and (pending["pipeline"], pending["action"]) == (pipeline, action):
        diff = pending["diff"]
        what = {"freeze": f"The tuner loop stops changing {pipeline}.",
                "unfreeze": f"The tuner loop may change {pipeline} again."}.get(action)
        if diff is not None:
            what = (f"{diff.height} knob value{'s' if diff.height != 1 else ''} change from version "
                    f"{pending['version']}:" if diff.height else "No knob value changes; the config is held as it is.")
        if action in ("approve", "reject"):
            what = (f"proposal {pending['proposal']}: {pending['sentence']}. "
                    + ("These knob values change:" if action == "approve" else "Nothing changes; it proposed:"))
        st.warning(f"{action.capitalize()} {pipeline}: {what}")
        if diff is not None and diff.height:
            ui.table(diff)
        confirm, cancel = st.columns(2)
        if confirm.button(f"Confirm {action}", type="primary", key="tuner_confirm"):
            token = st.session_state.get("tuner_token", "")
            if not token:
                st.session_state["tuner_answer"] = (False, "Paste the tuner token first: nothing was sent.")
            else:
                st.session_state["tuner_answer"] = call_tuner(ctx.settings.tuner_url, token, pipeline, action,
                                                              pending["body"], pending.get("proposal"))
                st.cache_data.clear()  # the next read shows the change, not a cached answer from before it
            st.session_state.pop("tuner_pending", None)
            st.rerun()  # the page again, read after the change, with the answer below
        if cancel.button("Cancel", key="tuner_cancel"):
            st.session_state.pop("tuner_pending", None)
    _show_answer()


def _show_answer() -> None:
    answer = st.session_state.get("tuner_answer")
    if answer:
        (st.success if answer[0] else st.error)(answer[1])


def _timeline(history: list[dict], window) -> None:
    data = pl.DataFrame([{"bucket": d["decided_at"], "kind": d["kind"], "reason": frames.readable(d["reason"]),
                          "version": d["version_after"]} for d in history if d["decided_at"] >= window[0]],
                        schema={"bucket": pl.Datetime("us", "UTC"), "kind": pl.Utf8, "reason": pl.Utf8,
                                "version": pl.Int64})
    if data.is_empty():
        return
    ui.chart(alt.Chart(data).mark_point(filled=True, size=90).encode(
        x=charts.time_axis(window), y=alt.Y("kind:N", title="decision", axis=alt.Axis(labelLimit=0)),
        color=alt.Color("kind:N", legend=None),
        tooltip=["kind:N", "version:Q", "reason:N", alt.Tooltip("bucket:T", format="%Y-%m-%d %H:%M:%S")]))


def render(ctx: Context) -> None:
    f = ctx.filters
    window = ui.window(f, datetime.now(UTC))
    try:
        known = [p["pipeline"] for p in cached(ctx.settings, versions.pipelines)]
    except StoreUnavailable as problem:
        show_unavailable(problem, f.since)
        return
    shown = [p for p in known if not f.pipeline_name or p == f.pipeline_name]
    if not shown:
        st.info(f"The tuner has no config{f.scope()} yet: an executor registers its pipeline with the tuner when it "
                "starts (`tracetune up` with `tracetune demo`).")
        return
    prefetch(ctx.settings, [(fn, {"pipeline": p, **extra}) for p in shown for fn, extra in (
        (versions.latest, {}), (decisions.state, {}), (canary.running, {}), (decisions.history, {"limit": 100}),
        (approval.policy, {}), (approval.proposals, {"status": "pending"}))])
    for pipeline in shown:
        try:
            config = cached(ctx.settings, versions.latest, pipeline=pipeline)
            state = cached(ctx.settings, decisions.state, pipeline=pipeline)
            trial = cached(ctx.settings, canary.running, pipeline=pipeline)
            history = cached(ctx.settings, decisions.history, pipeline=pipeline, limit=100)
            rules = cached(ctx.settings, approval.policy, pipeline=pipeline)
            waiting = cached(ctx.settings, approval.proposals, pipeline=pipeline, status="pending")
        except StoreUnavailable as problem:
            st.error(str(problem))
            return
        st.header(pipeline)
        version, held, on_trial = st.columns(3)
        version.metric("Config version in force", f"{config.version}" if config else "–")
        held.metric("Tuner loop", "frozen" if state.frozen else "pinned" if state.pinned else "tuning",
                    help=f"{state.reason} ({state.author})" if state.reason else "Free to change knobs.")
        on_trial.metric("Canary in flight",
                        f"v{trial.version} · {100 * trial.share:.0f}% of tasks" if trial else "none",
                        help=f"Since {trial.started_at:%Y-%m-%d %H:%M} UTC: {frames.readable(trial.reason)}"
                        if trial else None)
        st.caption(f"Approval mode: {rules.approval.mode} (from the {rules.source})"
                   + (f"; waiting for a person in auto: {approval.describe(rules.approval)}"
                      if rules.approval.mode == "auto" and approval.describe(rules.approval) else "")
                   + ". Set it with `tracetune tuner mode`.")
        if waiting:
            st.warning(f"{len(waiting)} proposal{'s' if len(waiting) != 1 else ''} of the tuner wait"
                       f"{'s' if len(waiting) == 1 else ''} for an operator: approve or reject below (one pipeline "
                       "chosen in the sidebar), or `tracetune tuner approve N`.")
            ui.text_table(proposal_table(waiting, config))
        if config is not None:
            ui.table(config_table(config))
        if trial is not None:
            st.caption(f"Canary version {trial.version} against version {trial.base_version}: "
                       f"{frames.readable(trial.reason)}")
            ui.table(changes(config.to_dict()["steps"] if config else {}, trial.config.to_dict()["steps"]))
        st.subheader("Decisions")
        if history:
            _timeline(history, window)
            ui.text_table(decision_table(history))
            st.caption("effect: the pipeline before the decision, what the tuner predicted, and what was measured "
                       "after it (a canary: its tasks against the base version's, over the same time).")
        else:
            st.caption("No decision yet.")
        if f.pipeline_name and config is not None:
            _actions(ctx, pipeline, config)
    if not f.pipeline_name:
        st.caption("Choose one pipeline in the sidebar to pin, freeze, unfreeze, roll it back or answer its "
                   "proposals.")


if __name__ == "__main__":
    run(render)
