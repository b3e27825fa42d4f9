"""Terminal rendering shared by the CLI and the demo's live view.

Tables fit WIDTH columns (a terminal's own width, else COLUMNS, else 100): each view shows its
essential columns, `wide=True` (`--wide`) all of them, one line a row, scrolling sideways if need be.
Rates are percent everywhere ("error %").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import polars as pl
from rich import box
from rich.console import Console
from rich.table import Table

WIDTH = 100  # columns when the output is not a terminal and COLUMNS is not set
WIDE_WIDTH = 240  # off a terminal, --wide tables get this many so each row stays one line


def console(wide: bool = False) -> Console:
    """Rich console: a terminal's width; off a terminal (pipes, logs, CI) COLUMNS, else WIDTH.

    `wide` tables never fold a cell to fit: at least WIDE_WIDTH columns, one line per row, wider than a
    narrow terminal (`| less -S` scrolls them sideways) rather than cut."""
    if sys.stdout.isatty():
        return Console(width=max(Console().width, WIDE_WIDTH)) if wide else Console()
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() and int(columns) > 0 else WIDTH
    return Console(width=max(width, WIDE_WIDTH) if wide else width)


def _table(title: str, caption: str | None = None) -> Table:
    return Table(title=title, title_justify="left", caption=caption, caption_justify="left")


def _column(table: Table, header: str, numeric: bool = False) -> None:
    """Narrow columns wrap (fold) rather than cut words to `reque…`."""
    table.add_column(header, justify="right" if numeric else "left", overflow="fold")


def percent(rate: float | None) -> str:
    """A fraction as percent without the sign (the header says %): 0.0044 -> '0.44', 0.25 -> '25.0'."""
    if rate is None or rate != rate:
        return "-"
    pct = 100 * rate
    if pct == 0:
        return "0"
    if pct < 0.01:
        return "<0.01"
    return f"{pct:.2g}" if pct < 1 else f"{pct:.1f}"


def _number(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# Frame column -> (header, format): units in the header, the same in every view.
_FORMATS: dict[str, tuple[str, Callable]] = {
    "error_rate": ("error %", percent),
    "cache_hit_rate": ("cache hit %", percent),
    "throughput_rps": ("req/s", _number),
    "mean_batch_size": ("batch size", _number),
    "mean_queue_ms": ("queue ms", _number),
}
# What each view shows without --wide (after its group-by keys).
LATENCY_COLUMNS = ("requests", "error_rate", "throughput_rps", "p50_ms", "p95_ms", "p99_ms")
BATCHING_COLUMNS = ("pipeline", "step", "route", "batched_spans", "batch_size_p50", "batch_size_p95",
                    "queue_ms_p50", "queue_ms_p95", "queue_depth_p95")
COLD_START_COLUMNS = ("pipeline", "step", "route", "cold_starts", "executors", "cold_ms_max", "warm_ms_p50")


def _header(name: str) -> str:
    if name in _FORMATS:
        return _FORMATS[name][0]
    return name.replace("_ms", " ms").replace("_", " ")


def step_table(frame: pl.DataFrame, title: str = "per-step latency") -> Table:
    """Rows of step_stats; a pipeline's "(end to end)" row (its tasks) in bold."""
    table = _table(title)
    for name in ("pipeline", "step"):
        _column(table, name)
    for name in ("requests", "error %", "p50 ms", "p95 ms", "p99 ms"):
        _column(table, name, numeric=True)
    if frame.is_empty():
        table.add_row("(no spans yet)", "", "", "", "", "", "")
        return table
    for row in frame.iter_rows(named=True):
        table.add_row(row["pipeline"], row["step"], f"{row['requests']:,}", percent(row["error_rate"]),
                      f"{row['p50_ms']:.2f}", f"{row['p95_ms']:.2f}", f"{row['p99_ms']:.2f}",
                      style="bold" if row["step"] == "(end to end)" else None)
    return table


