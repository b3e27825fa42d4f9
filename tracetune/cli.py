"""The `tracetune` command: one sub-command per process, plus stats, models and the supervisor."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from urllib.parse import urlsplit

import click

from tracetune import settings as settings_mod
from tracetune.settings import Settings, SettingsError


class UserError(click.ClickException):
    """A mistake the user can fix: one line on stderr, exit code 2 (as click's usage errors), no traceback."""

    exit_code = 2


def _settings(ctx: click.Context, **overrides) -> Settings:
    try:
        return settings_mod.load(ctx.obj.get("config"), **overrides)
    except SettingsError as exc:
        raise UserError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              help="TOML settings file (default: ./tracetune.toml if present).")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.pass_context
def cli(ctx: click.Context, config: str | None, verbose: bool) -> None:
    """tracetune: observe AI task pipelines, and tune them against their SLOs."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx.obj = {"config": config}


# ---- long-running processes ----------------------------------------------------------------

@cli.group(invoke_without_command=True)
@click.pass_context
def store(ctx: click.Context) -> None:
    """Run the embedded ClickHouse (chDB) on the ClickHouse HTTP interface (default 127.0.0.1:8123).

    `tracetune store migrate` and `tracetune store status` manage the schema of whichever ClickHouse the
    settings name (the embedded store, a server, or a cluster).
    """
    if ctx.invoked_subcommand is not None:
        return
    s = _settings(ctx)
    if not s.embedded:
        raise UserError("TRACETUNE_CLICKHOUSE_URL is set: the embedded store is not used; unset it "
                                   "to run the embedded store")
    if s.clickhouse_cluster:
        raise UserError(f"TRACETUNE_CLICKHOUSE_CLUSTER={s.clickhouse_cluster} is set: a cluster is reached through "
                        "TRACETUNE_CLICKHOUSE_URL, not the embedded store; unset one of them")
    from tracetune import store as store_mod
    store_mod.serve(s)


def _schema_client(s: Settings, create_database: bool):
    """A client on the settings' database for the schema commands (no migration on connect)."""
    from tracetune import store as store_mod

    where = s.store_url if s.embedded else s.clickhouse_url
    try:
        if create_database:
            store_mod.ensure_database(s)
        return store_mod.connect(s, ensure_schema=False)
    except SettingsError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure to reach ClickHouse gets the same one-line answer
        if not create_database and "UNKNOWN_DATABASE" in str(exc):
            return None  # nothing applied yet: every migration is pending
        raise UserError(f"cannot reach ClickHouse at {where}: {str(exc).splitlines()[0]} "
                        "(is `tracetune store` or `tracetune up` running?)") from None


@store.command("migrate")
@click.pass_context
def store_migrate(ctx: click.Context) -> None:
    """Apply the schema migrations the database lacks, in order, and print each one applied."""
    from tracetune import store as store_mod
    from tracetune.store.migrations import who

    s = _settings(ctx)
    client = _schema_client(s, create_database=True)
    try:
        pending = [st for st in store_mod.migration_status(client) if st.state == "pending"]
        done: list[object] = []
        show = len(pending) > 1 and sys.stderr.isatty()  # a bar on a terminal; logs get the lines below
        with click.progressbar(length=len(pending), label="migrating", file=sys.stderr, show_pos=True,
                               hidden=not show) as bar:
            result = store_mod.migrate(client, cluster=s.clickhouse_cluster,
                                       applied_by=f"{who()} (tracetune store migrate)",
                                       progress=lambda m: (done.append(m), bar.update(1)))
    except (store_mod.MigrationError, store_mod.ClusterFormError) as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a statement the server refused: say which, in one line
        failed = f" {pending[len(done)].version:03d} {pending[len(done)].name}" if len(done) < len(pending) else ""
        raise UserError(f"migration{failed} failed ({len(done)} applied before it, and recorded): "
                        f"{str(exc).splitlines()[0]}") from None
    for migration in result.applied:
        click.echo(f"applied {migration.label}")
    for state in result.changed:
        click.echo(f"warning: {state.version:03d} {state.name} has changed since it was applied "
                   f"({state.applied_at:%Y-%m-%d %H:%M} UTC); a changed file is not applied again: add a new "
                   "migration instead", err=True)
    where = f"cluster {s.clickhouse_cluster}, " if s.clickhouse_cluster else ""
    done = f"{len(result.applied)} applied" if result.applied else "nothing to apply"
    click.echo(f"{done}; {where}database {s.database} is at version {result.version:03d}")


@store.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@click.pass_context
def store_status(ctx: click.Context, as_json: bool) -> None:
    """Each migration and its state in the database: applied, pending, changed or unknown."""
    from tracetune import store as store_mod

    s = _settings(ctx)
    client = _schema_client(s, create_database=False)
    try:
        states = store_mod.migration_status(client)
    except store_mod.MigrationError as exc:
        raise UserError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the same one-line answer as for any unreachable store
        raise UserError(f"cannot read the schema state: {str(exc).splitlines()[0]}") from None
    if as_json:
        click.echo(json.dumps([st.as_dict() for st in states], indent=2))
        return
    rows = [(f"{st.version:03d}", st.name, st.state,
             f"{st.applied_at:%Y-%m-%d %H:%M:%S}" if st.applied_at else "", st.applied_by) for st in states]
    header = ("version", "name", "state", "applied at (UTC)", "applied by")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@cli.command()
@click.pass_context
def collector(ctx: click.Context) -> None:
    """Run the OTLP collector (HTTP POST /v1/traces on 4318, gRPC on 4317) writing to ClickHouse."""
    from tracetune import collector as collector_mod
    from tracetune.collector.wal import WalError

    try:
        collector_mod.serve(_settings(ctx))
    except (WalError, OSError) as exc:  # log directory in use, a port taken: one line, exit 2
        raise UserError(str(exc).splitlines()[0]) from None


