"""`tracetune tuner`: run the tuner API and loop; `tuner history` lists its decisions."""

from __future__ import annotations

import json
import logging

import click

from tracetune.cli.common import check_pipeline, connect, load_settings


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
