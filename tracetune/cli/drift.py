"""`tracetune drift`: feature drift now against a reference; `drift baseline set|show|clear` pins the reference."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from tracetune.cli.common import UserError, check_pipeline, check_window, connect, json_rows, load_settings


@click.group(invoke_without_command=True)
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

    check_window(current, "--current")
    if reference is not None:
        check_window(reference, "--reference")
    client = connect(load_settings(ctx), readonly=not save)
    check_pipeline(client, pipeline)
    frame = analyzer.current_drift(client, current=current, pipeline=pipeline, reference=reference)
    if save and not frame.is_empty():
        analyzer.store_drift(client, frame)
    if as_json:
        click.echo(json_rows(frame))
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
            check_window(value, name)
    client = connect(load_settings(ctx))
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

    baselines = analyzer.list_baselines(connect(load_settings(ctx), readonly=True), pipeline)
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

    version = analyzer.clear_baseline(connect(load_settings(ctx)), pipeline, author="cli")
    if version is None:
        raise UserError(f"pipeline {pipeline!r} has no drift baseline to clear; see `tracetune drift baseline show`")
    click.echo(f"{pipeline}: drift baseline removed (v{version}); drift compares with the preceding window")