@cli.group(invoke_without_command=True)
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
    tuner_mod.serve(_settings(ctx))
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

    client = _client(_settings(ctx), readonly=True)
    _known_pipeline(client, pipeline)
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

def _tuner_call(s: Settings, method: str, path: str, body: dict | None = None, params: dict | None = None):
    """Call the tuner's API with its write token; the answer's JSON, or UserError with the tuner's one line."""
    import httpx

    try:
        answer = httpx.request(method, f"{s.tuner_url}{path}", json=body, params=params, timeout=60,
                               headers={"Authorization": f"Bearer {s.secret('tuner')}"})
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach the tuner at {s.tuner_url} ({type(exc).__name__}): is `tracetune up` "
                        "running?") from None
    try:
        data = answer.json()
    except ValueError:
        data = {}
    if answer.status_code != 200:
        detail = data.get("detail") if isinstance(data, dict) else None
        raise UserError(f"the tuner refused ({answer.status_code}): {detail or answer.reason_phrase}")
    return data


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
    rows = _tuner_call(_settings(ctx), "GET", "/v1/proposals", params=params)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo("no proposal waits" + (f" for {pipeline}" if pipeline else "")
                   + ("" if show_all else " (`--all` lists the recent ones)"))
    for row in [] if as_json else rows:
        click.echo(_proposal_line(row))


def _answer(ctx: click.Context, number: int, verb: str, reason: str, by: str | None) -> dict:
    import getpass

    return _tuner_call(_settings(ctx), "POST", f"/v1/proposals/{number}/{verb}",
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

    s = _settings(ctx)
    if mode is None:
        if knobs or max_change is not None:
            raise UserError("--knob and --max-change go with a mode, e.g. `tracetune tuner mode --pipeline P auto "
                            "--knob route_weights`")
        found = _tuner_call(s, "GET", f"/v1/pipelines/{pipeline}/approval")
    else:
        found = _tuner_call(s, "PUT", f"/v1/pipelines/{pipeline}/approval", {
            "mode": mode, "knobs": list(knobs), "max_change": max_change, "reason": reason, "by": getpass.getuser()})
    marks = [f"moves of {', '.join(found['knobs'])}"] if found["knobs"] else []
    marks += [f"moves over {found['max_change']:.0%}"] if found.get("max_change") is not None else []
    click.echo(f"{pipeline}: {found['mode']} (from the {found['source']})"
               + (f"; waiting for approval: {' and '.join(marks)}" if marks and found["mode"] == "auto" else ""))


@cli.command()
@click.option("--pipeline", "targets", multiple=True, metavar="MODULE:ATTRIBUTE",
              help="A pipeline to run, e.g. my_pipelines:reviews (repeatable; default: the pipelines setting).")
@click.pass_context
def executor(ctx: click.Context, targets: tuple[str, ...]) -> None:
    """Run the executor: pipelines behind POST /v1/pipelines/{p}/tasks, /metrics, polling the tuner."""
    from tracetune.executor.runner import PipelineLoadError, run
    from tracetune.tuner.config import ConfigError

    settings = _settings(ctx, pipelines=",".join(targets) if targets else None)
    try:
        run(settings)
    except (PipelineLoadError, ConfigError) as exc:
        raise UserError(str(exc)) from None


@cli.command()
@click.pass_context
def standins(ctx: click.Context) -> None:
    """Run the stand-in remote services: an OpenAI-compatible LLM (8808) and a CRM (8809)."""
    from tracetune.demo.standins import serve_standins

    s = _settings(ctx)
    serve_standins(s.bind_host, s.llm_port, s.crm_port)


@cli.command()
@click.option("--rate", type=float, default=None, help="Mean arrivals per second (default: settings load_rate).")
@click.option("--duration", type=float, default=None, help="Seconds to run (default: until Ctrl-C).")
@click.option("--pattern", type=click.Choice(["steady", "step", "burst", "daily", "daily_bursts"]), default="steady",
              show_default=True, help="How the arrival rate changes over time (daily_bursts: a day compressed into "
                                      "--period with two 3x bursts).")
@click.option("--duplicates", type=float, default=0.2, show_default=True,
              help="Share of tickets that repeat a recent one.")
@click.option("--drift", "drifts", multiple=True, metavar="KIND@SECONDS",
              help="Inject drift from a time on: category_mix, text_length or unseen_vocab (repeatable).")
@click.option("--tenants", default="acme,globex,initech", show_default=True, help="Comma-separated tenants.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--period", type=float, default=120.0, show_default=True,
              help="Seconds in one cycle of the daily pattern (a quarter of it for burst).")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--pipeline", default="ticket_triage", show_default=True,
              help="The pipeline to drive (it takes {\"text\": ...}): rag_answering is sent product questions, "
                   "any other pipeline support tickets.")
@click.pass_context
def load(ctx: click.Context, rate, duration, pattern, duplicates, drifts, tenants, seed, period, no_progress,
         as_json, pipeline) -> None:
    """Drive a pipeline open-loop (Poisson arrivals) and record ground truth for quality."""
    from tracetune.demo.load import Drift, LoadPlan, PlanError

    s = _settings(ctx)
    try:
        parsed = [Drift.parse(d) for d in drifts]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--drift") from None
    plan = LoadPlan(rate=s.load_rate if rate is None else rate, duration=duration, pattern=pattern,
                    duplicate_ratio=duplicates, drifts=parsed, tenants=[t for t in tenants.split(",") if t],
                    seed=seed, period_seconds=period)
    try:
        plan.validate()
    except PlanError as exc:  # --rate 0 is refused, not read as "the default rate"
        flags = {"rate": "--rate", "duration": "--duration", "duplicate_ratio": "--duplicates",
                 "period_seconds": "--period", "pattern": "--pattern"}
        raise click.BadParameter(str(exc), param_hint=flags.get(exc.field)) from None
    from tracetune.loadcli import run_load_command

    summary = run_load_command(s, plan, pipeline, progress=not no_progress)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in summary.items()))


