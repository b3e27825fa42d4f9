"""Commands started in a project folder find the running stack by themselves.

`tracetune up` runs in one folder (its ports in that folder's tracetune.toml, its tokens in its home); an executor
started from another folder, with no TRACETUNE_* at all, reaches it: it says which stack it uses, its spans pass
the collector's token check and land in the stack's store, and it makes no home of its own. Several stacks and
none named is one line and exit 2; naming one by its home works; the record goes when the stack stops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.servers import free_port, wait_until
from tracetune import store
from tracetune.base import settings as settings_mod
from tracetune.base import stacks

PIPELINE = """
from tracetune.executor import Pipeline, Step

def {name}(settings):
    return Pipeline("{name}", [Step("shout", lambda task: task.data.update(text=task.data["text"].upper()))])
"""


def _env(runtime: Path, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRACETUNE_")}
    return {**clean, "XDG_RUNTIME_DIR": str(runtime), **extra}


def _tracetune(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracetune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_an_executor_in_another_folder_finds_the_running_stack(tmp_path):
    runtime, stack_dir, project = tmp_path / "runtime", tmp_path / "stack", tmp_path / "project"
    for folder in (runtime, stack_dir, project):
        folder.mkdir()
    ports = {name: free_port() for name in ("store_port", "collector_port", "collector_grpc_port", "tuner_port",
                                            "executor_port", "dashboard_port", "llm_port", "crm_port")}
    (stack_dir / "tracetune.toml").write_text("\n".join(f"{k} = {v}" for k, v in ports.items()) +
                                              '\npipelines = ["stackpipe:stackpipe"]\n'
                                              'llm_url = "http://127.0.0.1:9/v1"\ncrm_url = "http://127.0.0.1:9"\n')
    (stack_dir / "stackpipe.py").write_text(PIPELINE.format(name="stackpipe"))
    (project / "mine.py").write_text(PIPELINE.format(name="mine"))
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen([sys.executable, "-m", "tracetune", "up"], cwd=stack_dir, env=_env(runtime),
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    executor = None
    try:
        stack = wait_until(lambda: stacks.running({"XDG_RUNTIME_DIR": str(runtime)}), 60, message="the record")[0]
        record = stack.path
        assert record.stat().st_mode & 0o777 == 0o600 and record.parent.stat().st_mode & 0o777 == 0o700
        assert stack.home == (stack_dir / ".tracetune").resolve() and stack.pid == up.pid
        settings = settings_mod.load(config_file=stack_dir / "tracetune.toml", environ={},
                                     home=str(stack_dir / ".tracetune"))
        wait_until(lambda: _answers(f"{settings.executor_url}/health"), 120, message="the stack's executor")

        mine_port = free_port()
        executor = subprocess.Popen([sys.executable, "-m", "tracetune", "executor", "--pipeline", "mine:mine"],
                                    cwd=project, env=_env(runtime, TRACETUNE_EXECUTOR_PORT=str(mine_port)),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: _answers(f"http://127.0.0.1:{mine_port}/health") or executor.poll() is not None, 60,
                   message="the project's executor")
        assert executor.poll() is None, executor.communicate()
        token = (stack.home / "executor.token").read_text().strip()  # the stack's token, not a new one
        answer = httpx.post(f"http://127.0.0.1:{mine_port}/v1/pipelines/mine/tasks", json={"text": "hello"},
                            headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert answer.status_code == 200, answer.text
        client = store.connect(settings, readonly=True)
        wait_until(lambda: client.query("SELECT count() FROM otel_traces WHERE SpanName = 'mine'").result_rows[0][0],
                   30, message="the project executor's spans in the stack's store")
        registered = httpx.get(f"{settings.tuner_url}/v1/pipelines/mine/config", timeout=10)
        assert registered.status_code == 200, registered.text  # it registered with the stack's tuner
        assert not (project / ".tracetune").exists()
        executor.send_signal(signal.SIGTERM)
        _, err = executor.communicate(timeout=30)
        said = [line for line in err.splitlines() if line.startswith("tracetune: using")]
        assert said == [f"tracetune: using the running stack pid {up.pid} in {stack_dir} (home {stack.home})"], err

        # Another stack running (a second record of a live process) and none named: one line, exit 2.
        other_home = tmp_path / "other" / ".tracetune"
        other_home.mkdir(parents=True)
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            second = record.parent / f"{sleeper.pid}.json"
            body = json.loads(record.read_text()) | {"pid": sleeper.pid, "started": stacks._started(sleeper.pid),
                                                       "folder": str(other_home.parent),
                                                       "home": str(other_home)}
            second.write_text(json.dumps(body))
            second.chmod(0o600)
            refused = _tracetune(["stats", "--since", "15m"], project, _env(runtime))
            assert refused.returncode == 2, (refused.stdout, refused.stderr)
            lines = [line for line in refused.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and "2 tracetune stacks are running" in lines[0] and "TRACETUNE_HOME" in lines[0]
            assert "Traceback" not in refused.stderr
            named = _tracetune(["stats", "--since", "15m"], project, _env(runtime, TRACETUNE_HOME=str(stack.home)))
            assert named.returncode == 0, named.stderr
            assert "mine" in named.stdout
        finally:
            sleeper.kill()
            sleeper.wait()
        assert not second.exists() or stacks.running({"XDG_RUNTIME_DIR": str(runtime)}) == [stack]
    finally:
        if executor is not None and executor.poll() is None:
            executor.kill()
            executor.wait()
        up.send_signal(signal.SIGINT)
        try:
            up.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        log.close()
    assert not stacks.running({"XDG_RUNTIME_DIR": str(runtime)})
    assert not list((runtime / "tracetune" / "stacks").glob("*.json"))  # removed on stop, not only ignored


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
