"""Analyzer: SQL over spans answering what a pipeline costs in time, errors and money."""

from analyzer.stats import STEP_STATS_COLUMNS, latency_series, parse_window, step_stats

__all__ = ["step_stats", "latency_series", "parse_window", "STEP_STATS_COLUMNS"]
