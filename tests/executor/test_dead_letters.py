"""Dead letters end to end with real processes: an executor running an effect step against the CRM stand-in
(a real server on 127.0.0.1), the tuner serving /v1/dead-letters, the embedded store, and the `tracetune
dead-letters` CLI. A replayed letter reaches the CRM under its original idempotency key, so however often it
is replayed the CRM stores it once; a replay the CRM still refuses keeps the letter and says why; discards
are audited; calls without the tuner's token change nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.executor.effect_pipeline import ATTEMPTS, NAME
from tests.servers import ThreadServer, start_process, stop_process, wait_until
from tracetune import store
from tracetune.analyzer import dead_letters
from tracetune.base.settings import Settings
from tracetune.demo.standins import create_crm_app

FAIL_FIRST = 2 * ATTEMPTS  # per key: the task's attempts fail, then one replay's, then the CRM takes it
TUNER_TOKEN, EXECUTOR_TOKEN = "tuner-s3cret", "executor-s3cret"


@dataclass
class Stack:
    settings: Settings
    crm: ThreadServer
    tmp: Path

    def task(self, task_id: str, text: str) -> httpx.Response:
        return httpx.post(f"{self.settings.executor_url}/v1/pipelines/{NAME}/tasks", json={"text": text,
                          "task_id": task_id}, headers={"Authorization": f"Bearer {EXECUTOR_TOKEN}"}, timeout=30)

    def api(self, method: str, path: str, token: str | None = TUNER_TOKEN, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, f"{self.settings.tuner_url}{path}", headers=headers, timeout=60, **kwargs)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
        return subprocess.run([sys.executable, "-m", "tracetune", "dead-letters", *args], cwd=self.tmp,
                              env={**env, **self.settings.as_env(), "COLUMNS": "100"}, capture_output=True,
                              text=True, timeout=120)  # tables are read at 100 columns, whatever runs the test

    def followups(self, key: str = "") -> list[dict]:
        params = {"idempotency_key": key} if key else {}
        return httpx.get(f"{self.crm.url}/v1/followups", params=params).json()["data"]

    def crm_requests(self) -> int:
        return httpx.get(f"{self.crm.url}/stats").json()["requests"]

    def letter(self, key: str) -> dead_letters.Letter:
        return dead_letters.find(store.connect(self.settings, ensure_schema=False), key)


def _ready(url: str, proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(log.read_text()[-3000:])
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def stack(db_settings, tmp_path) -> Iterator[Stack]:
    with ThreadServer(create_crm_app(fail_first=FAIL_FIRST, latency_ms=0, retry_after=0)) as crm:
        settings = db_settings.replace(home=tmp_path / "home", crm_url=crm.url, tuner_token=TUNER_TOKEN,
                                       executor_token=EXECUTOR_TOKEN, tuner_interval_seconds=0,
                                       pipelines="tests.executor.effect_pipeline:followups")
        procs = []
        try:
            for name, url in (("tuner", f"{settings.tuner_url}/health"),
                              ("executor", f"{settings.executor_url}/health")):
                log = tmp_path / f"{name}.log"
                procs.append(start_process([name], settings, log))
                wait_until(lambda url=url, proc=procs[-1], log=log: _ready(url, proc, log), 60, 0.2, f"{name} ready")
            yield Stack(settings, crm, tmp_path)
        finally:
            for proc in reversed(procs):
                stop_process(proc)


def test_a_letter_replayed_twice_reaches_the_crm_once_and_a_still_failing_replay_keeps_it(stack):
    failed = stack.task("task-1", "charged twice for one order")
    assert failed.status_code == 502 and "dead-lettered" in failed.json()["error"]
    assert stack.crm_requests() == ATTEMPTS and stack.followups() == []

    listed = stack.cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    key = row["idempotency_key"]
    assert (row["status"], row["pipeline"], row["step"], row["task_id"]) == ("open", NAME, "create_followup", "task-1")
    assert (row["attempts"], row["last_status"]) == (ATTEMPTS, 503) and "temporarily unavailable" in row["error"]

    # The CRM still fails this key's next attempts: the replay says why and the letter stays open.
    still = stack.cli("replay", key[:12])
    assert still.returncode == 1, still.stdout + still.stderr
    assert "still failing, kept" in still.stderr and "HTTP 503" in still.stderr
    assert len(still.stderr.strip().splitlines()) == 2 and "Traceback" not in still.stderr
    letter = stack.letter(key)
    assert letter.status == "open" and [e.action for e in letter.events] == ["replay_failed"]
    assert letter.events[0].attempts == ATTEMPTS and letter.events[0].http_status == 503
    assert stack.followups() == []

    first = stack.cli("replay", key, "--reason", "the CRM is back")
    assert first.returncode == 0, first.stderr
    assert f"{key}: replayed" in first.stdout
    second = stack.api("POST", f"/v1/dead-letters/{key}/replay", json={"author": "bob"})
    assert second.status_code == 200, second.text
    stored = stack.followups(key)
    assert len(stored) == 1 and len(stack.followups()) == 1  # the CRM filed it once, under the original key
    assert stored[0]["data"] == {"ticket": "charged twice for one order"}
    assert second.json()["answer"]["id"] == stored[0]["id"]  # the second replay got the CRM's stored follow-up
    assert httpx.get(f"{stack.crm.url}/stats").json()["replayed"] == 1

    letter = stack.letter(key)
    assert letter.status == "replayed" and letter.replays == 3
    assert [(e.action, e.reason) for e in letter.events][1:] == [("replayed", "the CRM is back"), ("replayed", "")]
    assert letter.events[2].author == "bob"
    assert stack.cli("list", "--json").stdout.strip() == "[]"  # no open letter left
    assert "no open dead letters to replay" in stack.cli("replay", "--all").stdout
    replays = {(m.labels["outcome"]): m.value for family in text_string_to_metric_families(
        httpx.get(stack.settings.executor_metrics_url).text) for m in family.samples
        if m.name == "tracetune_dead_letter_replays_total"}
    assert replays == {"failed": 1.0, "replayed": 2.0}
    letters = [m.value for family in text_string_to_metric_families(httpx.get(stack.settings.executor_metrics_url).text)
               for m in family.samples if m.name == "tracetune_dead_letters_total"]
    assert letters == [1.0]  # replays are never dead-lettered again
    shown = stack.cli("show", key)
    assert shown.returncode == 0 and "replayed by bob" in shown.stdout and '"ticket"' in shown.stdout


def test_discard_is_audited_and_unauthenticated_replay_or_discard_is_refused(stack):
    assert stack.task("task-2", "please call me back").status_code == 502
    [letter] = dead_letters.letters(store.connect(stack.settings, ensure_schema=False))
    key, before = letter.idempotency_key, stack.crm_requests()

    for token in (None, "wrong-token"):
        for action, body in (("replay", {}), ("discard", {"reason": "not mine"})):
            refused = stack.api("POST", f"/v1/dead-letters/{key}/{action}", token=token, json=body)
            assert refused.status_code == 401, (action, token, refused.text)
        assert stack.api("GET", "/v1/dead-letters", token=token).status_code == 401  # bodies are customer data
        direct = httpx.post(f"{stack.settings.executor_url}/v1/pipelines/{NAME}/steps/create_followup/replay",
                            json={"task_id": letter.task_id, "idempotency_key": key, "payload": letter.body},
                            headers={"Authorization": f"Bearer {token}"} if token else {})
        assert direct.status_code == 401, direct.text  # the executor's own replay call needs its token too
    assert stack.crm_requests() == before  # nothing was sent
    assert stack.letter(key).status == "open" and stack.letter(key).events == []

    table = stack.cli("list")
    assert table.returncode == 0 and key[:13] in table.stdout and "create_followup" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 100, table.stdout

    no_reason = stack.api("POST", f"/v1/dead-letters/{key}/discard", json={"author": "carol"})
    assert no_reason.status_code == 422 and "reason" in no_reason.json()["detail"]

    discarded = stack.cli("discard", key, "--reason", "the customer was called back by phone")
    assert discarded.returncode == 0, discarded.stderr
    letter = stack.letter(key)
    assert letter.status == "discarded"
    [event] = letter.events
    assert event.action == "discarded" and event.reason == "the customer was called back by phone"
    assert event.author and event.author != "api"  # the CLI names the user who ran it
    assert stack.api("GET", "/v1/dead-letters?status=discarded").json()[0]["last_author"] == event.author

    again = stack.api("POST", f"/v1/dead-letters/{key}/replay", json={})
    assert again.status_code == 409 and "discarded" in again.json()["detail"]
    assert stack.crm_requests() == before and stack.followups() == []
    unknown = stack.cli("replay", "0000000000")
    assert unknown.returncode == 2 and "no dead letter" in unknown.stderr and "Traceback" not in unknown.stderr
