"""Analyzer: SQL over spans answering what a pipeline costs in time, errors and money."""

from analyzer.stats import (
    DIMENSIONS,
    LATENCY_COLUMNS,
    STEP_STATS_COLUMNS,
    latency,
    latency_series,
    parse_window,
    step_stats,
)

__all__ = ["DIMENSIONS", "LATENCY_COLUMNS", "STEP_STATS_COLUMNS", "latency", "latency_series", "parse_window",
           "step_stats"]
