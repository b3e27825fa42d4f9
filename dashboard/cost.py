"""Cost: per 1k requests by step, route, model and tenant with the price version, over time, and what changed
since the previous period of the same length and why (volume, step mix, route, tokens, compute)."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import streamlit as st

from tracetune import analyzer
from tracetune.analyzer import PricesError
from tracetune.dashboard import charts, frames, pricing, ui
from tracetune.dashboard.context import Context, run
from tracetune.dashboard.frames import COST_SPLIT, format_money
from tracetune.dashboard.queries import StoreUnavailable, cached, prefetch, show_unavailable

PANEL_WIDTH, PANEL_HEIGHT = 820, 120  # each pipeline's row of the cost-over-time chart (px)
MONEY_COLUMNS = {"cost per 1k": ui.MONEY, "total cost": ui.MONEY, "requests": ui.COUNT, "spans": ui.COUNT,
                 "tokens": ui.COUNT, "compute s": st.column_config.NumberColumn(format="%.3f"),
                 **{f"{label} per 1k": ui.MONEY for label in COST_SPLIT.values()}}


def unpriced_note(by_step: pl.DataFrame, version: str) -> str:
    """One line naming the step spans no price of `version` applies to (their tokens' model or their route is
    not listed, and the step has no per-call price); "" when every span is priced."""
    unpriced = by_step.filter(pl.col("unpriced_spans") > 0)
    if unpriced.is_empty():
        return ""
    where = ", ".join(f"{r['pipeline']}/{r['step']} (route {r['route'] or '–'}, model {r['model'] or '–'})"
                      for r in unpriced.to_dicts())
    return (f"{int(unpriced['unpriced_spans'].sum()):,} step spans have a route or model that price version "
            f"{version} does not list, so their token or compute cost is missing from these figures: {where}. "
            "Add them to prices.toml.")


def change_table(change: pl.DataFrame) -> pl.DataFrame:
    """cost_change as shown: per 1k before and now, each driver's part of the move (per 1k), and what the
    change in requests alone did to the total cost (volume)."""
    return change.select(
        "pipeline", pl.col("per_1k_before").alias("per 1k before"), pl.col("per_1k_after").alias("per 1k now"),
        *analyzer.series.COST_CHANGE_DRIVERS, pl.col("volume").alias("volume (total)"))


def render(ctx: Context) -> None:
    f = ctx.filters
    bucket = ui.bucket_seconds(f)
    window = ui.window(f, datetime.now(UTC))
    asked = [{"since": f.since, "pipeline": f.pipeline_name},
             {"since": f.since, "pipeline": f.pipeline_name, "bucket_seconds": bucket},
             {"since": f.since, "pipeline": f.pipeline_name, "offset_seconds": f.seconds}]
    prefetch(ctx.settings, [(analyzer.current_prices, {}), *((analyzer.cost_cells, kwargs) for kwargs in asked)])
    try:
        table, note = pricing.table(ctx.settings)
        cells, timed, previous = (cached(ctx.settings, analyzer.cost_cells, **kwargs) for kwargs in asked)
    except StoreUnavailable as problem:
        show_unavailable(problem, f.since)
        return
    except PricesError as exc:
        st.info(f"No cost without prices: {exc}")
        return
    currency, tenant = table.currency, f.tenant_name
    st.caption(f"Prices: version {table.version} · {currency}{note}. Both periods are priced with this version, "
               "so a change below is the traffic's, not the price list's.")
    by_pipeline = analyzer.cost_by(cells, table, ("pipeline",), tenant=tenant)
    requests = int(by_pipeline["requests"].sum() or 0)
    if requests == 0:
        st.info(f"No requests in the last {f.since}{f.scope()} yet: cost per 1k counts tasks (root spans with "
                "`tracetune.pipeline`).")
        return
    total = float(by_pipeline["cost"].sum())
    earlier = analyzer.cost_by(previous, table, ("pipeline",), tenant=tenant)
    before_requests = int(earlier["requests"].sum() or 0)
    before = 1000 * float(earlier["cost"].sum()) / before_requests if before_requests else None
    per_1k, spent, count, change = st.columns(4)
    now_per_1k = 1000 * total / requests
    per_1k.metric(f"Cost per 1k requests ({currency})", format_money(now_per_1k, currency),
                  help="1000 × the cost of the range's requests ÷ their number (docs/cost.md).")
    spent.metric(f"Total cost ({currency})", format_money(total, currency))
    count.metric("Priced requests", f"{requests:,}")
    change.metric("Per 1k vs the previous period",
                  f"{100 * (now_per_1k - before) / before:+.0f} %" if before else "no earlier data",
                  help=f"Against the {f.since} before this range.")

    by_step = analyzer.cost_by(cells, table, ("pipeline", "step", "route", "model"), tenant=tenant)
    warning = unpriced_note(by_step, table.version)
    if warning:
        st.warning(warning)

    st.subheader("By step, route and model")
    shown = frames.cost_table(frames.fold_modelless(by_step), ["pipeline", "step", "route", "model"],
                              not f.pipeline_name)
    ui.table(shown.drop("spans", "compute s", "tokens", "total cost").with_columns(
        pl.col(c).replace("", None) for c in ("route", "model")), MONEY_COLUMNS)
    st.caption("Per 1k requests of the step's pipeline, so a pipeline's rows add up to its cost per 1k; split into "
               "its tokens, compute and per-call parts. A route's calls answered without calling its model (from the "
               f"cache) count in that model's row; {frames.MISSING} in model or route: the step called no model, or "
               "has no route.")
    ui.chart(charts.bars(frames.cost_split(by_step, not f.pipeline_name), "per_1k",
                         f"cost per 1k requests ({currency})", "series", "step", color="kind", color_title="cost"))

    st.subheader("By tenant")
    by_tenant = analyzer.cost_by(cells, table, ("pipeline", "tenant"), tenant=tenant).with_columns(
        pl.col("tenant").replace("", "(none)"))
    ui.table(frames.cost_table(by_tenant, ["pipeline", "tenant"], True).drop("spans", "compute s"), MONEY_COLUMNS)
    st.caption("A batch serves several tenants: its compute is shared by how many of each tenant's calls it ran.")

    st.subheader("Cost per 1k requests over time")
    over_time = analyzer.cost_by(timed, table, ("pipeline",), tenant=tenant, over_time=True).filter(
        pl.col("requests") > 0)
    data = frames.with_gaps(over_time.select("bucket", "pipeline", "cost_per_1k"), ["pipeline"], bucket)
    none = pl.DataFrame()
    ui.chart(charts.pipeline_panels(data, "cost_per_1k", f"cost per 1k ({currency})", window, none, "", none,
                                    PANEL_WIDTH, PANEL_HEIGHT))
    st.caption("One row per pipeline, each on its own scale.")

    st.subheader(f"What changed since the previous {f.since}")
    keys = ("pipeline", "step", "route", "model")
    moved = analyzer.cost_change(analyzer.cost_by(previous, table, keys, tenant=tenant), by_step).filter(
        (pl.col("requests_before") > 0) | (pl.col("requests_after") > 0))  # pipelines with tasks in either
    for row in moved.to_dicts():
        st.markdown("- " + frames.change_sentence(row, currency))
    ui.table(change_table(moved), {c: ui.MONEY for c in change_table(moved).columns if c != "pipeline"})
    st.caption("mix: steps called more or less often per request; route: calls moved between routes or models; "
               "tokens: tokens per call; compute: compute time (and per-call price) per call. They add up to the "
               "change in cost per 1k; volume is what the change in requests alone did to the total cost. "
               f"{frames.MISSING}: the pipeline had no requests in one of the periods, so there is no change to split.")


if __name__ == "__main__":
    run(render)
