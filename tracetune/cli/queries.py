"""One-shot questions to the store: `stats`, `cost`, `whatif`, `slo`, `errors`, `report`."""

from __future__ import annotations

import json

import click

from tracetune.cli.common import (
    UserError,
    check_pipeline,
    check_window,
    connect,
    json_rows,
    load_settings,
    prices_table,
    settle,
)


@click.command()
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

    check_window(since)
    if batching and cold:
        raise UserError("--batching and --cold-starts are two views: give one")
    settings = load_settings(ctx)
    settle(settings)
    client = connect(settings, readonly=True)
    check_pipeline(client, pipeline)
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
        click.echo(json_rows(frame))
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


@click.command()
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

    check_window(since)
    s = load_settings(ctx)
    settle(s)
    client = connect(s)
    check_pipeline(client, pipeline)
    table = prices_table(s, client)
    keys = [b.strip() for b in by.split(",") if b.strip()]
    if keys and "pipeline" not in keys and not pipeline and set(keys) & {"step", "route", "model"}:
        keys = ["pipeline", *keys]  # a step or route is a pipeline's: rows of several pipelines say whose
    try:
        frame = analyzer.cost_per_1k(client, since, by=keys, pipeline=pipeline, prices=table, source=source)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    if as_json:
        click.echo(json_rows(frame))
    else:
        console(wide).print(cost_table(frame, title=f"cost per 1k requests, last {since} "
                                                    f"(prices {table.version}, {table.currency})", wide=wide))


@click.command()
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

    check_window(since)
    s = load_settings(ctx)
    client = connect(s, readonly=True)
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


@click.command()
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

    client = connect(load_settings(ctx), readonly=True)
    check_pipeline(client, pipeline)
    slos = [analyzer.get_slo(client, pipeline)] if pipeline else analyzer.list_slos(client)
    if not slos or slos[0] is None:
        raise UserError(f"no SLO saved{' for ' + pipeline if pipeline else ''}; set one with "
                                   "PUT /v1/pipelines/{p}/slo on the tuner")
    frame = pl.concat([analyzer.slo_status(client, s.pipeline, slo=s, source=source) for s in slos])
    if as_json:
        click.echo(json_rows(frame))
    else:
        out = console(wide)
        for row in analyzer.slo_words(frame).iter_rows(named=True):  # the words the dashboard and report show
            out.print(f"{row['pipeline']} {row['objective']} ({row['target']}): {row['status']}", highlight=False)
        out.print(slo_table(frame, wide))


@click.command()
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

    check_window(since)
    client = connect(load_settings(ctx), readonly=True)
    check_pipeline(client, pipeline)
    frame = analyzer.errors(client, since, pipeline, kind or "", limit)
    if as_json:
        click.echo(json_rows(frame))
    else:
        console(wide).print(errors_table(frame, title=f"errors, last {since}" + (f" ({kind})" if kind else ""),
                                         wide=wide))


@click.command()
@click.option("--since", default="1h", show_default=True, help="Trailing window: 30s, 5m, 2h, 7d.")
@click.option("--pipeline", default="", help="Only this pipeline.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="tracetune-report.html", show_default=True)
@click.pass_context
def report(ctx: click.Context, since: str, pipeline: str, output: str) -> None:
    """Write an HTML report: latency, critical path, cost per 1k, drift and SLOs, with charts."""
    from tracetune.analyzer.report import write_report

    check_window(since)
    s = load_settings(ctx)
    client = connect(s)
    check_pipeline(client, pipeline)
    path = write_report(client, output, since, prices_table(s, client), pipeline)
    click.echo(f"wrote {path.resolve()}")
