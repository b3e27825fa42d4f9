"""Terminal rendering shared by the CLI and the demo's live view."""

from __future__ import annotations

import polars as pl
from rich.console import Console
from rich.table import Table


def console() -> Console:
    return Console()


def step_table(frame: pl.DataFrame, title: str = "per-step latency") -> Table:
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
                      f"{row['p50_ms']:.2f}", f"{row['p95_ms']:.2f}", f"{row['p99_ms']:.2f}")
    return table
