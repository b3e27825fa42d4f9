"""`bench/tuner.py --mode real`: each arm runs the whole stack for real and is measured from its own store.

Every arm starts a fresh stack (store, collector, tuner, stand-ins, executor, analyzer: what `tracetune up`
starts, without the dashboard) in its own temporary home on free ports, drives one demo pipeline (real ONNX
models, the LLM and CRM stand-ins) with the same open-loop Poisson load for every arm (one seed, 20%
duplicates), then reads cost, latency, SLO windows, quality and config versions back from the store with the
analyzer's query functions. Pipelines (`--pipeline`):

- triage: `ticket_triage`, the rate steps up at half time (20/s, then 40/s by default).
- rag:    `rag_answering`, a compressed day (`--period` seconds, default 300) with two 3x bursts a day.

Arms:

- default: the pipeline's declared defaults; the tuning loop is off (`tuner_interval_seconds = 0`).
- aimd:    loop off; every 30 s this process sets classify.batch_max_size with `aimd_batch_size` from the
           last 30 s (classify p95 against the step's share of the SLO's p95), through the tuner API.
- tuner:   the real loop in `tracetune tuner`, on shortened settings (TUNER_LOOP) so it acts within minutes.
- a dict:  that config pinned (POST .../config) once the executor registered the pipeline (the "oracle").

`python bench/tuner_real.py --minutes 2 --arm default` runs one arm and prints its row as JSON;
`--parallel` runs the arms side by side (each its own stack), so every arm meets the same machine load.
Besides the whole run, each row has cost per 1k over the run's last third and from minute 10 on, and the
commit it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from clickhouse_connect.driver.exceptions import DatabaseError

from tracetune import analyzer, store
from tracetune.base import settings as settings_mod
from tracetune.demo.load import LoadPlan, ground_truth_writer, run_load
from tracetune.supervisor import StartError, Supervisor, components
from tracetune.tuner import observe, oracles, token_for
from tracetune.tuner.batching import aimd_batch_size
from tracetune.tuner.canary import limits_for as canary_limits
from tracetune.tuner.config import PipelineSpec
from tracetune.tuner.loop import step_target_ms

try:
    from harness import isolated_settings  # bench/harness.py: this script's folder
except ImportError:  # imported as bench.tuner_real (bench/tuner.py takes its folder off sys.path)
    from bench.harness import isolated_settings

log = logging.getLogger("bench.tuner_real")

ARMS = ("default", "aimd", "tuner", "oracle")


@dataclasses.dataclass(frozen=True)
class Workload:
    """A demo pipeline and the load the bench drives it with."""

    target: str  # the executor's `pipelines` setting
    name: str
    pattern: str
    rate: float
    aimd_step: str  # the step whose batch_max_size the aimd arm steers
    period_seconds: float = 120.0
    mean_factor: float = 1.0  # the load's mean rate over the run, as a multiple of `rate`
    cost_spread: float = 1.0  # per-task cost's coefficient of variation under the default (sizes the canaries)


PIPELINES = {
    # cost_spread: measured on the default arms of 2026-12-06 (27,046 triage tasks: 4.7; 2,348 rag tasks: 0.68).
    "triage": Workload("tracetune.demo.triage:ticket_triage", "ticket_triage", "step", 20.0, "classify",
                       mean_factor=1.5, cost_spread=4.7),
    "rag": Workload("tracetune.demo.rag:rag_answering", "rag_answering", "daily_bursts", 2.0, "rerank", 300.0,
                    cost_spread=0.68),
}
TRIAGE = PIPELINES["triage"]
AFTER_SECONDS = 600  # "within 10 minutes": cost per 1k from here on
ROW_KEYS = ("arm", "cost_per_1k", "p95_ms", "p99_ms", "slo_windows", "quality", "changes", "cost_by_step", "requests")

DEFAULT_RATE = 20.0  # requests/s before the step, 40 after: the demo's load, as bench/tuner.py simulates it
DUPLICATE_RATIO = 0.2
# The loop acting within a short run: look every 15 s at the last minute, a minute apart, on >= 100 requests.
TUNER_LOOP = {"tuner_interval_seconds": 15, "tuner_window_seconds": 60, "tuner_cooldown_seconds": 60,
              "tuner_min_requests": 100}
# A window must hold enough tasks for its p95 to say whether the target is missed: at a low rate it is widened
# until it holds this many at the load's mean rate (rag at 2/s: 300 s, the loop's default and the simulation's;
# its 60 s held about 120 tasks, whose p95 read under the target while a quarter of the minutes missed it).
WINDOW_TASKS = 600
START_ATTEMPTS = 3  # a stack whose free port another program took before it bound it starts again on new ports
LOOP_OFF = {"tuner_interval_seconds": 0}  # 0: `tracetune tuner` starts no loop
# A canary gets what a run this short needs for its sequential test to finish (`canary.limits_for`): half the
# tasks, time enough to show a 30% cost difference at the workload's spread of per-task cost (at least a
# quarter of the run, at most a third), and a minimum of tasks per arm it reaches well within that time. The
# loop's defaults (20%, 200 tasks, 30 minutes) assume hours; a sixth of a 15-minute run gave a canary a few
# hundred tasks, far from the thousands a saving carried by a tenth of the tasks takes to show.
CANARY_MIN_REQUESTS_FLOOR = 30
AIMD_KNOB = "batch_max_size"
AIMD_PERIOD_SECONDS = 30
AIMD_MIN_REQUESTS = 20  # fewer requests in a period: hold
# SLO windows: one minute each, after a warm-up of 5 minutes, or of 5/30 of the run when that is shorter.
WINDOW_SECONDS = 60
WARMUP_SECONDS, WARMUP_SHARE = 300.0, 5 / 30
FLUSH_TIMEOUT_SECONDS, FLUSH_QUIET_SECONDS = 90.0, 3.0

ROOTS_SQL = """
SELECT count() FROM otel_traces
WHERE ParentSpanId = '' AND SpanAttributes['tracetune.step'] = ''
  AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
