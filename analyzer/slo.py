"""SLOs per pipeline and their multi-window, multi-burn-rate alerts (the SRE workbook's table, as data).

What counts as a bad request (a task = its root span: `tracetune.pipeline` set, no `tracetune.step`):

| SLO kind       | target          | bad request                   | error budget (bad fraction allowed) |
|----------------|-----------------|-------------------------------|-------------------------------------|
| `availability` | `error_rate`    | root span failed, server-side | `error_rate` (or 1 − `objective`)   |
| `latency_p95`  | `p95_ms`        | root span slower than p95_ms  | 5%  (95% must be at most p95_ms)    |
| `latency_p99`  | `p99_ms`        | root span slower than p99_ms  | 1%  (99% must be at most p99_ms)    |

A failed task is a server error unless its kind is `client` (invalid input the pipeline refused,
see analyzer/errors.py): a user's bad input does not make the service unavailable. A latency SLO
counts every task, failed or not, by its duration. `cost_per_1k` and `quality_floor`
are stored with the SLO for the cost and quality checks; they have no request-level burn rate.

Burn rate = (bad / total) / error budget: at 1 the budget lasts exactly the SLO period.

Only the time the pipeline has data counts: the budget left is over the tasks since the first one in
the period (`data_seconds` says how long that is), is NaN when there is none, and a rule whose long
window is longer than the data has `enough_data` False and does not fire (a 3-day rule cannot judge
7 minutes of traffic).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import polars as pl

from tracetune.analyzer._time import epoch_ns, utc
from tracetune.analyzer.errors import ERROR_KIND_SQL
from tracetune.analyzer.stats import parse_window

__all__ = ["BURN_WINDOWS_30D", "SLO", "SLO_NAMES", "SLO_STATUS_COLUMNS", "STATE_ORDER", "BurnWindow", "Objective",
           "SLOError", "alerts", "budget_words", "burn_rate", "burn_windows", "data_note", "duration_words",
           "enough_data", "error_budget_remaining", "get_slo", "list_slos", "request_counts", "save_slo",
           "slo_status", "slo_words", "slower_than", "window_label"]

Source = Literal["rollup", "raw"]
BASE_PERIOD_DAYS = 30
LATENCY_BUDGETS = {"latency_p95": ("p95_ms", 0.05), "latency_p99": ("p99_ms", 0.01)}

# The SRE workbook's recommended alerts for a 30-day SLO (chapter 5, "multiwindow, multi-burn-rate"):
# (long window, short window, share of the period's error budget spent in the long window, severity).
# A rule fires when the burn rate over BOTH windows is above its factor; the short window makes it
# stop soon after the burning stops. Factors are derived from these numbers by burn_windows().
BURN_WINDOWS_30D: tuple[tuple[str, str, float, str], ...] = (
    ("1h", "5m", 0.02, "page"),
    ("6h", "30m", 0.05, "page"),
    ("3d", "6h", 0.10, "ticket"),
)


class SLOError(ValueError):
    """An SLO that cannot be used; the message is one line naming the bad field."""


@dataclass(frozen=True)
class BurnWindow:
    """One alert rule: fire `severity` when the burn rate over long_s and short_s both exceed factor."""

    long_s: int
    short_s: int
    budget_fraction: float
    factor: float
    severity: str


def burn_windows(period_days: float = BASE_PERIOD_DAYS, scale_windows: bool = True) -> tuple[BurnWindow, ...]:
    """The BURN_WINDOWS_30D rules for an SLO period of period_days.

    Burning at rate b for a time w spends b·w/P of the budget of a period P, so a rule that fires
    when a fraction f of the budget went in its long window w needs b = f·P/w. For P = 30 d this
    gives 0.02·720h/1h = 14.4, 0.05·720h/6h = 6 and 0.10·720h/72h = 1, the workbook's factors.
    With scale_windows (default) both windows scale by P/30d (a 7-day SLO pages on 14 min / 70 s),
    which leaves every factor as it is; without it the windows stay as in the table and the factor
    changes instead (Sloth's choice: 28 d → 13.44, 5.6, 0.933). Windows are whole seconds.
    """
    if isinstance(period_days, bool) or not isinstance(period_days, int | float) or not 0 < period_days <= 366:
        raise SLOError(f"period_days must be a number of days in (0, 366], got {period_days!r}")
    period_s = period_days * 86400
    scale = period_days / BASE_PERIOD_DAYS if scale_windows else 1.0
    rules = []
    for long, short, fraction, severity in BURN_WINDOWS_30D:
        long_s = max(1, round(parse_window(long) * scale))
        short_s = max(1, round(parse_window(short) * scale))
        rules.append(BurnWindow(long_s, short_s, fraction, round(fraction * period_s / long_s, 9), severity))
    return tuple(rules)


# ---- pure functions -----------------------------------------------------------------------------

def _check_budget(error_budget: float) -> None:
    if not 0 < error_budget <= 1:
        raise SLOError(f"error budget must be a fraction in (0, 1], got {error_budget!r}")


def burn_rate(bad: float, total: float, error_budget: float) -> float:
    """(bad / total) / error_budget; 0 when there was no traffic (nothing was spent)."""
    _check_budget(error_budget)
    return 0.0 if total <= 0 else (bad / total) / error_budget


def error_budget_remaining(bad: float, total: float, error_budget: float) -> float:
    """Share of the period's budget left: 1 − bad / (error_budget · total). Negative when overspent."""
    _check_budget(error_budget)
    return 1.0 if total <= 0 else 1.0 - bad / (error_budget * total)


def alerts(rates: Mapping[int, float], windows: Sequence[BurnWindow] | None = None) -> list[BurnWindow]:
    """The rules that fire: burn rate above the factor over the long AND the short window.

    rates maps window length in seconds to the burn rate over it (the workbook's `>`, as in Prometheus rules).
    """
    windows = burn_windows() if windows is None else windows
    missing = sorted({s for w in windows for s in (w.long_s, w.short_s)} - set(rates))
    if missing:
        raise SLOError(f"no burn rate for window(s) of {', '.join(f'{s}s' for s in missing)} seconds")
    return [w for w in windows if rates[w.long_s] > w.factor and rates[w.short_s] > w.factor]


# ---- the SLO itself -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Objective:
    """One request-level SLO of a pipeline: its kind, latency target (None for availability) and budget."""

    kind: str
    target_ms: float | None
    error_budget: float


@dataclass(frozen=True)
class SLO:
    """Targets for one pipeline over a rolling period. Unset (None) targets are not checked.

    error_rate and objective say the same thing two ways (objective 0.999 = error_rate 0.001); set either.
    """

    pipeline: str
    p95_ms: float | None = None
    p99_ms: float | None = None
    error_rate: float | None = None
    objective: float | None = None
    cost_per_1k: float | None = None
    quality_floor: float | None = None
    period_days: float = BASE_PERIOD_DAYS

    def __post_init__(self) -> None:
        self.validate()

    def _fail(self, message: str) -> SLOError:
        return SLOError(f"SLO for pipeline {self.pipeline!r}: {message}")

    def validate(self) -> None:
        if not isinstance(self.pipeline, str) or not self.pipeline.strip():
            raise SLOError(f"SLO `pipeline` must be a non-empty name, got {self.pipeline!r}")
        rules = {  # field -> (check, what it must be)
            "p95_ms": (lambda v: v > 0, "a latency in milliseconds > 0"),
            "p99_ms": (lambda v: v > 0, "a latency in milliseconds > 0"),
            "error_rate": (lambda v: 0 < v < 1, "a fraction of requests in (0, 1), e.g. 0.001"),
            "objective": (lambda v: 0 < v < 1, "a fraction of good requests in (0, 1), e.g. 0.999"),
            "cost_per_1k": (lambda v: v >= 0, "a price per 1000 requests >= 0"),
            "quality_floor": (lambda v: 0 <= v <= 1, "a score in [0, 1]"),
            "period_days": (lambda v: 0 < v <= 366, "a number of days in (0, 366], e.g. 30"),
        }
        for name, (check, what) in rules.items():
            value = getattr(self, name)
            if value is None and name != "period_days":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or not check(value):
                raise self._fail(f"`{name}` must be {what}, got {value!r}")
        if self.p95_ms is not None and self.p99_ms is not None and self.p99_ms < self.p95_ms:
            raise self._fail(f"`p99_ms` ({self.p99_ms}) must not be below `p95_ms` ({self.p95_ms})")
        if self.error_rate is not None and self.objective is not None \
                and not math.isclose(self.error_rate, 1 - self.objective, rel_tol=1e-9, abs_tol=1e-12):
            raise self._fail(f"`error_rate` ({self.error_rate}) and `objective` ({self.objective}) disagree; "
                             "set only one of them")
        if all(getattr(self, n) is None for n in ("p95_ms", "p99_ms", "error_rate", "objective", "cost_per_1k",
                                                  "quality_floor")):
            raise self._fail("no target set; give at least one of p95_ms, p99_ms, error_rate, objective, "
                             "cost_per_1k, quality_floor")

    @property
    def error_budget(self) -> float | None:
        """The availability budget: error_rate, or 1 − objective."""
        if self.error_rate is not None:
            return self.error_rate
        return None if self.objective is None else 1 - self.objective

    def objectives(self) -> list[Objective]:
        """The request-level SLOs this one sets, in table order (see the module docstring)."""
        result = []
        if self.error_budget is not None:
            result.append(Objective("availability", None, self.error_budget))
        for kind, (name, budget) in LATENCY_BUDGETS.items():
            if getattr(self, name) is not None:
                result.append(Objective(kind, float(getattr(self, name)), budget))
        return result

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, body: Mapping[str, Any], pipeline: str | None = None) -> SLO:
        """An SLO from a JSON body (e.g. PUT /v1/pipelines/{p}/slo); `pipeline` overrides the body's."""
        if not isinstance(body, Mapping):
            raise SLOError(f"an SLO must be a JSON object, got {type(body).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(body) - set(names))
        if unknown:
            raise SLOError(f"unknown SLO field `{unknown[0]}`; use {', '.join(names)}")
        values = dict(body)
        if pipeline is not None:
            values["pipeline"] = pipeline
        if "pipeline" not in values:
            raise SLOError("an SLO needs `pipeline`")
        if values.get("period_days") is None:
            values.pop("period_days", None)
        return cls(**values)


# ---- storage ----------------------------------------------------------------------------------

_LATEST_SLO_SQL = """
SELECT version, slo FROM tracetune_slos WHERE pipeline = {pipeline:String}
ORDER BY version DESC, created_at DESC LIMIT 1
"""
_ALL_SLOS_SQL = """
SELECT pipeline, argMax(slo, (version, created_at)) AS body FROM tracetune_slos
GROUP BY pipeline HAVING body != '' ORDER BY pipeline
"""


def _latest(client, pipeline: str) -> tuple[int, SLO | None] | None:
    """(the newest version, its SLO or None if that version deleted it), or None if there never was one."""
    rows = client.query(_LATEST_SLO_SQL, parameters={"pipeline": pipeline}).result_rows
    if not rows:
        return None
    version, body = rows[0]
    return int(version), SLO.from_dict(json.loads(body)) if body else None


def save_slo(client, slo: SLO, author: str = "") -> int:
    """Store slo as the pipeline's next version and return it; an unchanged SLO keeps its version.

    Versions are numbered by the one writer (the tuner API holds a lock around this call)."""
    latest = _latest(client, slo.pipeline)
    if latest and latest[1] == slo:
        return latest[0]
    version = latest[0] + 1 if latest else 1
    client.insert("tracetune_slos", [[slo.pipeline, version, slo.to_json(), author]],
                  column_names=["pipeline", "version", "slo", "author"])
    return version


def delete_slo(client, pipeline: str, author: str = "") -> int | None:
    """Remove the pipeline's SLO (a version with an empty body); the version written, None if it had none."""
    latest = _latest(client, pipeline)
    if latest is None or latest[1] is None:
        return None
    client.insert("tracetune_slos", [[pipeline, latest[0] + 1, "", author]],
                  column_names=["pipeline", "version", "slo", "author"])
    return latest[0] + 1


def slo_version(client, pipeline: str) -> int:
    """The pipeline's newest SLO version (a deletion counts), 0 if it never had one."""
    latest = _latest(client, pipeline)
    return latest[0] if latest else 0


def get_slo(client, pipeline: str) -> SLO | None:
    """The pipeline's latest SLO, or None if none was saved (or it was deleted)."""
    latest = _latest(client, pipeline)
    return latest[1] if latest else None


def list_slos(client) -> list[SLO]:
    """The latest SLO of every pipeline that has one, by pipeline name."""
    return [SLO.from_dict(json.loads(body)) for _, body in client.query(_ALL_SLOS_SQL).result_rows]


# ---- counting good and bad tasks -----------------------------------------------------------------

# Tasks of one pipeline in every trailing window ending at end_ns, in one scan of the longest window:
# total, server errors, client errors, for each latency target how many took longer, and the first task.
REQUEST_COUNTS_RAW_SQL = """
SELECT
    window_seconds,
    count() AS total,
    countIf(failed AND error_kind != 'client') AS errors,
    countIf(failed AND error_kind = 'client') AS client_errors,
    sumForEach(arrayMap(t -> toUInt64(Duration > t), {targets_ns:Array(UInt64)})) AS slow,
    min(Timestamp) AS first_seen
FROM (
    SELECT
        Timestamp,
        StatusCode IN ('Error', 'STATUS_CODE_ERROR') AS failed,
        {kind_sql} AS error_kind,
        Duration,
        arrayJoin(arrayFilter(w -> Timestamp >= fromUnixTimestamp64Nano({end_ns:Int64}) - toIntervalSecond(w),
                              {windows:Array(UInt32)})) AS window_seconds
    FROM otel_traces
    WHERE Timestamp >= fromUnixTimestamp64Nano({end_ns:Int64}) - toIntervalSecond(arrayMax({windows:Array(UInt32)}))
      AND Timestamp < fromUnixTimestamp64Nano({end_ns:Int64})
      AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
      AND SpanAttributes['tracetune.step'] = ''
      AND ParentSpanId = ''
      AND ({tenant:String} = '' OR SpanAttributes['tracetune.tenant'] = {tenant:String})
)
GROUP BY window_seconds
ORDER BY window_seconds
""".replace("{kind_sql}", ERROR_KIND_SQL)

# The same from the per-minute rollups (windows rounded out to whole minutes); durations come back as
# log2 histograms (8 buckets per doubling) and are counted against the targets in Python; client
# errors come from tracetune_task_errors_1m and are taken out of the errors; first_seen is a minute.
REQUEST_COUNTS_ROLLUP_SQL = """
SELECT
    window_seconds,
    sum(requests) AS total,
    sum(errors) AS errors,
    sumMapMerge(duration_hist) AS hist,
    min(minute) AS first_seen
FROM (
    SELECT
        minute,
        requests,
        errors,
        duration_hist,
        arrayJoin(arrayFilter(
            w -> minute >= toStartOfMinute(fromUnixTimestamp64Nano({end_ns:Int64}) - toIntervalSecond(w)),
            {windows:Array(UInt32)})) AS window_seconds
    FROM tracetune_spans_1m
    WHERE pipeline = {pipeline:String}
      AND step = ''
      AND ({tenant:String} = '' OR tenant = {tenant:String})
      AND minute >= toStartOfMinute(fromUnixTimestamp64Nano({end_ns:Int64})
                                    - toIntervalSecond(arrayMax({windows:Array(UInt32)})))
      AND minute < fromUnixTimestamp64Nano({end_ns:Int64})
)
GROUP BY window_seconds
ORDER BY window_seconds
"""

CLIENT_ERRORS_ROLLUP_SQL = """
SELECT window_seconds, sum(errors) AS client_errors
FROM (
    SELECT
        errors,
        arrayJoin(arrayFilter(
            w -> minute >= toStartOfMinute(fromUnixTimestamp64Nano({end_ns:Int64}) - toIntervalSecond(w)),
            {windows:Array(UInt32)})) AS window_seconds
    FROM tracetune_task_errors_1m
    WHERE pipeline = {pipeline:String}
      AND error_kind = 'client'
      AND ({tenant:String} = '' OR tenant = {tenant:String})
      AND minute >= toStartOfMinute(fromUnixTimestamp64Nano({end_ns:Int64})
                                    - toIntervalSecond(arrayMax({windows:Array(UInt32)})))
      AND minute < fromUnixTimestamp64Nano({end_ns:Int64})
)
GROUP BY window_seconds
"""

HIST_BUCKETS_PER_DOUBLING = 8  # as tracetune_spans_1m.duration_hist: bucket = floor(log2(ns + 1) * 8)


def slower_than(hist: Mapping[int, int], target_ns: float) -> float:
    """Estimated count of durations > target_ns from a duration_hist map.

    Buckets wholly above the target count fully; the bucket holding the target counts by the share
    of it (in log scale) above the target, so the error is at most that one bucket's count.
    """
    x = math.log2(target_ns + 1) * HIST_BUCKETS_PER_DOUBLING
    b = math.floor(x)
    above = sum(count for bucket, count in hist.items() if bucket > b)
    return float(above + hist.get(b, 0) * (b + 1 - x))


def _utc(moment: datetime | None) -> datetime:
    return utc(moment) if moment is not None else datetime.now(UTC)


_ns = epoch_ns


def request_counts(client, pipeline: str, windows: Sequence[int], latency_targets_ms: Sequence[float] = (),
                   now: datetime | None = None, tenant: str = "", source: Source = "rollup") -> pl.DataFrame:
    """Tasks in each trailing window (seconds) ending at now: window_seconds, total, errors, client_errors,
    slow, first_seen.

    errors are server errors (what the availability SLO counts), client_errors the failed tasks
    refused for their input (analyzer/errors.py); first_seen is when the window's first task started
    (None without tasks; the start of its minute from the rollup).
    slow is a list aligned with latency_targets_ms: tasks slower than each target. `raw` counts
    exactly over exactly the window; `rollup` (default) reads tracetune_spans_1m, so a 30-day budget
    costs the same at any span rate, with windows rounded out to whole minutes and slow counts
    estimated from the duration histogram (within one 9%-wide bucket of the target).
    """
    if source not in ("rollup", "raw"):
        raise ValueError(f"source must be 'rollup' or 'raw', not {source!r}")
    windows = sorted({int(w) for w in windows})
    if not windows or windows[0] <= 0:
        raise ValueError(f"windows must be positive numbers of seconds, got {windows!r}")
    targets_ns = [int(round(t * 1e6)) for t in latency_targets_ms]
    parameters = {"pipeline": pipeline, "tenant": tenant, "end_ns": _ns(_utc(now)), "windows": windows,
                  "targets_ns": targets_ns}
    sql = REQUEST_COUNTS_RAW_SQL if source == "raw" else REQUEST_COUNTS_ROLLUP_SQL
    found = {}
    if source == "raw":
        for window, total, errors, client_errors, slow, first in client.query(sql, parameters=parameters).result_rows:
            found[int(window)] = (int(total), int(errors), int(client_errors), [float(x) for x in slow], utc(first))
    else:
        clients = {int(w): int(n) for w, n in client.query(CLIENT_ERRORS_ROLLUP_SQL, parameters=parameters).result_rows}
        for window, total, errors, hist, first in client.query(sql, parameters=parameters).result_rows:
            refused = min(clients.get(int(window), 0), int(errors))
            found[int(window)] = (int(total), int(errors) - refused, refused,
                                  [slower_than(hist, t) for t in targets_ns], utc(first))
    empty = (0, 0, 0, [0.0] * len(targets_ns), None)  # a window without tasks
    names = ("window_seconds", "total", "errors", "client_errors", "slow", "first_seen")
    rows = [dict(zip(names, (w, *found.get(w, empty)), strict=True)) for w in windows]
    return pl.DataFrame(rows, schema={"window_seconds": pl.Int64, "total": pl.Int64, "errors": pl.Int64,
                                      "client_errors": pl.Int64, "slow": pl.List(pl.Float64),
                                      "first_seen": pl.Datetime("us", "UTC")})


# ---- status --------------------------------------------------------------------------------------

SLO_STATUS_COLUMNS = ["pipeline", "slo", "target_ms", "objective", "error_budget", "period_days", "severity",
                      "long_window", "short_window", "long_window_s", "short_window_s", "factor", "long_burn_rate",
                      "short_burn_rate", "firing", "period_requests", "period_bad", "budget_remaining",
                      "data_seconds", "enough_data", "period_client_errors"]
_STATUS_SCHEMA = {"pipeline": pl.Utf8, "slo": pl.Utf8, "target_ms": pl.Float64, "objective": pl.Float64,
                  "error_budget": pl.Float64, "period_days": pl.Float64, "severity": pl.Utf8,
                  "long_window": pl.Utf8, "short_window": pl.Utf8, "long_window_s": pl.Int64,
                  "short_window_s": pl.Int64, "factor": pl.Float64, "long_burn_rate": pl.Float64,
                  "short_burn_rate": pl.Float64, "firing": pl.Boolean, "period_requests": pl.Int64,
                  "period_bad": pl.Float64, "budget_remaining": pl.Float64, "data_seconds": pl.Float64,
                  "enough_data": pl.Boolean, "period_client_errors": pl.Int64}


def window_label(seconds: int) -> str:
    """3600 -> '1h', 280 -> '4m40s', 259200 -> '3d'."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def data_note(data_seconds: float, period_days: float) -> str:
    """What a budget was computed over, as said to the user: "7.5 min of data", "the whole 30-day period"."""
    if data_seconds <= 0:
        return "no data in the period"
    if data_seconds >= period_days * 86400:
        return f"the whole {period_days:g}-day period"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if data_seconds >= size:
            return f"{data_seconds / size:.1f} {unit} of data"
    return f"{data_seconds:.0f} s of data"


def slo_status(client, pipeline: str, now: datetime | None = None, slo: SLO | None = None, tenant: str = "",
               source: Source = "rollup", scale_windows: bool = True) -> pl.DataFrame:
    """Burn rates, firing rules and budget left for each objective of the pipeline's SLO.

    One row per (SLO kind, burn-rate rule), SLO_STATUS_COLUMNS. slo defaults to the stored one;
    SLOError if there is none. Budget remaining is over the tasks of the trailing SLO period ending
    at now, which only has data for data_seconds (since its first task; 0 and a NaN budget without
    any); a rule whose long window is longer than that has enough_data False and does not fire.
    period_client_errors: failed tasks left out of availability as the client's (invalid input).
    """
    slo = slo or get_slo(client, pipeline)
    if slo is None:
        raise SLOError(f"no SLO saved for pipeline {pipeline!r}; set one with PUT /v1/pipelines/{pipeline}/slo")
    objectives = slo.objectives()
    rules = burn_windows(slo.period_days, scale_windows)
    period_s = round(slo.period_days * 86400)
    latency = [o for o in objectives if o.target_ms is not None]
    counts = request_counts(client, pipeline, [period_s, *(s for r in rules for s in (r.long_s, r.short_s))],
                            [o.target_ms for o in latency], now, tenant, source)
    by_window = {row["window_seconds"]: row for row in counts.iter_rows(named=True)}

    def bad(window: int, objective: Objective) -> float:
        row = by_window[window]
        return float(row["errors"]) if objective.target_ms is None else row["slow"][latency.index(objective)]

    period = by_window[period_s]
    end = _utc(now)
    data_seconds = 0.0 if period["first_seen"] is None else \
        float(min(period_s, max(0, round((end - period["first_seen"]).total_seconds()))))  # whole seconds
    rows = []
    for objective in objectives:
        rates = {w: burn_rate(bad(w, objective), by_window[w]["total"], objective.error_budget) for w in by_window}
        firing = [rule for rule in alerts(rates, rules) if enough_data(data_seconds, rule.long_s)]
        period_bad = bad(period_s, objective)
        remaining = error_budget_remaining(period_bad, period["total"], objective.error_budget) \
            if period["total"] else math.nan
        for rule in rules:
            rows.append({
                "pipeline": pipeline, "slo": objective.kind, "target_ms": objective.target_ms,
                "objective": 1 - objective.error_budget, "error_budget": objective.error_budget,
                "period_days": float(slo.period_days), "severity": rule.severity,
                "long_window": window_label(rule.long_s), "short_window": window_label(rule.short_s),
                "long_window_s": rule.long_s, "short_window_s": rule.short_s, "factor": rule.factor,
                "long_burn_rate": rates[rule.long_s], "short_burn_rate": rates[rule.short_s],
                "firing": rule in firing, "period_requests": period["total"],
                "period_bad": period_bad, "budget_remaining": remaining, "data_seconds": data_seconds,
                "enough_data": enough_data(data_seconds, rule.long_s),
                "period_client_errors": period["client_errors"] if objective.target_ms is None else 0,
            })
    return pl.DataFrame(rows, schema=_STATUS_SCHEMA).select(SLO_STATUS_COLUMNS)


# ---- SLOs in words (the dashboard's Overview, the report) -------------------------------------------

def _ms_words(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def duration_words(days: float) -> str:
    """A span of time as a product owner says it: "40 minutes", "5 hours", "3 days"."""
    hours = days * 24
    if hours < 1:
        minutes = max(1, round(hours * 60))
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    if hours < 48:
        whole = round(hours)
        return f"{whole} hour{'s' if whole != 1 else ''}"
    whole = round(days)
    return f"{whole} days"


# SLO states, worst first.
STATE_ORDER = ("budget spent", "burning fast", "at risk", "on track", "not enough data", "no traffic yet")


def enough_data(data_seconds: float, long_window_s: float) -> bool:
    """The one rule for "enough data", for every rule, objective and surface (CLI, pages, report, alerts):
    the pipeline's data in the SLO period covers the long window. An objective is judged once its shortest
    rule's long window is covered (1 h of a 30-day SLO): before that its budget left is a guess from a few
    tasks (149 tasks, 10 slow, read as "30% over budget"), so every surface says "not enough data"."""
    return data_seconds >= long_window_s


def budget_words(budget_remaining: float, burn_rate: float, period_days: float,
                 paging: bool = False, data_seconds: float | None = None,
                 judged_after_s: float | None = None) -> tuple[str, str]:
    """(state, sentence) of one SLO objective from its budget left (a fraction), the recent burn rate and
    the SLO period: at burn rate b the budget left r lasts r · period / b.

    on track: burning no faster than the budget allows (b ≤ 1); at risk: faster, with the time left at
    this burn; burning fast: a page-severity rule fires; budget spent: nothing left (r ≤ 0); not enough
    data: the data (data_seconds) does not cover judged_after_s yet (`enough_data`)."""
    if budget_remaining != budget_remaining:  # NaN: no task in the period
        return "no traffic yet", "no traffic yet"
    if data_seconds is not None and judged_after_s is not None and not enough_data(data_seconds, judged_after_s):
        return "not enough data", (f"not enough data: {data_note(data_seconds, period_days)}, judged after "
                                   f"{duration_words(judged_after_s / 86400)}")
    left = f"{100 * max(0.0, budget_remaining):.0f}% of the error budget left"
    if budget_remaining <= 0:
        return "budget spent", f"budget spent: {100 * -budget_remaining:.0f}% over the {period_days:g}-day budget"
    if burn_rate <= 1:
        return "on track", f"on track: {left}"
    time_left = duration_words(budget_remaining * period_days / burn_rate)
    if paging:
        return "burning fast", f"burning fast: {time_left} of budget left at this burn (on-call is paged)"
    return "at risk", f"at risk: {time_left} of budget left at this burn"


SLO_NAMES = {"availability": "errors", "latency_p95": "p95 latency", "latency_p99": "p99 latency"}


def slo_words(status: pl.DataFrame) -> pl.DataFrame:
    """One row per (pipeline, objective) of slo_status frames: state and sentence (budget_words), the target,
    budget left and the recent burn (the burn rate over the shortest long window: the last hour of a
    30-day SLO), worst state first (then least budget left). The words every surface shows: the CLI's
    `tracetune slo`, the dashboard's Overview and the report's "At a glance" all call this."""
    columns = {"pipeline": pl.Utf8, "objective": pl.Utf8, "target": pl.Utf8, "state": pl.Utf8, "status": pl.Utf8,
               "budget_left": pl.Float64, "burn": pl.Float64, "window": pl.Utf8}
    rows = []
    for (pipeline, slo), rules in status.group_by(["pipeline", "slo"], maintain_order=True):
        recent = rules.sort("long_window_s").row(0, named=True)
        paging = bool(rules.filter(pl.col("firing") & (pl.col("severity") == "page")).height)
        state, sentence = budget_words(recent["budget_remaining"], recent["long_burn_rate"], recent["period_days"],
                                       paging, recent.get("data_seconds"), recent["long_window_s"])
        target = (f"{(1 - recent['error_budget']) * 100:g}% of tasks succeed" if recent["target_ms"] is None
                  else f"{100 * (1 - recent['error_budget']):g}% of tasks within {_ms_words(recent['target_ms'])}")
        rows.append({"pipeline": pipeline, "objective": SLO_NAMES.get(slo, slo), "target": target, "state": state,
                     "status": sentence, "budget_left": recent["budget_remaining"], "burn": recent["long_burn_rate"],
                     "window": recent["long_window"]})
    frame = pl.DataFrame(rows, schema=columns)
    rank = {s: i for i, s in enumerate(STATE_ORDER)}
    return frame.sort(pl.col("state").replace_strict(rank, return_dtype=pl.Int32), "pipeline", "budget_left",
                      "objective", nulls_last=True)
