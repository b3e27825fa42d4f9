"""`tracetune tuner`: run the tuner API and loop; `tuner history` lists its decisions."""

from __future__ import annotations

import json
import logging

import click

from tracetune.base.settings import Settings
from tracetune.cli.common import UserError, answer_detail, check_pipeline, connect, load_settings, tuner_call


@click.group(invoke_without_command=True)
@click.pass_context
def tuner(ctx: click.Context) -> None:
    """Run the tuner API (GET /v1/pipelines/{p}/config, OpenAPI at /docs; default port 8700) and the tuning
    loop. Several may run: all serve the API, the one holding the `tuner` lease runs the loop.

    `tracetune tuner history --pipeline P` lists the tuner's decisions with predicted against observed.
    """
    if ctx.invoked_subcommand is not None:
        return
    import threading

    from tracetune import tuner as tuner_mod
    logging.getLogger("tracetune.store.lease").setLevel(logging.INFO)  # who holds the lease, always shown
    tuner_mod.serve(load_settings(ctx))
    for thread in threading.enumerate():  # the loop has been told to stop: let it release its lease
        if thread.name == "tuning-loop":
            thread.join(10)


# The pipeline figures a decision predicts and what was measured after it, as history shows them.
_HISTORY_FIGURES = (("cost_per_1k", "cost/1k", "{:.4f}"), ("p95_ms", "p95 ms", "{:.0f}"),
                    ("quality", "quality", "{:.3f}"))


def _history_rows(rows: list[dict]) -> list[dict]:
    """Decisions as history prints them: the sentence, and per figure before, predicted and observed (rounded)."""
    out = []
    for row in rows:
        predicted, observed = row["predicted"], row["observed"]
        figures = {}
        for key, _, _ in _HISTORY_FIGURES:
            before = predicted.get(f"before.{key}", observed.get(f"base.{key}"))
            seen = observed.get(key, observed.get(f"canary.{key}"))
            values = {"before": before, "predicted": predicted.get(key), "observed": seen}
            figures[key] = {k: round(v, 6) for k, v in values.items() if v is not None and v == v}
        out.append({"decided_at": row["decided_at"].isoformat(timespec="seconds"), "kind": row["kind"],
                    "author": row["author"], "version_before": row["version_before"],
                    "version_after": row["version_after"], "summary": row["summary"], "figures": figures,
                    "decision_id": row["decision_id"]})
    return out