"""

# End-to-end p95 per minute window from `from_ms` (root spans by start time; the same exact quantile as
# analyzer.latency's raw source).
WINDOWS_SQL = """
SELECT intDiv(toUnixTimestamp64Milli(Timestamp) - {from_ms:Int64}, {window_ms:Int64}) AS window,
       count() AS requests, quantileExactInclusive(0.95)(Duration) / 1e6 AS p95_ms
FROM otel_traces
WHERE ParentSpanId = '' AND SpanAttributes['tracetune.step'] = ''
  AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
  AND toUnixTimestamp64Milli(Timestamp) >= {from_ms:Int64} AND toUnixTimestamp64Milli(Timestamp) < {to_ms:Int64}
GROUP BY window
ORDER BY window
"""

# Labelled requests (the load generator's ground truth) whose final answer (the root span's
# `tracetune.outcome`) is in the store, and how many of those answers are right.
QUALITY_SQL = """
SELECT count() AS labelled, countIf(r.answer = g.truth) AS correct
FROM (
    SELECT trace_id, any(label) AS truth FROM tracetune_ground_truth
    WHERE pipeline = {pipeline:String} AND label != '' AND trace_id != ''
    GROUP BY trace_id
) AS g
INNER JOIN (
    SELECT TraceId AS trace_id, any(SpanAttributes['tracetune.outcome']) AS answer FROM otel_traces
    WHERE ParentSpanId = '' AND SpanAttributes['tracetune.pipeline'] = {pipeline:String}
      AND SpanAttributes['tracetune.outcome'] != ''
    GROUP BY trace_id
) AS r ON r.trace_id = g.trace_id
"""

VERSIONS_SQL = "SELECT count() FROM tracetune_config_versions WHERE pipeline = {pipeline:String}"

# Remote calls that failed to an answer (a timeout, 429s until the deadline): the local answer stood. A call cut by
# its timeout carries no tokens, so the store prices it at nothing though a provider bills it (docs/cost.md).
FAILED_SQL = """
SELECT countIf(SpanAttributes['tracetune.escalation'] = 'failed'),
       countIf(SpanAttributes['tracetune.escalation'] = 'failed'
               AND SpanAttributes['error.type'] = 'httpx.ReadTimeout'),
       countIf(SpanAttributes['tracetune.escalation'] != '')
