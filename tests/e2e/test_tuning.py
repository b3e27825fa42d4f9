"""The loop closed with real processes: under an SLO the demo's default misses, the tuner restores it
first — it tries a new config on a share of the demo's tasks (a canary), the executor runs that share on
it, the tuner promotes it on the evidence — spans carry the new `tracetune.config_version`, the tasks on
it meet the p95 target the default missed, and cost per 1k falls."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import polars as pl

from tests.conftest import make_settings
from tests.servers import running_stack, wait_until
from tracetune import store
from tracetune.analyzer import cost_per_request, load_prices, publish_prices
from tracetune.tuner.decisions import KINDS

RECENT_SQL = """
SELECT count(), quantile(0.95)(Duration / 1e6) FROM otel_traces
WHERE ParentSpanId = '' AND SpanAttributes['tracetune.pipeline'] = 'ticket_triage'
  AND Timestamp >= now64(9) - toIntervalSecond(40)
"""

VERSIONS_SQL = """
SELECT TraceId AS trace_id, toUInt32OrZero(SpanAttributes['tracetune.config_version']) AS version
FROM otel_traces WHERE ParentSpanId = '' AND SpanAttributes['tracetune.pipeline'] = 'ticket_triage'
"""

TUNED_SQL = f"SELECT count() FROM ({VERSIONS_SQL}) WHERE version >= {{version:UInt32}}"
TUNED_TASKS = 500
"""Tasks on the tuned config (its canary share and after) before the load stops: 20 s of the load."""

P95_TARGET_MS = 220.0
"""Tighter than the demo's 500 ms, and well under what the default's tail takes once warm: with the default
cascade threshold about 9% of tickets escalate to LLM tiers whose median answer takes 300 ms (small) and
700 ms (large), and all but a few escalated ones take over 200 ms, so about 8% of tasks are slower than
this target, more than the 5% a p95 target lets be slow (measured on the config in force beside the canary:
8.5-9% over 200 ms, 5-6% over 250 ms, 3-6% over 300 ms). At 300 ms the default missed the target only while
warming up: the tuner started its restoring canary on the first window, but beside the canary the config in
force met the target about as often as not, so the canary could rarely show it restored anything and waited
for its cost to be shown better instead, which takes over a thousand tasks on it at this spread of per-task
cost. Escalating under 4% (a lower threshold, which the 0.85 floor allows) meets it (the tuned p95 was
40-205 ms, the highest on a machine running three other test suites), and costs less."""


def test_the_tuner_restores_a_missed_p95_target_first_and_lowers_cost_under_load(tmp_path, models_dir):
    settings = make_settings(tmp_path / "home", collector_flush_seconds=0.2, executor_config_poll_seconds=0.5,
                             tuner_interval_seconds=2, tuner_window_seconds=40, tuner_cooldown_seconds=20,
                             tuner_min_requests=300, tuner_canary_share=0.3, tuner_canary_min_requests=80)
    shutil.copytree(models_dir, settings.models_dir)
    with running_stack(settings, tmp_path):
        client = store.connect(settings, ensure_schema=False)
        publish_prices(client, load_prices())  # as the analyzer does at start
        slo = httpx.put(f"{settings.tuner_url}/v1/pipelines/ticket_triage/slo", json={
            "p95_ms": P95_TARGET_MS, "p99_ms": 1500, "error_rate": 0.02, "quality_floor": 0.85},
            headers={"Authorization": f"Bearer {settings.secret('tuner')}"})
        assert slo.status_code == 200, slo.text
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")} | settings.as_env()
        load = subprocess.Popen([sys.executable, "-m", "tracetune", "load", "--rate", "25", "--duration", "180",
                                 "--duplicates", "0.3", "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            decisions_url = f"{settings.tuner_url}/v1/pipelines/ticket_triage/decisions"
            of = lambda *kinds: [d for d in httpx.get(decisions_url).json() if d["kind"] in kinds]
            try:
                wait_until(lambda: of("canary_promote", "canary_rollback"), 160, 1.0, "a canary judged under load")
            except AssertionError as exc:  # say what the tuner did decide
                seen = client.query(RECENT_SQL).result_rows[0]
                raise AssertionError(f"{exc}; decisions: {[(d['kind'], d['reason']) for d in of(*KINDS)]}; "
                                     f"tasks in the last 40 s and their p95 ms: {seen}") from None
            judged = of("canary_promote", "canary_rollback")[-1]
            assert judged["kind"] == "canary_promote", judged["reason"]
            first = judged
            wait_until(lambda: httpx.get(f"{settings.executor_url}/health").json()["pipelines"]["ticket_triage"]
                       >= first["version_after"], 20, 0.5, "the executor on the tuned version")
            # The load's --duration and these waits are upper bounds (a canary was judged after 72 to 108 s of
            # load on an idle machine, later on a busy one): once enough tasks ran on the tuned config to read
            # its p95 and cost, the load stops (SIGTERM is its clean stop, exit 0).
            wait_until(lambda: client.query(TUNED_SQL, parameters={"version": first["version_after"]})
                       .result_rows[0][0] >= TUNED_TASKS, 60, 1.0, f"{TUNED_TASKS} tasks on the tuned config")
        finally:
            load.terminate()
            _, err = load.communicate(timeout=180)
        assert load.returncode == 0, err
        assert first["reason"] and first["predicted"]
        # The default missed the target, so the tuner restored it first (with p99 when that was over its own
        # target too), and its verdict says what it bought.
        assert started_reason(of, first).startswith(("Trying on 30% of tasks: restoring p95 first.",
                                                     "Trying on 30% of tasks: restoring p95 and p99 first.")), first
        assert first["reason"].startswith("canary better: "), first["reason"]
        assert first["config_after"] != first["config_before"]
        # Judged on both arms over the same minutes: the canary's share and the rest.
        assert first["observed"]["canary.requests"] >= 80 and first["observed"]["base.requests"] >= 80, first
        started = [d for d in of("canary_start") if d["version_after"] == first["version_after"]]
        assert started and started[0]["config_after"] == first["config_after"]

        versions = pl.DataFrame(client.query(VERSIONS_SQL).named_results())
        costs = cost_per_request(client, since="10m", pipeline="ticket_triage", limit=100_000)
        per_task = costs.join(versions, on="trace_id").with_columns(
            tuned=pl.col("version") >= first["version_after"])
        summary = {row["tuned"]: row for row in per_task.group_by("tuned").agg(
            n=pl.len(), cost_per_1k=1000 * pl.col("cost").mean(),
            p95_ms=pl.col("duration_ms").quantile(0.95)).iter_rows(named=True)}
        print(f"\nstarted: {started_reason(of, first)}")  # shown with -s, for the record
        print(f"\ntuned: {first['reason']}\nbefore/after: {summary}")  # shown with -s, for the record
        assert summary[True]["n"] > 100, summary  # tasks ran under the tuned config, their spans say so
        assert summary[True]["cost_per_1k"] < summary[False]["cost_per_1k"], summary
        # The target the SLO names, met by the tasks on the tuned config (canary and after).
        assert summary[True]["p95_ms"] <= P95_TARGET_MS, summary

        # What undoing the saving would cost (escalate below 0.9), predicted from the same measurements
        # before anyone applies it.
        whatif = subprocess.run([sys.executable, "-m", "tracetune", "whatif", "--pipeline", "ticket_triage",
                                 "--set", "escalate.cascade_threshold=0.9", "--since", "2m", "--json"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert whatif.returncode == 0, whatif.stderr
        rows = {row["figure"]: row for row in json.loads(whatif.stdout) if row["model"] == "cascade"}
        assert rows["escalated_share"]["proposed"] > rows["escalated_share"]["current"]
        assert rows["cost_per_1k"]["proposed"] > rows["cost_per_1k"]["current"]
        refused = subprocess.run([sys.executable, "-m", "tracetune", "whatif", "--pipeline", "ticket_triage",
                                  "--set", "escalate.nope=1"], env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
            line for line in refused.stderr.strip().splitlines() if line.startswith("Error:")], refused.stderr
        assert "steps.escalate.nope" in refused.stderr


def started_reason(of, judged: dict) -> str:
    """The reason of the canary_start decision that put `judged`'s version on trial."""
    (started,) = [d for d in of("canary_start") if d["version_after"] == judged["version_after"]]
    return started["reason"]
