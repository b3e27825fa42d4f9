"""FeatureDrift alerts on a real stack: `tracetune up` (store, collector, tuner, stand-ins, executor, analyzer
with default settings) in a fresh home, the demo load steady, then with its category mix shifted, then steady
again; the firing FeatureDrift alerts are read from the analyzer's alert state every 30 s.

    .venv/bin/python bench/drift_live.py --steady 40 --shift 10 --after 5 --rate 10   # about 57 minutes

Prints a table: alerts fired during the steady phase (target 0), when the shift's alert fired, in how many
samples it was firing while the shift lasted, and when it resolved after the shift ended.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from harness import isolated_settings, stop_process  # bench/harness.py: this script's folder
from rich.console import Console
from rich.table import Table

from tracetune import store
from tracetune.analyzer import alerts

SAMPLE_SECONDS = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady", type=float, default=40.0, help="minutes of steady load first")
    parser.add_argument("--shift", type=float, default=10.0, help="minutes of the category-mix shift")
    parser.add_argument("--after", type=float, default=5.0, help="minutes of steady load after the shift")
    parser.add_argument("--rate", type=float, default=10.0, help="tickets per second")
    args = parser.parse_args()
    console = Console(width=150)
    home = Path(tempfile.mkdtemp(prefix="tracetune-bench-drift-live-"))
    settings = isolated_settings(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")} | settings.as_env()
    log = open(home / "up.log", "w")
    up = subprocess.Popen([sys.executable, "-m", "tracetune", "up"], cwd=home, env=env, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
    console.log(f"tracetune up in {home} (log {home / 'up.log'})")
    samples: list[tuple[float, str, set[str]]] = []
    try:
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(f"{settings.executor_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if up.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the stack did not come up; see {home / 'up.log'}")
            time.sleep(2)
        client = store.connect(settings, ensure_schema=False)
        phase = ["steady"]
        begun = time.time()
        done = threading.Event()

        def sample() -> None:
            while not done.wait(SAMPLE_SECONDS):
                try:
                    firing = {f"{a.labels.get('step')}/{a.labels.get('feature')}"
                              for a in alerts.current_alerts(client).values()
                              if a.state == "firing" and a.labels.get("alertname") == "FeatureDrift"}
                except Exception as exc:  # noqa: BLE001 - a busy store: skip the sample
                    console.log(f"sample failed: {exc}")
                    continue
                samples.append((time.time() - begun, phase[0], firing))
                console.log(f"{(time.time() - begun) / 60:5.1f} min [{phase[0]}] firing: {sorted(firing) or '-'}")

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        marks = {}
        for name, minutes, drift in (("steady", args.steady, []), ("shift", args.shift, ["--drift", "category_mix@0"]),
                                     ("after", args.after, [])):
            phase[0] = name
            marks[name] = time.time() - begun
            subprocess.run([sys.executable, "-m", "tracetune", "load", "--rate", str(args.rate), "--duration",
                            str(minutes * 60), "--no-progress", *drift], cwd=home, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        marks["end"] = time.time() - begun
        done.set()
        sampler.join(SAMPLE_SECONDS + 30)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)  # Ctrl-C: the supervisor stops what it started
            try:
                up.wait(120)
            except subprocess.TimeoutExpired:
                stop_process(up)
        log.close()

    category = "classify/category"
    steady_fired = sorted({f for t, p, found in samples if p == "steady" for f in found})
    shift = [(t, found) for t, p, found in samples if p == "shift"]
    first = next((t - marks["shift"] for t, found in shift if category in found), None)
    held = [category in found for t, found in shift if first is not None and t - marks["shift"] >= first]
    gone = next((t - marks["after"] for t, p, found in samples if p == "after" and category not in found), None)
    table = Table(title=f"FeatureDrift alerts on a real stack (tracetune up, analyzer defaults), {args.rate:g} "
                        "tickets/s")
    for column in ("steady minutes", "alerts fired while steady", "shift minutes", "first fired after shift start",
                   "samples firing after that, until the shift ended", "resolved after shift end"):
        table.add_column(column)
    table.add_row(f"{args.steady:g}", f"{len(steady_fired)}" + (f" ({', '.join(steady_fired)})" if steady_fired
                                                                 else ""),
                  f"{args.shift:g}", "never" if first is None else f"{first:.0f} s", f"{sum(held)}/{len(held)}",
                  "not within the run" if gone is None else f"within {gone:.0f} s")
    console.print(table)


if __name__ == "__main__":
    main()
