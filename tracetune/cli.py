"""The `tracetune` command: one sub-command per process, plus stats, models and the supervisor."""

from __future__ import annotations

import json
import logging
import sys

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

@cli.command()
@click.pass_context
def store(ctx: click.Context) -> None:
    """Run the embedded ClickHouse (chDB) on the ClickHouse HTTP interface (default 127.0.0.1:8123)."""
    s = _settings(ctx)
    if not s.embedded:
        raise UserError("TRACETUNE_CLICKHOUSE_URL is set: the embedded store is not used; unset it "
                                   "to run the embedded store")
    from tracetune import store as store_mod
    store_mod.serve(s)


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


@cli.command()
@click.pass_context
def tuner(ctx: click.Context) -> None:
    """Run the tuner API (GET /v1/pipelines/{p}/config, OpenAPI at /docs; default port 8700)."""
    from tracetune import tuner as tuner_mod
    tuner_mod.serve(_settings(ctx))


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
@click.option("--pattern", type=click.Choice(["steady", "step", "burst", "daily"]), default="steady",
              show_default=True, help="How the arrival rate changes over time.")
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
              help="The pipeline to send tickets to (it takes {\"text\": ...}).")
@click.pass_context
def load(ctx: click.Context, rate, duration, pattern, duplicates, drifts, tenants, seed, period, no_progress,
         as_json, pipeline) -> None:
    """Drive a pipeline open-loop (Poisson arrivals) and record ground truth for quality."""
    from tracetune.demo.load import Drift, LoadPlan

    s = _settings(ctx)
    try:
        plan = LoadPlan(rate=rate or s.load_rate, duration=duration, pattern=pattern, duplicate_ratio=duplicates,
                        drifts=[Drift.parse(d) for d in drifts], tenants=[t for t in tenants.split(",") if t],
                        seed=seed, period_seconds=period)
        plan.validate()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    from tracetune.loadcli import run_load_command

    summary = run_load_command(s, plan, pipeline, progress=not no_progress)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(" ".join(f"{k}={v}" for k, v in summary.items()))


@cli.command("analyzer")
@click.pass_context
def analyzer_cmd(ctx: click.Context) -> None:
    """Run the analyzer loop: publish prices, refresh drift and SLO burn rates every interval."""
    import signal
    import threading

    from tracetune.analyzer.loop import run

    s = _settings(ctx)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from tracetune import store as store_mod
    client = store_mod.connect(s, wait=60)
    run(client, s.prices_file, s.analyzer_interval_seconds, stop)


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
@click.option("--rate", type=float, default=None, help="Requests per second of demo load (default 20).")
@click.pass_context
def demo(ctx: click.Context, duration: float | None, rate: float | None) -> None:
    """Run the whole loop with a steady load and show a live per-step table; Ctrl-C stops everything."""
    from tracetune.supervisor import demo as run_demo

    sys.exit(run_demo(_settings(ctx, load_rate=rate), duration=duration))


# ---- one-shot commands -----------------------------------------------------------------------

@cli.command()
@click.option("--since", default="5m", show_default=True, help="Trailing window: 30s, 5m, 2h, 7d.")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("--by", default="pipeline,step", show_default=True,
              help="Comma-separated: pipeline, step, route, tenant, model, service.")
