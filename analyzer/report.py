"""`tracetune report`: one self-contained HTML file (inline SVG charts, no scripts) answering
where the time goes, what 1k requests cost, what drifted and how the SLOs stand."""

from __future__ import annotations

import io
import math
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import polars as pl
from jinja2 import Environment, select_autoescape
from markupsafe import Markup

from tracetune.analyzer.cost import cost_per_1k
from tracetune.analyzer.drift import (
    DEFAULT_CURRENT,
    Thresholds,
    current_drift,
    drift_flags,
    feature_status,
    reference_label,
)
from tracetune.analyzer.prices import PriceTable
from tracetune.analyzer.slo import data_note, list_slos, slo_status, slo_words
from tracetune.analyzer.stats import END_TO_END, batching, latency, latency_series, parse_window
from tracetune.analyzer.traces import step_breakdown

_PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#9d755d"]


def _svg(fig) -> Markup:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return Markup(text[text.index("<svg"):])


def _finish_barh(fig, ax, labels: list[str], xlabel: str) -> Markup:
    """Step labels top to bottom, legend, grid: the common end of every horizontal-bar chart."""
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars, never over them
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)


def percentile_chart(stats: pl.DataFrame) -> Markup | None:
    if stats.is_empty():
        return None
    labels = [f"{p}/{s}" for p, s in zip(stats["pipeline"], stats["step"], strict=True)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    height = 0.26
    for i, (name, color) in enumerate(zip(("p50_ms", "p95_ms", "p99_ms"), _PALETTE, strict=False)):
        ax.barh([y + (i - 1) * height for y in range(len(labels))], stats[name].to_list(), height, label=name[:3],
                color=color)
    ax.set_xscale("log")
    return _finish_barh(fig, ax, labels, "milliseconds (log scale)")


def with_gaps(times: list, values: list, bucket_seconds: int) -> tuple[list, list]:
    """The points with a None between two more than a bucket apart, so a line breaks where no request ran
    instead of being drawn straight across the idle time."""
    out_t, out_v = [], []
    for i, (t, v) in enumerate(zip(times, values, strict=True)):
        if i and (t - times[i - 1]).total_seconds() > bucket_seconds:
            out_t.append(times[i - 1] + (t - times[i - 1]) / 2)
            out_v.append(None)
        out_t.append(t)
        out_v.append(v)
    return out_t, out_v


def series_chart(series: pl.DataFrame, bucket_seconds: int) -> Markup | None:
    if series.is_empty():
        return None
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for i, ((pipeline, step), part) in enumerate(series.sort("bucket").group_by(["pipeline", "step"],
                                                                                 maintain_order=True)):
        times, values = with_gaps(part["bucket"].to_list(), part["p95_ms"].to_list(), bucket_seconds)
        ax.plot(times, [math.nan if v is None else v for v in values], label=f"{pipeline}/{step}",
                color=_PALETTE[i % len(_PALETTE)], marker=".", markersize=3)
    ax.set_yscale("log")
    ax.set_ylabel("p95 ms (log scale)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, not over, the lines
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _svg(fig)


def cost_chart(cost: pl.DataFrame) -> Markup | None:
    if cost.is_empty() or cost["cost"].sum() == 0:
        return None
    labels = [" / ".join(str(row[k]) or "-" for k in ("pipeline", "step", "route"))
              for row in cost.iter_rows(named=True)]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(labels) + 1.2))
    left = [0.0] * len(labels)
    for part, color in zip(("token_cost", "compute_cost", "call_cost"), _PALETTE, strict=False):
        per_1k = [1000 * v / r if r else 0 for v, r in zip(cost[part], cost["requests"], strict=True)]
        ax.barh(range(len(labels)), per_1k, left=left, label=part.replace("_cost", ""), color=color)
        left = [a + b for a, b in zip(left, per_1k, strict=True)]
    return _finish_barh(fig, ax, labels, "cost per 1k requests")


def critical_chart(breakdown: pl.DataFrame) -> Markup | None:
    if breakdown.is_empty():
        return None
    fig, ax = plt.subplots(figsize=(8, 0.4 * breakdown.height + 1.2))
    labels = [f"{p}/{s}" for p, s in zip(breakdown["pipeline"], breakdown["step"], strict=True)]
    ax.barh(range(len(labels)), [100 * v for v in breakdown["critical_share"]], color=_PALETTE[0], label="all requests")
    ax.scatter([100 * v for v in breakdown["tail_share"]], range(len(labels)), color=_PALETTE[3], zorder=3,
               label="slowest 5%")
    return _finish_barh(fig, ax, labels, "% of request time on the critical path")


