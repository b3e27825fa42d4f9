"""The `tracetune` command: one sub-command per process, plus stats, models and the supervisor."""

from __future__ import annotations

import json
import logging
import sys

import click

from tracetune import settings as settings_mod
from tracetune.settings import Settings, SettingsError


def _settings(ctx: click.Context, **overrides) -> Settings:
    try:
        return settings_mod.load(ctx.obj.get("config"), **overrides)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


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
        raise click.ClickException("TRACETUNE_CLICKHOUSE_URL is set: the embedded store is not used; unset it "
                                   "to run the embedded store")
    import store as store_mod

    store_mod.serve(s)


@cli.command()
@click.pass_context
def collector(ctx: click.Context) -> None:
    """Run the OTLP/HTTP collector (POST /v1/traces, default port 4318) writing to ClickHouse."""
    import collector as collector_mod

    collector_mod.serve(_settings(ctx))


@cli.command()
@click.pass_context
def tuner(ctx: click.Context) -> None:
    """Run the tuner API (GET /v1/pipelines/{p}/config, OpenAPI at /docs; default port 8700)."""
    import tuner as tuner_mod

    tuner_mod.serve(_settings(ctx))


@cli.command()
@click.option("--rate", type=float, default=None, help="Requests per second of built-in load (0: none).")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.pass_context
def executor(ctx: click.Context, rate: float | None, duration: float | None) -> None:
    """Run the executor: the sample pipeline, its /metrics, config polling, and optional load."""
    from executor.runner import run

    run(_settings(ctx, load_rate=rate), duration=duration)


@cli.command()
@click.pass_context
def dashboard(ctx: click.Context) -> None:
    """Run the Streamlit dashboard (default port 8501)."""
    from tracetune.supervisor import dashboard_command
    import os

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
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.pass_context
def stats(ctx: click.Context, since: str, pipeline: str, as_json: bool) -> None:
    """Per-step requests, error rate, p50, p95, p99 (ms) over a trailing window."""
    import analyzer
    import store as store_mod
    from tracetune.terminal import console, step_table

    try:
        analyzer.parse_window(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    s = _settings(ctx)
    try:
        client = store_mod.connect(s)
    except Exception as exc:
        raise click.ClickException(f"cannot reach ClickHouse at {s.store_url if s.embedded else s.clickhouse_url}: "
                                   f"{str(exc).splitlines()[0]} (is `tracetune up` running?)") from None
    frame = analyzer.step_stats(client, since, pipeline)
    if as_json:
        click.echo(json.dumps(frame.to_dicts(), indent=2))
    else:
        console().print(step_table(frame, title=f"per-step latency, last {since}"))


@cli.group()
def models() -> None:
    """Build the executor's ONNX models."""


@models.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if the models exist.")
@click.pass_context
def models_build(ctx: click.Context, force: bool) -> None:
    """Train and export the demo models into .tracetune/models (reused when present)."""
    from executor.models import build_models

    report = build_models(_settings(ctx).models_dir, force=force, progress=True)
    click.echo(json.dumps(report, indent=2))


def main() -> None:
    cli(prog_name="tracetune")


if __name__ == "__main__":
    main()