FROM otel_traces WHERE SpanAttributes['tracetune.pipeline'] = {pipeline:String}
"""

# How the loop's canaries ended (the newest state of each tried version).
CANARIES_SQL = """
SELECT latest, count() FROM (
    SELECT version, argMax(status, (changed_at, seq)) AS latest FROM tracetune_canaries
    WHERE pipeline = {pipeline:String}
    GROUP BY version
)
GROUP BY latest
"""


class BenchError(RuntimeError):
    """The benchmark cannot run or finish an arm; the message is one line saying why."""


# ---- the arms -------------------------------------------------------------------------------------

def run_real(arms: dict[str, dict | None], *, minutes: float, seed: int, progress=None,
             rate: float | None = None, keep: bool = False, pipeline: str = "triage",
             parallel: bool = False) -> list[dict]:
    """One measured row per arm, in order: ROW_KEYS, then warmup_s and windows (what slo_windows covers),
    error_rate, escalations_failed of escalations (remote calls that failed to an answer: priced at nothing,
    whatever a provider bills) and escalations_cut of those (sent and cut by their timeout: a provider bills
    them), canaries (how the loop's canaries ended), settings (the arm's
    overrides), seconds (wall time of the arm) and load (the load generator's counts). `changes` counts a pinned
    arm's pin.

    `arms` maps a name to None (default, aimd or tuner) or to a config (step -> knob -> value) pinned for
    the whole run. `progress` is a rich Progress; each arm adds a task counting elapsed minutes.
    `keep` keeps each arm's temporary home (logs, data) instead of removing it. `pipeline` names one of
    PIPELINES; `rate` replaces its base rate. `parallel` runs the arms at once, each in its own stack.
    """
    plans = _check_arms(arms)
    if pipeline not in PIPELINES:
        raise BenchError(f"pipeline {pipeline!r} is not one of {', '.join(PIPELINES)}")
    workload = PIPELINES[pipeline]
    rate = workload.rate if rate is None else rate
    if not minutes > 0:
        raise BenchError(f"minutes must be above 0, got {minutes}")
    if not rate > 0:
        raise BenchError(f"rate must be above 0 requests/s, got {rate}")
    models = _models_dir()

    def arm(name: str, pinned: dict | None) -> dict:
        return _run_arm(name, pinned, workload, minutes=minutes, seed=seed, rate=rate, models=models,
                        progress=progress, keep=keep)

    if not parallel:
        return [arm(name, pinned) for name, pinned in plans]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(plans)) as pool:
        futures = [pool.submit(arm, name, pinned) for name, pinned in plans]
        return [future.result() for future in futures]


def _check_arms(arms: Mapping[str, dict | None]) -> list[tuple[str, dict | None]]:
    if not arms:
        raise BenchError(f"no arm to run; name some of {', '.join(ARMS)}")
    for name, pinned in arms.items():
        if pinned is None and name not in ("default", "aimd", "tuner"):
            raise BenchError(f"arm {name!r} needs a config to pin (step -> knob -> value); "
                             "only default, aimd and tuner run without one")
        if pinned is not None and not (isinstance(pinned, dict) and all(isinstance(v, dict) for v in pinned.values())):
            raise BenchError(f"arm {name!r}: the config to pin must map steps to {{knob: value}}, got {pinned!r}")
    return list(arms.items())


def _models_dir() -> Path:
    """The caller's models folder (`tracetune models build`), built if missing; every arm's home links to it."""
    from tracetune.demo.models import build_models

    try:
        models = settings_mod.load().models_dir.resolve()
    except settings_mod.SettingsError as exc:
        raise BenchError(f"cannot find the models folder: {exc}") from None
    build_models(models, progress=sys.stderr.isatty())
    return models


def _overrides(name: str, pinned: dict | None, duration: float, rate: float, workload: Workload = TRIAGE,
               ) -> dict[str, Any]:
    """The settings an arm runs on beyond the isolated defaults: the loop off, or on and shortened."""
    if name != "tuner" or pinned is not None:
        return dict(LOOP_OFF)
    overrides: dict[str, Any] = dict(TUNER_LOOP)
    window = max(overrides["tuner_window_seconds"], math.ceil(WINDOW_TASKS / (rate * workload.mean_factor)))
    overrides.update({"tuner_window_seconds": window, "tuner_cooldown_seconds": window})
    limits = canary_limits(duration, rate * workload.mean_factor, workload.cost_spread,
                           floor_tasks=CANARY_MIN_REQUESTS_FLOOR)
    overrides.update({"tuner_canary_share": limits["share"], "tuner_canary_max_seconds": limits["max_seconds"],
                      "tuner_canary_min_requests": limits["min_requests"]})
    return overrides


def _run_arm(name: str, pinned: dict | None, workload: Workload, *, minutes: float, seed: int, rate: float,
             models: Path, progress, keep: bool) -> dict:
    started = time.monotonic()
    commit = _commit()  # what this arm runs, before anything can change under it
    home = Path(tempfile.mkdtemp(prefix=f"tracetune-bench-{workload.name}-{name}-"))
    (home / "models").symlink_to(models, target_is_directory=True)
    overrides = _overrides(name, pinned, minutes * 60, rate, workload)
    task = progress.add_task(f"{workload.name} {name}", total=minutes) if progress is not None else None
    failed = True
    supervisor = None
    try:
        for attempt in range(START_ATTEMPTS):
            settings = isolated_settings(home, pipelines=workload.target, **overrides)
            supervisor = Supervisor(settings, components(settings, 0.0, with_dashboard=False), echo=log.info)
            try:
                supervisor.start()
                break
            except StartError as exc:
                if "already in use" not in str(exc) or attempt == START_ATTEMPTS - 1:  # the bind's or the check's
                    raise BenchError(f"arm {name}: {str(exc).splitlines()[0]} (logs in {home / 'logs'})") from None
                # A free port taken by another program (an arm beside it) between choosing it and binding it, or
                # found taken by the supervisor's check before starting: new ports, again.
                log.warning("arm %s: %s; starting again on other ports", name, str(exc).splitlines()[-1])
                for part in reversed(supervisor.parts):
                    supervisor.stop_one(part)
        client = store.connect(settings)
        headers = {"Authorization": f"Bearer {token_for(settings)}"}
        with httpx.Client(base_url=f"{settings.tuner_url}/v1/pipelines/{workload.name}", headers=headers,
                          timeout=30) as api:
            spec = _wait_declared(api, workload.name)
            if pinned is not None:
                answer = api.post("/config", json={"steps": pinned, "reason": f"bench {name}: pinned for the run"})
                if answer.status_code != 200:
                    detail = answer.json().get("detail") if answer.headers.get("content-type", "").startswith(
                        "application/json") else None
                    raise BenchError(f"arm {name}: the tuner refused the config to pin ({answer.status_code}): "
                                     f"{detail or answer.text[:200]}")
            duration = minutes * 60
            load_started = time.time()
            report = _drive(settings, name, workload, spec, api, duration, seed, rate, progress, task)
        # Stop what makes spans or config versions, then wait for the collector to write the rest.
        for part in ("tuner", "executor", "analyzer"):
            supervisor.stop_one(next(p for p in supervisor.parts if p.name == part))
        if progress is not None:
            progress.update(task, description=f"{name} (measuring)")
        _wait_flushed(client, workload.name)
        row = _measure(client, name, workload.name, load_started, duration)
        row["pipeline"] = workload.name
        row["commit"] = commit
        row["pinned"] = pinned
        row["settings"] = overrides
        row["seconds"] = round(time.monotonic() - started, 1)
        row["load"] = {k: report[k] for k in ("sent", "ok", "rejected", "failed", "overloaded", "dropped")}
        if report["dropped"]:  # the load's own limit of requests in flight: the machine did not keep up
            log.warning("arm %s: the load generator dropped %d of %d requests (too many in flight: this machine "
                        "did not keep up with the arms run side by side); its latency and SLO windows are no "
                        "evidence of the config", name, report["dropped"], report["sent"])
        failed = False
        return row
    finally:
        for part in reversed(supervisor.parts if supervisor else []):
            stopping = time.monotonic()
            supervisor.stop_one(part)
            log.info("stopped the %s in %.1f s", part.name, time.monotonic() - stopping)
        if supervisor:
            _check_stopped(supervisor)
        if progress is not None:
            progress.update(task, description=name)
        if keep or failed:
            log.warning("arm %s: its home (logs, data) is kept in %s", name, home)
        else:
            shutil.rmtree(home, ignore_errors=True)


def _commit() -> str:
    """The commit the bench runs (with "+changes" when the work tree differs from it), or "" outside git."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+changes" if dirty else "")


