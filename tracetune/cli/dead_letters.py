"""`tracetune dead-letters`: side effects that gave up after their retries, to list, show, replay or discard.

Reads go to the store; replay and discard go through the tuner's API (tuner/routes/dead_letters.py), which
asks the executor to send the letter under its original idempotency key."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import click

from tracetune.cli.alerts import _since
from tracetune.cli.common import UserError, answer_detail, check_window, connect, load_settings, tuner_call


class DownstreamFailed(click.ClickException):
    """A replay the downstream did not take: one line saying why, exit code 1 (not the user's mistake)."""

    exit_code = 1


@click.group("dead-letters")
def dead_letters_group() -> None:
    """Side effects that gave up after their retries (e.g. the CRM follow-up): list, show, replay, discard.

    Replay runs in the executor (it holds the downstream's URL and credentials), asked by the tuner, and sends
    the letter under its original idempotency key, so the downstream stores the effect once."""


@dead_letters_group.command("list")
@click.option("--status", type=click.Choice(["open", "replayed", "discarded", "all"]), default="open",
              show_default=True, help="Which letters.")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("--step", default="", help="Only this step.")
@click.option("--since", default=None, help="Only letters dead-lettered within this window: 30m, 1d, 7d.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Newest letters.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--wide", is_flag=True, help="Every column (full keys, first time, last replay or discard).")
@click.pass_context
def dead_letters_list(ctx: click.Context, status: str, pipeline: str, step: str, since: str | None, limit: int,
                      as_json: bool, wide: bool) -> None:
    """Dead letters, newest first: what failed (pipeline, step, task), why, how often it was tried, when."""
    from datetime import timedelta

    import polars as pl

    from tracetune import analyzer
    from tracetune.analyzer import dead_letters as letters_mod
    from tracetune.terminal import console, frame_table

    if since:
        check_window(since)
    start = datetime.now(UTC) - timedelta(seconds=analyzer.parsecheck_window(since)) if since else None
    client = connect(load_settings(ctx), readonly=True)
    found = letters_mod.letters(client, status, pipeline, step, start, limit)
    rows = [letter.to_dict(payload=False) for letter in found]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console().print(f"no {'' if status == 'all' else status + ' '}dead letters"
                        + (f" for {pipeline}" if pipeline else ""))
        return
    shown = [{"key": r["idempotency_key"] if wide else r["idempotency_key"][:13], "status": r["status"],
              "pipeline": r["pipeline"], "step": r["step"], "task": r["task_id"], "tries": r["attempts"],
              "times": r["dead_lettered"], "http": r["last_status"] or "-", "last (UTC)": _since(r["last_at"])[5:],
              "first (UTC)": _since(r["first_at"]), "error": r["error"],
              "done by": f"{r['last_action']} by {r['last_author']}" if r["last_action"] else "",
              "why": r["last_reason"]} for r in rows]
    columns = ("key", *(("status",) if status == "all" else ()), "step", "task", "tries", "http", "last (UTC)", "error")
    console(wide).print(frame_table(pl.DataFrame(shown, infer_schema_length=None), "dead letters, newest first "
                                    "(tries: attempts in all; `tracetune dead-letters show KEY`)", columns, wide))


@dead_letters_group.command("show")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print the letter as JSON.")
@click.pass_context
def dead_letters_show(ctx: click.Context, key: str, as_json: bool) -> None:
    """One letter by its idempotency key (or a unique prefix of 8+ characters): the body it sent, each time it
    was dead-lettered, each replay and discard."""
    from tracetune.analyzer import dead_letters as letters_mod

    try:
        letter = letters_mod.find(connect(load_settings(ctx), readonly=True), key)
    except letters_mod.DeadLetterError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(letter.to_dict(), indent=2, default=str))
        return
    click.echo(f"{letter.idempotency_key}  {letter.status}\n"
               f"  {letter.pipeline} / {letter.step}, task {letter.task_id}\n"
               f"  dead-lettered {letter.dead_lettered}x, {letter.attempts} attempts in all, first "
               f"{_since(letter.first_at.isoformat())}, last {_since(letter.last_at.isoformat())} UTC\n"
               f"  last error: {letter.error}")
    for row in letter.history:
        click.echo(f"  {_since(row['created_at'].isoformat())}  dead-lettered after {row['attempts']} attempts "
                   f"(HTTP {row['last_status'] or '-'})")
    for event in letter.events:
        click.echo(f"  {_since(event.at.isoformat() if event.at else '')}  {event.action} by {event.author}"
                   + (f" after {event.attempts} attempts" if event.attempts else "")
                   + (f": {event.reason}" if event.reason else ""))
    click.echo("body:\n" + json.dumps(letter.body, indent=2, default=str))


