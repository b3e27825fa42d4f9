"""Generated passwords and tokens: created 0600, whole, once, and the same for every process."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from tracetune.base import settings as settings_mod
from tracetune.base.settings import SettingsError


def _settings(home: Path, **values):
    return settings_mod.load(config_file=home / "none.toml", environ={}, home=str(home), **values)


def _credentials(home: str) -> tuple[tuple[str, str], tuple[str, str], str]:
    s = _settings(Path(home))
    return s.store_credentials(), s.store_credentials(readonly=True), s.secret("tuner")


def test_passwords_are_generated_once_into_private_files(tmp_path):
    old = os.umask(0)  # even a permissive umask must not make them readable by others
    try:
        writer, reader, token = _credentials(str(tmp_path))
    finally:
        os.umask(old)
    s = _settings(tmp_path)
    assert writer[0] == "default" and reader[0] == "reader" and writer[1] != reader[1]
    for path in (s.store_password_file(), s.store_password_file(readonly=True), tmp_path / "tuner.token"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _credentials(str(tmp_path)) == (writer, reader, token)  # read back, not regenerated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.password", "store_reader.password", "tuner.token"]


def test_processes_starting_at_once_agree_on_one_password(tmp_path):
    with ProcessPoolExecutor(8) as pool:
        seen = set(pool.map(_credentials, [str(tmp_path)] * 32))
    assert len(seen) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_a_password_file_others_can_read_is_refused(tmp_path):
    path = _settings(tmp_path).store_password_file()
    path.write_text("shared\n")
    path.chmod(0o644)
    with pytest.raises(SettingsError, match="chmod 600"):
        _settings(tmp_path).store_credentials()


def test_given_passwords_win_and_write_nothing(tmp_path):
    s = _settings(tmp_path, store_password="given-w", store_reader_password="given-r")
    assert s.store_credentials() == ("default", "given-w")
    assert s.store_credentials(readonly=True) == ("reader", "given-r")
    assert s.clickhouse_target(readonly=True)["username"] == "reader"
    assert not list(tmp_path.iterdir())
    env = {"TRACETUNE_STORE_PASSWORD": "from-env"}
    assert settings_mod.load(config_file=tmp_path / "none.toml", environ=env).store_credentials()[1] == "from-env"


def test_a_server_url_serves_both_reads_and_writes_with_its_own_user(tmp_path):
    s = _settings(tmp_path, clickhouse_url="http://ops:pw@ch.example:8123/db")
    for readonly in (False, True):
        target = s.clickhouse_target(readonly=readonly)
        assert (target["username"], target["password"], target["database"]) == ("ops", "pw", "db")
    assert not list(tmp_path.iterdir())


def test_a_started_stacks_logs_and_data_are_its_owners_alone(tmp_path):
    """What `tracetune up` writes (component logs, the store's data) is not readable by other users,
    even when a log of an earlier run was left world-readable."""
    from tests.conftest import make_settings
    from tracetune.supervisor import Supervisor, components

    settings = make_settings(tmp_path)
    logs = settings.home / "logs"
    logs.mkdir(mode=0o755, parents=True)
    (logs / "store.log").write_text("an older run\n")
    (logs / "store.log").chmod(0o644)
    parts = [part for part in components(settings, 0, with_dashboard=False) if part.name == "store"]
    supervisor = Supervisor(settings, parts, echo=lambda *_: None)
    try:
        supervisor.start()
        written = [logs, *logs.iterdir(), *Path(settings.data_dir).rglob("*"), Path(settings.data_dir)]
        assert (logs / "store.log") in written and "an older run" not in (logs / "store.log").read_text()
        assert len(written) > 5
        wide = [f"{path} {stat.S_IMODE(path.stat().st_mode):o}" for path in written
                if path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077]
        assert wide == []
    finally:
        supervisor.stop()
