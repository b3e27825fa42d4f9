"""`tracetune demo` and `tracetune up` as a user runs them: URLs, the final table, a clean stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from tests.conftest import make_settings
from tests.dashboard import browser, seed
from tests.servers import wait_until
from tracetune import store
from tracetune.dashboard.app import PAGES


def _env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    return env | settings.as_env() | {"COLUMNS": "120"}


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _ports(settings) -> list[int]:
    return [settings.store_port, settings.collector_port, settings.tuner_port, settings.executor_port,
            settings.dashboard_port, settings.llm_port, settings.crm_port]


def check_demo_run(out: subprocess.CompletedProcess, settings) -> None:
    """What `tracetune demo --duration N` must show: every URL, a final per-step table with real
    numbers, a clean stop with every port released. Run from the installed wheel in
    tests/tracetune/test_wheel.py, as a user who installed tracetune runs it."""
    assert out.returncode == 0, out.stdout + out.stderr
    for url in (settings.store_url, settings.collector_url, settings.tuner_url, settings.dashboard_url,
                settings.executor_metrics_url):
        assert url in out.stdout
    table = out.stdout.split("per-step latency")[-1]
    for step in ("normalize", "classify", "prioritize", "draft_reply"):
        line = next(line for line in table.splitlines() if f" {step} " in line)
        cells = [c.strip() for c in line.split("│") if c.strip()]
        requests, p50, p95, p99 = int(cells[2].replace(",", "")), float(cells[4]), float(cells[5]), float(cells[6])
        assert requests > 50 and p99 >= p95 >= p50 > 0
    assert "stopped every process" in out.stdout
    assert not any(_listening(p) for p in _ports(settings))


def test_up_serves_every_dashboard_page_and_ctrl_c_stops_every_process(tmp_path, models_dir):
    """`tracetune up` as a user runs it: with spans in its store, every dashboard page opens in headless
    Chromium without a Streamlit exception (screenshots in tmp_path; skipped without Chromium); Ctrl-C
    then stops every process it started."""
    settings = make_settings(tmp_path / "home")
    shutil.copytree(models_dir, settings.models_dir)
    proc = subprocess.Popen([sys.executable, "-m", "tracetune", "up"], env=_env(settings), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "is up" in line:
                break
        assert any("is up" in line for line in lines), "".join(lines)
        assert all(_listening(p) for p in _ports(settings))
        if not browser.missing():
            seed.seed_spans(store.connect(settings))  # what a few minutes of two pipelines leave
            shots = browser.visit_every_page(settings.dashboard_url, tmp_path, since="1h")
            assert sorted(shots) == sorted(path for _, _, path, _ in PAGES)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopped every process" in rest
    wait_until(lambda: not any(_listening(p) for p in _ports(settings)), 10, message="ports released")
