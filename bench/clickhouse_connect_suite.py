"""clickhouse-connect's own integration tests against the embedded store: what passes, what fails, why.

Every tracetune component talks to the store through clickhouse-connect, and the store claims to speak
"enough of" the ClickHouse HTTP interface for it. Our tests cover the requests tracetune sends; the
client's own integration suite covers everything else the client can send (sessions, summaries,
query ids, external data, Arrow, streaming, settings ...). This runs that suite, unmodified, against a
fresh store and counts the result. It is a measurement, not a test of tracetune: failures are data.

Starts `python -m tracetune store` on a free port with a temporary home, waits for /ping, runs pytest
on the chosen files of the checkout with the CLICKHOUSE_CONNECT_TEST_* variables pointing at it,
parses pytest's JUnit XML, prints passed / failed / errors / skipped per file, the pass ratio of the
four target files (test_client, test_inserts, test_arrow, test_numeric) and every failing test with
the first line of its error, then stops the store.

The password the tests send is TRACETUNE_STORE_PASSWORD if set, else a generated one. The store gets
it as TRACETUNE_STORE_PASSWORD only when `store_password` is a Settings field (an unknown TRACETUNE_*
variable stops the store at start).

Reproduce (the tests are read from a checkout, never copied into this repository). The installed client
is clickhouse-connect 1.12.0, whose package ships no tests; the numbers recorded for the store were taken
with commit 842e4131 (main after 1.7.2, the newest the copy at hand held). Checking out the tag that
matches the installed client (`v1.12.0`) measures the same client against its own tests instead:

    git clone https://github.com/ClickHouse/clickhouse-connect /tmp/ccsuite/clickhouse-connect
    git -C /tmp/ccsuite/clickhouse-connect checkout 842e4131e76cc44cef00052a48f695c57a5c187c
    .venv/bin/pip install pytest-asyncio aiohttp  # their conftest imports the first; [async] tests need the second
    .venv/bin/python bench/clickhouse_connect_suite.py /tmp/ccsuite/clickhouse-connect

    # only the four target files; keep the JUnit XML, pytest and store logs; results as JSON
    .venv/bin/python bench/clickhouse_connect_suite.py CHECKOUT --no-extra --workdir /tmp/ccsuite/run \\
        --json /tmp/ccsuite/run/results.json
    # measure another tree of tracetune (e.g. `git worktree add /tmp/tt-head HEAD`)
    .venv/bin/python bench/clickhouse_connect_suite.py CHECKOUT --tracetune-root /tmp/tt-head

The checkout path may also come from CLICKHOUSE_CONNECT_CHECKOUT.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import free_port, stop_process  # bench/harness.py: this script's folder
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
TARGET_FILES = ("test_client.py", "test_inserts.py", "test_arrow.py", "test_numeric.py")
EXTRA_FILES = ("test_session_id.py", "test_external_data.py", "test_form_encode_query.py")
SUITE_DIR = Path("tests") / "integration_tests"
DATABASE = "cc_suite"
OUTCOMES = ("passed", "failed", "error", "skipped")

console = Console(highlight=False)


class UsageError(Exception):
    """A mistake in how the script was called: printed as one line, exit 2."""


@dataclass
class Result:
    file: str
    test: str  # the pytest node name, e.g. test_query_with_params[sync]
    outcome: str  # one of OUTCOMES
    reason: str = ""  # first line of the error or skip reason
    detail: str = ""  # the whole message and traceback text from the XML
    seconds: float = 0.0


@dataclass
class FileCount:
    file: str
    counts: Counter = field(default_factory=Counter)

    @property
    def ran(self) -> int:
        return self.counts["passed"] + self.counts["failed"] + self.counts["error"]

    @property
    def ratio(self) -> float | None:
        return self.counts["passed"] / self.ran if self.ran else None


# ---- the store -------------------------------------------------------------------------------

def clean_env() -> dict[str, str]:
    """This environment without anything that would steer the store or the tests from outside."""
    drop = ("TRACETUNE_", "CLICKHOUSE_CONNECT_TEST_", "PYTEST_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop) and k != "PYTHONPATH"}


def store_env(tracetune_root: Path, home: Path, port: int) -> dict[str, str]:
    env = clean_env()
    env.update({"PYTHONPATH": str(tracetune_root), "TRACETUNE_HOME": str(home),
                "TRACETUNE_STORE_PORT": str(port), "TRACETUNE_BIND_HOST": "127.0.0.1"})
    return env


def settings_fields(env: dict[str, str], cwd: Path) -> set[str]:
    """The Settings fields of the tracetune the store process will import."""
    code = ("import dataclasses, tracetune.base.settings as s; "
            "print(' '.join(f.name for f in dataclasses.fields(s.Settings)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(f"cannot import tracetune.base.settings: {out.stderr.strip().splitlines()[-1:]}")
    return set(out.stdout.split())


def wait_ping(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen(url, timeout=2).read().startswith(b"Ok."):
                return
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the store did not answer {url} (exit code {proc.poll()})")


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# ---- the suite -------------------------------------------------------------------------------

def check_checkout(checkout: Path | None, files: list[str]) -> Path:
    if checkout is None:
        raise UsageError("give the path of a clickhouse-connect checkout (or set CLICKHOUSE_CONNECT_CHECKOUT); "
                         "see this script's docstring for the clone and checkout commands")
    checkout = checkout.expanduser().resolve()
    if not (checkout / SUITE_DIR / "conftest.py").is_file():
        raise UsageError(f"{checkout} is not a clickhouse-connect checkout: {SUITE_DIR / 'conftest.py'} is missing")
    if not any((checkout / SUITE_DIR / name).is_file() for name in files):
        raise UsageError(f"none of {', '.join(files)} is in {checkout / SUITE_DIR}")
    missing = [name for module, name in (("pytest_asyncio", "pytest-asyncio"), ("aiohttp", "aiohttp"))
               if importlib.util.find_spec(module) is None]
    if missing:  # their conftest imports pytest_asyncio; every [async] test needs aiohttp
        raise UsageError(f"the suite needs {', '.join(missing)}: {sys.executable} -m pip install {' '.join(missing)}")
    return checkout


def checkout_commit(checkout: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--show-toplevel", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "commit unknown"
    lines = out.stdout.split()
    if out.returncode or len(lines) != 2 or Path(lines[0]).resolve() != checkout:
        return "not a git checkout"
    return f"commit {lines[1]}"


def client_under_test(checkout: Path) -> str:
    """Version and place of the clickhouse_connect the suite will import, as pytest will set up sys.path."""
    code = ("import sys; sys.path.append(sys.argv[1]); import clickhouse_connect, tests; "
            "print(clickhouse_connect.__version__, clickhouse_connect.__file__, tests.__file__)")
    out = subprocess.run([sys.executable, "-P", "-c", code, str(checkout)], cwd=checkout, env=clean_env(),
                         capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise UsageError(f"cannot import clickhouse_connect and the checkout's tests: "
                         f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
    version, client, tests = out.stdout.split()
    if Path(client).resolve().is_relative_to(checkout) or not Path(tests).resolve().is_relative_to(checkout):
        raise UsageError(f"the suite would import clickhouse_connect from {client} and tests from {tests}; "
                         "expected the installed client and the checkout's tests")
    return f"clickhouse-connect {version} ({Path(client).parent})"


def test_env(port: int, password: str, compress: str) -> dict[str, str]:
    env = clean_env()
    env.update({
        "CLICKHOUSE_CONNECT_TEST_HOST": "127.0.0.1",
        "CLICKHOUSE_CONNECT_TEST_PORT": str(port),
        "CLICKHOUSE_CONNECT_TEST_USER": "default",
        "CLICKHOUSE_CONNECT_TEST_PASSWORD": password,
        "CLICKHOUSE_CONNECT_TEST_DOCKER": "False",
        "CLICKHOUSE_CONNECT_TEST_CLOUD": "False",
        "CLICKHOUSE_CONNECT_TEST_DATABASE": DATABASE,
        "CLICKHOUSE_CONNECT_TEST_COMPRESS": compress,
        "CLICKHOUSE_CONNECT_TEST_INSERT_QUORUM": "0",
    })
    return env


def pytest_argv(paths: list[str], junit: Path, timeout: float, keyword: str) -> list[str]:
    # -P and --import-mode=append: a full checkout has clickhouse_connect/ at its root, and the tests must
    # import the installed client (the one tracetune uses), not that source tree.
    argv = [sys.executable, "-P", "-m", "pytest", *paths, "--import-mode=append", f"--junitxml={junit}",
            "-o", "junit_family=xunit1",
            "-p", "no:cacheprovider", "-o", "addopts=", "-o", "log_cli=false", "-q", "--no-header", "-rN"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        argv += ["--timeout", str(timeout)]
    if keyword:
        argv += ["-k", keyword]
    return argv


_ERROR_CODE_LINE = re.compile(r"Code: \d+\.|DB::Exception|Exception:")


def first_line(message: str) -> str:
    """The line that says what went wrong: a driver's "received error code N" gets the server's line too."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    first = lines[0]
    if "received ClickHouse error" in first or first.endswith(":"):
        server = next((line for line in lines[1:] if _ERROR_CODE_LINE.search(line)), "")
        if server:
            first = f"{first} | {server}"
    return first


