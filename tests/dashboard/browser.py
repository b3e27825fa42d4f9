"""Headless Chromium for the dashboard's browser tests: where it is, how it starts, and a visit of every page
that fails on a Streamlit exception and leaves a screenshot. Importing this never skips; `missing()` says
why a browser test cannot run here."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.servers import stop_process, wait_until
from tracetune.base.settings import Settings
from tracetune.dashboard.app import PAGES
from tracetune.supervisor import dashboard_command

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless as root (no sandbox), and nothing that would reach past 127.0.0.1.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]  # containers often have a tiny /dev/shm
VIEWPORT = {"width": 1400, "height": 2000}  # the page scrolls inside its own container: a tall window shows it all
RENDER_TIMEOUT_MS = 90_000  # a wait, not a speed figure: a page on a busy 2-core machine takes long to first show


def missing() -> str:
    """Why no browser test can run here ("" when one can)."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no playwright: pip install -e '.[test]'"
    return ""


@contextmanager
def running_dashboard(settings: Settings, tmp_path: Path, timeout: float = 60) -> Iterator[None]:
    """`streamlit run` of the dashboard as `tracetune up` starts it (its settings only, no tracetune.toml),
    until its /_stcore/health answers; stopped on exit. Its output goes to <tmp_path>/dashboard.log."""
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
        wait_until(healthy, timeout, 0.2, "the dashboard's /_stcore/health")
        yield
    finally:
        stop_process(proc)


def visit_every_page(dashboard_url: str, out_dir: Path, **params: str) -> dict[str, Path]:
    """Open each page from its URL (the filters in the query string), wait for its title and the end of
    its script run, assert no Streamlit exception element, and screenshot it to <out_dir>/<page>.png."""
    from playwright.sync_api import sync_playwright

    query = "&".join(f"{k}={v}" for k, v in {"refresh": "off", **params}.items())
    shots: dict[str, Path] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(RENDER_TIMEOUT_MS)
            for _, title, path, _ in PAGES:
                page.goto(f"{dashboard_url}/{'' if path == 'overview' else path}?{query}")
                page.get_by_role("heading", name=title, exact=True).first.wait_for()
                page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")
                page.wait_for_timeout(300)  # the last marks settle
                assert page.locator('[data-testid="stException"]').count() == 0, (path, page.inner_text("body")[:2000])
                shots[path] = out_dir / f"{path}.png"
                page.screenshot(path=shots[path])
        finally:
            browser.close()
    return shots