@tuner.command("history")
@click.option("--pipeline", required=True, help="The pipeline whose decisions to list.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="Newest decisions.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.pass_context
def tuner_history(ctx: click.Context, pipeline: str, limit: int, as_json: bool) -> None:
    """The tuner's decisions, newest first: one sentence each, and cost, p95 and quality before, as predicted
    and as observed after (a canary's verdict: the canary's own tasks)."""
    from rich.console import Console
    from rich.table import Table

    from tracetune.tuner import decisions

    client = connect(load_settings(ctx), readonly=True)
    check_pipeline(client, pipeline)
    rows = _history_rows(decisions.history(client, pipeline, limit=limit))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    console = Console(width=100)
    if not rows:
        console.print(f"no decisions for {pipeline} yet")
        return
    table = Table(title=f"{pipeline}: tuner decisions, newest first (before -> predicted / observed)",
                  show_lines=True, width=100)
    table.add_column("when, what", width=16)
    table.add_column("decision", ratio=1)
    table.add_column("before -> predicted / observed", width=34, no_wrap=True)
    for row in rows:
        lines = []
        for key, label, fmt in _HISTORY_FIGURES:
            figures = row["figures"][key]
            if figures:
                shown = [fmt.format(figures[k]) if k in figures else "-" for k in ("before", "predicted", "observed")]
                lines.append(f"{label} {shown[0]} -> {shown[1]} / {shown[2]}")
        when = row["decided_at"].replace("T", " ")[:16]
        table.add_row(f"{when}\n{row['kind']}\nv{row['version_before']} -> v{row['version_after']}", row["summary"],
                      "\n".join(lines) or "-")
    console.print(table)


# ---- approval modes: proposals waiting for an operator (tuner/approval.py, through the tuner's API) ----------

def _tuner_json(s: Settings, method: str, path: str, body: dict | None = None, params: dict | None = None):
    """The tuner's JSON answer, or UserError with the tuner's one line."""
    answer = tuner_call(s, method, path, body, params)
    if answer.status_code != 200:
        raise UserError(f"the tuner refused ({answer.status_code}): {answer_detail(answer)}")
    return answer.json()


def _proposal_line(p: dict) -> str:
    changes = "; ".join(f"{step}.{knob} -> {json.dumps(value)}" for step, knobs in p["changes"].items()
                        for knob, value in knobs.items())
    restores = f" restores {', '.join(p['violated'])};" if p["violated"] else ""
    ended = f" by {p['decided_by']}: {p['note']}" if p["decided_by"] else ""
    return (f"#{p['number']} {p['pipeline']} {p['status']}{ended} (made {p['proposed_at'][:16].replace('T', ' ')} UTC"
            + (f", expires {p['expires_at'][:16].replace('T', ' ')} UTC" if p["status"] == "pending" else "")
            + f")\n  {p['summary']}\n  changes: {changes}\n {restores} waits for: {p['waits_for']}")


@tuner.command("pending")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("--all", "show_all", is_flag=True, help="Every recent proposal (approved, rejected, expired ...).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of lines.")
@click.pass_context
def tuner_pending(ctx: click.Context, pipeline: str, show_all: bool, as_json: bool) -> None:
    """Proposals of the tuning loop waiting for an operator: what each changes, its sentence, until when."""
    params = {"pipeline": pipeline, "limit": 50} | ({} if show_all else {"status": "pending"})
    rows = _tuner_json(load_settings(ctx), "GET", "/v1/proposals", params=params)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo("no proposal waits" + (f" for {pipeline}" if pipeline else "")
                   + ("" if show_all else " (`--all` lists the recent ones)"))
    for row in [] if as_json else rows:
        click.echo(_proposal_line(row))


def _answer(ctx: click.Context, number: int, verb: str, reason: str, by: str | None) -> dict:
    import getpass

    return _tuner_json(load_settings(ctx), "POST", f"/v1/proposals/{number}/{verb}",
                       {"reason": reason, "by": by or getpass.getuser()})


@tuner.command("approve")
@click.argument("number", type=click.IntRange(1))
@click.option("--reason", required=True, help="Why (kept in the decision audit).")
@click.option("--by", default=None, help="Who approves (default: your user name).")
@click.pass_context
def tuner_approve(ctx: click.Context, number: int, reason: str, by: str | None) -> None:
    """Apply proposal NUMBER exactly as proposed (a canary of it when it was proposed with one)."""
    answer = _answer(ctx, number, "approve", reason, by)
    started = [d for d in answer["decisions"] if d["kind"] in ("canary_start", "tune")]
    what = f"canary version {started[0]['version_after']} on trial" if started and started[0]["kind"] == \
        "canary_start" else f"version {answer['version']} in force"
    click.echo(f"proposal {number} approved: {answer['proposal']['pipeline']} has {what}")


@tuner.command("reject")
@click.argument("number", type=click.IntRange(1))
@click.option("--reason", required=True, help="Why (kept in the decision audit).")
@click.option("--by", default=None, help="Who rejects (default: your user name).")
@click.pass_context
def tuner_reject(ctx: click.Context, number: int, reason: str, by: str | None) -> None:
    """Reject proposal NUMBER: nothing changes, and the loop leaves those moves alone for an hour."""
    answer = _answer(ctx, number, "reject", reason, by)
    click.echo(f"proposal {number} rejected: {answer['proposal']['pipeline']} keeps its config")


@tuner.command("mode")
@click.option("--pipeline", required=True, help="The pipeline whose approval mode to show or set.")
@click.argument("mode", required=False, type=click.Choice(["auto", "approve", "observe"]))
@click.option("--knob", "knobs", multiple=True, help="In auto: moves of this knob wait (\"route_weights\" or "
                                                    "\"step.knob\"; repeatable).")
@click.option("--max-change", type=click.FloatRange(0, min_open=True), default=None,
              help="In auto: moves larger than this share wait (e.g. 0.3).")
@click.option("--reason", default="", help="Why (kept in the decision audit).")
@click.pass_context
def tuner_mode(ctx: click.Context, pipeline: str, mode: str | None, knobs: tuple[str, ...], max_change: float | None,
               reason: str) -> None:
    """Show the pipeline's approval mode, or set it: auto, approve (every proposal waits) or observe."""
    import getpass

    s = load_settings(ctx)
    if mode is None:
        if knobs or max_change is not None:
            raise UserError("--knob and --max-change go with a mode, e.g. `tracetune tuner mode --pipeline P auto "
                            "--knob route_weights`")
        found = _tuner_json(s, "GET", f"/v1/pipelines/{pipeline}/approval")
    else:
        found = _tuner_json(s, "PUT", f"/v1/pipelines/{pipeline}/approval", {
            "mode": mode, "knobs": list(knobs), "max_change": max_change, "reason": reason, "by": getpass.getuser()})
    marks = [f"moves of {', '.join(found['knobs'])}"] if found["knobs"] else []
    marks += [f"moves over {found['max_change']:.0%}"] if found.get("max_change") is not None else []
    click.echo(f"{pipeline}: {found['mode']} (from the {found['source']})"
               + (f"; waiting for approval: {' and '.join(marks)}" if marks and found["mode"] == "auto" else ""))