def at_a_glance(stats: pl.DataFrame, totals: pl.DataFrame, cost: pl.DataFrame, slo_frame: pl.DataFrame,
                slos: list, drift_status: pl.DataFrame) -> list[dict]:
    """One row per pipeline for the top of the report: tasks, end-to-end p95 against its target, cost per
    1k against its budget, the SLO in words (its worst objective), drifting features, the costliest step."""
    words = slo_words(slo_frame) if not slo_frame.is_empty() else pl.DataFrame()
    declared = {slo.pipeline: slo for slo in slos}
    ends = {r["pipeline"]: r for r in stats.filter(pl.col("step") == END_TO_END).iter_rows(named=True)} \
        if not stats.is_empty() else {}
    per_1k = {r["pipeline"]: r["cost_per_1k"] for r in totals.iter_rows(named=True)}
    rows = []
    for pipeline in sorted(set(ends) | set(per_1k)):
        slo = declared.get(pipeline)
        mine = words.filter(pl.col("pipeline") == pipeline) if not words.is_empty() else words
        drifting = sorted(f"{r['step']}.{r['feature']}" if r["step"] else r["feature"]
                          for r in drift_status.iter_rows(named=True)
                          if r["pipeline"] == pipeline and r["status"] == "drift") \
            if not drift_status.is_empty() else []
        parts = cost.filter((pl.col("pipeline") == pipeline) & pl.col("cost_per_1k").is_not_null()) \
            if not cost.is_empty() else cost
        whole = float(parts["cost_per_1k"].sum()) if parts.height else 0.0
        top = parts.sort("cost_per_1k", descending=True).row(0, named=True) if whole > 0 else None
        rows.append({
            "pipeline": pipeline,
            "tasks": ends[pipeline]["requests"] if pipeline in ends else None,
            "p95_ms": ends[pipeline]["p95_ms"] if pipeline in ends else None,
            "p95_target_ms": slo.p95_ms if slo else None,
            "cost_per_1k": per_1k.get(pipeline),
            "cost_budget": slo.cost_per_1k if slo else None,
            "slo": mine["status"][0] if mine.height else "no SLO declared",
            "slo_state": mine["state"][0] if mine.height else "",
            "drifting": drifting,
            "top_cost": (f"{top['step']}{' / ' + top['route'] if top['route'] else ''}: "
                         f"{top['cost_per_1k'] / whole:.0%}") if top else "",
        })
    return rows


def build_report(client, since: str = "1h", prices: PriceTable | None = None, pipeline: str = "") -> str:
    """The report as an HTML string."""
    parse_window(since)
    stats = latency(client, since, ("pipeline", "step"), pipeline)
    seconds = parse_window(since)
    bucket_seconds = max(10, seconds // 60)
    series = latency_series(client, since, pipeline, bucket_seconds=bucket_seconds)
    if bucket_seconds >= 60:  # the rollup's buckets are whole minutes
        bucket_seconds = -(-bucket_seconds // 60) * 60
    cost = cost_per_1k(client, since, by=("pipeline", "step", "route"), pipeline=pipeline, prices=prices)
    totals = cost_per_1k(client, since, by=("pipeline",), pipeline=pipeline, prices=prices)
    breakdown = step_breakdown(client, since, pipeline)
    batches = batching(client, since, pipeline)
    drift = current_drift(client, pipeline=pipeline)
    drift_status = feature_status(drift)
    flags = drift_flags(client, since, pipeline)
    references = sorted({reference_label(row) for row in drift.iter_rows(named=True)})
    slos = []
    for slo in list_slos(client):
        if not pipeline or slo.pipeline == pipeline:
            slos.append(slo_status(client, slo.pipeline, slo=slo))
    slo_frame = pl.concat(slos) if slos else pl.DataFrame()
    budgets = slo_frame.unique(["pipeline", "slo"], keep="first", maintain_order=True) if slos else slo_frame
    slo_notes = sorted({f"{r['pipeline']} over {data_note(r['data_seconds'], r['period_days'])}"
                        for r in budgets.iter_rows(named=True)})
    slo_refused = sorted({(r["pipeline"], r["period_client_errors"]) for r in budgets.iter_rows(named=True)
                          if r["slo"] == "availability" and r["period_client_errors"]})

    glance = at_a_glance(stats, totals, cost, slo_frame, list_slos(client), drift_status)

    env = Environment(autoescape=select_autoescape(["html"]))
    env.filters["num"] = lambda v, digits=2: "-" if v is None or v != v else f"{v:,.{digits}f}"
    env.filters["sig"] = lambda v, digits=3: "-" if v is None or v != v else f"{v:.{digits}g}"  # money per 1k
    template = env.from_string(resources.files("tracetune.analyzer").joinpath("templates", "report.html").read_text())
    return template.render(
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), since=since, pipeline=pipeline or "all pipelines",
        stats=stats.to_dicts(), batching=batches.to_dicts(), totals=totals.to_dicts(), cost=cost.to_dicts(),
        breakdown=breakdown.to_dicts(), glance=glance,
        drift=drift_status.to_dicts(), drift_flags=flags.to_dicts(), drift_current=DEFAULT_CURRENT,
        drift_reference="; ".join(references) or "the preceding " + DEFAULT_CURRENT,
        min_samples=Thresholds().min_samples, psi_min_samples=Thresholds().psi_min_samples,
        slo=slo_frame.to_dicts() if not slo_frame.is_empty() else [], slo_notes=slo_notes, slo_refused=slo_refused,
        price_version=(cost["price_version"][0] if cost.height else (prices.version if prices else "")),
        currency=(cost["currency"][0] if cost.height else ""),
        charts={"percentiles": percentile_chart(stats), "series": series_chart(series, bucket_seconds),
                "cost": cost_chart(cost), "critical": critical_chart(breakdown)},
    )


def write_report(client, path: Path, since: str = "1h", prices: PriceTable | None = None, pipeline: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(client, since, prices, pipeline))
    return path