@cli.command("analyzer")
@click.pass_context
def analyzer_cmd(ctx: click.Context) -> None:
    """Run the analyzer loop: publish prices, refresh drift and SLO burn rates every interval, evaluate
    alert rules and deliver notifications. Several may run: the one holding the `analyzer` lease works."""
    import signal
    import threading

    from tracetune.analyzer.loop import run

    s = _settings(ctx)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from tracetune import store as store_mod
    from tracetune.analyzer import alerts, delivery
    from tracetune.store.lease import Lease
    logging.getLogger("tracetune.store.lease").setLevel(logging.INFO)  # who holds the lease, always shown
    client = store_mod.connect(s, wait=60)
    lease = Lease(store_mod.connect(s), "analyzer", s.lease_seconds)  # its own client
    receivers = delivery.receivers_from_settings(s)
    engine = alerts.Engine(client, receivers, alerts.Timing(s.alert_group_wait_seconds, s.alert_group_interval_seconds,
                                                            s.alert_repeat_interval_seconds), s.dashboard_url)
    run(client, s.prices_file, s.analyzer_interval_seconds, stop, engine,
        notify_seconds=max(0.5, min(5.0, s.alert_group_wait_seconds)), lease=lease,
        # A worker for each term the lease is held, with its own client; it sends only while holding.
        delivery=lambda: delivery.DeliveryWorker(store_mod.connect(s), receivers, active=lease.holding))


@cli.command()
@click.pass_context
def dashboard(ctx: click.Context) -> None:
    """Run the Streamlit dashboard (default port 8501)."""
    import os

    from tracetune.supervisor import dashboard_command

    s = _settings(ctx)
    os.execvpe(dashboard_command(s)[0], dashboard_command(s), {**os.environ, **s.as_env()})


@cli.command()
@click.pass_context
def up(ctx: click.Context) -> None:
    """Start store (if embedded), collector, tuner, executor (no load) and dashboard; Ctrl-C stops all."""
    from tracetune.supervisor import up as run_up

    sys.exit(run_up(_settings(ctx)))


@cli.command()
@click.option("--duration", type=float, default=None,
              help="Run this many seconds without the live view, print the final table, exit.")
@click.option("--rate", type=float, default=None,
              help="Requests per second of demo load (default 20 for triage, 2 for rag).")
@click.option("--pipeline", type=click.Choice(["triage", "rag"]), default="triage", show_default=True,
              help="triage: support tickets under a steady load; rag: product questions answered from a knowledge "
                   "base, under a compressed daily curve with bursts.")
@click.pass_context
def demo(ctx: click.Context, duration: float | None, rate: float | None, pipeline: str) -> None:
    """Run the whole loop with a demo load and show a live per-step table; Ctrl-C stops everything."""
    from tracetune.supervisor import demo as run_demo

    if rate is not None and rate <= 0:  # not "the default rate"
        raise click.BadParameter(f"rate must be above 0 requests/s, got {rate:g} (`tracetune up` runs without load)",
                                 param_hint="--rate")
    sys.exit(run_demo(_settings(ctx), duration=duration, pipeline=pipeline, rate=rate))


# ---- one-shot commands -----------------------------------------------------------------------

@cli.command()
@click.option("--since", default="5m", show_default=True, help="Trailing window: 30s, 5m, 2h, 7d.")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("--by", default="pipeline,step", show_default=True,
              help="Comma-separated: pipeline, step, route, tenant, model, service. Without step, route or model "
                   "the rows count tasks (root spans); with step each pipeline has an (end to end) row.")
@click.option("--batching", is_flag=True, help="Batch size, queue time and queue depth distributions instead.")
@click.option("--cold-starts", "cold", is_flag=True,
              help="Cold starts instead: each model variant's first request after an executor started.")
@click.option("--source", type=click.Choice(["rollup", "raw"]), default="rollup", show_default=True,
              help="Per-minute rollups (flat cost, percentiles within 0.5%) or raw spans (exact).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--wide", is_flag=True, help="Every column (default: the main ones, to fit 100 columns).")