def cost_table(frame: pl.DataFrame, title: str = "cost per 1k requests", wide: bool = False) -> Table:
    """Requests is the pipeline's request count (the per-1k denominator), said once per pipeline; $ columns
    are window totals; a total row sums them (its $ per 1k: total $ over every pipeline's requests).

    Without `wide`: requests, tokens, total $ and $ per 1k; `wide` adds spans, compute seconds and
    the token / compute / calls split.
    """
    table = _table(title, "$ columns: totals over the window" + ("" if wide else "; --wide splits them into "
                                                                  "token, compute and calls"))
    keys = [c for c in frame.columns if c in ("pipeline", "tenant", "step", "route", "model")]
    for name in keys:
        _column(table, name)
    has_spans = wide and "spans" in frame.columns
    numbers = ["requests", *(["spans"] if has_spans else []), "tokens in/out",
               *(["compute s", "token $", "compute $", "calls $"] if wide else []), "total $", "$ per 1k"]
    for name in numbers:
        _column(table, name, numeric=True)
    width = len(keys) + len(numbers)
    if frame.is_empty():
        table.add_row(*(["(no requests in the window)"] + [""] * width)[:width])
        return table
    # By step, route or model, a row's requests are its pipeline's: said once per pipeline, counted once.
    per_pipeline = bool(set(keys) & {"step", "route", "model"})
    if per_pipeline and "pipeline" in keys:
        frame = frame.sort("pipeline", maintain_order=True)
    sums = {"requests": 0, "spans": 0, "in": 0, "out": 0, "cost": 0.0, "split": [0.0, 0.0, 0.0, 0.0]}
    last = None
    for row in frame.iter_rows(named=True):
        per_1k = row["cost_per_1k"]
        total = row["cost"] if "cost" in row else row["token_cost"] + row["compute_cost"] + row["call_cost"]
        values = [row["compute_seconds"], row["token_cost"], row["compute_cost"], row["call_cost"]]
        split = [f"{values[0]:.2f}", *(f"{v:.4f}" for v in values[1:])]
        first = not per_pipeline or row.get("pipeline", "") != last
        if first:
            sums["requests"] += row["requests"]
        last = row.get("pipeline", "")
        sums["spans"] += row.get("spans") or 0
        sums["in"] += row["input_tokens"]
        sums["out"] += row["output_tokens"]
        sums["cost"] += total
        sums["split"] = [a + (b or 0.0) for a, b in zip(sums["split"], values, strict=True)]
        table.add_row(*[row[k] or "-" for k in keys], f"{row['requests']:,}" if first else "",
                      *([f"{row['spans']:,}"] if has_spans else []),
                      f"{row['input_tokens']:,}/{row['output_tokens']:,}", *(split if wide else []),
                      f"{total:.4f}", "-" if per_1k is None else f"{per_1k:.4f}")
    if frame.height > 1:
        table.rows[-1].end_section = True
        every = sums["split"]
        table.add_row("total", *[""] * (len(keys) - 1), f"{sums['requests']:,}",
                      *([f"{sums['spans']:,}"] if has_spans else []), f"{sums['in']:,}/{sums['out']:,}",
                      *([f"{every[0]:.2f}", *(f"{v:.4f}" for v in every[1:])] if wide else []),
                      f"{sums['cost']:.4f}",
                      f"{1000 * sums['cost'] / sums['requests']:.4f}" if sums["requests"] else "-", style="bold")
    return table


_STATUS_STYLE = {"drift": "bold red", "warn": "yellow", "ok": "green", "insufficient_data": "dim"}


_STATUS_WORDS = {"insufficient_data": "too few samples"}


def _compact(title: str, caption: str | None = None) -> Table:
    """A table of many short rows: no vertical rules, so names stay whole at 100 columns."""
    return Table(title=title, title_justify="left", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD,
                 pad_edge=False)


def drift_table(status: pl.DataFrame, detail: pl.DataFrame, title: str = "drift", caption: str | None = None,
                wide: bool = False) -> Table:
    """One row per feature: its verdict and the statistic that decided it (every statistic with `wide`)."""
    table = _compact(title, caption)
    names = ("pipeline", "step", "feature", "status", "statistics" if wide else "decided by", "n ref / cur")
    for name in names:  # with `wide`, one statistic a line: it still fits 100 columns
        table.add_column(name, justify="right" if name == "n ref / cur" else "left", no_wrap=True)
    if status.is_empty():
        table.add_row("(no features in either window)", *[""] * (len(names) - 1))
        return table
    rank = {"drift": 0, "warn": 1, "ok": 2, "insufficient_data": 3}
    for row in status.iter_rows(named=True):
        stats = detail.filter((pl.col("pipeline") == row["pipeline"]) & (pl.col("step") == row["step"])
                              & (pl.col("feature") == row["feature"]))
        shown = list(stats.iter_rows(named=True))
        if not wide and shown:  # the statistic whose verdict is the feature's, else the first
            shown = [min(shown, key=lambda r: rank.get(r["status"], 9))]
        text = "\n".join(f"{r['statistic']} {r['value']:.3g}" + ("" if not wide or r["p_value"] != r["p_value"]
                                                                   else f" (p={r['p_value']:.2g})") for r in shown)
        first = stats.row(0, named=True) if stats.height else {"n_reference": 0, "n_current": 0}
        style = _STATUS_STYLE.get(row["status"], "")
        word = _STATUS_WORDS.get(row["status"], row["status"])
        table.add_row(row["pipeline"], row["step"], row["feature"], f"[{style}]{word}[/{style}]" if style else word,
                      text,
                      f"{first['n_reference']:,} / {first['n_current']:,}")
    return table


