"""The real dashboard (`streamlit run`, as `tracetune up` starts it) in headless Chromium over seeded spans.

AppTest (test_app.py) checks what each tab computes; this checks what a browser shows: each tab's
rendered text carries the seeded steps and figures, and its screenshot is a real picture.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.dashboard.test_app import (
    DRIFT_PIPELINE,
    DRIFT_SPANS,
    DRIFT_STEP,
    PIPELINES,
    SLO,
    durations_ms,
    seed_features,
    seed_spans,
)
from tests.servers import free_port, stop_process, wait_until
from tracetune import analyzer
from tracetune.dashboard.frames import format_money, format_ms
from tracetune.settings import Settings
from tracetune.supervisor import dashboard_command

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless as root (no sandbox), and nothing that would reach past 127.0.0.1.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]  # containers often have a tiny /dev/shm
VIEWPORT = {"width": 1400, "height": 2000}  # the page scrolls inside its own container: a tall window shows it all
RENDER_TIMEOUT_MS = 30_000

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install -e '.[test]'")

_METRICS_JS = """els => els.map(e => [
    e.querySelector('[data-testid=stMetricLabel]').innerText.trim(),
    e.querySelector('[data-testid=stMetricValue]').innerText.trim()])"""
_ARIA = re.compile(r"(\w+): ([^;]*)")


@pytest.fixture
def dashboard(db_settings: Settings, client, tmp_path) -> Iterator[Settings]:
    """`streamlit run dashboard/app.py` on a free port over seeded spans, an SLO breach and the bundled prices.

    The drift features lie hours and half an hour back: outside the 15-minute window of the other tabs.
    """
    seed_spans(client)
    seed_features(client)
    analyzer.save_slo(client, SLO)
    analyzer.publish_prices(client, analyzer.load_prices())
    settings = db_settings.replace(dashboard_port=free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    env |= settings.as_env() | {"TRACETUNE_CONFIG": str(tmp_path / "absent.toml")}
    log = tmp_path / "dashboard.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(dashboard_command(settings), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the dashboard exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{settings.dashboard_url}/_stcore/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 45, 0.2, "the dashboard's /_stcore/health")
        yield settings
    finally:
        stop_process(proc)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_real_picture(path: Path) -> None:
    """A full-size PNG with text and charts in it: many colours, and no colour covering nearly all of it."""
    from PIL import Image  # pillow, matplotlib's own dependency

    assert png_size(path) == (VIEWPORT["width"], VIEWPORT["height"]), path
    assert path.stat().st_size > 30_000, path
    area = VIEWPORT["width"] * VIEWPORT["height"]
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=area)  # [(pixels, colour)]
    assert len(colours) > 200, (path, len(colours))
    assert max(count for count, _ in colours) < 0.95 * area, path


def _open_tab(page, label: str, ready: str) -> dict[str, str]:
    """Click a tab, wait for one of its metric labels, return the visible metrics (label -> value)."""
    page.get_by_role("tab", name=label, exact=True).click()
    page.locator('[data-testid="stMetricLabel"]:visible', has_text=ready).first.wait_for()
    return dict(page.locator('[data-testid="stMetric"]:visible').evaluate_all(_METRICS_JS))


def _chart_points(page) -> list[dict[str, str]]:
    """The data of every visible chart point, from the labels vega gives its SVG marks."""
    labels = page.locator('[aria-roledescription="point"]:visible').evaluate_all(
        "els => els.map(e => e.getAttribute('aria-label'))")
    return [dict(_ARIA.findall(label)) for label in labels if label]


def test_browser_renders_every_tab_with_seeded_numbers(dashboard: Settings, client, tmp_path):
    shots: dict[str, Path] = {}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(RENDER_TIMEOUT_MS)
            page.goto(dashboard.dashboard_url)

            def shoot(name: str) -> None:
                page.wait_for_function("[...document.querySelectorAll('.vega-embed svg')]"
                                       ".every(svg => svg.getBoundingClientRect().width > 0 || !svg.checkVisibility())")
                shots[name] = tmp_path / f"{name}.png"
                page.screenshot(path=shots[name])

            # Latency: the headline figures, and every seeded step with its calls in the p95-over-time chart.
            metrics = _open_tab(page, "Latency", "Slowest step p95")
            assert metrics["Requests"] == "65"
            generate_p95 = analyzer.step_stats(client, "15m", pipeline="doc_qa").filter(step="generate")["p95_ms"][0]
            assert metrics["Slowest step p95 · doc_qa / generate"] == format_ms(generate_p95)
            page.wait_for_function("document.querySelectorAll('[aria-roledescription=point]').length > 0")
            calls: dict[str, int] = defaultdict(int)
            for point in _chart_points(page):
                if "series" in point and "p95_ms" in point:
                    calls[point["series"]] += int(point["requests"])
            seeded = {f"{p} / {step}": n for p, steps in PIPELINES.items() for step, n, *_ in steps}
            seeded[f"{DRIFT_PIPELINE} / {DRIFT_STEP}"] = DRIFT_SPANS  # the drift seed's current minute
            assert calls == seeded
            body = page.inner_text("body")
            for name in ("doc_qa / generate", "doc_qa / rerank", "ticket_triage / embed", "ticket_triage / route"):
                assert name in body  # chart legends
            shoot("latency")

            # Cost: the figures of the published price version.
            metrics = _open_tab(page, "Cost", "Cost per 1k requests")
            prices = analyzer.current_prices(client)
            overall = analyzer.cost_per_1k(client, "15m", by=(), prices=prices, source="rollup")
            assert metrics[f"Cost per 1k requests ({prices.currency})"] == format_money(
                overall["cost_per_1k"][0], prices.currency)
            assert metrics["Priced requests"] == "65"
            assert f"version {prices.version} · {prices.currency}" in page.inner_text("body")
            shoot("cost")

            # Critical path: generate dominates doc_qa (its steps run one after another).
            metrics = _open_tab(page, "Critical path", "Biggest contributor")
            totals = {step: sum(durations_ms(base, n)) for step, n, _, base in PIPELINES["doc_qa"]}
            assert metrics["Biggest contributor · doc_qa"] == \
                f"generate · {100 * totals['generate'] / sum(totals.values()):.0f} %"
            shoot("critical_path")

            # Drift, computed on the fly over the last minute: `lang` drifted against the pinned baseline;
            # `rare` has too few samples for a verdict. (Seeded again now: the current minute moves on while
            # the other tabs render; which other steps have a full minute of data depends on that timing.)
            seed_features(client)
            metrics = _open_tab(page, "Drift", "Insufficient data")
            assert metrics["Drift"] == "1" and int(metrics["Ok"]) >= 1
            assert int(metrics["Insufficient data"]) >= 1
            assert "computed now" in page.inner_text("body")
            shoot("drift")

            # SLOs: the seeded availability breach burns the budget, but a few minutes of data are not
            # enough for any rule's long window (1 h at least): nothing fires yet, and the page says why.
            metrics = _open_tab(page, "SLOs", "Alert rules firing")
            assert metrics["Alert rules firing"] == "0 of 6"
            assert "No burn-rate alert is firing." in page.inner_text("body")
            shoot("slos")

            # Alerts: nothing evaluated on this store yet, said as such.
            metrics = _open_tab(page, "Alerts", "Alerts firing")
            assert metrics["Alerts firing"] == "0"
            assert "No alert is firing or pending." in page.inner_text("body")
            shoot("alerts")
        finally:
            browser.close()
    for path in shots.values():
        assert_real_picture(path)