@click.option("--batching", is_flag=True, help="Batch size and queue time distributions instead.")
@click.option("--source", type=click.Choice(["rollup", "raw"]), default="rollup", show_default=True,
              help="Per-minute rollups (flat cost, percentiles within 0.5%) or raw spans (exact).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.pass_context
def stats(ctx: click.Context, since: str, pipeline: str, by: str, batching: bool, source: str,
          as_json: bool) -> None:
    """Per-step requests, error rate, p50, p95, p99 (ms) over a trailing window."""
    from tracetune import analyzer
    from tracetune.terminal import console, frame_table, step_table

    _window(since)
    client = _client(_settings(ctx), readonly=True)
    keys = tuple(b.strip() for b in by.split(",") if b.strip())
    try:
        if batching:
            frame = analyzer.batching(client, since, pipeline)
        elif keys == ("pipeline", "step"):
            frame = analyzer.step_stats(client, since, pipeline, source=source)
        else:
            frame = analyzer.latency(client, since, keys, pipeline, source=source)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    if as_json:
        click.echo(json.dumps(frame.to_dicts(), indent=2, default=str))
    elif batching:
        console().print(frame_table(frame.drop("size_histogram") if "size_histogram" in frame.columns else frame,
                                    f"batching, last {since}"))
    elif keys == ("pipeline", "step"):
        console().print(step_table(frame, title=f"per-step latency, last {since}"))
    else:
        console().print(frame_table(frame, f"latency by {', '.join(keys)}, last {since}"))


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


def _window(since: str) -> None:
    from tracetune import analyzer
    try:
        analyzer.parse_window(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None


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
@click.pass_context
def cost(ctx: click.Context, since: str, by: str, pipeline: str, source: str, as_json: bool) -> None:
    """Cost per 1k requests (token, compute and per-call prices from prices.toml)."""
    from tracetune import analyzer
    from tracetune.terminal import console, cost_table

    _window(since)
    s = _settings(ctx)
    client = _client(s)
    table = _prices(s, client)
    try:
        frame = analyzer.cost_per_1k(client, since, by=[b.strip() for b in by.split(",") if b.strip()],
                                     pipeline=pipeline, prices=table, source=source)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    if as_json:
        click.echo(json.dumps(frame.to_dicts(), indent=2, default=str))
    else:
        console().print(cost_table(frame, title=f"cost per 1k requests, last {since} "
                                                f"(prices {table.version}, {table.currency})"))


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


@cli.command()
@click.option("--current", default="1h", show_default=True, help="Current window (ends now).")
@click.option("--reference", default="24h", show_default=True, help="Reference window (ends where current starts).")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("--save", is_flag=True, help="Also store the results in tracetune_drift.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.pass_context
def drift(ctx: click.Context, current: str, reference: str, pipeline: str, save: bool, as_json: bool) -> None:
    """Drift of every tracetune.feature.* attribute and step latency: current window vs reference."""
    from tracetune import analyzer
    from tracetune.terminal import console, drift_table

    _window(current)
    _window(reference)
    client = _client(_settings(ctx))
    ref_window, cur_window = analyzer.default_windows(None, current, reference)
    frame = analyzer.compute_drift(client, ref_window, cur_window, pipeline=pipeline)
    if save and not frame.is_empty():
        analyzer.store_drift(client, frame)
    if as_json:
        click.echo(json.dumps(frame.to_dicts(), indent=2, default=str))
    else:
        console().print(drift_table(analyzer.feature_status(frame) if not frame.is_empty() else frame, frame,
                                    title=f"drift: last {current} vs the {reference} before"))


@cli.command()
@click.option("--pipeline", default="", help="Only this pipeline (default: every pipeline with an SLO).")
@click.option("--source", type=click.Choice(["rollup", "raw"]), default="rollup", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.pass_context
def slo(ctx: click.Context, pipeline: str, source: str, as_json: bool) -> None:
    """SLO burn rates over the multi-window pairs, firing rules and error budget remaining."""
    import polars as pl

    from tracetune import analyzer
    from tracetune.terminal import console, slo_table

    client = _client(_settings(ctx), readonly=True)
    slos = [analyzer.get_slo(client, pipeline)] if pipeline else analyzer.list_slos(client)
    if not slos or slos[0] is None:
        raise UserError(f"no SLO saved{' for ' + pipeline if pipeline else ''}; set one with "
                                   "PUT /v1/pipelines/{p}/slo on the tuner")
    frame = pl.concat([analyzer.slo_status(client, s.pipeline, slo=s, source=source) for s in slos])
    if as_json:
        click.echo(json.dumps(frame.to_dicts(), indent=2, default=str))
    else:
        console().print(slo_table(frame))


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
    path = write_report(client, output, since, _prices(s, client), pipeline)
    click.echo(f"wrote {path.resolve()}")


@cli.group()
def models() -> None:
    """Build the executor's ONNX models."""


@models.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if the models exist.")
@click.pass_context
def models_build(ctx: click.Context, force: bool) -> None:
    """Train and export the demo models into .tracetune/models (reused when present)."""
    from tracetune.demo.models import build_models

    report = build_models(_settings(ctx).models_dir, force=force, progress=True)
    click.echo(json.dumps(report, indent=2))


def main() -> None:
    cli(prog_name="tracetune")


if __name__ == "__main__":
    main()
