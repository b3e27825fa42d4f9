"""Dashboard at scale: time to render each page over 10M spans, reading the rollups.

Generates spans inside a temporary embedded store (INSERT ... SELECT over numbers(), so the
materialized views fill the rollups exactly as live ingest does), adds an SLO, a tuner config with
decisions and a stored drift run, then renders every page headless (Streamlit AppTest, the same app
`tracetune dashboard` serves) for each time range and prints a table: the first render with an empty
cache (what a new question costs the store) and the median of re-renders within the cache's TTL.

    .venv/bin/python bench/dashboard.py              # 10M spans
    .venv/bin/python bench/dashboard.py --spans 1e6  # quicker
    .venv/bin/python bench/dashboard.py --against /tmp/main/.venv/bin/python  # another checkout, side by side

--against PYTHON renders the pages of the checkout that interpreter imports `tracetune` from (e.g. main in a
second worktree with its own .venv) over the same store, in turns with this checkout's, so both are measured
under the same load; the table gives both and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from harness import generate_spans, start_store, stop_process  # bench/harness.py: this script's folder
from rich.console import Console
from rich.table import Table

from tracetune import analyzer

APP = Path(str(resources.files("tracetune.dashboard").joinpath("app.py")))
PAGES = ("overview", "steps", "cost", "drift", "tuner", "alerts")


def seed_the_rest(client) -> None:
    """An SLO, a tuner config with a decision, a stored drift run: every page has something to show."""
    from tracetune.tuner import decisions, versions
    from tracetune.tuner.config import Knob, PipelineSpec

    analyzer.save_slo(client, analyzer.SLO(pipeline="triage", error_rate=0.01, p95_ms=2000, cost_per_1k=0.1))
    spec = PipelineSpec("triage", {"classify": {"batch_max_size": Knob("int", 8, 1, 64)}})
    first, _ = versions.register(client, spec)
    second = versions.change(client, spec, {"classify": {"batch_max_size": 16}}, "tuner", "bench")
    decisions.record(client, decisions.Decision("triage", "tune", first.version, second.version, first.to_dict(),
                                                second.to_dict(), "bench", predicted={"p95_ms": 900.0}))
    analyzer.store_drift(client, analyzer.current_drift(client, current="5m"))


def render(page: str, since: str, repeat: int) -> tuple[float, float, int]:
    """(median render ms with an empty cache, median re-render ms within the cache's TTL, elements shown) of one
    page and range, `repeat` renders each."""
    import streamlit as st
    from streamlit.logger import set_log_level
    from streamlit.testing.v1 import AppTest

    set_log_level("error")  # AppTest outside a server warns on every run

    def once(cold: bool) -> tuple[float, AppTest]:
        if cold:
            st.cache_data.clear()
        at = AppTest.from_file(str(APP))
        for name, value in {"pipeline": "all", "since": since, "tenant": "all", "refresh": "off"}.items():
            at.query_params[name] = value
        at.switch_page(f"{page}.py")
        started = time.perf_counter()
        at.run(timeout=600)
        elapsed = (time.perf_counter() - started) * 1000
        if at.exception or at.error:
            problem = at.exception[0].value if at.exception else at.error[0].value
            raise RuntimeError(f"{page} ({since}): {problem}")
        return elapsed, at

    colds, warms = [], []
    for _ in range(repeat):  # an empty cache, then the same page again at once (answered from the cache)
        elapsed, at = once(True)
        colds.append(elapsed)
        warms.append(once(False)[0])
    cold, warm = statistics.median(colds), statistics.median(warms)
    shown = len(at.dataframe) + len(at.get("vega_lite_chart")) + len(at.metric)
    return cold, warm, shown


def render_all(ranges: list[str], repeat: int) -> dict[str, list[float]]:
    """Every page over every range with this interpreter's checkout: "page range" -> [cold ms, warm ms, elements]."""
    render("overview", "1h", 1)  # imports and the first connection, outside the figures
    return {f"{page} {since}": list(render(page, since, repeat)) for since in ranges for page in PAGES}


def render_with(python: str, ranges: list[str], repeat: int) -> dict[str, list[float]]:
    """render_all in a child process of `python` (another checkout), over the store this process's environment
    names: its JSON answer."""
    done = subprocess.run([python, __file__, "--render-only", "--ranges", ",".join(ranges), "--repeat", str(repeat)],
                          env=os.environ.copy(), capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=float, default=1e7, help="spans to generate (default 10M)")
    parser.add_argument("--chunk", type=float, default=1e6)
    parser.add_argument("--ranges", default="1h,24h", help="comma-separated time ranges to render")
    parser.add_argument("--repeat", type=int, default=3, help="re-renders per page, within the cache's TTL")
    parser.add_argument("--against", default="", help="python of another checkout to render side by side with this")
    parser.add_argument("--rounds", type=int, default=2, help="turns of each checkout with --against")
    parser.add_argument("--render-only", action="store_true", help=argparse.SUPPRESS)  # the child of --against
    args = parser.parse_args()
    ranges = args.ranges.split(",")
    if args.render_only:  # the store is the parent's (TRACETUNE_* in the environment); answer in JSON
        print(json.dumps(render_all(ranges, args.repeat)))
        return
    console = Console(width=150)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops its store (finally)

    settings, proc, client = start_store("tracetune-bench-dashboard-")
    home = settings.home
    try:
        total, inserted = int(args.spans), 0
        started = time.perf_counter()
        inserted = generate_spans(client, total, inserted, args.chunk, console, f"generating {total:,} spans")
        seed_the_rest(client)
        minute_rows, hour_rows = (client.query(f"SELECT count() FROM {t}").result_rows[0][0]
                                  for t in ("tracetune_spans_1m", "tracetune_spans_1h"))
        console.print(f"{inserted:,} spans in {time.perf_counter() - started:.0f} s; rollups hold {minute_rows:,} "
                      f"minute rows and {hour_rows:,} hour rows")

        os.environ.update(settings.as_env() | {"TRACETUNE_CONFIG": str(home / "absent.toml")})
        if args.against:
            compare(console, args.against, ranges, args.repeat, args.rounds, inserted)
            return
        render("overview", "1h", 1)  # imports and the first connection, outside the figures
        table = Table(title=f"dashboard pages over {inserted:,} spans (AppTest render, ms)")
        for column in ("page", "range", f"render, empty cache (median of {args.repeat})",
                       f"re-render, cached (median of {args.repeat})", "elements"):
            table.add_column(column, justify="left" if column in ("page", "range") else "right")
        for since in args.ranges.split(","):
            for page in PAGES:
                cold, warm, shown = render(page, since, args.repeat)
                table.add_row(page, since, f"{cold:,.0f}", f"{warm:,.0f}", f"{shown}")
        console.print(table)
        console.print("empty cache: every question asked of the store (rollups; the Steps page's error list and "
                      "critical path read raw spans of at most the last hour, drift the current minute and its "
                      "reference); re-render: the same page again, within the cache's TTL.")
    finally:
        stop_process(proc)
        shutil.rmtree(home, ignore_errors=True)


def compare(console: Console, other: str, ranges: list[str], repeat: int, rounds: int, spans: int) -> None:
    """Both checkouts in turns (other, this, other, this, ...) over one store; medians of the turns, and ratios."""
    mine, theirs = [], []
    for _ in range(rounds):
        theirs.append(render_with(other, ranges, repeat))
        mine.append(render_with(sys.executable, ranges, repeat))
    table = Table(title=f"dashboard pages over {spans:,} spans, two checkouts in turns (AppTest render, ms; medians "
                        f"of {rounds} turns x {repeat} renders)")
    for column in ("page", "range", "empty cache: other", "empty cache: this", "this / other", "cached: other",
                   "cached: this"):
        table.add_column(column, justify="left" if column in ("page", "range") else "right")
    for key in mine[0]:
        page, since = key.split()
        cold = [statistics.median(turn[key][0] for turn in runs) for runs in (theirs, mine)]
        warm = [statistics.median(turn[key][1] for turn in runs) for runs in (theirs, mine)]
        table.add_row(page, since, f"{cold[0]:,.0f}", f"{cold[1]:,.0f}", f"{cold[1] / cold[0]:.2f}",
                      f"{warm[0]:,.0f}", f"{warm[1]:,.0f}")
    console.print(table)
    console.print(f"other: {other}; this: {sys.executable}. Empty cache: every question asked of the store; "
                  "cached: the same page again within the cache's TTL.")


if __name__ == "__main__":
    main()
