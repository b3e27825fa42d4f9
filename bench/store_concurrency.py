"""The embedded store under concurrent load: one engine lock and no cancel (the old design) vs as shipped.

Starts two stores side by side on free ports, each in its own process and data directory: one whose
engine serialises every call behind one lock, as the store did before, and the store as shipped.
For each it measures `SELECT 1` alone, `SELECT 1` and small inserts while a CPU-heavy query runs,
eight threads of `SELECT 1`, and how long a query keeps running after its client timed out.

    .venv/bin/python bench/store_concurrency.py [--slow-seconds 4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from harness import free_port, stop_process  # bench/harness.py: this script's folder

SLOW = "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) % 7 = 3 /* bench-slow-{tag} */"
PASSWORD = "bench-password"


def _serve(port: int, home: str, locked: bool) -> None:
    """Child process: one store on `port`, its engine behind one lock if `locked`."""
    from tracetune.base.serving import serve
    from tracetune.store.access import User, Users, allowed_hosts
    from tracetune.store.engine import Engine
    from tracetune.store.server import create_app

    class LockedEngine(Engine):
        _one = threading.Lock()

        def execute(self, request, session=None):
            with self._one:
                return super().execute(request, session)

        def stream(self, request, session=None):
            with self._one:
                yield from super().stream(request, session)

        def cancel(self, query_id: str) -> bool:  # the old store could not stop a query
            return False

    engine = (LockedEngine if locked else Engine)(Path(home) / "data")
    users = Users([User("default", PASSWORD, 0)])
    serve(create_app(engine, users, allowed_hosts("127.0.0.1")), "127.0.0.1", port)


def _start(locked: bool, home: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), home] + (["--locked"] if locked else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ping").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the store on port {port} did not start")


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def _timed(client: httpx.Client, query: str) -> float:
    started = time.perf_counter()
    client.post("/", content=query).raise_for_status()
    return time.perf_counter() - started


def _measure(url: str, slow_seconds: float, tag: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with httpx.Client(base_url=url, auth=("default", PASSWORD), timeout=120) as client:
        client.post("/", content="CREATE TABLE IF NOT EXISTS marks (id UInt32) ENGINE = MergeTree ORDER BY id")
        idle = [_timed(client, "SELECT 1") for _ in range(200)]
        out["SELECT 1 alone p50 ms"], out["SELECT 1 alone p99 ms"] = _ms(idle, 0.5), _ms(idle, 0.99)

        busy, inserts = [], []
        for round_ in range(3):  # a SELECT 1 and an insert sent together while the slow query runs
            slow = threading.Thread(target=client.post, args=("/",), kwargs={
                "content": SLOW.format(tag=f"{tag}-{round_}"), "params": {"max_execution_time": str(slow_seconds)}})
            slow.start()
            time.sleep(0.3)
            with ThreadPoolExecutor(2) as pool:
                select = pool.submit(_timed, client, "SELECT 1")
                insert = pool.submit(_timed, client, f"INSERT INTO marks VALUES ({round_})")
                busy.append(select.result())
                inserts.append(insert.result())
            slow.join()
        out["SELECT 1 beside a slow query max ms"] = _ms(busy, 1.0)
        out["insert beside a slow query max ms"] = _ms(inserts, 1.0)

        def worker(_: int) -> list[float]:
            with httpx.Client(base_url=url, auth=("default", PASSWORD), timeout=60) as own:
                return [_timed(own, "SELECT 1") for _ in range(50)]

        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            many = [t for batch in pool.map(worker, range(8)) for t in batch]
        out["8 threads SELECT 1 p50 ms"] = _ms(many, 0.5)
        out["8 threads SELECT 1 per s"] = len(many) / (time.perf_counter() - started)

        marker = f"bench-timeout-{tag}"
        try:  # with one lock and no cancel it runs until its own limit (3x the slow query)
            client.post("/", content=SLOW.format(tag=marker), timeout=1.0,
                        params={"max_execution_time": str(3 * slow_seconds)})
        except httpx.TimeoutException:
            pass
        gone_at = time.perf_counter()
        check = "SELECT count() FROM system.processes WHERE position(query, {m:String}) > 0 AND query_id != queryID()"
        while client.post("/", content=check, params={"param_m": marker}).text.strip() != "0":
            if time.perf_counter() - gone_at > slow_seconds * 10:
                break
            time.sleep(0.05)
        out["query left running after client timeout s"] = time.perf_counter() - gone_at
        client.post("/", content=f"KILL QUERY WHERE position(query, '{marker}') > 0 AND query_id != queryID() SYNC")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow-seconds", type=float, default=4.0, help="how long the CPU-heavy query runs")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "HOME"), help=argparse.SUPPRESS)
    parser.add_argument("--locked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(int(args.serve[0]), args.serve[1], args.locked)
        return

    results = {}
    with tempfile.TemporaryDirectory() as home:
        for name, locked in (("one engine lock", True), ("connection per request", False)):
            print(f"measuring: {name} ...", file=sys.stderr)
            proc, url = _start(locked, os.path.join(home, name.replace(" ", "-")))
            try:
                results[name] = _measure(url, args.slow_seconds, name.replace(" ", "-"))
            finally:
                stop_process(proc, 20)

    old, new = results["one engine lock"], results["connection per request"]
    print(f"\nembedded store, {os.cpu_count()} cores, slow query {args.slow_seconds:g} s\n")
    print(f"{'measure':<44} {'one lock':>10} {'per request':>12} {'ratio':>8}")
    for key in old:
        ratio = old[key] / new[key] if new[key] else float("inf")
        print(f"{key:<44} {old[key]:>10.1f} {new[key]:>12.1f} {ratio:>7.1f}x")
    print("\nratio = one lock / per request (for 'per s' higher is better, for the rest lower is better)")


if __name__ == "__main__":
    main()