@click.pass_context
def stats(ctx: click.Context, since: str, pipeline: str, by: str, batching: bool, cold: bool, source: str,
          as_json: bool, wide: bool) -> None:
    """Per-step requests, error rate, p50, p95, p99 (ms) over a trailing window, and each pipeline's
    end-to-end row (its tasks, as callers see them)."""
    from tracetune import analyzer
    from tracetune.terminal import (
        BATCHING_COLUMNS,
        COLD_START_COLUMNS,
        console,
        frame_table,
        latency_table,
        step_table,
    )

    _window(since)
    if batching and cold:
        raise UserError("--batching and --cold-starts are two views: give one")
    settings = _settings(ctx)
    _settle(settings)
    client = _client(settings, readonly=True)
    _known_pipeline(client, pipeline)
    keys = tuple(b.strip() for b in by.split(",") if b.strip())
    try:
        if cold:
            frame = analyzer.cold_starts(client, since, pipeline)
        elif batching:
            frame = analyzer.batching(client, since, pipeline)
        elif keys == ("pipeline", "step"):
            frame = analyzer.step_stats(client, since, pipeline, source=source)
        else:
            frame = analyzer.latency(client, since, keys, pipeline, source=source)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    if as_json:
        click.echo(_json_rows(frame))
    elif cold:
        console(wide).print(frame_table(frame, f"cold starts (first request per model variant and executor start), "
                                        f"last {since}", COLD_START_COLUMNS, wide))
    elif batching:
        console(wide).print(frame_table(frame.drop("size_histogram") if "size_histogram" in frame.columns else frame,
                                        f"batching, last {since}", BATCHING_COLUMNS, wide))
    elif keys == ("pipeline", "step") and not wide:
        console().print(step_table(frame, title=f"per-step latency, last {since}"))
    elif keys == ("pipeline", "step"):  # every column step_stats has: self time, batches, queue, cache, ...
        console(wide).print(frame_table(frame, f"per-step latency, last {since}", wide=True))
    else:
        what = "spans" if any(k in analyzer.stats.STEP_DIMENSIONS for k in keys) else "tasks"
        console(wide).print(latency_table(frame, f"latency by {', '.join(keys)} ({what}), last {since}", keys, wide))


def _json_rows(frame) -> str:
    """A frame as JSON rows: NaN and infinities become null (they are not JSON), times ISO strings."""
    import math

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return json.dumps([clean(row) for row in frame.to_dicts()], indent=2, default=str)


# Pipelines that ever sent spans (the hourly rollup keeps them longest), were declared with the tuner or have an SLO.
KNOWN_PIPELINES_SQL = """
SELECT pipeline FROM tracetune_spans_1h WHERE pipeline != '' GROUP BY pipeline
UNION DISTINCT
SELECT pipeline FROM tracetune_config_versions GROUP BY pipeline
UNION DISTINCT
SELECT pipeline FROM tracetune_slos GROUP BY pipeline
"""


def _known_pipeline(client, pipeline: str) -> None:
    """UserError naming the known pipelines when --pipeline names none of them (rather than an empty table)."""
    if not pipeline:
        return
    known = sorted({row[0] for row in client.query(KNOWN_PIPELINES_SQL).result_rows})
    if pipeline not in known:
        raise UserError(f"unknown pipeline {pipeline!r}; known: {', '.join(known) or 'none yet (send traffic first)'}")


def _settle(s: Settings, patience: float = 10.0) -> None:
    """Wait (up to `patience` s, saying so on stderr) for spans the collector has acknowledged but not yet
    written, so `python app.py && tracetune stats` sees the app's spans; no collector running: no wait."""
    import time

    import httpx

    def queued() -> int:
        try:
            return int(httpx.get(f"{s.collector_url}/health", timeout=1.0).json().get("queued_rows") or 0)
        except (httpx.HTTPError, ValueError, AttributeError):
            return 0

    waiting, deadline = queued(), time.monotonic() + patience
    if not waiting:
        return
    click.echo(f"waiting for {waiting:,} spans the collector has acknowledged but not written yet (up to "
               f"{patience:g} s)", err=True)
    while waiting and time.monotonic() < deadline:
        time.sleep(0.25)
        waiting = queued()
    if waiting:
        click.echo(f"{waiting:,} spans still queued in the collector; they are not in this answer yet", err=True)


def _client(s: Settings, readonly: bool = False):
    """A store client; `readonly` reads as the store's read-only user (nothing the command does can write)."""
    from tracetune import store as store_mod

    try:
        return store_mod.connect(s, readonly=readonly)
    except SettingsError as exc:  # e.g. a password file others can read
        raise UserError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure to reach ClickHouse gets the same one-line answer
        where = s.store_url if s.embedded else s.clickhouse_url
        raise UserError(f"cannot reach ClickHouse at {where}: {str(exc).splitlines()[0]} "
                        "(is `tracetune up` running?)") from None


