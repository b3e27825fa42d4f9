"""Mistakes a user can make on the command line: one line on stderr, exit code 2, no traceback, nothing started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import free_port


def _tracetune(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    return subprocess.run([sys.executable, "-m", "tracetune", *args], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert lines and lines[-1].startswith("Error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("env, fragments", [
    ({"TRACETUNE_STORE_PORT": "abc"}, ["store_port", "TRACETUNE_STORE_PORT"]),
    ({"TRACETUNE_STORE_PORT": "70000"}, ["store_port = 70000", "between 1 and 65535"]),
    ({"TRACETUNE_NO_SUCH": "1"}, ["TRACETUNE_NO_SUCH is not a tracetune setting"]),
    ({"TRACETUNE_CLICKHOUSE_URL": "ftp://x"}, ["clickhouse_url", "http://user:pass@host:8123/database"]),
    ({"TRACETUNE_DATABASE": "a;b"}, ["database = 'a;b'"]),
    ({"TRACETUNE_PIPELINES": " , "}, ["pipelines (from TRACETUNE_PIPELINES) names no pipeline"]),
    ({"TRACETUNE_PIPELINES": "reviews.py"}, ["'reviews.py'", "package.module:attribute"]),
])
def test_a_bad_setting_stops_any_command_with_one_line(tmp_path, env, fragments):
    _one_line_error(_tracetune(["stats"], tmp_path, **env), *fragments)


def test_a_bad_config_file_is_named(tmp_path):
    (tmp_path / "tracetune.toml").write_text("[store]\nport = = 1\n")
    _one_line_error(_tracetune(["stats"], tmp_path), "tracetune.toml is not valid TOML")
    (tmp_path / "tracetune.toml").write_text("colour = 'red'\n")
    _one_line_error(_tracetune(["stats"], tmp_path), "unknown setting 'colour'")


def test_a_store_that_is_not_running_is_one_line(tmp_path):
    port = str(free_port())
    result = _tracetune(["stats"], tmp_path, TRACETUNE_STORE_PORT=port, TRACETUNE_HOME=str(tmp_path / "home"))
    _one_line_error(result, f"cannot reach ClickHouse at http://127.0.0.1:{port}", "tracetune up")


def test_the_embedded_store_refuses_to_start_for_a_server_url(tmp_path):
    result = _tracetune(["store"], tmp_path, TRACETUNE_CLICKHOUSE_URL="http://u:p@127.0.0.1:1/db")
    _one_line_error(result, "TRACETUNE_CLICKHOUSE_URL")


def test_a_password_file_others_can_read_stops_the_command(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "store.password").write_text("shared\n")
    (home / "store.password").chmod(0o644)
    result = _tracetune(["cost"], tmp_path, TRACETUNE_HOME=str(home), TRACETUNE_STORE_PORT=str(free_port()))
    _one_line_error(result, "store.password is readable by other users", "chmod 600")
    assert "cannot reach" not in result.stderr


def test_the_pipelines_setting_takes_a_toml_list(tmp_path):
    from tracetune.base import settings

    (tmp_path / "tracetune.toml").write_text('pipelines = ["reviews:reviews", "tracetune.demo.triage:ticket_triage"]\n')
    loaded = settings.load(tmp_path / "tracetune.toml", environ={})
    assert loaded.pipeline_targets == ["reviews:reviews", "tracetune.demo.triage:ticket_triage"]
    assert settings.load(environ=loaded.as_env()).pipeline_targets == loaded.pipeline_targets  # handed to children


# ---- the analyzer's commands against a store ---------------------------------------------------------

def _seed_tasks(client) -> None:
    """40 triage tasks a second apart in the last minute: 4 refused for empty input (client errors), 2
    failed at the CRM (server errors), with step spans, two tenants."""
    from datetime import UTC, datetime, timedelta

    from tests.spans import COLUMNS, span_row

    now, rows = datetime.now(UTC), []
    for n in range(40):
        start, trace = int((now - timedelta(seconds=n + 2)).timestamp() * 1e9), f"{n:032x}"
        common = {"tracetune.pipeline": "triage", "tracetune.tenant": ("acme", "globex")[n % 2]}
        message = "StepError: empty ticket" if n < 4 else "StepError: CRM refused" if n < 6 else ""
        root = common | ({"tracetune.error_kind": "client"} if n < 4 else {})
        rows.append(span_row(start, trace_id=trace, span_id=f"{n:016x}", name="triage", attrs=root,
                             duration=5 * 10**7, status="Error" if message else "Unset", status_message=message))
        for i, step in enumerate(("normalize", "classify")):
            rows.append(span_row(start + i, trace_id=trace, span_id=f"{n:08x}{i + 1:08x}", parent=f"{n:016x}",
                                 name=step, attrs=common | {"tracetune.step": step}, duration=10**7,
                                 status="Error" if message and step == "classify" else "Unset",
                                 status_message=message if step == "classify" else ""))
    client.insert("otel_traces", rows, column_names=COLUMNS)


def test_stats_errors_slo_and_drift_answer_tables_and_json(tmp_path, db_settings, client):
    import json

    from tracetune.analyzer import SLO, save_slo

    _seed_tasks(client)
    save_slo(client, SLO("triage", error_rate=0.01, p95_ms=40))
    env = db_settings.as_env()

    stats = json.loads(_tracetune(["stats", "--since", "5m", "--source", "raw", "--json"], tmp_path, **env).stdout)
    assert [(r["step"], r["requests"]) for r in stats] == [("(end to end)", 40), ("classify", 40), ("normalize", 40)]
    table = _tracetune(["stats", "--since", "5m", "--source", "raw"], tmp_path, **env).stdout
    assert "(end to end)" in table
    tenants = json.loads(_tracetune(["stats", "--by", "tenant", "--source", "raw", "--json"], tmp_path, **env).stdout)
    assert {r["tenant"]: r["requests"] for r in tenants} == {"acme": 20, "globex": 20}  # tasks, not 60 spans each

    errors = json.loads(_tracetune(["errors", "--json"], tmp_path, **env).stdout)
    assert {(r["step"], r["kind"], r["message"], r["failed_tasks"]) for r in errors} == {
        ("classify", "client", "StepError: empty ticket", 4), ("classify", "server", "StepError: CRM refused", 2)}
    server = _tracetune(["errors", "--kind", "server"], tmp_path, **env).stdout
    assert "CRM" in server and "empty" not in server  # (the table wraps long messages)

    slo = json.loads(_tracetune(["slo", "--source", "raw", "--json"], tmp_path, **env).stdout)
    availability = [r for r in slo if r["slo"] == "availability"]
    assert {(r["period_bad"], r["period_client_errors"], r["enough_data"], r["firing"]) for r in availability} == {
        (2.0, 4, False, False)}  # 2 server errors of 40; a minute of data is not enough for any rule
    text = _tracetune(["slo", "--source", "raw"], tmp_path, **env).stdout
    assert "not enough data" in text and " of data" in text and "4 client errors" in text

    drift = _tracetune(["drift", "--json"], tmp_path, **env)
    assert drift.returncode == 0 and isinstance(json.loads(drift.stdout), list)
    assert "NaN" not in drift.stdout  # null, valid JSON

    pinned = _tracetune(["drift", "baseline", "set", "--pipeline", "triage", "--first", "1h", "--note", "launch"],
                        tmp_path, **env)
    assert pinned.returncode == 0 and "drift baseline v1" in pinned.stdout, pinned.stderr
    shown = json.loads(_tracetune(["drift", "baseline", "show", "--json"], tmp_path, **env).stdout)
    assert [(b["pipeline"], b["version"], b["note"]) for b in shown] == [("triage", 1, "launch")]
    table = _tracetune(["drift"], tmp_path, **env).stdout
    assert "UTC" in table and "too few samples: under 100 in a window" in table
    assert "removed (v2)" in _tracetune(["drift", "baseline", "clear", "--pipeline", "triage"], tmp_path, **env).stdout


@pytest.mark.parametrize("args, fragments", [
    (["errors", "--since", "5x"], ["--since", "30s, 5m"]),
    (["errors", "--kind", "user"], ["--kind"]),
    (["drift", "--current", "soon"], ["--current"]),
    (["stats", "--by", "colour"], ["cannot group by 'colour'; choose from pipeline, step"]),
    (["cost", "--by", "colour"], ["cannot group cost by 'colour'", "pipeline"]),
    (["drift", "--reference", "0m"], ["--reference"]),
    (["drift", "baseline", "set", "--pipeline", "triage"], ["give one of --first 1h"]),
    (["drift", "baseline", "set", "--pipeline", "triage", "--start", "yesterday", "--end", "today"], ["ISO times"]),
    (["drift", "baseline", "set", "--pipeline", "triage", "--start", "2026-01-02T10:00"], ["go together"]),
    (["drift", "baseline", "set", "--pipeline", "nobody", "--first", "1h"], ["has no tasks yet"]),
    (["drift", "baseline", "set", "--pipeline", "triage", "--last", "10s"], ["too short"]),
    (["drift", "baseline", "clear", "--pipeline", "triage"], ["has no drift baseline to clear"]),
])
def test_analyzer_command_mistakes_are_one_line(tmp_path, db_settings, args, fragments):
    _one_line_error(_tracetune(args, tmp_path, **db_settings.as_env()), *fragments)


def test_alerts_commands_test_silence_list_and_show_deliveries(tmp_path, db_settings):
    import json

    from tests.analyzer.test_delivery import receiver_app, verify
    from tests.servers import ThreadServer
    from tracetune import store
    from tracetune.analyzer import delivery

    env = db_settings.as_env()
    _one_line_error(_tracetune(["alerts", "test"], tmp_path, **env), "no alert receiver is configured",
                    "alert_webhook_url")
    app = receiver_app()
    with ThreadServer(app) as receiver:  # in tracetune.toml, where the analyzer of the stack reads it too
        (tmp_path / "tracetune.toml").write_text(f'alert_webhook_url = "{receiver.url}/hook"\n')
        unset = {k: v for k, v in env.items() if k != "TRACETUNE_ALERT_WEBHOOK_URL"}  # as_env sets it, empty
        sent = _tracetune(["alerts", "test"], tmp_path, **unset)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.splitlines() == [f"receiver webhook: {receiver.url}/hook (from tracetune.toml)",
                                            "webhook: delivered (HTTP 200)"]
        # The first attempt was this command's: the analyzer's worker finds nothing of it left to send.
        assert delivery.deliver_due(store.connect(db_settings), delivery.receivers_from_settings(
            db_settings.replace(alert_webhook_url=f"{receiver.url}/hook")))["attempted"] == 0
        (tmp_path / "tracetune.toml").unlink()
    (request,) = app.state.seen
    assert request.json()["alerts"][0]["labels"]["alertname"] == "TracetuneTest"
    verify(db_settings.alert_secret(), request.headers, request.body)  # the secret generated into the home
    deliveries = json.loads(_tracetune(["alerts", "deliveries", "--json"], tmp_path, **env).stdout)
    assert [(d["receiver"], d["status"], d["http_status"]) for d in deliveries] == [("webhook", "delivered", 200)]
    assert "webhook" in _fits(_tracetune(["alerts", "deliveries"], tmp_path, **env, COLUMNS="100"))

    made = _tracetune(["alerts", "silence", "pipeline=shop", "severity=~page|ticket", "--for", "2h",
                       "--comment", "deploying"], tmp_path, **env)
    assert made.returncode == 0 and made.stdout.startswith("silence "), made.stderr
    silence_id = made.stdout.split()[1].rstrip(":")
    listed = _tracetune(["alerts", "silence", "--list"], tmp_path, **env).stdout
    assert silence_id in listed and "active" in listed and "pipeline=shop severity=~page|ticket" in listed
    assert _tracetune(["alerts", "silence", "--expire", silence_id], tmp_path, **env).returncode == 0
    assert "expired" in _tracetune(["alerts", "silence", "--list"], tmp_path, **env).stdout
    assert json.loads(_tracetune(["alerts", "list", "--all", "--json"], tmp_path, **env).stdout) == []
    assert _tracetune(["alerts", "list"], tmp_path, **env).stdout.strip() == "no alerts firing"

    _one_line_error(_tracetune(["alerts", "silence"], tmp_path, **env), "at least one matcher")
    _one_line_error(_tracetune(["alerts", "silence", "pipeline"], tmp_path, **env), "NAME=VALUE")
    _one_line_error(_tracetune(["alerts", "silence", "a=~(x"], tmp_path, **env), "not a regular expression")
    _one_line_error(_tracetune(["alerts", "silence", "a=b", "--for", "soon"], tmp_path, **env), "--for")
    _one_line_error(_tracetune(["alerts", "silence", "--expire", "nope"], tmp_path, **env), "no silence 'nope'")


def _fits(result: subprocess.CompletedProcess, columns: int = 100) -> str:
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout, result.stdout  # nothing cut to `reque…`
    assert max(len(line) for line in result.stdout.splitlines()) <= columns, result.stdout
    return result.stdout


def test_tables_fit_100_columns_and_wide_shows_every_column(tmp_path, db_settings, client):
    from tracetune.analyzer import SLO, save_slo

    _seed_tasks(client)
    save_slo(client, SLO("triage", error_rate=0.01, p95_ms=40))
    env = {**db_settings.as_env(), "COLUMNS": "100"}

    by_route = _fits(_tracetune(["stats", "--by", "step,route", "--source", "raw"], tmp_path, **env))
    assert "error %" in by_route and "req/s" in by_route and "cache hit %" not in by_route
    default = _fits(_tracetune(["stats", "--source", "raw"], tmp_path, **env))
    for text in (by_route, default):  # 6 failures of 40 at classify: percent in both views
        (classify,) = [line for line in text.splitlines() if "classify" in line]
        assert "15.0" in classify, text
    cost = _fits(_tracetune(["cost", "--by", "step,route"], tmp_path, **env)).splitlines()
    assert "pipeline" in cost[2] and any(line.startswith("│ total") for line in cost)  # whose steps, and the sum
    steps = [line for line in cost if "triage" in line]
    assert len(steps) > 1 and sum(line.split("│")[4].strip() != "" for line in steps) == 1  # requests said once
    errors = _fits(_tracetune(["errors"], tmp_path, **env))
    assert "--wide adds an example trace id" in errors
    slo = _fits(_tracetune(["slo", "--source", "raw"], tmp_path, **env))
    assert "triage errors (99% of tasks succeed): not enough data" in slo  # the Overview's words
    assert "not enough data" in slo.split("left %")[1]  # whole, not `insufficient`/`_data`
    drift = _fits(_tracetune(["drift", "--current", "10m"], tmp_path, **env))
    assert "decided by" in drift and "triage:" in drift
    wide_drift = _fits(_tracetune(["drift", "--current", "10m", "--wide"], tmp_path, **env))
    assert "statistics" in wide_drift
    per_step = _tracetune(["stats", "--source", "raw", "--wide"], tmp_path, **env)
    assert per_step.returncode == 0 and "max ms" in per_step.stdout and "errors" in per_step.stdout, per_step.stdout

    wide = _tracetune(["stats", "--by", "step,route", "--source", "raw", "--wide"], tmp_path, **env)
    assert wide.returncode == 0 and "…" not in wide.stdout
    assert all(header in wide.stdout for header in ("cache hit %", "mean ms", "queue ms", "errors"))
    wide_errors = _tracetune(["errors", "--wide"], tmp_path, **env).stdout
    assert any(f"{n:032x}" in wide_errors for n in range(6)), wide_errors  # an example trace id
    assert "calls $" in _tracetune(["cost", "--wide"], tmp_path, **env).stdout
    assert "factor" in _tracetune(["slo", "--source", "raw", "--wide"], tmp_path, **env).stdout


@pytest.mark.parametrize("command", [["stats"], ["cost"], ["errors"], ["slo"], ["drift"], ["report"]])
def test_an_unknown_pipeline_is_named_with_the_known_ones(tmp_path, db_settings, client, command):
    _seed_tasks(client)
    _one_line_error(_tracetune([*command, "--pipeline", "nosuch"], tmp_path, **db_settings.as_env()),
                    "unknown pipeline 'nosuch'; known: triage")


def test_a_home_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "home").write_text("not a directory\n")
    _one_line_error(_tracetune(["stats"], tmp_path, TRACETUNE_HOME=str(tmp_path / "home")),
                    "is a file, not a directory", "TRACETUNE_HOME")
    _one_line_error(_tracetune(["stats"], tmp_path, TRACETUNE_HOME=str(tmp_path / "home" / "inside")),
                    f"{tmp_path / 'home'} is a file, not a directory")


@pytest.mark.parametrize("args, fragments", [
    (["--rate", "0"], ["for --rate:", "rate must be above 0"]),
    (["--rate", "-3"], ["for --rate:"]),
    (["--duplicates", "1"], ["for --duplicates:"]),
    (["--duration", "0"], ["for --duration:"]),
    (["--drift", "weather@10"], ["for --drift:"]),
])
def test_load_refuses_a_bad_plan_naming_its_flag(tmp_path, args, fragments):
    _one_line_error(_tracetune(["load", *args], tmp_path), *fragments)


def test_demo_refuses_a_rate_of_zero(tmp_path):
    _one_line_error(_tracetune(["demo", "--rate", "0", "--duration", "5"], tmp_path), "for --rate:", "tracetune up")


def test_models_build_summary_is_a_few_lines():
    from tracetune.terminal import models_summary

    report = {"models_dir": ".tracetune/models", "built": [], "reused": ["fp32", "int8", "ticket-classifier"],
              "files": {}, "published_similarities": {"expected": [0.1] * 20, "fp32": [0.1] * 20, "int8": [0.1] * 20},
              "int8_agreement": {"mean_cosine": 0.9921, "min_cosine": 0.97, "nearest_neighbour_agreement": 0.8833,
                                 "samples": 300},
              "classifier": {"labels": ["billing", "login"], "held_out_accuracy": 0.922,
                             "held_out_accuracy_by_variant": {"fp32": 0.922, "int8": 0.924},
                             "held_out_confidence": 0.8, "train_samples": 2000, "test_samples": 500},
              "seconds": 0.31}
    lines = models_summary(report)
    assert len(lines) <= 5 and all(len(line) <= 100 for line in lines)
    assert "reused fp32, int8, ticket-classifier" in lines[0] and "fp32 92.2%, int8 92.4%" in lines[1]
    assert lines[-1] == "full report: tracetune models build --json"


def test_the_demo_counts_only_its_own_run():
    from tracetune.supervisor import DEMO_RAW_SECONDS, demo_window

    assert demo_window(1000.0, 1060.2) == (61, "raw")  # exactly this run: no earlier minute, no rounding out
    assert demo_window(1000.0, 1000.0) == (1, "raw")
    assert demo_window(0.0, DEMO_RAW_SECONDS + 5) == (DEMO_RAW_SECONDS + 5, "rollup")


def test_a_second_up_in_the_same_home_is_one_line_and_leaves_the_running_stack_alone(tmp_path):
    """The first stack's supervisor holds <home>/supervisor.lock (an exclusive flock, its pid inside); a second
    `tracetune up` there (other ports) refuses before it opens any log or starts any process."""
    import fcntl

    from tests.conftest import make_settings

    home = tmp_path / ".tracetune"
    home.mkdir(parents=True)
    held = (home / "supervisor.lock").open("a+")  # as the running stack's supervisor holds it
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.write(str(os.getpid()))
    held.flush()
    try:
        (home / "logs").mkdir(parents=True)
        (home / "logs" / "store.log").write_text("the running store's log\n")
        second = make_settings(home)  # other free ports, the same home
        env = {k: v for k, v in second.as_env().items() if k != "TRACETUNE_HOME"} | {"TRACETUNE_HOME": str(home)}
        result = _tracetune(["up"], tmp_path, **env)
        _one_line_error(result, f"already running with home {home}", "TRACETUNE_HOME")
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
        assert (home / "logs" / "store.log").read_text() == "the running store's log\n"
        assert str(os.getpid()) in result.stderr
    finally:
        held.close()


def test_stats_waits_for_spans_the_collector_still_queues(tmp_path, db_settings, client):
    """`python app.py && tracetune stats`: the app's spans are acknowledged, some not yet written. The CLI asks
    the collector's /health (here a stand-in answering as the collector does) and waits, saying so."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tests.servers import ThreadServer

    _seed_tasks(client)
    answers = iter([7, 7, 3])

    async def health(_request):
        return JSONResponse({"status": "ok", "queued_rows": next(answers, 0)})

    with ThreadServer(Starlette(routes=[Route("/health", health)])) as collector:
        env = {**db_settings.as_env(), "TRACETUNE_COLLECTOR_PORT": str(collector.port)}
        result = _tracetune(["stats", "--source", "raw"], tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert "waiting for 7 spans the collector has acknowledged but not written yet" in result.stderr
    assert "still queued" not in result.stderr and "triage" in result.stdout
    quiet = _tracetune(["stats", "--source", "raw"], tmp_path, **db_settings.as_env())  # no collector: no wait
    assert quiet.returncode == 0 and "waiting" not in quiet.stderr
