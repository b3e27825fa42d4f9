"""The real dashboard (`streamlit run`, the command `tracetune up` starts) in headless Chromium over seeded data.

AppTest (test_app.py) checks what each page computes; this checks what a browser shows at 1400 px wide with
three pipelines (the demo's ticket_triage, the README's reviews, an OpenTelemetry app's support_bot): every
page opens from its own URL with the filters in the query string, shows no Streamlit exception, carries
the seeded figures, repeats or cuts no axis label, shows every table row without an inner scroll box, no
cell reading "None" and no grid column narrower than its text, and leaves a screenshot of the whole page
(<page>.png in the test's tmp_path, and in $TRACETUNE_SCREENSHOTS if set), the HTML report's too.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dashboard import browser, seed
from tests.dashboard.browser import CHROMIUM, CHROMIUM_ARGS, RENDER_TIMEOUT_MS, VIEWPORT
from tests.dashboard.seed import PIPELINES, SLO, request_cost
from tests.servers import free_port
from tracetune import analyzer
from tracetune.base.settings import Settings
from tracetune.dashboard import ui
from tracetune.dashboard.frames import format_money

ROW_PX = 35  # a Streamlit dataframe row (and its header)

if browser.missing():
    pytest.skip(browser.missing(), allow_module_level=True)
from playwright import sync_api  # noqa: E402 - only once it is known to be there

_METRICS_JS = """els => els.map(e => [
    e.querySelector('[data-testid=stMetricLabel]').innerText.trim(),
    e.querySelector('[data-testid=stMetricValue]').innerText.trim()])"""


@pytest.fixture
def dashboard(db_settings: Settings, client, tmp_path) -> Iterator[tuple[Settings, list[seed.Request]]]:
    """`streamlit run dashboard/app.py` as `tracetune up` starts it, on a free port, over the seed: spans, drift
    features, an SLO breach, a tuner config with a canary, alerts, and the bundled prices published."""
    requests = seed.seed_spans(client)
    seed.seed_features(client)
    analyzer.save_slo(client, SLO)
    seed.seed_tuner(client)
    seed.seed_alerts(client)
    analyzer.publish_prices(client, analyzer.load_prices())
    settings = db_settings.replace(dashboard_port=free_port())
    with browser.running_dashboard(settings, tmp_path, 45):
        yield settings, requests


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_real_picture(path: Path) -> None:
    """A PNG 1400 px wide, at least the viewport tall, with text and charts in it: many colours, and no colour
    covering nearly all of it."""
    from PIL import Image  # pillow, matplotlib's own dependency

    width, height = png_size(path)
    assert width == VIEWPORT["width"] and height >= VIEWPORT["height"], (path, width, height)
    assert path.stat().st_size > 30_000, path
    area = width * height
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=area)  # [(pixels, colour)]
    assert len(colours) > 200, (path, len(colours))
    assert max(count for count, _ in colours) < 0.95 * area, path


def _metrics(page) -> dict[str, str]:
    return dict(page.locator('[data-testid="stMetric"]:visible').evaluate_all(_METRICS_JS))


# Per chart: the labels of each axis, and per table: its height and row count (header included).
_AXES_JS = """() => [...document.querySelectorAll('.vega-embed svg')].map(svg =>
    [...svg.querySelectorAll('.role-axis')].map(axis =>
        [...axis.querySelectorAll('.role-axis-label text')].map(t => t.textContent)))"""
_TABLES_JS = """() => [...document.querySelectorAll('[data-testid=stDataFrame]')].map(el => {
    const grid = el.querySelector('table[aria-rowcount]');
    const scroller = el.querySelector('.dvn-scroller');
    return [el.getBoundingClientRect().height, grid ? Number(grid.getAttribute('aria-rowcount')) : -1,
            scroller ? scroller.scrollWidth - scroller.clientWidth : 0,
            [...el.querySelectorAll('th')].map(th => th.textContent).join(' | ')];
})"""
_TABLES_READY_JS = """() => [...document.querySelectorAll('[data-testid=stDataFrame]')]
    .every(el => el.querySelector('table[aria-rowcount]'))"""


# Per grid column: its header and the text of it or its cells that is widest in the grid's font (semibold, the
# wider of the two weights it uses), measured on a canvas. The grid draws on a canvas and exposes no column
# widths; the page gives each text column ui.text_width of its texts, so this checks that width model against
# the real font: every text fits the width the model gives it.
_COLUMNS_JS = """() => {
    const measure = document.createElement('canvas').getContext('2d');
    measure.font = '600 14px ' + getComputedStyle(document.body).fontFamily;
    return [...document.querySelectorAll('[data-testid=stDataFrame] table[aria-rowcount]')].map(table => {
        const rows = [...table.querySelectorAll('tr')].map(tr => [...tr.children].map(c => c.textContent.trim()));
        return rows[0].map((header, i) => {
            const texts = rows.map(r => r[i] || '');
            const widest = texts.reduce((a, b) => measure.measureText(b).width > measure.measureText(a).width ? b : a);
            return [header, widest, measure.measureText(widest).width];
        });
    });
}"""
_CELLS_JS = """() => [...document.querySelectorAll('[data-testid=stDataFrame] table, [data-testid=stTable] table')]
    .flatMap(t => [...t.querySelectorAll('td, th')].map(c => c.textContent.trim()))"""


def cell_texts(page) -> list[str]:
    """The text of every cell and header of every table, grid or static."""
    return page.evaluate(_CELLS_JS)


def tables_text(page) -> str:
    """The cells of every table (the grid draws on a canvas; its accessible table carries the text)."""
    return "\n".join(page.locator('[data-testid="stDataFrame"] table, [data-testid="stTable"] table').evaluate_all(
        "els => els.map(e => e.textContent)"))


def check_layout(page, name: str) -> None:
    """No Streamlit exception; no axis repeating or cutting a label; every table tall enough for all its rows and no
    wider than the page."""
    assert page.locator('[data-testid="stException"]').count() == 0, (name, page.inner_text("body")[:2000])
    page.wait_for_function(_TABLES_READY_JS)
    for chart in page.evaluate(_AXES_JS):
        for labels in chart:
            assert len(labels) == len(set(labels)), (name, labels)
            assert not any(label.endswith("…") for label in labels), (name, labels)
    tables = page.evaluate(_TABLES_JS)
    for _ in range(10):  # a grid the last rerun mounted anew has no accessible table for a moment
        if all(rows > 0 for _, rows, _, _ in tables):
            break
        page.wait_for_timeout(500)
        tables = page.evaluate(_TABLES_JS)
    for height, rows, overflow, columns in tables:
        assert rows > 0, name
        assert height >= 0.9 * ROW_PX * rows, (name, height, rows)  # every row shown, no inner vertical scroll
        assert overflow <= 1, (name, overflow, columns)  # as wide as the page at most: no sideways scroll
    cells = cell_texts(page)
    assert cells and "None" not in cells and "nan" not in cells, name  # a missing value reads as a dash
    for columns in page.evaluate(_COLUMNS_JS):
        for header, widest, pixels in columns:  # the grid pads a cell by 8 px on each side
            assert pixels + 16 <= ui.text_width([widest]), (name, header, widest, pixels)


_HEIGHT_JS = """() => Math.max(document.body.scrollHeight, ...[...document.querySelectorAll(
    '[data-testid=stMain], [data-testid=stMainBlockContainer]')].map(el => el.scrollHeight))"""


def screenshot(page, path: Path) -> None:
    """The whole page at 1400 px wide: the window made as tall as the page (it scrolls inside its own container),
    then back to the viewport; a copy goes to $TRACETUNE_SCREENSHOTS when that is set."""
    height = max(VIEWPORT["height"], int(page.evaluate(_HEIGHT_JS)) + 80)
    page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
    page.wait_for_timeout(500)  # charts and grids re-lay out at the new height
    page.screenshot(path=path)
    page.set_viewport_size(VIEWPORT)
    if os.environ.get("TRACETUNE_SCREENSHOTS"):
        keep = Path(os.environ["TRACETUNE_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / path.name)


@pytest.mark.timeout(900)  # eight pages and the report in one browser; a busy 2-core machine takes minutes
def test_browser_renders_every_page_with_seeded_numbers(dashboard, client, tmp_path):
    settings, requests = dashboard
    shots: dict[str, Path] = {}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(RENDER_TIMEOUT_MS)

            def visit(path: str, title: str, ready: str, last: str, shot: str = "", **params: str) -> dict[str, str]:
                """Open a page by URL; wait for a metric, its last heading and the end of the script run."""
                query = {"pipeline": "all", "since": "1h", "tenant": "all", "refresh": "off", **params}
                url = "" if path == "overview" else path  # the default page lives at the root
                page.goto(f"{settings.dashboard_url}/{url}?" + "&".join(f"{k}={v}" for k, v in query.items()))
                page.get_by_role("heading", name=title, exact=True).first.wait_for()
                page.locator('[data-testid="stMetricLabel"]:visible', has_text=ready).first.wait_for()
                page.get_by_role("heading", name=last).first.wait_for()
                page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")
                page.wait_for_function("[...document.querySelectorAll('.vega-embed svg')]"
                                       ".every(svg => svg.getBoundingClientRect().width > 0 || !svg.checkVisibility())")
                page.wait_for_timeout(300)  # the last vega marks and grid rows settle
                check_layout(page, path)
                shots[shot or path] = tmp_path / f"{shot or path}.png"
                screenshot(page, shots[shot or path])
                return _metrics(page)

            # Overview: the SLO in words, both trends, the top contributors and the open alert.
            metrics = visit("overview", "Overview", "SLO", "Open alerts")
            assert metrics["SLO · support_bot"] == "Budget spent"
            assert set(PIPELINES) <= set(metrics)  # the cost per 1k headline of each
            cells = tables_text(page)
            over = 100 * (2 / (SLO.error_rate * 26) - 1)  # 2 of 26 tasks (one three hours back) failed
            assert f"budget spent: {over:.0f}% over the 30-day budget" in cells and "SLOBurnRate" in cells
            assert "burn factor" not in page.inner_text("body") + cells

            # Steps: every seeded step, and the failed classify calls with their trace ids.
            metrics = visit("steps", "Steps", "Requests", "Errors")
            assert metrics["Requests"] == f"{sum(steps[0][1] for steps in PIPELINES.values())}"
            body, cells = page.inner_text("body"), tables_text(page)
            for name in ("support_bot / generate / llm", "ticket_triage / create_followup"):  # chart legends
                assert name in body, name
            assert "step failed" in cells
            failed = {r.trace_id for r in requests if r.failed and not r.earlier}
            assert any(trace in cells for trace in failed)

            # Cost: the published price version, and the cost per 1k of the seed by hand.
            metrics = visit("cost", "Cost", "Cost per 1k requests", "What changed since")
            prices = analyzer.current_prices(client)
            now = [r for r in requests if not r.earlier]
            assert metrics[f"Cost per 1k requests ({prices.currency})"] == format_money(
                1000 * sum(request_cost(r, prices) for r in now) / len(now), prices.currency)
            body = page.inner_text("body")
            assert f"version {prices.version} · {prices.currency}" in body and "counted at 0" not in body
            assert "support_bot: new this period" in body

            # Drift, computed on the fly over the last minute (seeded again: the minute moves on).
            seed.seed_features(client)
            metrics = visit("drift", "Drift", "Not enough data", "One feature")
            assert metrics["Drift"] == "1"
            assert "Reference used" in page.inner_text("body")

            # Tuner: every pipeline's decisions in words; then one pipeline, with its canary and the change
            # controls behind the token.
            metrics = visit("tuner", "Tuner", "Canary in flight", "Change ticket_triage", "tuner_ticket_triage",
                            pipeline="ticket_triage")
            assert metrics["Canary in flight"] == "v3 · 10% of tasks"
            assert page.locator('input[type="password"]').count() == 1
            visit("tuner", "Tuner", "Canary in flight", "Decisions")
            body = page.inner_text("body")
            assert "clamped to cascade_threshold 0.63, cache_enabled on" in body and "{'" not in body
            assert "fp32 64.3% / int8 35.7%" in body and "0.6431834373838553" not in body
            assert "cost per 1k: 0.42 before, observed 0.31 (-26%)" in body

            # Alerts: support_bot's page firing (silenced), ticket_triage's resolved, the pending deliveries.
            metrics = visit("alerts", "Alerts", "Alerts firing", "Delivery log")
            assert metrics["Alerts firing"] == "1"
            cells = tables_text(page)
            assert "firing (silenced)" in cells and "resolved" in cells and "pipeline=support_bot" in cells
            assert {"support_bot", "ticket_triage"} <= set(re.findall(r"\b(support_bot|ticket_triage)\b", cells))

            # The HTML report of the same store (`tracetune report`), at the same width.
            from tracetune.analyzer.report import write_report

            report = write_report(client, tmp_path / "report.html", "1h", analyzer.current_prices(client))
            page.goto(report.as_uri())
            page.wait_for_load_state()
            assert "None" not in page.inner_text("body").split()
            shots["report"] = tmp_path / "report.png"
            screenshot(page, shots["report"])
        finally:
            browser.close()
    assert list(shots) == ["overview", "steps", "cost", "drift", "tuner_ticket_triage", "tuner", "alerts", "report"]
    for path in shots.values():
        assert_real_picture(path)
