"""Terminal rendering shared by the CLI and the demo's live view."""

from __future__ import annotations

import sys

import polars as pl
from rich.console import Console
from rich.table import Table


def console() -> Console:
    """Rich console; when output is not a terminal (logs, CI) wide enough for the tables."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def step_table(frame: pl.DataFrame, title: str = "per-step latency") -> Table:
    """Rows of step_stats; a pipeline's "(end to end)" row (its tasks) in bold."""
    table = Table(title=title, title_justify="left")
    for name in ("pipeline", "step"):
        table.add_column(name)
    for name in ("requests", "error %", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(name, justify="right")
    if frame.is_empty():
        table.add_row("(no spans yet)", "", "", "", "", "", "")
        return table
    for row in frame.iter_rows(named=True):
        table.add_row(row["pipeline"], row["step"], f"{row['requests']:,}", f"{100 * row['error_rate']:.1f}",
                      f"{row['p50_ms']:.2f}", f"{row['p95_ms']:.2f}", f"{row['p99_ms']:.2f}",
                      style="bold" if row["step"] == "(end to end)" else None)
    return table


def cost_table(frame: pl.DataFrame, title: str = "cost per 1k requests") -> Table:
    """Requests is the pipeline's request count (the per-1k denominator); $ columns are window totals."""
    table = Table(title=title, title_justify="left", caption="$ columns: totals over the window",
                  caption_justify="left")
    keys = [c for c in frame.columns if c in ("pipeline", "tenant", "step", "route", "model")]
    for name in keys:
        table.add_column(name)
    has_spans = "spans" in frame.columns
    for name in ("requests", *(["spans"] if has_spans else []), "tokens in/out", "compute s", "token $", "compute $",
                 "calls $", "$ per 1k"):
        table.add_column(name, justify="right")
    width = len(keys) + 7 + has_spans
    if frame.is_empty():
        table.add_row(*(["(no requests in the window)"] + [""] * width)[:width])
        return table
    for row in frame.iter_rows(named=True):
        per_1k = row["cost_per_1k"]
        table.add_row(*[row[k] or "-" for k in keys], f"{row['requests']:,}",
                      *([f"{row['spans']:,}"] if has_spans else []),
                      f"{row['input_tokens']:,}/{row['output_tokens']:,}", f"{row['compute_seconds']:.2f}",
                      f"{row['token_cost']:.4f}", f"{row['compute_cost']:.4f}", f"{row['call_cost']:.4f}",
                      "-" if per_1k is None else f"{per_1k:.4f}")
    return table


_STATUS_STYLE = {"drift": "bold red", "warn": "yellow", "ok": "green", "insufficient_data": "dim"}


def drift_table(status: pl.DataFrame, detail: pl.DataFrame, title: str = "drift", caption: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for name in ("pipeline", "step", "feature", "kind", "status", "statistics", "n ref / cur"):
        table.add_column(name, justify="right" if name == "n ref / cur" else "left")
    if status.is_empty():
        table.add_row("(no features in either window)", "", "", "", "", "", "")
        return table
    for row in status.iter_rows(named=True):
        stats = detail.filter((pl.col("pipeline") == row["pipeline"]) & (pl.col("step") == row["step"])
                              & (pl.col("feature") == row["feature"]))
        text = ", ".join(f"{r['statistic']} {r['value']:.3g}" + ("" if r["p_value"] != r["p_value"]
                                                                  else f" (p={r['p_value']:.2g})")
                         for r in stats.iter_rows(named=True))
        first = stats.row(0, named=True) if stats.height else {"n_reference": 0, "n_current": 0}
        style = _STATUS_STYLE.get(row["status"], "")
        table.add_row(row["pipeline"], row["step"], row["feature"], row.get("kind", ""),
                      f"[{style}]{row['status']}[/{style}]" if style else row["status"], text,
                      f"{first['n_reference']:,} / {first['n_current']:,}")
    return table


def slo_table(frame: pl.DataFrame) -> Table:
    """slo_status rows; budget left says what it covers, rules longer than the data say so instead of firing."""
    from tracetune.analyzer.slo import data_note

    notes = sorted({f"{r['pipeline']}: {data_note(r['data_seconds'], r['period_days'])}"
                    for r in frame.iter_rows(named=True)})
    client_errors = {(r["pipeline"], r["period_client_errors"]) for r in frame.iter_rows(named=True)
                     if r["slo"] == "availability" and r["period_client_errors"]}
    caption = "budgets over " + "; ".join(notes) + "".join(
        f"; {p}: {n:,} client errors (invalid input) not counted as unavailability" for p, n in sorted(client_errors))
    table = Table(title="SLO burn rates", title_justify="left", caption=caption, caption_justify="left")
    for name in ("pipeline", "slo", "target", "windows", "factor", "burn long / short", "firing", "budget left"):
        table.add_column(name, justify="left" if name in ("pipeline", "slo", "windows") else "right")
    for row in frame.iter_rows(named=True):
        target = f"{row['target_ms']:g} ms" if row["target_ms"] is not None else f"{row['objective']:.3%}"
        if row["firing"]:
            firing = f"[bold red]{row['severity']}[/bold red]"
        elif not row["enough_data"]:
            firing = "[dim]not enough data[/dim]"
        else:
            firing = "-"
        left = row["budget_remaining"]
        table.add_row(row["pipeline"], row["slo"], target, f"{row['long_window']} / {row['short_window']}",
                      f"{row['factor']:g}", f"{row['long_burn_rate']:.2f} / {row['short_burn_rate']:.2f}", firing,
                      "no data" if left != left else f"{left:.1%}")
    return table


def errors_table(frame: pl.DataFrame, title: str = "errors") -> Table:
    """analyzer.errors rows: where, whose (client / server), the message, how often, when last, a trace to open."""
    table = Table(title=title, title_justify="left")
    for name in ("pipeline", "step", "kind", "message", "count", "failed tasks", "last seen (UTC)", "example trace"):
        table.add_column(name, justify="right" if name in ("count", "failed tasks") else "left")
    if frame.is_empty():
        table.add_row("(no errors in the window)", *[""] * 7)
    for row in frame.iter_rows(named=True):
        style = "yellow" if row["kind"] == "client" else "red"
        table.add_row(row["pipeline"], row["step"] or "(end to end)", f"[{style}]{row['kind']}[/{style}]",
                      row["message"][:160], f"{row['count']:,}", f"{row['failed_tasks']:,}",
                      f"{row['last_seen']:%Y-%m-%d %H:%M:%S}", row["example_trace_id"])
    return table


def frame_table(frame: pl.DataFrame, title: str) -> Table:
    """Any analyzer frame as a table: text columns left, numbers right, floats to 2 decimals."""
    table = Table(title=title, title_justify="left")
    for name, dtype in frame.schema.items():
        table.add_column(name, justify="left" if dtype == pl.Utf8 else "right")
    if frame.is_empty():
        table.add_row("(nothing in the window)", *[""] * (frame.width - 1))
    for row in frame.iter_rows():
        table.add_row(*["-" if v is None or v != v else f"{v:,.2f}" if isinstance(v, float) else str(v)
                        for v in row])
    return table