def _wait_declared(api: httpx.Client, pipeline: str, timeout: float = 120.0) -> PipelineSpec:
    """The pipeline's declaration, once the executor registered it with the tuner."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = api.get("/spec")
            if answer.status_code == 200:
                return PipelineSpec.from_dict(answer.json())
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"the executor did not register {pipeline} with the tuner within {timeout:.0f}s")
        time.sleep(0.5)


def _drive(settings, name: str, workload: Workload, spec: PipelineSpec, api: httpx.Client, duration: float,
           seed: int, rate: float, progress, task) -> dict:
    """The load for `duration` s; meanwhile the progress bar, and in the aimd arm its controller."""
    plan = LoadPlan(rate=rate, duration=duration, pattern=workload.pattern, duplicate_ratio=DUPLICATE_RATIO,
                    seed=seed, period_seconds=workload.period_seconds)
    done = threading.Event()
    aimd = (_Aimd(store.connect(settings, ensure_schema=False), api, spec, workload.name, workload.aimd_step)
            if name == "aimd" else None)

    def tick() -> None:
        started = last = time.monotonic()
        while not done.wait(1.0):
            if progress is not None:
                progress.update(task, completed=min(duration, time.monotonic() - started) / 60)
            if aimd is not None and time.monotonic() - last >= AIMD_PERIOD_SECONDS:
                last = time.monotonic()
                try:
                    aimd.step()
                except Exception as exc:  # noqa: BLE001 - a missed step is logged; the next one tries again
                    log.warning("aimd step failed: %s", exc)

    ticker = threading.Thread(target=tick, name="bench-ticker", daemon=True)
    ticker.start()
    record = ground_truth_writer(store.connect(settings, ensure_schema=False))
    try:
        report = asyncio.run(run_load(plan, settings.executor_url, workload.name, record=record,
                                      token=settings.secret("executor")))
    finally:
        done.set()
        ticker.join(30)
    if progress is not None:
        progress.update(task, completed=duration / 60)
    return report.summary()


class _Aimd:
    """Clipper's AIMD on one step's batch_max_size, from the last period's p95 of the step against its
    share of the SLO's p95 (the same measurement and step target the tuner's loop uses)."""

    def __init__(self, client, api: httpx.Client, spec: PipelineSpec, pipeline: str, step: str):
        self.client, self.api, self.spec, self.pipeline, self.step_name = client, api, spec, pipeline, step
        self.knob = spec.steps[step][AIMD_KNOB]

    def step(self) -> int | None:
        obs = observe.collect(self.client, self.spec, AIMD_PERIOD_SECONDS)
        target = step_target_ms(analyzer.get_slo(self.client, self.pipeline), obs, self.step_name)
        if obs.requests < AIMD_MIN_REQUESTS or target is None:
            return None
        answer = self.api.get("/config")
        answer.raise_for_status()
        current = int(answer.json()["steps"].get(self.step_name, {}).get(AIMD_KNOB, self.knob.default))
        p95 = obs.step_total(self.step_name).p95_ms
        new = aimd_batch_size(current, p95, target, self.knob)
        if new != current:
            reason = (f"bench aimd: {self.step_name} p95 {p95:.0f} ms against its target {target:.0f} ms over "
                      f"{AIMD_PERIOD_SECONDS} s: {AIMD_KNOB} {current} -> {new}")
            self.api.patch("/config", json={"steps": {self.step_name: {AIMD_KNOB: new}}, "reason": reason}) \
                .raise_for_status()
            log.info(reason)
        return new


def _wait_flushed(client, pipeline: str) -> int:
    """Root spans in the store once their count has not grown for FLUSH_QUIET_SECONDS."""
    deadline = time.monotonic() + FLUSH_TIMEOUT_SECONDS
    count, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = int(client.query(ROOTS_SQL, parameters={"pipeline": pipeline}).result_rows[0][0])
        if now != count:
            count, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= FLUSH_QUIET_SECONDS:
            return count
        time.sleep(0.5)
    log.warning("root spans still arriving after %.0f s; measuring the %d there are", FLUSH_TIMEOUT_SECONDS, count)
    return count


def _check_stopped(supervisor: Supervisor) -> None:
    """Every process the arm started, and anything they started in their process groups, is gone."""
    for part in supervisor.parts:
        if part.proc is None:
            continue
        try:
            os.killpg(part.proc.pid, 0)
        except ProcessLookupError:
            continue
        log.warning("the %s left processes behind (process group %d); killing them", part.name, part.proc.pid)
        try:
            os.killpg(part.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- measuring --------------------------------------------------------------------------------------

def windows(duration: float) -> tuple[float, list[tuple[float, float]]]:
    """(warm-up seconds, [(start, end) of each SLO window in seconds from load start]).

    One-minute windows after the warm-up; a last shorter window counts if it is at least half a minute;
    a run too short for any gets one window over all that follows the warm-up."""
    warmup = min(WARMUP_SECONDS, WARMUP_SHARE * duration)
    spans, start = [], warmup
    while duration - start >= WINDOW_SECONDS / 2:
        spans.append((start, min(duration, start + WINDOW_SECONDS)))
        start += WINDOW_SECONDS
    return warmup, spans or [(warmup, duration)]


def _slo_windows(client, pipeline: str, load_started: float, duration: float,
                 p95_target: float | None) -> tuple[float, int, float | None]:
    warmup, spans = windows(duration)
    first = int((load_started + warmup) * 1000)
    rows = client.query(WINDOWS_SQL, parameters={
        "pipeline": pipeline, "from_ms": first, "to_ms": int((load_started + duration) * 1000),
        "window_ms": WINDOW_SECONDS * 1000}).result_rows
    p95 = {int(window): float(value) for window, requests, value in rows if requests}
    if p95_target is None:
        return warmup, len(spans), None
    # A window with no requests (the executor stopped answering) does not meet the SLO.
    good = sum(1 for i in range(len(spans)) if i in p95 and p95[i] <= p95_target)
    return warmup, len(spans), good / len(spans)


def _cost_since(client, pipeline: str, load_started: float, offset: float) -> float | None:
    """Cost per 1k of the requests from `offset` s after the load started to its end (nothing is sent
    after), or None when the run is shorter."""
    since = int(time.time() - (load_started + offset))
    frame = analyzer.cost_per_1k(client, since, by=("pipeline",), pipeline=pipeline)
    if offset <= 0 or frame.is_empty() or not frame["requests"][0]:
        return None
    return round(float(frame["cost_per_1k"][0] or 0.0), 6)


def _measure(client, name: str, pipeline: str, load_started: float, duration: float) -> dict:
    since = int(time.time() - load_started + 120)  # everything this arm's fresh store holds
    if analyzer.current_prices(client) is None:  # the analyzer publishes them at start; make sure
        analyzer.publish_prices(client, analyzer.load_prices())
    roots = analyzer.latency(client, since, by=("pipeline",), pipeline=pipeline, steps="roots", source="raw")
    if roots.is_empty():
        raise BenchError(f"arm {name}: no request of {pipeline} reached the store; see the collector and executor logs")
    latency = roots.row(0, named=True)
    steps = analyzer.cost_per_1k(client, since, by=("step",), pipeline=pipeline)
    requests = int(latency["requests"])
    cost = float(steps["cost"].sum() or 0.0)
    slo = analyzer.get_slo(client, pipeline)
    warmup, n_windows, share = _slo_windows(client, pipeline, load_started, duration, slo.p95_ms if slo else None)
    labelled, correct = client.query(QUALITY_SQL, parameters={"pipeline": pipeline}).result_rows[0]
    versions = int(client.query(VERSIONS_SQL, parameters={"pipeline": pipeline}).result_rows[0][0])
    failed, cut, escalated = client.query(FAILED_SQL, parameters={"pipeline": pipeline}).result_rows[0]
    try:
        canaries = dict(client.query(CANARIES_SQL, parameters={"pipeline": pipeline}).result_rows)
    except DatabaseError:  # a store without canaries
        canaries = None
    return {
        "arm": name,
        "cost_per_1k": round(1000 * cost / requests, 6),
        "p95_ms": round(float(latency["p95_ms"]), 1),
        "p99_ms": round(float(latency["p99_ms"]), 1),
        "slo_windows": None if share is None else round(share, 3),
        "quality": round(correct / labelled, 4) if labelled else None,
        # Its 95% Wilson lower bound, as the simulation's verdict reads quality: at or above the floor beyond doubt.
        "quality_lower_bound": round(oracles.quality_bound(correct, labelled), 4) if labelled else None,
        "labelled": int(labelled),
        "changes": max(0, versions - 1),
        "cost_by_step": {row["step"]: round(float(row["cost_per_1k"] or 0.0), 6)
                         for row in steps.iter_rows(named=True)},
        "requests": requests,
        "warmup_s": round(warmup, 1),
        "windows": n_windows,
        "error_rate": round(float(latency["error_rate"]), 4),
        "escalations_failed": int(failed),  # of `escalations`: priced at nothing, whatever a provider bills
        "escalations_cut": int(cut),  # of those: sent and cut by the timeout (`httpx.ReadTimeout`), billed
        "escalations": int(escalated),
        "canaries": canaries,
        "p95_ms_by_step": {row["step"]: round(float(row["p95_ms"]), 1) for row in analyzer.step_stats(
            client, since, pipeline, source="raw", end_to_end=False).iter_rows(named=True)},
        "cost_per_1k_last_third": _cost_since(client, pipeline, load_started, duration * 2 / 3),
        "cost_per_1k_after_10min": _cost_since(client, pipeline, load_started, AFTER_SECONDS)
        if duration > AFTER_SECONDS else None,
        "quality_floor": slo.quality_floor if slo else None,
        "p95_target_ms": slo.p95_ms if slo else None,
    }


# ---- one arm from the command line --------------------------------------------------------------------

def _oracle(text: str) -> dict:
    source = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        config = json.loads(source)
    except json.JSONDecodeError as exc:
        raise BenchError(f"--oracle is not valid JSON ({exc}); give {{step: {{knob: value}}}} or @file.json") from None
    return config.get("steps", config) if isinstance(config, dict) else config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="load per arm (default 3)")
    parser.add_argument("--arm", action="append", choices=ARMS, help="arm to run (repeatable; default: default)")
    parser.add_argument("--oracle", default=None, metavar="JSON|@FILE",
                        help='config pinned in the oracle arm, e.g. \'{"classify": {"batch_max_size": 16}}\'')
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pipeline", choices=list(PIPELINES), default="triage",
                        help="the demo pipeline and its load (default triage)")
    parser.add_argument("--rate", type=float, default=None,
                        help="base requests/s (default: the pipeline's, 20 for triage, 2 for rag)")
    parser.add_argument("--parallel", action="store_true", help="run the arms side by side, each its own stack")
    parser.add_argument("--keep", action="store_true", help="keep each arm's temporary home (logs, data)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the bench and the aimd arm do")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        names = args.arm or ["default"]
        if "oracle" in names and args.oracle is None:
            raise BenchError("the oracle arm needs --oracle with the config to pin, e.g. "
                             '--oracle \'{"classify": {"batch_max_size": 16}}\'')
        arms = {name: _oracle(args.oracle) if name == "oracle" else None for name in names}
        columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.1f}/{task.total:g} min"),
                   TimeElapsedColumn()]
        with Progress(*columns, console=Console(stderr=True), disable=not sys.stderr.isatty()) as bar:
            rows = run_real(arms, minutes=args.minutes, seed=args.seed, progress=bar, rate=args.rate, keep=args.keep,
                            pipeline=args.pipeline, parallel=args.parallel)
    except (BenchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; every process the bench started is stopped", file=sys.stderr)
        return 130
    print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