@dead_letters_group.command("replay")
@click.argument("keys", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every open letter (of --pipeline / --step, if given).")
@click.option("--pipeline", default="", help="With --all: only this pipeline.")
@click.option("--step", default="", help="With --all: only this step.")
@click.option("--reason", default="", help="Why (kept in the audit).")
@click.pass_context
def dead_letters_replay(ctx: click.Context, keys: tuple[str, ...], every: bool, pipeline: str, step: str,
                        reason: str) -> None:
    """Send letters again through the executor under their original idempotency keys (the downstream stores
    each once, however often it is replayed). A letter the downstream still refuses stays open, and why is
    shown; the exit code is then 1."""
    import getpass

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tracetune.analyzer import dead_letters as letters_mod

    s = load_settings(ctx)
    if every == bool(keys):
        raise UserError("give the keys of the letters to replay, or --all for every open one "
                        "(`tracetune dead-letters list` shows them)")
    if every:
        keys = tuple(letter.idempotency_key for letter in
                     letters_mod.letters(connect(s, readonly=True), "open", pipeline, step, None, 10_000))
        if not keys:
            click.echo("no open dead letters to replay")
            return
    body = {"author": getpass.getuser(), "reason": reason}
    failed = []
    with Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), transient=True,
                  disable=len(keys) < 2 or not sys.stderr.isatty(), console=None) as progress:
        bar = progress.add_task("replay", total=len(keys))
        for key in keys:
            answer = tuner_call(s, "POST", f"/v1/dead-letters/{key}/replay", body, timeout=330.0)
            if answer.status_code == 200:
                done = answer.json()
                click.echo(f"{done['idempotency_key']}: replayed after {done['attempts']} attempt"
                           f"{'s' if done['attempts'] != 1 else ''} (HTTP {done['http_status']})")
            elif answer.status_code == 502 and answer.json().get("outcome") == "replay_failed":
                failed.append(key)
                click.echo(f"{answer.json()['idempotency_key']}: still failing, kept: {answer_detail(answer)}",
                           err=True)
            elif answer.status_code in (401, 403, 404, 409, 422):
                raise UserError(answer_detail(answer))
            else:
                raise DownstreamFailed(answer_detail(answer))
            progress.advance(bar)
    if failed:
        raise DownstreamFailed(f"{len(failed)} of {len(keys)} dead letters were not taken; they stay open "
                               "(`tracetune dead-letters show KEY`)")


@dead_letters_group.command("discard")
@click.argument("key")
@click.option("--reason", required=True, help="Why the effect should never happen (kept in the audit).")
@click.pass_context
def dead_letters_discard(ctx: click.Context, key: str, reason: str) -> None:
    """Give a letter up for good; who and why are kept in the audit."""
    import getpass

    if not reason.strip():
        raise click.BadParameter("say why the effect should never happen", param_hint="--reason")
    answer = tuner_call(load_settings(ctx), "POST", f"/v1/dead-letters/{key}/discard",
                        {"author": getpass.getuser(), "reason": reason})
    if answer.status_code != 200:
        raise UserError(answer_detail(answer))
    done = answer.json()
    click.echo(f"{done['idempotency_key']}: discarded by {done['author']}: {done['reason']}")
