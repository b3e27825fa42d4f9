"""Boolean settings read from the environment, a TOML file and a parent's as_env() mean what they say."""

from __future__ import annotations

import pytest

from tracetune.base import settings as settings_mod
from tracetune.base.settings import SettingsError


@pytest.mark.parametrize(("raw", "value"), [("false", False), ("False", False), ("0", False), ("off", False),
                                            ("no", False), ("true", True), ("True", True), ("1", True),
                                            (" on ", True), ("YES", True)])
def test_a_boolean_from_the_environment(tmp_path, raw, value):
    loaded = settings_mod.load(config_file=tmp_path / "none.toml",
                               environ={"TRACETUNE_COLLECTOR_CONVERT_PROCESS": raw})
    assert loaded.collector_convert_process is value


def test_a_boolean_survives_the_trip_to_a_child_process(tmp_path):
    """as_env() writes True/False; a child reading them back gets the parent's values, not a non-empty string."""
    for value in (False, True):
        parent = settings_mod.load(config_file=tmp_path / "none.toml", collector_convert_process=value,
                                   store_require_sandbox=value)
        child = settings_mod.load(config_file=tmp_path / "none.toml", environ=parent.as_env())
        assert child.collector_convert_process is value and child.store_require_sandbox is value


def test_a_boolean_from_toml(tmp_path):
    config = tmp_path / "tracetune.toml"
    config.write_text("collector_convert_process = false\n")
    assert settings_mod.load(config_file=config, environ={}).collector_convert_process is False


def test_a_value_that_is_no_boolean_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(SettingsError) as refused:
        settings_mod.load(config_file=tmp_path / "none.toml", environ={"TRACETUNE_COLLECTOR_CONVERT_PROCESS": "maybe"})
    message = str(refused.value)
    assert "collector_convert_process" in message and "maybe" in message and "\n" not in message