def which_file(classname: str, name: str, files: list[str]) -> str | None:
    parts = set(f"{classname}.{name}".replace("/", ".").split("."))
    for file in files:
        if file.removesuffix(".py") in parts:
            return file
    return None


def parse_junit(path: Path, files: list[str]) -> list[Result]:
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        file = which_file(case.get("classname", ""), case.get("name", ""), files)
        if file is None:
            continue
        outcome, reason, detail = "passed", "", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is None:
                continue
            message = element.get("message") or ""
            text = element.text or ""
            detail = f"{message}\n{text}".strip()
            outcome = {"failure": "failed"}.get(tag, tag)
            reason = first_line(message) or first_line(text)
            if tag == "skipped" and message.startswith("Skipped: "):
                reason = message.removeprefix("Skipped: ").strip()
            break
        results.append(Result(file, case.get("name", ""), outcome, reason, detail, float(case.get("time") or 0)))
    return results


def count(results: list[Result], files: list[str]) -> dict[str, FileCount]:
    counts = {file: FileCount(file) for file in files}
    for result in results:
        counts[result.file].counts[result.outcome] += 1
    return counts


# ---- the report ------------------------------------------------------------------------------

def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.1f}%"


def report(results: list[Result], files: list[str], present: list[str], max_reason: int) -> float | None:
    counts = count(results, files)
    table = Table(title="clickhouse-connect integration tests against the embedded store")
    for column in ("file", "passed", "failed", "errors", "skipped", "pass %"):
        table.add_column(column, justify="left" if column == "file" else "right")

    def row(label: str, group: list[FileCount], style: str = "") -> float | None:
        total = Counter()
        for item in group:
            total.update(item.counts)
        ran = total["passed"] + total["failed"] + total["error"]
        ratio = total["passed"] / ran if ran else None
        table.add_row(label, str(total["passed"]), str(total["failed"]), str(total["error"]), str(total["skipped"]),
                      _pct(ratio), style=style)
        return ratio

    targets = [counts[f] for f in files if f in TARGET_FILES and f in present]
    extras = [counts[f] for f in files if f not in TARGET_FILES and f in present]
    for item in targets:
        row(item.file, [item])
    target_ratio = row(f"target ({len(targets)} files)", targets, "bold") if targets else None
    if extras:
        table.add_section()
        for item in extras:
            row(item.file, [item])
    missing = [f for f in files if f not in present]
    console.print(table)
    console.print("pass % = passed / (passed + failed + errors); skipped tests are not counted.")
    if missing:
        console.print(f"not in this checkout: {', '.join(missing)}")
    console.print(f"[bold]target ratio: {_pct(target_ratio)}[/] "
                  f"({sum(c.counts['passed'] for c in targets)} of {sum(c.ran for c in targets)} tests that ran)")

    bad = [r for r in results if r.outcome in ("failed", "error")]
    if bad:
        console.print(f"\n[bold]failing ({len(bad)})[/]")
        for result in bad:
            reason = result.reason if len(result.reason) <= max_reason else result.reason[:max_reason - 1] + "…"
            console.print(f"{result.file}::{result.test} [{result.outcome}] {reason}", soft_wrap=True, markup=False)
    skips = Counter((r.file, r.reason) for r in results if r.outcome == "skipped")
    if skips:
        console.print(f"\n[bold]skipped ({sum(skips.values())})[/]")
        for (file, reason), n in sorted(skips.items()):
            console.print(f"{file}: {n} x {reason}", soft_wrap=True, markup=False)
    return target_ratio