def _window(since: str, option: str = "--since") -> None:
    from tracetune import analyzer
    try:
        analyzer.parse_window(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _prices(s: Settings, client):
    from tracetune import analyzer
    try:
        table = analyzer.load_prices(s.prices_file) if s.prices_file else analyzer.load_prices()
        analyzer.publish_prices(client, table)
    except analyzer.PricesError as exc:
        raise UserError(str(exc)) from None
    return table


@cli.command()
@click.option("--since", default="1h", show_default=True, help="Trailing window: 30s, 5m, 2h, 7d.")
@click.option("--by", default="pipeline,step", show_default=True,
              help="Comma-separated: pipeline, tenant, step, route, model.")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("--source", type=click.Choice(["raw", "rollup"]), default="raw", show_default=True,
              help="Raw spans (exact, any grouping) or the rollups (flat cost at scale).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--wide", is_flag=True, help="Every column: spans, compute seconds, token / compute / calls $.")
@click.pass_context
def cost(ctx: click.Context, since: str, by: str, pipeline: str, source: str, as_json: bool, wide: bool) -> None:
    """Cost per 1k requests (token, compute and per-call prices from prices.toml)."""
    from tracetune import analyzer
    from tracetune.terminal import console, cost_table

    _window(since)
    s = _settings(ctx)
    _settle(s)
    client = _client(s)
    _known_pipeline(client, pipeline)
    table = _prices(s, client)
    keys = [b.strip() for b in by.split(",") if b.strip()]
    if keys and "pipeline" not in keys and not pipeline and set(keys) & {"step", "route", "model"}:
        keys = ["pipeline", *keys]  # a step or route is a pipeline's: rows of several pipelines say whose
    try:
        frame = analyzer.cost_per_1k(client, since, by=keys, pipeline=pipeline, prices=table, source=source)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    if as_json:
        click.echo(_json_rows(frame))
    else:
        console(wide).print(cost_table(frame, title=f"cost per 1k requests, last {since} "
                                                    f"(prices {table.version}, {table.currency})", wide=wide))


@cli.command()
@click.option("--pipeline", required=True, help="The pipeline to predict for.")
@click.option("--set", "assignments", multiple=True, required=True, metavar="STEP.KNOB=VALUE",
              help="A proposed knob value, e.g. classify.batch_max_size=16 or classify.route_weights=fp32=0.5,int8=0.5 "
                   "(repeatable).")
@click.option("--since", default="15m", show_default=True, help="The window the models are fitted on.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.pass_context
def whatif(ctx: click.Context, pipeline: str, assignments: tuple[str, ...], since: str, as_json: bool) -> None:
    """Predict p95, throughput, cost and quality of a proposed config from the tuner's fitted models."""
    from rich.table import Table

    from tracetune import analyzer
    from tracetune.terminal import console
    from tracetune.tuner import observe, versions
    from tracetune.tuner import whatif as whatif_mod
    from tracetune.tuner.config import ConfigError

    _window(since)
    s = _settings(ctx)
    client = _client(s, readonly=True)
    spec, config = versions.latest_spec(client, pipeline), versions.latest(client, pipeline)
    if spec is None or config is None:
        known = ", ".join(p["pipeline"] for p in versions.pipelines(client)) or "none yet"
        raise UserError(f"pipeline {pipeline!r} is not declared with the tuner; known: {known}")
    try:
        rows = whatif_mod.predict(spec, config, whatif_mod.parse_sets(list(assignments)),
                                  observe.collect(client, spec, analyzer.parse_window(since)))
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{pipeline}: config v{config.version} vs proposed, models fitted on the last {since}")
    for column in ("step", "model", "figure", "current", "proposed"):
        table.add_column(column, justify="right" if column in ("current", "proposed") else "left")
    def cell(row: dict, column: str) -> str:
        value = row[column]
        if value is None:  # an infinite latency: the step cannot keep up at this config
            return "saturated" if row["figure"] in ("p95_ms", "mean_ms") else ""
        return f"{value:,.4g}"

    for row in rows:
        table.add_row(row["step"], row["model"], row["figure"], cell(row, "current"), cell(row, "proposed"))
    console().print(table)


@cli.group(invoke_without_command=True)
@click.option("--current", default="1m", show_default=True, help="Current window (ends now).")
@click.option("--reference", default=None,
              help="Compare with this long a window just before the current one (e.g. 24h), for every pipeline. "
                   "Default: the pipeline's pinned baseline, else its first hour of traffic.")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("--save", is_flag=True, help="Also store the results in tracetune_drift.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--wide", is_flag=True, help="Every statistic of each feature, with its p-value.")
@click.pass_context
def drift(ctx: click.Context, current: str, reference: str | None, pipeline: str, save: bool, as_json: bool,
          wide: bool) -> None:
    """Drift of every tracetune.feature.* attribute and step latency: the current window vs each pipeline's
    baseline (`tracetune drift baseline set`), else vs its first hour of traffic."""
    if ctx.invoked_subcommand is not None:
        return
    from tracetune import analyzer
    from tracetune.terminal import console, drift_table

    _window(current, "--current")
    if reference is not None:
        _window(reference, "--reference")
    client = _client(_settings(ctx), readonly=not save)
    _known_pipeline(client, pipeline)
    frame = analyzer.current_drift(client, current=current, pipeline=pipeline, reference=reference)
    if save and not frame.is_empty():
        analyzer.store_drift(client, frame)
    if as_json:
        click.echo(_json_rows(frame))
        return
    references = sorted({f"{row['pipeline']}: {analyzer.reference_label(row)}"
                         for row in frame.iter_rows(named=True)})
    limits = analyzer.Thresholds()
    out = console(wide)
    out.print(f"drift of the last {current}, against:", highlight=False)
    for line in references or ["(no spans in the window)"]:
        out.print(f"  {line}", highlight=False)
    out.print(drift_table(
        analyzer.feature_status(frame) if not frame.is_empty() else frame, frame, title="drift", wide=wide,
        caption=f"too few samples: under {limits.min_samples} in a window ({limits.psi_min_samples} for psi). "
                "Step latency drifts only if it moves by 1 ms and 20% of its median, and pages through SLO "
                "alerts, not drift. Move a reference with `tracetune drift baseline set`."))


def _baseline_window(first: str | None, last: str | None, start: str | None, end: str | None, client, pipeline: str):
    """(start, end) of a baseline from exactly one of --first, --last or --start/--end; UserError otherwise."""
    from datetime import timedelta

    from tracetune import analyzer

    chosen = [name for name, value in (("--first", first), ("--last", last), ("--start", start or end)) if value]
    if len(chosen) != 1:
        raise UserError("give one of --first 1h (the pipeline's first hour of traffic), --last 1h (the hour up to "
                        "now) or --start and --end (ISO times, UTC unless they say)")
    if first or last:
        seconds = analyzer.parse_window(first or last)  # checked by the caller
        if first:
            begin = analyzer.first_traffic(client, pipeline)
            if begin is None:
                raise UserError(f"pipeline {pipeline!r} has no tasks yet; send traffic first, or give --start/--end")
            return begin, begin + timedelta(seconds=seconds)
        now = datetime.now(UTC)
        return now - timedelta(seconds=seconds), now
    if not (start and end):
        raise UserError("--start and --end go together: give both (ISO times, e.g. 2026-01-02T10:00)")
    try:
        return datetime.fromisoformat(start), datetime.fromisoformat(end)
    except ValueError as exc:
        raise UserError(f"{exc}; use ISO times like 2026-01-02T10:00 or 2026-01-02T10:00+01:00") from None


@drift.group("baseline")
def drift_baseline() -> None:
    """Pin, show or remove the window each pipeline's drift is measured against."""


@drift_baseline.command("set")
@click.option("--pipeline", required=True, help="The pipeline whose baseline this is.")
@click.option("--first", default=None, help="The pipeline's first WINDOW of traffic, e.g. 1h.")
@click.option("--last", default=None, help="The WINDOW up to now, e.g. 1h (traffic you trust).")
@click.option("--start", default=None, help="Start of a chosen window (ISO time, UTC unless it says).")
@click.option("--end", default=None, help="End of a chosen window (ISO time).")
@click.option("--note", default="", help="Why this window (kept with it).")
@click.option("--json", "as_json", is_flag=True, help="Print the baseline as JSON.")
@click.pass_context
def drift_baseline_set(ctx: click.Context, pipeline: str, first: str | None, last: str | None, start: str | None,
                       end: str | None, note: str, as_json: bool) -> None:
    """Pin a baseline: drift of the pipeline is then measured against it (until `clear`)."""
    from tracetune import analyzer

    for name, value in (("--first", first), ("--last", last)):
        if value is not None:
            _window(value, name)
    client = _client(_settings(ctx))
    begin, finish = _baseline_window(first, last, start, end, client, pipeline)
    try:
        baseline = analyzer.set_baseline(client, pipeline, begin, finish, note=note, author="cli",
                                         allow_future=bool(first))
    except analyzer.BaselineError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(baseline.to_dict(), indent=2))
    else:
        click.echo(f"{pipeline}: drift baseline v{baseline.version} is {baseline.start:%Y-%m-%d %H:%M:%S} – "
                   f"{baseline.end:%Y-%m-%d %H:%M:%S} UTC" + (" (not over yet: until it is, drift compares with "
                                                              "what there is of it)"
                                                              if baseline.end > datetime.now(UTC) else ""))


@drift_baseline.command("show")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.pass_context
def drift_baseline_show(ctx: click.Context, pipeline: str, as_json: bool) -> None:
    """The pinned baselines (pipelines without one use their first hour of traffic)."""
    from tracetune import analyzer

    baselines = analyzer.list_baselines(_client(_settings(ctx), readonly=True), pipeline)
    if as_json:
        click.echo(json.dumps([b.to_dict() for b in baselines.values()], indent=2))
        return
    if not baselines:
        click.echo(f"no drift baseline pinned{' for ' + pipeline if pipeline else ''}: drift compares each window "
                   "with the pipeline's first hour of traffic")
    for name, b in baselines.items():
        click.echo(f"{name}: v{b.version} {b.start:%Y-%m-%d %H:%M:%S} – {b.end:%Y-%m-%d %H:%M:%S} UTC"
                   + (f" ({b.note})" if b.note else ""))


@drift_baseline.command("clear")
@click.option("--pipeline", required=True, help="The pipeline whose baseline to remove.")
@click.pass_context
def drift_baseline_clear(ctx: click.Context, pipeline: str) -> None:
    """Remove a baseline: the pipeline's drift goes back to comparing with the preceding window."""
    from tracetune import analyzer

    version = analyzer.clear_baseline(_client(_settings(ctx)), pipeline, author="cli")
    if version is None:
        raise UserError(f"pipeline {pipeline!r} has no drift baseline to clear; see `tracetune drift baseline show`")
    click.echo(f"{pipeline}: drift baseline removed (v{version}); drift compares with the preceding window")


@cli.command()
@click.option("--pipeline", default="", help="Only this pipeline (default: every pipeline with an SLO).")
@click.option("--source", type=click.Choice(["rollup", "raw"]), default="rollup", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--wide", is_flag=True, help="Every column (adds the burn-rate factor).")
@click.pass_context
def slo(ctx: click.Context, pipeline: str, source: str, as_json: bool, wide: bool) -> None:
    """SLO burn rates over the multi-window pairs, firing rules and error budget remaining."""
    import polars as pl

    from tracetune import analyzer
    from tracetune.terminal import console, slo_table

    client = _client(_settings(ctx), readonly=True)
    _known_pipeline(client, pipeline)
    slos = [analyzer.get_slo(client, pipeline)] if pipeline else analyzer.list_slos(client)
    if not slos or slos[0] is None:
        raise UserError(f"no SLO saved{' for ' + pipeline if pipeline else ''}; set one with "
                                   "PUT /v1/pipelines/{p}/slo on the tuner")
    frame = pl.concat([analyzer.slo_status(client, s.pipeline, slo=s, source=source) for s in slos])
    if as_json:
        click.echo(_json_rows(frame))
    else:
        out = console(wide)
        for row in analyzer.slo_words(frame).iter_rows(named=True):  # the words the dashboard and report show
            out.print(f"{row['pipeline']} {row['objective']} ({row['target']}): {row['status']}", highlight=False)
        out.print(slo_table(frame, wide))


@cli.command()
@click.option("--since", default="1h", show_default=True, help="Trailing window: 30s, 5m, 2h, 7d.")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("--kind", type=click.Choice(["client", "server"]), default=None,
              help="Only client errors (input the pipeline refused) or server errors (what availability counts).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Most frequent first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--wide", is_flag=True, help="Every column (adds an example trace id per message).")
@click.pass_context
def errors(ctx: click.Context, since: str, pipeline: str, kind: str | None, limit: int, as_json: bool,
           wide: bool) -> None:
    """Error messages of failed tasks and steps, grouped: count, failed tasks, last seen, an example trace id."""
    from tracetune import analyzer
    from tracetune.terminal import console, errors_table

    _window(since)
    client = _client(_settings(ctx), readonly=True)
    _known_pipeline(client, pipeline)
    frame = analyzer.errors(client, since, pipeline, kind or "", limit)
    if as_json:
        click.echo(_json_rows(frame))
    else:
        console(wide).print(errors_table(frame, title=f"errors, last {since}" + (f" ({kind})" if kind else ""),
                                         wide=wide))


@cli.command()
@click.option("--since", default="1h", show_default=True, help="Trailing window: 30s, 5m, 2h, 7d.")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="tracetune-report.html", show_default=True)
@click.pass_context
def report(ctx: click.Context, since: str, pipeline: str, output: str) -> None:
    """Write an HTML report: latency, critical path, cost per 1k, drift and SLOs, with charts."""
    from tracetune.analyzer.report import write_report

    _window(since)
    s = _settings(ctx)
    client = _client(s)
    _known_pipeline(client, pipeline)
    path = write_report(client, output, since, _prices(s, client), pipeline)
    click.echo(f"wrote {path.resolve()}")


@cli.group()
def alerts() -> None:
    """Firing alerts, silences, deliveries and a test alert."""


def _since(moment: str | None) -> str:
    return (moment or "")[:19].replace("T", " ")


@alerts.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also pending alerts and those resolved in the last hour.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.pass_context
def alerts_list(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """Firing alerts (and, with --all, pending and recently resolved ones), silenced ones marked."""
    from rich.table import Table

    from tracetune.analyzer import alerts as alerting
    from tracetune.terminal import console

    client = _client(_settings(ctx), readonly=True)
    silences = alerting.list_silences(client)
    now = datetime.now(UTC)
    rows = [{**alert.to_dict(), "silenced_by": alert.silenced_by(silences, now)}
            for alert in sorted(alerting.current_alerts(client).values(), key=lambda a: (a.state, a.active_at))
            if alert.state == "firing" or show_all]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"alerts ({'all' if show_all else 'firing'})", title_justify="left")
    for column in ("state", "alert", "pipeline", "severity", "since", "summary"):
        table.add_column(column, overflow="fold")
    for row in rows:
        state = row["state"] + (" (silenced)" if row["silenced_by"] else "")
        table.add_row(state, row["labels"].get("alertname", ""), row["labels"].get("pipeline", ""),
                      row["labels"].get("severity", ""), _since(row["resolved_at"] or row["fired_at"]
                                                                or row["active_at"]),
                      row["annotations"].get("summary", ""))
    console().print(table if rows else "no alerts" + ("" if show_all else " firing"))


@alerts.command("silence")
@click.argument("matchers", nargs=-1, metavar="[NAME=VALUE | NAME!=VALUE | NAME=~REGEX]...")
@click.option("--for", "duration", default="2h", show_default=True, help="How long: 30m, 2h, 1d.")
@click.option("--comment", default="", help="Why (kept with the silence).")
@click.option("--list", "show", is_flag=True, help="List silences instead (active, pending, ended in the last day).")
@click.option("--expire", metavar="ID", default=None, help="End the silence with this id now.")
@click.pass_context
def alerts_silence(ctx: click.Context, matchers: tuple[str, ...], duration: str, comment: str, show: bool,
                   expire: str | None) -> None:
    """Keep matching alerts out of notifications for a while, e.g. `pipeline=ticket_triage severity=ticket`."""
    import getpass
    from datetime import timedelta

    from tracetune import analyzer
    from tracetune.analyzer import alerts as alerting

    s = _settings(ctx)
    if show:
        for silence in alerting.list_silences(_client(s, readonly=True)):
            info = silence.to_dict()
            click.echo(f"{silence.silence_id}  {info['status']['state']:8} until {_since(info['endsAt'])}  "
                       f"{' '.join(str(m) for m in silence.matchers)}  {silence.comment}")
        return
    if expire:
        try:
            ended = alerting.expire_silence(_client(s), expire)
        except LookupError as exc:
            raise UserError(f"{exc}; `tracetune alerts silence --list` shows them") from None
        click.echo(f"silence {ended.silence_id} ended")
        return
    if not matchers:
        raise UserError("give at least one matcher, e.g. `tracetune alerts silence pipeline=ticket_triage --for 2h`")
    try:
        parsed = [alerting.Matcher.parse(m) for m in matchers]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        seconds = analyzer.parse_window(duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--for") from None
    silence = alerting.add_silence(_client(s), parsed, datetime.now(UTC) + timedelta(seconds=seconds),
                                   created_by=getpass.getuser(), comment=comment)
    click.echo(f"silence {silence.silence_id}: {' '.join(str(m) for m in parsed)} until "
               f"{_since(silence.to_dict()['endsAt'])} UTC")


@alerts.command("deliveries")
@click.option("--status", type=click.Choice(["pending", "retrying", "delivered", "failed"]), default=None,
              help="Only deliveries in this state.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--wide", is_flag=True, help="Every column (ids, group key, times, the body sent).")
@click.pass_context
def alerts_deliveries(ctx: click.Context, status: str | None, limit: int, as_json: bool, wide: bool) -> None:
    """The delivery log: each notification per receiver, its attempts, last answer and state."""
    import polars as pl

    from tracetune.analyzer import delivery
    from tracetune.terminal import console, frame_table

    rows = delivery.deliveries(_client(_settings(ctx), readonly=True), limit=limit, status=status)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    elif rows:
        console(wide).print(frame_table(pl.DataFrame(rows, infer_schema_length=None), "alert deliveries, newest first",
                                        ("created_at", "receiver", "status", "attempts", "http_status", "error"), wide))
    else:
        console().print("no deliveries yet")


@alerts.command("test")
@click.pass_context
def alerts_test(ctx: click.Context) -> None:
    """Send a test alert to every configured receiver now and say what each answered."""
    from tracetune.analyzer import alerts as alerting
    from tracetune.analyzer import delivery

    s = _settings(ctx)
    receivers = delivery.receivers_from_settings(s)
    config = ctx.obj.get("config") or os.environ.get("TRACETUNE_CONFIG") or "tracetune.toml"
    if not receivers:
        raise UserError(f"no alert receiver is configured in {config} or TRACETUNE_ALERT_* (what the analyzer "
                        "reads); set alert_webhook_url, alert_slack_url or alert_pagerduty_routing_key in "
                        f"{config} so the analyzer and this command both use it")
    setting = {"webhook": "alert_webhook_url", "slack": "alert_slack_url", "pagerduty": "alert_pagerduty_routing_key"}
    for receiver in receivers:
        where = s._origin.get(setting[receiver.kind], "default")
        url = urlsplit(getattr(receiver, "url", ""))  # the host only for Slack: its path is the secret
        target = f"{url.scheme}://{url.netloc}" + (url.path if receiver.kind == "webhook" else "/…")
        click.echo(f"receiver {receiver.name}: {target} (from {where})")
    client = _client(s)
    ids = delivery.send_now(client, alerting.test_notification(s.dashboard_url), receivers)
    rows = [row for row in delivery.deliveries(client, limit=100) if row.get("delivery_id") in ids]
    for row in rows:
        click.echo(f"{row.get('receiver')}: {row.get('status')} (HTTP {row.get('http_status') or '-'}) "
                   f"{row.get('error') or ''}".rstrip())
    if any(row.get("status") != "delivered" for row in rows):
        raise UserError("not every receiver took the test alert; retries go on in the analyzer "
                        "(`tracetune alerts deliveries`)")


# ---- dead letters: side effects that gave up, to inspect, replay or discard ----------------------------

class DownstreamFailed(click.ClickException):
    """A replay the downstream did not take: one line saying why, exit code 1 (not the user's mistake)."""

    exit_code = 1


def _tuner_call(s: Settings, method: str, path: str, body: dict | None = None, timeout: float = 330.0):
    """A call to the tuner API with its write token; UserError when the tuner cannot be reached."""
    import httpx

    try:
        return httpx.request(method, f"{s.tuner_url}{path}", json=body, timeout=timeout,
                             headers={"Authorization": f"Bearer {s.secret('tuner')}"})
    except httpx.HTTPError as exc:
        raise UserError(f"cannot reach the tuner at {s.tuner_url} ({type(exc).__name__}); replay and discard go "
                        "through it (is `tracetune up` running?)") from None


def _answer_detail(response) -> str:
    try:
        return str(response.json().get("detail") or response.text)
    except (ValueError, AttributeError):
        return response.text[:300]


@cli.group("dead-letters")
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
        _window(since)
    start = datetime.now(UTC) - timedelta(seconds=analyzer.parse_window(since)) if since else None
    client = _client(_settings(ctx), readonly=True)
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
        letter = letters_mod.find(_client(_settings(ctx), readonly=True), key)
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

    s = _settings(ctx)
    if every == bool(keys):
        raise UserError("give the keys of the letters to replay, or --all for every open one "
                        "(`tracetune dead-letters list` shows them)")
    if every:
        keys = tuple(letter.idempotency_key for letter in
                     letters_mod.letters(_client(s, readonly=True), "open", pipeline, step, None, 10_000))
        if not keys:
            click.echo("no open dead letters to replay")
            return
    body = {"author": getpass.getuser(), "reason": reason}
    failed = []
    with Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), transient=True,
                  disable=len(keys) < 2 or not sys.stderr.isatty(), console=None) as progress:
        bar = progress.add_task("replay", total=len(keys))
        for key in keys:
            answer = _tuner_call(s, "POST", f"/v1/dead-letters/{key}/replay", body)
            if answer.status_code == 200:
                done = answer.json()
                click.echo(f"{done['idempotency_key']}: replayed after {done['attempts']} attempt"
                           f"{'s' if done['attempts'] != 1 else ''} (HTTP {done['http_status']})")
            elif answer.status_code == 502 and answer.json().get("outcome") == "replay_failed":
                failed.append(key)
                click.echo(f"{answer.json()['idempotency_key']}: still failing, kept: {_answer_detail(answer)}",
                           err=True)
            elif answer.status_code in (401, 403, 404, 409, 422):
                raise UserError(_answer_detail(answer))
            else:
                raise DownstreamFailed(_answer_detail(answer))
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
    answer = _tuner_call(_settings(ctx), "POST", f"/v1/dead-letters/{key}/discard",
                         {"author": getpass.getuser(), "reason": reason})
    if answer.status_code != 200:
        raise UserError(_answer_detail(answer))
    done = answer.json()
    click.echo(f"{done['idempotency_key']}: discarded by {done['author']}: {done['reason']}")


@cli.group()
def models() -> None:
    """Build the executor's ONNX models."""


@models.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if the models exist.")
@click.option("--json", "as_json", is_flag=True, help="Print the full build report as JSON.")
@click.pass_context
def models_build(ctx: click.Context, force: bool, as_json: bool) -> None:
    """Train and export the demo models into .tracetune/models (reused when present)."""
    from tracetune.demo.models import build_models
    from tracetune.terminal import models_summary

    report = build_models(_settings(ctx).models_dir, force=force, progress=True)  # on stderr
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join(models_summary(report)))


def main() -> None:
    cli(prog_name="tracetune")


if __name__ == "__main__":
    main()
