"""Drift of step features and step latency between a reference window and a current window.

Numeric features (and step latency, as feature `latency_ms`) are compared with PSI, the two-sample
Kolmogorov–Smirnov test and the Wasserstein distance; categorical features with the Jensen–Shannon
distance and a chi-square test of the two windows' category counts. The maths are pure functions
over arrays; the verdicts come from a table of thresholds (`Thresholds`), overridable per feature.
A feature is numeric when every sampled value of it, in both windows, parses as a float.

Which reference (`current_drift`, what the analyzer loop, the CLI and the dashboard use): the
pipeline's pinned baseline (analyzer/baselines.py) when it has one, else its first hour of traffic
(what there is of it before the current window while that hour lasts): a sustained change stays
flagged until the owner moves the reference. Every row says in words which reference it used.
Numeric features need a practical shift as well as a significant one (Thresholds.min_shift_ratio):
with thousands of samples a KS test finds a 0.005 ms move of a 0.02 ms step, which matters to nobody.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from tracetune.analyzer._time import epoch_ns, utc
from tracetune.analyzer.baselines import cleared_baselines, first_traffic_all, list_baselines
from tracetune.analyzer.slo import window_label
from tracetune.analyzer.stats import parse_window

__all__ = ["AUTO_BASELINE", "DEFAULT_CURRENT", "Reference", "drift_references", "DRIFT_COLUMNS",
           "FEATURE_DEFAULTS", "STATUSES", "Thresholds", "chi_square", "compare",
           "compute_drift", "current_drift", "default_windows", "drift_flags", "feature_status", "jensen_shannon",
           "ks_test", "latest_drift", "psi", "reference_label", "store_drift", "validate_thresholds", "verdict",
           "wasserstein"]

PSI_EPSILON = 1e-4  # proportion used for an empty bin, so ln(c/r) stays finite
SAMPLE_CAP = 20_000  # values per (pipeline, step, feature, window), reservoir-sampled in ClickHouse
LATENCY_FEATURE = "latency_ms"
# The current window by default: short enough that a change is caught within a few minutes (a window
# and the analyzer's interval), long enough for min_samples at a few tasks a second.
DEFAULT_CURRENT = "1m"
# The reference of a pipeline nobody pinned one for: its first hour of traffic, held until its owner
# moves it (`tracetune drift baseline set`), so a sustained change stays flagged as long as it lasts.
AUTO_BASELINE = "1h"

# Worst first: the order feature_status() uses to pick one verdict per feature.
STATUSES = ("drift", "warn", "ok", "insufficient_data")

DRIFT_COLUMNS = ["computed_at", "pipeline", "step", "feature", "kind", "statistic", "value", "p_value", "n_reference",
                 "n_current", "reference_start", "reference_end", "current_start", "current_end", "status"]
_TIME = pl.Datetime("ms", "UTC")
_SCHEMA = {"computed_at": _TIME, "pipeline": pl.Utf8, "step": pl.Utf8, "feature": pl.Utf8, "kind": pl.Utf8,
           "statistic": pl.Utf8, "value": pl.Float64, "p_value": pl.Float64, "n_reference": pl.Int64,
           "n_current": pl.Int64, "reference_start": _TIME, "reference_end": _TIME, "current_start": _TIME,
           "current_end": _TIME, "status": pl.Utf8}


# ---- the maths -----------------------------------------------------------------------------

def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> float:
    """Population Stability Index: Σ (c − r)·ln(c / r) over quantile bins of the reference.

    Bin edges are the reference's 1/bins … (bins−1)/bins quantiles (ties merged), bins are
    [edge_i, edge_i+1) with open ends, and an empty bin counts as PSI_EPSILON of its window.
    """
    ref, cur = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    if ref.size == 0 or cur.size == 0:
        return math.nan
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1) / ref.size
    c = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1) / cur.size
    r, c = np.maximum(r, PSI_EPSILON), np.maximum(c, PSI_EPSILON)
    return float(np.sum((c - r) * np.log(c / r)))


def ks_test(reference: Sequence[float], current: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov (statistic D, p-value)."""
    if len(reference) == 0 or len(current) == 0:
        return math.nan, math.nan
    from scipy import stats  # scipy.stats takes seconds to import: only where a statistic is computed

    result = stats.ks_2samp(reference, current)
    return float(result.statistic), float(result.pvalue)


