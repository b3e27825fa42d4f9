"""Approval modes through the real processes: the `tracetune tuner` process's own loop thread, in `approve`
mode, leaves a proposal waiting and changes no knob over several looks; `tracetune tuner pending|approve`
(CLI processes, through the tuner's API and its token) list it and apply exactly it as a canary; a wrong
token is refused in one line; `tracetune tuner mode` switches to observe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

from tests.conftest import make_settings
from tests.servers import start_process, stop_process, wait_until
from tests.tuner.test_loop import SLO_SHOP, SPEC, _spans
from tracetune import store
from tracetune.analyzer import load_prices, publish_prices, save_slo
from tracetune.tuner.config import PipelineConfig


def _cli(args: list[str], settings) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")} | settings.as_env()
    return subprocess.run([sys.executable, "-m", "tracetune", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def _ready(url: str, proc, log) -> bool:
    if proc.poll() is not None:
        raise AssertionError(log.read_text()[-3000:])
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_tuner_process_waits_for_approval_and_the_cli_approves_exactly_the_proposal(tmp_path):
    settings = make_settings(tmp_path / "home", tuner_interval_seconds=1, tuner_window_seconds=30,
                             tuner_cooldown_seconds=0, tuner_min_requests=100, tuner_canary_share=0.2)
    down = _cli(["tuner", "pending"], settings)  # no tuner yet: one line, exit code 2
    assert down.returncode == 2 and "cannot reach the tuner at" in down.stderr and "Traceback" not in down.stderr
    procs = {}
    try:
        for name, url in (("store", f"{settings.store_url}/ping"), ("tuner", f"{settings.tuner_url}/health")):
            procs[name] = start_process([name], settings, tmp_path / f"{name}.log")
            wait_until(lambda url=url, name=name: _ready(url, procs[name], tmp_path / f"{name}.log"), 90, 0.2, name)
        token = {"Authorization": f"Bearer {settings.secret('tuner')}"}
        declared = httpx.put(f"{settings.tuner_url}/v1/pipelines/shop/spec", headers=token,
                             json=SPEC.to_dict() | {"approval": {"mode": "approve"}})
        assert declared.status_code == 200, declared.text
        client = store.connect(settings, ensure_schema=False)
        save_slo(client, SLO_SHOP, "test")
        publish_prices(client, load_prices())
        _spans(client, 400, distinct=100)  # repeated inputs: the loop proposes score's cache

        def waiting() -> list[dict]:
            out = _cli(["tuner", "pending", "--json"], settings)
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        [proposal] = wait_until(waiting, 60, 0.5, "a proposal waiting")
        assert proposal["changes"]["score"]["cache_enabled"] is True and proposal["status"] == "pending"
        time.sleep(3)  # three more looks of the loop
        config = httpx.get(f"{settings.tuner_url}/v1/pipelines/shop/config").json()
        assert config["version"] == 1 and config["canary"] is None  # no knob changed
        assert [p["number"] for p in waiting()] == [proposal["number"]]  # and no second proposal
        listed = _cli(["tuner", "pending"], settings)
        assert f"#{proposal['number']} shop pending" in listed.stdout and "Turned score's cache on" in listed.stdout

        refused = _cli(["tuner", "approve", str(proposal["number"]), "--reason", "x"],
                       settings.replace(tuner_token="not-the-token"))
        assert refused.returncode == 2 and "the tuner refused (401)" in refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        assert httpx.get(f"{settings.tuner_url}/v1/pipelines/shop/config").json()["canary"] is None

        approved = _cli(["tuner", "approve", str(proposal["number"]), "--reason", "cache is safe", "--by", "alice"],
                        settings)
        assert approved.returncode == 0, approved.stderr
        assert approved.stdout.startswith(f"proposal {proposal['number']} approved: shop has canary version 2")
        config = httpx.get(f"{settings.tuner_url}/v1/pipelines/shop/config").json()
        base = PipelineConfig.from_dict(config)
        assert config["version"] == 1 and config["canary"]["version"] == 2
        assert config["canary"]["steps"] == SPEC.merge(base, proposal["changes"]).steps  # exactly the proposal
        history = httpx.get(f"{settings.tuner_url}/v1/pipelines/shop/decisions").json()
        assert [d["kind"] for d in history[:2]] == ["canary_start", "proposal_approve"]
        assert history[1]["author"] == "alice" and "cache is safe" in history[1]["reason"]
        again = _cli(["tuner", "approve", str(proposal["number"]), "--reason", "again"], settings)
        assert again.returncode == 2 and "is approved by alice" in again.stderr

        mode = _cli(["tuner", "mode", "--pipeline", "shop", "observe", "--reason", "watch only"], settings)
        assert mode.returncode == 0 and mode.stdout.strip() == "shop: observe (from the api)", mode
        bad = _cli(["tuner", "mode", "--pipeline", "shop", "auto", "--knob", "no_such_knob"], settings)
        assert bad.returncode == 2 and "no step declares" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        for proc in reversed(list(procs.values())):
            stop_process(proc)
