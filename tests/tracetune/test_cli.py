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
    from tracetune import settings

    (tmp_path / "tracetune.toml").write_text('pipelines = ["reviews:reviews", "tracetune.demo.triage:ticket_triage"]\n')
    loaded = settings.load(tmp_path / "tracetune.toml", environ={})
    assert loaded.pipeline_targets == ["reviews:reviews", "tracetune.demo.triage:ticket_triage"]
    assert settings.load(environ=loaded.as_env()).pipeline_targets == loaded.pipeline_targets  # handed to children