def wasserstein(reference: Sequence[float], current: Sequence[float]) -> float:
    """Earth mover's distance between the two samples, in the feature's own unit."""
    if len(reference) == 0 or len(current) == 0:
        return math.nan
    from scipy import stats

    return float(stats.wasserstein_distance(reference, current))


def _frequencies(reference: Iterable[str], current: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Category counts of both windows over the union of their categories (sorted)."""
    ref, cur = Counter(reference), Counter(current)
    categories = sorted(set(ref) | set(cur))
    return (np.array([ref[k] for k in categories], dtype=float), np.array([cur[k] for k in categories], dtype=float))


def jensen_shannon(reference: Iterable[str], current: Iterable[str]) -> float:
    """Jensen–Shannon distance (base 2, so 0 = same mix, 1 = disjoint categories)."""
    ref, cur = _frequencies(reference, current)
    if ref.sum() == 0 or cur.sum() == 0:
        return math.nan
    from scipy.spatial import distance

    return float(distance.jensenshannon(ref / ref.sum(), cur / cur.sum(), base=2))


def chi_square(reference: Iterable[str], current: Iterable[str]) -> tuple[float, float]:
    """Chi-square test of independence of window × category counts (statistic, p-value).

    scipy's defaults apply (Yates' correction when there are exactly two categories).
    """
    ref, cur = _frequencies(reference, current)
    if ref.sum() == 0 or cur.sum() == 0:
        return math.nan, math.nan
    from scipy import stats

    result = stats.chi2_contingency(np.vstack([ref, cur]))
    return float(result.statistic), float(result.pvalue)


# ---- thresholds as data ----------------------------------------------------------------------

@dataclass(frozen=True)
class Thresholds:
    """Verdict thresholds for one feature. None switches a level off.

    psi_*, js_*, wasserstein_*: the statistic at or above the value is warn / drift.
    ks_p, chi2_p: a p-value below it is drift, if the effect is also at least ks_min_statistic (KS D)
    or chi2_min_cramers_v (Cramér's V = sqrt(chi2 / n)): with thousands of samples a test finds
    shifts too small to matter, so significance alone would alarm on every daily wobble. js_drift,
    chi2_min_cramers_v and ks_min_statistic are 0.2: minute-long windows of real traffic (repeats of
    recent tickets cluster the categories) reach 0.12 with no drift at all, and a minute in which the
    load dipped to 180 tasks gave KS D 0.11-0.15 (p 0.001-0.03) on steady text lengths, while a changed
    mix or length is well above 0.3.
    Below min_samples in either window there is no verdict ("insufficient_data"); PSI needs more
    (psi_min_samples), because its noise alone is about (bins − 1)·(1/n_ref + 1/n_cur): ~0.18 at
    100 per window with 10 bins, ~0.04 at 500.
    wasserstein is in the feature's unit, so it has no default: set it per feature to get a verdict.
    min_shift, min_shift_ratio: the practical floor of a numeric feature: below a Wasserstein distance
    of min_shift (feature units), or of min_shift_ratio x the reference median, every numeric statistic
    says ok, however significant (FEATURE_DEFAULTS sets them for step latency).
    kind forces "numeric" or "categorical" (e.g. for a category that happens to be coded as numbers).
    """

    psi_warn: float | None = 0.1
    psi_drift: float | None = 0.2
    ks_p: float | None = 0.05
    ks_min_statistic: float | None = 0.2
    wasserstein_warn: float | None = None
    wasserstein_drift: float | None = None
    js_warn: float | None = None
    js_drift: float | None = 0.2
    chi2_p: float | None = 0.05
    chi2_min_cramers_v: float | None = 0.2
    min_shift: float | None = None
    min_shift_ratio: float | None = None
    min_samples: int = 100
    psi_min_samples: int = 500
    bins: int = 10
    kind: str | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "kind":
                if value not in (None, "numeric", "categorical"):
                    raise ValueError(f"threshold `kind` must be 'numeric' or 'categorical', got {value!r}")
            elif f.name in ("min_samples", "psi_min_samples", "bins"):
                if isinstance(value, bool) or not isinstance(value, int) or value < (2 if f.name == "bins" else 1):
                    raise ValueError(f"threshold `{f.name}` must be a whole number >= {2 if f.name == 'bins' else 1}, "
                                     f"got {value!r}")
            elif value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                        or not math.isfinite(value) or value < 0):
                raise ValueError(f"threshold `{f.name}` must be a number >= 0 or None, got {value!r}")
        for name in ("psi", "js", "wasserstein"):
            warn, drift = getattr(self, f"{name}_warn"), getattr(self, f"{name}_drift")
            if warn is not None and drift is not None and warn > drift:
                raise ValueError(f"threshold `{name}_warn` ({warn}) must not be above `{name}_drift` ({drift})")

    @classmethod
    def resolve(cls, overrides: Mapping[str, Any] | None, pipeline: str, step: str, feature: str) -> Thresholds:
        """Defaults (and FEATURE_DEFAULTS of the feature), then overrides under "*", feature, "step/feature",
        "pipeline/step/feature" (most specific last)."""
        result = cls()._with(FEATURE_DEFAULTS[feature], feature) if feature in FEATURE_DEFAULTS else cls()
        for key in ("*", feature, f"{step}/{feature}", f"{pipeline}/{step}/{feature}"):
            if overrides and key in overrides:
                result = result._with(overrides[key], key)
        return result

    def _with(self, override: Thresholds | Mapping[str, Any], key: str) -> Thresholds:
        if isinstance(override, Thresholds):
            return override
        if not isinstance(override, Mapping):
            raise ValueError(f"thresholds[{key!r}] must be a mapping of threshold names to values, got {override!r}")
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(override) - set(names))
        if unknown:
            raise ValueError(f"thresholds[{key!r}]: unknown threshold `{unknown[0]}`; use {', '.join(names)}")
        return dataclasses.replace(self, **override)


# Defaults by feature name, under the caller's overrides. Step latency drifts only when its distribution
# moves by at least 1 ms and 20% of its median (Wasserstein distance): tuner changes of a few percent,
# CPU noise and microsecond steps are not drift anyone acts on, however many samples prove them.
FEATURE_DEFAULTS: dict[str, dict[str, Any]] = {
    LATENCY_FEATURE: {"min_shift": 1.0, "min_shift_ratio": 0.2},
}


def validate_thresholds(overrides: Mapping[str, Any] | None) -> None:
    """Fail early, naming the key, for overrides that would fail mid-run."""
    for key, override in (overrides or {}).items():
        Thresholds()._with(override, key)


# statistic -> (field compared, warn threshold, drift threshold, compare, minimum effect size):
# compare "above" = a bigger value is worse, "below" = a smaller p-value is worse.
_RULES: dict[str, tuple[str, str | None, str | None, str, str | None]] = {
    "psi": ("value", "psi_warn", "psi_drift", "above", None),
    "ks": ("p_value", None, "ks_p", "below", "ks_min_statistic"),
    "wasserstein": ("value", "wasserstein_warn", "wasserstein_drift", "above", None),
    "js": ("value", "js_warn", "js_drift", "above", None),
    "chi2": ("p_value", None, "chi2_p", "below", "chi2_min_cramers_v"),
}


def verdict(statistic: str, value: float, p_value: float, n_reference: int, n_current: int,
            thresholds: Thresholds) -> str:
    """ok / warn / drift / insufficient_data for one statistic, from the _RULES table."""
    minimum = thresholds.psi_min_samples if statistic == "psi" else thresholds.min_samples
    if min(n_reference, n_current) < minimum:
        return "insufficient_data"
    field_name, warn_name, drift_name, direction, effect_name = _RULES[statistic]
    x = value if field_name == "value" else p_value
    if math.isnan(x):
        return "insufficient_data"
    floor = getattr(thresholds, effect_name) if effect_name else None
    if floor is not None:  # KS: D itself; chi-square on a 2 x k table: Cramér's V = sqrt(chi2 / n)
        effect = value if statistic == "ks" else math.sqrt(value / (n_reference + n_current))
        if effect < floor:
            return "ok"
    worse = (lambda limit: x >= limit) if direction == "above" else (lambda limit: x < limit)
    for status, name in (("drift", drift_name), ("warn", warn_name)):
        limit = getattr(thresholds, name) if name else None
        if limit is not None and worse(limit):
            return status
    return "ok"


def _as_floats(values: Sequence[str]) -> np.ndarray | None:
    """The values as finite floats, or None if any does not parse (then the feature is categorical)."""
    try:
        array = np.asarray(values, dtype=float)
    except ValueError:
        return None
    return array[np.isfinite(array)]


def compare(reference: Sequence, current: Sequence, kind: str, thresholds: Thresholds) -> list[dict[str, Any]]:
    """Every statistic for one feature: dicts with kind, statistic, value, p_value, n_reference, n_current, status.

    kind is "numeric", "latency" (arrays of floats) or "categorical" (sequences of strings).
    """
    rows = []
    if kind == "categorical":
        ref, cur = [str(v) for v in reference], [str(v) for v in current]
        results = {"js": (jensen_shannon(ref, cur), math.nan), "chi2": chi_square(ref, cur)}
    else:
        ref, cur = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
        results = {"psi": (psi(ref, cur, thresholds.bins), math.nan), "ks": ks_test(ref, cur),
                   "wasserstein": (wasserstein(ref, cur), math.nan)}
    practical = kind == "categorical" or _practical(ref, cur, results["wasserstein"][0], thresholds)
    for statistic, (value, p_value) in results.items():
        status = verdict(statistic, value, p_value, len(ref), len(cur), thresholds)
        rows.append({"kind": kind, "statistic": statistic, "value": value, "p_value": p_value,
                     "n_reference": len(ref), "n_current": len(cur),
                     "status": "ok" if status in ("warn", "drift") and not practical else status})
    return rows


def _practical(reference: np.ndarray, current: np.ndarray, distance: float, thresholds: Thresholds) -> bool:
    """Whether a numeric shift is big enough to matter: the Wasserstein distance against min_shift and
    min_shift_ratio x |reference median| (no floor set: always)."""
    if reference.size == 0 or current.size == 0 or math.isnan(distance):
        return True
    if thresholds.min_shift is not None and distance < thresholds.min_shift:
        return False
    if thresholds.min_shift_ratio is not None and distance < thresholds.min_shift_ratio * abs(
            float(np.median(reference))):
        return False
    return True


# ---- I/O at the edges ------------------------------------------------------------------------

# Tags each step span with the window(s) it falls in and keeps only spans in one; shared by both queries.
_WINDOWED = """        arrayJoin(arrayFilter(w -> w != '', [
            if(Timestamp >= fromUnixTimestamp64Nano({reference_start:Int64})
               AND Timestamp < fromUnixTimestamp64Nano({reference_end:Int64}), 'reference', ''),
            if(Timestamp >= fromUnixTimestamp64Nano({current_start:Int64})
               AND Timestamp < fromUnixTimestamp64Nano({current_end:Int64}), 'current', '')])) AS window
    FROM otel_traces
    WHERE ((Timestamp >= fromUnixTimestamp64Nano({reference_start:Int64})
            AND Timestamp < fromUnixTimestamp64Nano({reference_end:Int64}))
        OR (Timestamp >= fromUnixTimestamp64Nano({current_start:Int64})
            AND Timestamp < fromUnixTimestamp64Nano({current_end:Int64})))
      AND SpanAttributes['tracetune.step'] != ''
      AND SpanAttributes['tracetune.pipeline'] != ''
      AND ({pipeline:String} = '' OR SpanAttributes['tracetune.pipeline'] = {pipeline:String})
      AND NOT has({exclude:Array(String)}, SpanAttributes['tracetune.pipeline'])
)
"""

# Reservoir samples of every step-span feature per window; a span in both windows counts in both.
FEATURE_SAMPLES_SQL = """
SELECT pipeline, step, feature, window, groupArraySample({cap:UInt32}, {seed:UInt64})(value) AS sample
FROM (
    SELECT
        SpanAttributes['tracetune.pipeline'] AS pipeline,
        SpanAttributes['tracetune.step'] AS step,
        arrayJoin(arrayFilter(k -> startsWith(k, 'tracetune.feature.'), mapKeys(SpanAttributes))) AS key,
        substring(key, length('tracetune.feature.') + 1) AS feature,
        SpanAttributes[key] AS value,
{windowed}GROUP BY pipeline, step, feature, window
""".replace("{windowed}", _WINDOWED)

# Step latency (ms) samples per window, the same way.
LATENCY_SAMPLES_SQL = """
SELECT pipeline, step, window, groupArraySample({cap:UInt32}, {seed:UInt64})(Duration / 1e6) AS sample
FROM (
    SELECT
        SpanAttributes['tracetune.pipeline'] AS pipeline,
        SpanAttributes['tracetune.step'] AS step,
        Duration,
{windowed}GROUP BY pipeline, step, window
""".replace("{windowed}", _WINDOWED)

# The newest run's rows for every (pipeline, step, feature).
LATEST_DRIFT_SQL = """
SELECT * FROM tracetune_drift
WHERE ({pipeline:String} = '' OR pipeline = {pipeline:String})
  AND (pipeline, step, feature, computed_at) IN (
      SELECT pipeline, step, feature, max(computed_at) FROM tracetune_drift
      WHERE ({pipeline:String} = '' OR pipeline = {pipeline:String})
      GROUP BY pipeline, step, feature)
ORDER BY pipeline, step, feature, statistic
"""


_utc = utc
_ns = epoch_ns


def _window(name: str, window: tuple[datetime, datetime]) -> tuple[datetime, datetime]:
    start, end = (_utc(w) for w in window)
    if not start < end:
        raise ValueError(f"{name} window must have start < end, got {start.isoformat()} .. {end.isoformat()}")
    return start, end


def default_windows(now: datetime | None = None, current: str = "1h",
                    reference: str = "24h") -> tuple[tuple[datetime, datetime], tuple[datetime, datetime]]:
    """(reference, current): current = the last `current` before now, reference = the `reference` before that."""
    now = _utc(now or datetime.now(UTC))
    current_start = now - timedelta(seconds=parse_window(current))
    return (current_start - timedelta(seconds=parse_window(reference)), current_start), (current_start, now)


def empty_frame() -> pl.DataFrame:
    return pl.DataFrame(schema=_SCHEMA)


def compute_drift(client, reference: tuple[datetime, datetime], current: tuple[datetime, datetime],
                  pipeline: str = "", thresholds: Mapping[str, Any] | None = None, sample_cap: int = SAMPLE_CAP,
                  seed: int = 1, exclude: Sequence[str] = ()) -> pl.DataFrame:
    """Drift of every step feature and step latency, current vs reference: one row per statistic (DRIFT_COLUMNS).

    thresholds: overrides keyed "*", "feature", "step/feature" or "pipeline/step/feature", each a
    mapping of Thresholds fields (e.g. {"text_length": {"psi_drift": 0.3}}). exclude: pipelines left out.
    """
    reference, current = _window("reference", reference), _window("current", current)
    validate_thresholds(thresholds)
    parameters = {"reference_start": _ns(reference[0]), "reference_end": _ns(reference[1]),
                  "current_start": _ns(current[0]), "current_end": _ns(current[1]),
                  "pipeline": pipeline, "cap": int(sample_cap), "seed": int(seed), "exclude": list(exclude)}
    samples: dict[tuple[str, str, str], dict[str, list]] = {}
    for row in client.query(FEATURE_SAMPLES_SQL, parameters=parameters).result_rows:
        samples.setdefault((row[0], row[1], row[2]), {})[row[3]] = list(row[4])
    latency: dict[tuple[str, str, str], dict[str, list]] = {}
    for row in client.query(LATENCY_SAMPLES_SQL, parameters=parameters).result_rows:
        latency.setdefault((row[0], row[1], LATENCY_FEATURE), {})[row[2]] = list(row[3])

    now = datetime.now(UTC)
    computed_at = now.replace(microsecond=now.microsecond // 1000 * 1000)  # the table keeps milliseconds
    bounds = {"reference_start": reference[0], "reference_end": reference[1],
              "current_start": current[0], "current_end": current[1]}
    rows = []
    for source, fixed_kind in ((samples, None), (latency, "latency")):
        for (pipe, step, feature), windows in sorted(source.items()):
            limits = Thresholds.resolve(thresholds, pipe, step, feature)
            ref, cur = windows.get("reference", []), windows.get("current", [])
            kind = fixed_kind or limits.kind
            if kind is None or kind == "numeric":
                ref_f, cur_f = _as_floats(ref), _as_floats(cur)
                numeric = ref_f is not None and cur_f is not None
                if kind is None:
                    kind = "numeric" if numeric else "categorical"
                elif not numeric:
                    raise ValueError(f"feature {feature!r} of {pipe}/{step} is forced numeric but has values that "
                                     "are not numbers; drop its `kind` threshold")
                if numeric:
                    ref, cur = ref_f, cur_f
            for result in compare(ref, cur, kind, limits):
                rows.append({"computed_at": computed_at, "pipeline": pipe, "step": step, "feature": feature,
                             **result, **bounds})
    if not rows:
        return empty_frame()
    return pl.DataFrame(rows, schema=_SCHEMA).select(DRIFT_COLUMNS)


@dataclass(frozen=True)
class Reference:
    """The window one pipeline's current window is compared with, which kind it is, and that in words.

    kind: "baseline" (pinned by its owner), "first_traffic" (the automatic default: the pipeline's first
    hour of traffic; while that hour lasts, what there is of it before the current window, held at the
    first current window a feature drifted in), "preceding" (the window of the same
    length just before: after the owner cleared a baseline, for a pipeline too young for the first, or
    for every pipeline when a caller asks for a reference length) or "window" (a given length before)."""

    kind: str
    start: datetime
    end: datetime
    label: str


def drift_references(client, cur_window: tuple[datetime, datetime], pipeline: str = "",
                     auto_baseline: str | int = AUTO_BASELINE) -> dict[str, Reference]:
    """Pipeline -> the reference its drift is judged against now (see Reference), for every pipeline with
    tasks (or just `pipeline`). A pinned baseline wins; a cleared one means the preceding window; otherwise
    the pipeline's first `auto_baseline` of traffic ("0" switches that off: the preceding window)."""
    cur_start, cur_end = cur_window
    length = cur_end - cur_start
    preceding = (cur_start - length, cur_start)
    auto = auto_baseline if isinstance(auto_baseline, int) else (
        parse_window(auto_baseline) if auto_baseline != "0" else 0)
    pinned, cleared = list_baselines(client, pipeline), cleared_baselines(client, pipeline)
    words = f"the preceding {window_label(round(length.total_seconds()))}"
    references = {}
    for name, first in first_traffic_all(client, pipeline).items():
        if name in pinned:
            b = pinned[name]
            references[name] = Reference("baseline", b.start, b.end,
                                         f"baseline v{b.version} {_span_words(b.start, b.end)} (pinned)")
        elif name in cleared or not auto or first + length > cur_start:
            references[name] = Reference("preceding", *preceding, words)
        else:
            full, held = first + timedelta(seconds=auto), _held_at(client, name, first, first + timedelta(seconds=auto))
            end = min(full, cur_start, held or full)
            how = (" up to the first drift found" if held is not None and end == held
                   else " so far" if end < full else "")
            references[name] = Reference("first_traffic", first, end,
                                         f"first {window_label(auto)} of traffic{how}, {_span_words(first, end)}")
    for name, b in pinned.items():  # pinned before any task reached the rollup
        references.setdefault(name, Reference("baseline", b.start, b.end,
                                              f"baseline v{b.version} {_span_words(b.start, b.end)} (pinned)"))
    return references


# The start of the first stored current window in which a feature drifted, within [start, end): the
# automatic reference stops growing there, so a change that begins in the first hour does not become
# part of its own reference. Step latency is left out: CPU contention moves it, and SLO alerts cover it.
_HELD_SQL = """
SELECT min(current_start), count() FROM tracetune_drift
WHERE pipeline = {pipeline:String} AND status = 'drift' AND feature != {latency:String}
  AND current_start >= fromUnixTimestamp64Nano({start:Int64}) AND current_start < fromUnixTimestamp64Nano({end:Int64})
"""


def _held_at(client, pipeline: str, start: datetime, end: datetime) -> datetime | None:
    held, count = client.query(_HELD_SQL, parameters={"pipeline": pipeline, "latency": LATENCY_FEATURE,
                                                      "start": _ns(start), "end": _ns(end)}).result_rows[0]
    return _utc(held) if count else None


def _span_words(start: datetime, end: datetime) -> str:
    day = "%H:%M" if start.date() == end.date() else "%Y-%m-%d %H:%M"
    return f"{start:%Y-%m-%d %H:%M} – {end.strftime(day)} UTC"


def current_drift(client, now: datetime | None = None, current: str | int = DEFAULT_CURRENT, pipeline: str = "",
                  thresholds: Mapping[str, Any] | None = None, reference: str | int | None = None,
                  sample_cap: int = SAMPLE_CAP, auto_baseline: str | int = AUTO_BASELINE) -> pl.DataFrame:
    """Drift of the last `current` (ending at now) against each pipeline's reference (`drift_references`:
    its pinned baseline, else its first hour of traffic); DRIFT_COLUMNS plus `reference`, the reference
    in words.

    reference (e.g. "24h") overrides that for every pipeline: the `reference` before the current window.
    """
    now = _utc(now or datetime.now(UTC))
    current_s = current if isinstance(current, int) else parse_window(current)
    cur_window = (now - timedelta(seconds=current_s), now)
    if reference is not None:
        reference_s = reference if isinstance(reference, int) else parse_window(reference)
        ref_window = (cur_window[0] - timedelta(seconds=reference_s), cur_window[0])
        return _labelled(compute_drift(client, ref_window, cur_window, pipeline, thresholds, sample_cap),
                         f"the preceding {window_label(reference_s)}")
    references = drift_references(client, cur_window, pipeline, auto_baseline)
    frames = [_labelled(compute_drift(client, (r.start, r.end), cur_window, name, thresholds, sample_cap), r.label)
              for name, r in sorted(references.items())]
    if not (pipeline and pipeline in references):  # spans of pipelines the rollup has no task of yet
        preceding = (cur_window[0] - timedelta(seconds=current_s), cur_window[0])
        frames.append(_labelled(compute_drift(client, preceding, cur_window, pipeline, thresholds, sample_cap,
                                              exclude=sorted(references)),
                                f"the preceding {window_label(current_s)}"))
    frames = [f for f in frames if not f.is_empty()]
    if not frames:
        return _labelled(empty_frame(), "")
    return pl.concat(frames).sort(["pipeline", "step", "feature"], maintain_order=True)


def _labelled(frame: pl.DataFrame, words: str) -> pl.DataFrame:
    return frame.with_columns(reference=pl.lit(words, dtype=pl.Utf8))


def reference_label(row: Mapping[str, Any]) -> str:
    """What a drift row was compared with, in words: its `reference` (current_drift's rows), else from its
    windows: "the preceding 1m" or "2026-01-02 10:00 – 11:00 UTC" (stored rows)."""
    if row.get("reference"):
        return str(row["reference"])
    ref_start, ref_end, cur_start, cur_end = (row[k] for k in ("reference_start", "reference_end", "current_start",
                                                                "current_end"))
    if ref_end == cur_start and ref_end - ref_start == cur_end - cur_start:
        return f"the preceding {window_label(round((cur_end - cur_start).total_seconds()))}"
    return _span_words(ref_start, ref_end)


def store_drift(client, frame: pl.DataFrame) -> int:
    """Append a compute_drift frame to `tracetune_drift`; returns the number of rows written."""
    if frame.is_empty():
        return 0
    missing = [c for c in DRIFT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"drift frame lacks column(s) {', '.join(missing)}; pass what compute_drift returned")
    rows = [list(row) for row in frame.select(DRIFT_COLUMNS).iter_rows()]
    client.insert("tracetune_drift", rows, column_names=DRIFT_COLUMNS)
    return len(rows)


def latest_drift(client, pipeline: str = "") -> pl.DataFrame:
    """The newest stored run's rows for every (pipeline, step, feature), DRIFT_COLUMNS, UTC times."""
    result = client.query(LATEST_DRIFT_SQL, parameters={"pipeline": pipeline})
    if not result.result_rows:
        return empty_frame()
    frame = pl.DataFrame([dict(zip(result.column_names, row, strict=True)) for row in result.result_rows],
                         infer_schema_length=None)
    as_utc = [pl.col(c).dt.convert_time_zone("UTC") if frame.schema[c].time_zone else  # type: ignore[union-attr]
              pl.col(c).dt.replace_time_zone("UTC") for c, t in _SCHEMA.items() if t == _TIME]
    return frame.with_columns(as_utc).select(DRIFT_COLUMNS).cast(_SCHEMA)


# When each feature was last flagged (warn or drift), from the stored runs of the trailing window.
DRIFT_FLAGS_SQL = """
SELECT pipeline, step, feature, argMax(status, rank) AS worst, min(computed_at) AS first_flagged,
       max(computed_at) AS last_flagged, uniqExact(computed_at) AS runs
FROM (
    SELECT pipeline, step, feature, computed_at, status, if(status = 'drift', 2, 1) AS rank
    FROM tracetune_drift
    WHERE computed_at >= now64(3) - toIntervalSecond({window_seconds:UInt32})
      AND status IN ('drift', 'warn')
      AND ({pipeline:String} = '' OR pipeline = {pipeline:String})
)
GROUP BY pipeline, step, feature
ORDER BY last_flagged DESC, pipeline, step, feature
"""
DRIFT_FLAG_COLUMNS = {"pipeline": pl.Utf8, "step": pl.Utf8, "feature": pl.Utf8, "worst": pl.Utf8,
                      "first_flagged": _TIME, "last_flagged": _TIME, "runs": pl.Int64}


def drift_flags(client, since: str | int = "1h", pipeline: str = "") -> pl.DataFrame:
    """Features the stored runs flagged (warn or drift) in the trailing window: worst status, first and
    last run that flagged it, how many runs did. Against the preceding window a drift shows for a few
    runs only (then both windows hold the new traffic): this keeps it in view."""
    seconds = since if isinstance(since, int) else parse_window(since)
    result = client.query(DRIFT_FLAGS_SQL, parameters={"window_seconds": seconds, "pipeline": pipeline})
    if not result.result_rows:
        return pl.DataFrame(schema=DRIFT_FLAG_COLUMNS)
    frame = pl.DataFrame([dict(zip(result.column_names, row, strict=True)) for row in result.result_rows],
                         infer_schema_length=None)
    times = [pl.col(c).dt.convert_time_zone("UTC") if frame.schema[c].time_zone else  # type: ignore[union-attr]
             pl.col(c).dt.replace_time_zone("UTC") for c in ("first_flagged", "last_flagged")]
    return frame.with_columns(times).select(list(DRIFT_FLAG_COLUMNS)).cast(DRIFT_FLAG_COLUMNS)


def feature_status(frame: pl.DataFrame) -> pl.DataFrame:
    """One verdict per (pipeline, step, feature): the worst status among its statistics (STATUSES order)."""
    keys = ["pipeline", "step", "feature"]
    if frame.is_empty():
        return pl.DataFrame(schema={**{k: pl.Utf8 for k in keys}, "kind": pl.Utf8, "status": pl.Utf8})
    rank = {status: i for i, status in enumerate(STATUSES)}
    return (frame.with_columns(pl.col("status").replace_strict(rank, return_dtype=pl.Int32).alias("_rank"))
            .group_by(keys, maintain_order=True)
            .agg(pl.col("kind").first(), pl.col("_rank").min())
            .with_columns(pl.col("_rank").replace_strict(dict(enumerate(STATUSES)), return_dtype=pl.Utf8)
                          .alias("status"))
            .drop("_rank").sort(keys))