def slo_table(frame: pl.DataFrame, wide: bool = False) -> Table:
    """slo_status rows; budget left says what it covers, rules longer than the data say so instead of firing.

    Without `wide` the burn-rate factor (the threshold the long and short burns must both pass) is left out.
    """
    from tracetune.analyzer.slo import data_note

    notes = sorted({f"{r['pipeline']}: {data_note(r['data_seconds'], r['period_days'])}"
                    for r in frame.iter_rows(named=True)})
    client_errors = {(r["pipeline"], r["period_client_errors"]) for r in frame.iter_rows(named=True)
                     if r["slo"] == "availability" and r["period_client_errors"]}
    caption = "burn: over the long / short window; left %: error budget left, over " + "; ".join(notes) + "".join(
        f"; {p}: {n:,} client errors (invalid input) not counted as unavailability" for p, n in sorted(client_errors))
    table = _compact("SLO burn rates", caption)
    names = ("pipeline", "slo", "target", "windows", *(["factor"] if wide else []), "burn", "firing", "left %")
    for name in names:
        table.add_column(name, justify="left" if name in ("pipeline", "slo", "windows", "firing") else "right",
                         no_wrap=True)
    for row in frame.iter_rows(named=True):
        target = f"{row['target_ms']:g} ms" if row["target_ms"] is not None else f"{100 * row['objective']:g}%"
        if row["firing"]:
            firing = f"[bold red]{row['severity']}[/bold red]"
        elif not row["enough_data"]:
            firing = "[dim]not enough data[/dim]"
        else:
            firing = "-"
        left = row["budget_remaining"]
        table.add_row(row["pipeline"], row["slo"], target, f"{row['long_window']}/{row['short_window']}",
                      *([f"{row['factor']:g}"] if wide else []),
                      f"{row['long_burn_rate']:.2f} / {row['short_burn_rate']:.2f}", firing,
                      "no data" if left != left else f"{100 * left:.1f}")
    return table


def errors_table(frame: pl.DataFrame, title: str = "errors", wide: bool = False) -> Table:
    """analyzer.errors rows: where, whose (client / server), the message, how often, when last.

    `wide` adds an example trace id to open (`--json` has it too) and the year of last seen.
    """
    table = _table(title, None if wide else "--wide adds an example trace id per message")
    names = ("pipeline", "step", "kind", "message", "count", "failed tasks", "last seen (UTC)",
             *(["example trace"] if wide else []))
    for name in names:
        _column(table, name, numeric=name in ("count", "failed tasks"))
    if frame.is_empty():
        table.add_row("(no errors in the window)", *[""] * (len(names) - 1))
    seen = "%Y-%m-%d %H:%M:%S" if wide else "%m-%d %H:%M:%S"
    for row in frame.iter_rows(named=True):
        style = "yellow" if row["kind"] == "client" else "red"
        table.add_row(row["pipeline"], row["step"] or "(end to end)", f"[{style}]{row['kind']}[/{style}]",
                      row["message"][:160], f"{row['count']:,}", f"{row['failed_tasks']:,}",
                      f"{row['last_seen']:{seen}}", *([row["example_trace_id"]] if wide else []))
    return table


def frame_table(frame: pl.DataFrame, title: str, columns: Sequence[str] | None = None, wide: bool = False,
                caption: str | None = None) -> Table:
    """Any analyzer frame as a table: text columns left, numbers right, floats to 2 decimals, rates in %.

    `columns` are the ones shown without `wide` (those the frame has, in that order); `wide` shows all.
    """
    names = list(frame.columns) if wide or columns is None else [c for c in columns if c in frame.columns]
    hidden = frame.width - len(names)
    if hidden and caption is None:
        caption = f"{hidden} more columns with --wide"
    table = _table(title, caption)
    for name in names:
        _column(table, _header(name), numeric=frame.schema[name] != pl.Utf8)
    if frame.is_empty():
        table.add_row("(nothing in the window)", *[""] * (len(names) - 1))
    for row in frame.select(names).iter_rows(named=True):
        table.add_row(*[_FORMATS[k][1](v) if k in _FORMATS else _number(v) for k, v in row.items()])
    return table


def latency_table(frame: pl.DataFrame, title: str, keys: Sequence[str], wide: bool = False) -> Table:
    """analyzer.latency rows: the group-by keys, then LATENCY_COLUMNS (all with `wide`)."""
    return frame_table(frame, title, [*keys, *LATENCY_COLUMNS], wide)


def models_summary(report: dict) -> list[str]:
    """A few lines from build_models' report (`tracetune models build --json` prints all of it)."""
    agreement = report.get("int8_agreement") or {}
    classifier = report.get("classifier") or {}
    by_variant = classifier.get("held_out_accuracy_by_variant") or {}
    accuracy = (", ".join(f"{v} {a:.1%}" for v, a in by_variant.items())
                or f"{classifier.get('held_out_accuracy', 0):.1%}")
    lines = [f"models in {report['models_dir']}: built {', '.join(report['built']) or 'nothing'}; "
             f"reused {', '.join(report['reused']) or 'nothing'} ({report['seconds']:g} s)",
             f"classifier: {len(classifier.get('labels', []))} labels, held-out accuracy {accuracy} "
             f"({classifier.get('test_samples', 0):,} tickets)"]
    if agreement:
        lines.append(f"int8 vs fp32: mean cosine {agreement.get('mean_cosine', float('nan')):.4f}, nearest-neighbour "
                     f"agreement {agreement.get('nearest_neighbour_agreement', float('nan')):.1%}")
    lines.append("full report: tracetune models build --json")
    return lines