# ---- main ------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    files = list(TARGET_FILES) + ([] if args.no_extra else list(EXTRA_FILES))
    checkout = check_checkout(args.checkout, files)
    present = [f for f in files if (checkout / SUITE_DIR / f).is_file()]
    tracetune_root = args.tracetune_root.expanduser().resolve()
    if not (tracetune_root / "store" / "__init__.py").is_file():
        raise UsageError(f"{tracetune_root} holds no tracetune tree (store/__init__.py is missing)")

    work = Path(args.workdir).expanduser().resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="ccsuite-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return measure(args, checkout, files, present, tracetune_root, work)
    finally:
        if args.workdir:
            console.print(f"\nkept {work} (junit.xml, pytest.log, store.log)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, checkout: Path, files: list[str], present: list[str], tracetune_root: Path,
            work: Path) -> int:
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    store_log, pytest_log, junit = work / "store.log", work / "pytest.log", work / "junit.xml"
    junit.unlink(missing_ok=True)

    port = free_port()
    password = os.environ.get("TRACETUNE_STORE_PASSWORD") or secrets.token_urlsafe(18)
    env = store_env(tracetune_root, home, port)
    try:
        password_setting = "store_password" in settings_fields(env, home)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        console.print(str(exc), style="red", markup=False)
        return 1
    if password_setting:
        env["TRACETUNE_STORE_PASSWORD"] = password
    console.print(f"client {client_under_test(checkout)}\n"
                  f"checkout {checkout} ({checkout_commit(checkout)})  tracetune {tracetune_root}  "
                  f"store 127.0.0.1:{port}  work {work}\n"
                  f"password {'given to the store and the tests' if password_setting else 'given to the tests only'}"
                  f" (store_password {'is' if password_setting else 'is not'} a setting)")

    proc = subprocess.Popen([sys.executable, "-m", "tracetune", "store"], env=env, cwd=home,
                            stdout=store_log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_ping(f"http://127.0.0.1:{port}/ping", proc)
        except RuntimeError as exc:
            console.print(f"{exc}; log {store_log}:\n{tail(store_log)}", style="red", markup=False)
            return 1
        started = time.monotonic()
        with pytest_log.open("wb") as out:
            pytest = subprocess.run(pytest_argv([str(SUITE_DIR / f) for f in present], junit, args.timeout,
                                                args.k),
                                    env=test_env(port, password, args.compress), cwd=checkout, stdout=out,
                                    stderr=subprocess.STDOUT)
        elapsed = time.monotonic() - started
        if proc.poll() is not None:
            console.print(f"[red]the store exited during the run (code {proc.returncode}); log {store_log}[/]")
    finally:
        stop_process(proc)

    if not junit.exists():
        console.print(f"pytest wrote no results (exit code {pytest.returncode}); log {pytest_log}:\n"
                      f"{tail(pytest_log)}", style="red", markup=False)
        return 1
    results = parse_junit(junit, files)
    console.print(f"pytest exit code {pytest.returncode}, {len(results)} tests in {elapsed:.0f} s\n")
    report(results, files, present, args.max_reason)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "checkout": str(checkout), "files": present, "port": port, "pytest_exit_code": pytest.returncode,
            "password_setting": password_setting, "results": [asdict(r) for r in results]}, indent=1))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_checkout = os.environ.get("CLICKHOUSE_CONNECT_CHECKOUT")
    parser.add_argument("checkout", nargs="?", type=Path, default=Path(default_checkout) if default_checkout else None,
                        help="a clickhouse-connect checkout (default: $CLICKHOUSE_CONNECT_CHECKOUT)")
    parser.add_argument("--no-extra", action="store_true",
                        help=f"only the target files, not {', '.join(EXTRA_FILES)}")
    parser.add_argument("--tracetune-root", type=Path, default=ROOT,
                        help="the tracetune tree whose store runs (default: this repository)")
    parser.add_argument("--compress", default="True",
                        help="CLICKHOUSE_CONNECT_TEST_COMPRESS for the tests (True, False, lz4, zstd, gzip ...)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one test may take (pytest-timeout)")
    parser.add_argument("-k", default="", help="pytest -k expression, to run part of the files")
    parser.add_argument("--workdir", default="", help="keep the JUnit XML, pytest and store logs here")
    parser.add_argument("--json", default="", help="write every test's outcome and message to this file")
    parser.add_argument("--max-reason", type=int, default=220, help="cut each failure line at this many characters")
    args = parser.parse_args()
    try:
        sys.exit(run(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
