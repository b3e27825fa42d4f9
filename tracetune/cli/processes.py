"""The long-running processes: `collector`, `executor`, `standins`, `load`, `analyzer`, `dashboard`, and
`up` / `demo`, which start them all."""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from tracetune.cli.common import UserError, load_settings


@click.command()
@click.pass_context
def collector(ctx: click.Context) -> None:
    """Run the OTLP collector (HTTP POST /v1/traces on 4318, gRPC on 4317) writing to ClickHouse."""
    from tracetune import collector as collector_mod
    from tracetune.collector.wal import WalError

    try:
        collector_mod.serve(load_settings(ctx, discover=False))  # one collector per home
    except (WalError, OSError) as exc:  # log directory in use, a port taken: one line, exit 2
        raise UserError(str(exc).splitlines()[0]) from None


@click.command()
@click.option("--pipeline", "targets", multiple=True, metavar="MODULE:ATTRIBUTE",
              help="A pipeline to run, e.g. my_pipelines:reviews (repeatable; default: the pipelines setting).")
@click.pass_context
def executor(ctx: click.Context, targets: tuple[str, ...]) -> None:
    """Run the executor: pipelines behind POST /v1/pipelines/{p}/tasks, /metrics, polling the tuner."""
    from tracetune.executor.runner import PipelineLoadError, run
    from tracetune.tuner.config import ConfigError

    settings = load_settings(ctx, pipelines=",".join(targets) if targets else None)
    try:
        run(settings)
    except (PipelineLoadError, ConfigError) as exc:
        raise UserError(str(exc)) from None


@click.command()
@click.pass_context
def standins(ctx: click.Context) -> None:
    """Run the stand-in remote services: an OpenAI-compatible LLM (8808) and a CRM (8809)."""
    from tracetune.demo.standins import serve_standins

    s = load_settings(ctx)
    serve_standins(s.bind_host, s.llm_port, s.crm_port)


@click.command()
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

    s = load_settings(ctx)
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


@click.command("analyzer")
@click.pass_context
def analyzer_cmd(ctx: click.Context) -> None:
    """Run the analyzer loop: publish prices, refresh drift and SLO burn rates every interval, evaluate
    alert rules and deliver notifications. Several may run: the one holding the `analyzer` lease works."""
    import signal
    import threading

    from tracetune.analyzer.loop import run

    s = load_settings(ctx)
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
                                                            s.alert_repeat_interval_seconds), s.dashboard_url,
                           runbook_base_url=s.alert_runbook_base_url)
    run(client, s.prices_file, s.analyzer_interval_seconds, stop, engine,
        notify_seconds=max(0.5, min(5.0, s.alert_group_wait_seconds)), lease=lease,
        # A worker for each term the lease is held, with its own client; it sends only while holding.
        delivery=lambda: delivery.DeliveryWorker(store_mod.connect(s), receivers, active=lease.holding))


@click.command()
@click.pass_context
def dashboard(ctx: click.Context) -> None:
    """Run the Streamlit dashboard (default port 8501)."""

    from tracetune.supervisor import dashboard_command

    s = load_settings(ctx)
    os.execvpe(dashboard_command(s)[0], dashboard_command(s), {**os.environ, **s.as_env()})


@click.command()
@click.pass_context
def up(ctx: click.Context) -> None:
    """Start store (if embedded), collector, tuner, executor (no load) and dashboard; Ctrl-C stops all."""
    from tracetune.supervisor import up as run_up

    sys.exit(run_up(load_settings(ctx, discover=False)))  # a stack of its own


@click.command()
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
    sys.exit(run_demo(load_settings(ctx, discover=False), duration=duration, pipeline=pipeline, rate=rate))
