"""The records of running stacks: which one a command uses, and what it refuses (tracetune/base/stacks.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tracetune.base import settings as settings_mod
from tracetune.base import stacks
from tracetune.base.settings import SettingsError


@pytest.fixture
def runtime(tmp_path) -> dict[str, str]:
    folder = tmp_path / "runtime"
    folder.mkdir()
    return {"XDG_RUNTIME_DIR": str(folder)}


def _record_for(pid: int, home: Path, runtime: dict[str, str], **settings: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = stacks.directory(runtime) / f"{pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(json.dumps({"pid": pid, "folder": str(home.parent), "home": str(home),
                                "settings": {"home": str(home), **settings}}))
    path.chmod(0o600)
    return path


def test_record_holds_the_resolved_settings_privately_and_load_reads_them(tmp_path, runtime, monkeypatch):
    settings = make_settings(tmp_path / "stack" / ".tracetune", collector_token="")
    settings.home.mkdir(parents=True)  # as `tracetune up` makes it
    monkeypatch.chdir(tmp_path)
    path = stacks.record(settings, runtime)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    found = settings_mod.load(config_file=project / "none.toml", environ=dict(runtime), discover=True)
    assert found.home == settings.home.resolve() and found.collector_port == settings.collector_port
    assert found.store_password == settings.store_password
    assert found.origin("collector_port").startswith(settings_mod.STACK_ORIGIN)
    mine = settings_mod.load(config_file=project / "none.toml", environ={**runtime, "TRACETUNE_TUNER_PORT": "1234"},
                             discover=True)
    assert mine.tuner_port == 1234 and mine.collector_port == settings.collector_port  # explicit wins
    plain = settings_mod.load(config_file=project / "none.toml", environ=dict(runtime))
    assert plain.home == Path(".tracetune") and plain.collector_port == 4318  # only when asked to discover
    stacks.remove(path)
    assert settings_mod.load(config_file=project / "none.toml", environ=dict(runtime), discover=True).home == \
        Path(".tracetune")


def test_dead_and_foreign_records_are_ignored(tmp_path, runtime):
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = _record_for(dead.pid, tmp_path / "a" / ".tracetune", runtime)
    readable = _record_for(os.getpid(), tmp_path / "b" / ".tracetune", runtime)
    readable.chmod(0o644)  # someone else could have written it: never trusted
    assert stacks.running(runtime) == []
    assert not gone.exists()  # a killed stack's record is cleaned up by the next reader


def test_several_stacks_need_a_name_and_a_home_names_one(tmp_path, runtime, monkeypatch):
    sleepers = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        homes = [tmp_path / name / ".tracetune" for name in ("one", "two")]
        for proc, home in zip(sleepers, homes, strict=True):
            _record_for(proc.pid, home, runtime, tuner_port=str(1000 + proc.pid % 1000))
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SettingsError, match="2 tracetune stacks are running .*TRACETUNE_HOME"):
            settings_mod.load(config_file=tmp_path / "none.toml", environ=dict(runtime), discover=True)
        named = settings_mod.load(config_file=tmp_path / "none.toml",
                                  environ={**runtime, "TRACETUNE_HOME": str(homes[1])}, discover=True)
        assert named.tuner_port == 1000 + sleepers[1].pid % 1000
        monkeypatch.chdir(homes[0].parent)  # in a stack's own folder: that stack
        here = settings_mod.load(config_file=tmp_path / "none.toml", environ=dict(runtime), discover=True)
        assert here.tuner_port == 1000 + sleepers[0].pid % 1000
        unknown = settings_mod.load(config_file=tmp_path / "none.toml",
                                    environ={**runtime, "TRACETUNE_HOME": str(tmp_path / "elsewhere")}, discover=True)
        assert unknown.tuner_port == 8700  # a home no stack runs from: the settings as given
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()


def test_a_reused_pid_is_not_the_stack(tmp_path, runtime):
    """A record names its supervisor by pid and start time: another process under the same pid is not it."""
    path = _record_for(os.getpid(), tmp_path / "a" / ".tracetune", runtime)
    body = json.loads(path.read_text())
    path.write_text(json.dumps(body | {"started": stacks._started(os.getpid())}))
    assert [s.pid for s in stacks.running(runtime)] == [os.getpid()]
    path.write_text(json.dumps(body | {"started": "1"}))  # this pid, but a process that started at boot
    assert stacks.running(runtime) == [] and not path.exists()
