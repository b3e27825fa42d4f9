"""Dead letters: side effects that gave up after their retries, what failed, why, how often it was tried, when,
and what operators did about them; one letter's body and history, with the commands that replay or discard it.

Read-only, as every page: replay and discard are write calls (the tuner's token), made with `tracetune
dead-letters` or `POST /v1/dead-letters/{key}/replay|discard`, never from a browser page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import streamlit as st

from tracetune.analyzer import dead_letters, parse_window
from tracetune.dashboard import frames, ui
from tracetune.dashboard.context import Context, run
from tracetune.dashboard.queries import StoreUnavailable, cached, prefetch, show_unavailable

SHOWN = 200
STATUSES = {"open": "open", "replayed": "replayed", "discarded": "discarded", "all": "all"}


def letter_table(letters: list[dead_letters.Letter], show_pipeline: bool) -> pl.DataFrame:
    """One row per letter: status, step, task, attempts in all, last HTTP status and error, when, last action."""
    table = pl.DataFrame([{
        "key": letter.idempotency_key, "status": letter.status, "pipeline": letter.pipeline, "step": letter.step,
        "task": letter.task_id, "attempts": letter.attempts, "dead-lettered": letter.dead_lettered,
        "HTTP": letter.last_status or None, "error": letter.error, "last (UTC)": frames.format_time(letter.last_at),
        "done": f"{letter.last_action} by {letter.last_author}" if letter.last_action else ""}
        for letter in letters], schema={"key": pl.Utf8, "status": pl.Utf8, "pipeline": pl.Utf8, "step": pl.Utf8,
                                        "task": pl.Utf8, "attempts": pl.Int64, "dead-lettered": pl.Int64,
                                        "HTTP": pl.Int64, "error": pl.Utf8, "last (UTC)": pl.Utf8, "done": pl.Utf8})
    return table if show_pipeline else table.drop("pipeline")


def _call(f, status: str) -> dict:
    since = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(seconds=parse_window(f.since))
    return {"status": status, "pipeline": f.pipeline_name, "since": since, "limit": SHOWN}


def _detail(ctx: Context, key: str) -> None:
    letter = cached(ctx.settings, dead_letters.find, key=key)
    st.markdown(f"**{letter.pipeline} / {letter.step}**, task `{letter.task_id}`: {letter.status}, "
                f"dead-lettered {letter.dead_lettered}x, {letter.attempts} attempts in all")
    st.text(f"last error: {letter.error}")
    history = [{"when (UTC)": frames.format_time(row["created_at"]), "what": "dead-lettered",
                "who": "executor", "detail": f"{row['attempts']} attempts, HTTP {row['last_status'] or '-'}"}
               for row in letter.history]
    history += [{"when (UTC)": frames.format_time(e.at), "what": e.action, "who": e.author,
                 "detail": e.reason + (f" ({e.attempts} attempts, HTTP {e.http_status or '-'})" if e.attempts else "")}
                for e in letter.events]
    ui.text_table(pl.DataFrame(history).sort("when (UTC)"))
    st.json(letter.body, expanded=False)
    st.caption("Replay sends the body again under its original idempotency key, through the executor (it holds "
               "the service's URL and credentials); the service stores it once however often it is replayed. "
               "From a shell in the stack's folder:")
    st.code(f"tracetune dead-letters replay {letter.idempotency_key}\n"
            f"tracetune dead-letters discard {letter.idempotency_key} --reason \"...\"", language="bash")


def render(ctx: Context) -> None:
    f = ctx.filters
    status = st.radio("Letters", list(STATUSES), horizontal=True, key="dead_letters_status")
    prefetch(ctx.settings, [(dead_letters.letters, _call(f, status)), (dead_letters.growth, {})])
    try:
        found = cached(ctx.settings, dead_letters.letters, **_call(f, status))
        growth = cached(ctx.settings, dead_letters.growth)
    except StoreUnavailable as problem:
        show_unavailable(problem, f.since)
        return
    mine = [g for g in growth if not f.pipeline_name or g.pipeline == f.pipeline_name]
    opened, new = st.columns(2)
    opened.metric("Open dead letters", f"{sum(g.open for g in mine):,}",
                  help="Side effects that gave up and were neither replayed nor discarded (any time).")
    new.metric("New in the last hour", f"{sum(g.new for g in mine):,}",
               help="The DeadLettersGrowing alert fires while a step has new open letters.")
    if not found:
        st.info(f"No {'' if status == 'all' else status + ' '}dead letters in the last {f.since}{f.scope()}.")
        return
    table = letter_table(found, not f.pipeline_name)
    ui.table(table, {"attempts": ui.COUNT, "dead-lettered": ui.COUNT, "HTTP": ui.COUNT})
    st.caption(f"Newest first, at most {SHOWN}. attempts: every attempt of every time the effect was "
               "dead-lettered; done: the last replay or discard.")
    st.subheader("One letter")
    key = st.selectbox("Idempotency key", [letter.idempotency_key for letter in found], key="dead_letters_key")
    if key:
        _detail(ctx, key)


if __name__ == "__main__":
    run(render)
