"""Analyzer: SQL over spans answering what a pipeline costs in time, errors and money."""

from tracetune.analyzer.baselines import (
    Baseline,
    BaselineError,
    clear_baseline,
    first_traffic,
    get_baseline,
    list_baselines,
    set_baseline,
)
from tracetune.analyzer.cost import COST_DIMENSIONS, cost_over_time, cost_per_1k, cost_per_request
from tracetune.analyzer.drift import (
    AUTO_BASELINE,
    DEFAULT_CURRENT,
    DRIFT_COLUMNS,
    Reference,
    Thresholds,
    compute_drift,
    current_drift,
    default_windows,
    drift_flags,
    drift_references,
    feature_status,
    latest_drift,
    reference_label,
    store_drift,
)
from tracetune.analyzer.errors import ERROR_COLUMNS, ERROR_KINDS, errors
from tracetune.analyzer.prices import PricesError, PriceTable
from tracetune.analyzer.prices import current as current_prices
from tracetune.analyzer.prices import load as load_prices
from tracetune.analyzer.prices import publish as publish_prices
from tracetune.analyzer.series import (
    cost_by,
    cost_cells,
    cost_change,
    drift_history,
    error_spans,
    feature_histograms,
    feature_samples,
    pipelines,
    step_series,
    tenants,
)
from tracetune.analyzer.slo import (
    SLO,
    SLO_STATUS_COLUMNS,
    STATE_ORDER,
    BurnWindow,
    SLOError,
    budget_words,
    burn_rate,
    burn_windows,
    data_note,
    delete_slo,
    enough_data,
    error_budget_remaining,
    get_slo,
    list_slos,
    request_counts,
    save_slo,
    slo_status,
    slo_version,
    slo_words,
)
from tracetune.analyzer.slo import alerts as slo_alerts
from tracetune.analyzer.stats import (
    BATCHING_COLUMNS,
    COLD_START_COLUMNS,
    DIMENSIONS,
    END_TO_END,
    LATENCY_COLUMNS,
    STEP_STATS_COLUMNS,
    batching,
    cold_starts,
    latency,
    latency_series,
    parse_window,
    step_stats,
)
from tracetune.analyzer.traces import ROOT_STEP, SpanRecord, critical_path, self_times, step_breakdown, step_times

__all__ = [
    "Baseline", "BaselineError", "clear_baseline", "first_traffic", "get_baseline", "list_baselines", "set_baseline",
    "DEFAULT_CURRENT", "current_drift", "drift_flags", "reference_label", "ERROR_COLUMNS", "ERROR_KINDS", "errors",
    "data_note", "END_TO_END",
    "BATCHING_COLUMNS", "batching", "COLD_START_COLUMNS", "cold_starts",
    "DRIFT_COLUMNS", "SLO", "SLO_STATUS_COLUMNS", "BurnWindow", "SLOError", "Thresholds", "burn_rate",
    "burn_windows", "compute_drift", "default_windows", "error_budget_remaining", "feature_status", "get_slo",
    "delete_slo", "latest_drift", "list_slos", "request_counts", "save_slo", "slo_alerts", "slo_status",
    "slo_version", "store_drift",
    "COST_DIMENSIONS", "DIMENSIONS", "LATENCY_COLUMNS", "ROOT_STEP", "STEP_STATS_COLUMNS", "PriceTable",
    "PricesError", "SpanRecord", "cost_over_time", "cost_per_1k", "cost_per_request", "critical_path",
    "current_prices", "latency", "latency_series", "load_prices", "parse_window", "publish_prices",
    "self_times", "step_breakdown", "step_stats", "step_times",
    "cost_by", "cost_cells", "cost_change", "drift_history", "error_spans", "feature_histograms", "feature_samples",
    "pipelines", "step_series", "tenants",
    "AUTO_BASELINE", "Reference", "drift_references", "STATE_ORDER", "budget_words", "enough_data", "slo_words",
]
