"""docker-compose.yml, the Dockerfile and deploy/, checked without a Docker engine.

The compose file is validated against the Compose specification's JSON schema (vendored by
check-jsonschema), as written and once interpolated from .env.example with every profile; each
service's command must be a `tracetune` command, each setting it passes a valid Settings value, each
dependency and file it names must exist. Nothing here starts a container: that needs Docker.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from tracetune.base import settings as settings_mod
from tracetune.cli import cli

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
PROFILES = {"cluster", "load"}
CLUSTER_NAME = "tracetune"
# Services running the tracetune image, and the settings holding the ports their healthchecks probe.
HEALTH_PORTS = {"collector": ["collector_port"], "tuner": ["tuner_port"], "executor": ["executor_port"],
                "dashboard": ["dashboard_port"], "standins": ["llm_port", "crm_port"]}
NO_HEALTH_PORT = {"analyzer", "load"}  # no HTTP port of their own
# What the documented loop fills with `openssl rand -hex 24` (docs/deploy.md, .env.example).
SECRETS = ["CLICKHOUSE_PASSWORD", "CLICKHOUSE_READER_PASSWORD", "CLICKHOUSE_CLUSTER_SECRET",
           "TRACETUNE_TUNER_TOKEN", "TRACETUNE_COLLECTOR_TOKEN", "TRACETUNE_EXECUTOR_TOKEN"]

_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


class Unset(LookupError):
    """A `${VAR:?message}` whose variable is missing: compose refuses to start."""


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation (${V}, ${V:-d}, ${V-d}, ${V:?e}, ${V?e}, ${V:+r}, ${V+r}, $$) over a parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        present, filled = name in env, bool(env.get(name))
        if op is None:
            return env.get(name, "")
        if op in ("?", ":?"):
            if not (filled if op == ":?" else present):
                raise Unset(f"{name}: {arg}")
            return env[name]
        if op in ("-", ":-"):
            return env[name] if (filled if op == ":-" else present) else arg
        return arg if (filled if op == ":+" else present) else ""

    return _VAR.sub(one, value)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped)."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value
    return pairs


def filled_env(cluster: bool = False) -> dict[str, str]:
    """.env as the documented `cp .env.example .env` plus generated secrets makes it."""
    env = read_env_file(ENV_EXAMPLE)
    for key in SECRETS:
        env[key] = "0123abcd" * 6
    env["TRACETUNE_ALERT_WEBHOOK_SECRET"] = "whsec_" + "QUJD" * 8
    if cluster:  # the two lines .env.example says to uncomment
        switch = commented_env()
        env.update({key: switch[key] for key in ("COMPOSE_PROFILES", "TRACETUNE_CLICKHOUSE_CLUSTER")})
    return env


def commented_env() -> dict[str, str]:
    """The commented-out KEY=VALUE lines of .env.example (the cluster switch and optional knobs)."""
    return dict(m.groups() for m in re.finditer(r"(?m)^# ?([A-Z][A-Z0-9_]*)=(\S*)$", ENV_EXAMPLE.read_text()))


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def check() -> jsonschema.protocols.Validator:
    """A validator for the Compose specification's schema, as check-jsonschema vendors it."""
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(vendored.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)  # about a second: once per module
    return cls(schema)


def active(model: dict, profiles: set[str]) -> dict[str, dict]:
    """The services compose starts with these profiles on (no profiles: always)."""
    return {name: svc for name, svc in model["services"].items()
            if not svc.get("profiles") or set(svc["profiles"]) & profiles}


def tracetune_services(model: dict) -> dict[str, dict]:
    return {name: svc for name, svc in model["services"].items() if svc.get("image") == "tracetune:local"}


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


MODES = {"single": (filled_env(), set()), "cluster": (filled_env(cluster=True), {"cluster"}),
         "cluster+load": (filled_env(cluster=True), {"cluster", "load"}), "load": (filled_env(), {"load"})}


# ---- the compose file ----------------------------------------------------------------------------

def test_the_vendored_schema_is_strict_enough_to_catch_a_typo(raw, check):
    assert not list(check.iter_errors(raw)), [e.message for e in check.iter_errors(raw)]
    broken = copy.deepcopy(raw)
    broken["services"]["collector"]["helthcheck"] = broken["services"]["collector"].pop("healthcheck")
    assert list(check.iter_errors(broken)), "the schema accepted a misspelt key"


@pytest.mark.parametrize("mode", MODES)
def test_the_interpolated_file_validates_in_every_mode(raw, check, mode):
    env, profiles = MODES[mode]
    model = interpolate(raw, env)
    assert "${" not in json.dumps(model)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in check.iter_errors(model)]
    assert not errors
    assert set(env.get("COMPOSE_PROFILES", "").split(",")) - {""} <= PROFILES
    services = active(model, profiles)
    for name, svc in services.items():
        for profile in svc.get("profiles", []):
            assert profile in PROFILES, f"{name}: unknown profile {profile!r}"
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in model["services"], f"{name} depends on {dep}, which is not a service"
            assert dep != name
            # compose refuses a required dependency whose profile is off
            assert dep in services or spec.get("required") is False, f"{name} needs {dep}, off in {mode}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in model["services"][dep], f"{name} waits for {dep}'s health, it has none"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).is_file(), f"{name}: {source} does not exist ({mode})"
            else:
                assert source in model["volumes"], f"{name}: volume {source} is not declared"


def test_passwords_and_tokens_must_come_from_the_env_file(raw):
    with pytest.raises(Unset, match="CLICKHOUSE_PASSWORD"):
        interpolate(raw, {})
    env = filled_env()
    loops = [re.search(r"for key in (.*?); do", text, re.S)[1].replace("#", "").replace("\\", "").split()
             for text in (ENV_EXAMPLE.read_text(), (ROOT / "docs" / "deploy.md").read_text())]
    assert loops[0] == loops[1] == SECRETS  # the documented generation fills every required secret
    for key in SECRETS:
        assert read_env_file(ENV_EXAMPLE)[key] == "", f"{key} has a value in .env.example"
        with pytest.raises(Unset, match=key):
            interpolate(raw, {**env, key: ""})
    for name, svc in raw["services"].items():
        files = svc.get("env_file")
        for entry in [files] if isinstance(files, str | dict) else files or []:
            path = entry if isinstance(entry, str) else entry["path"]
            # .env is the documented copy of .env.example, made before the first `docker compose up`
            assert path == ".env" and ENV_EXAMPLE.is_file(), f"{name}: env_file {path}"
        assert "container_name" not in svc, f"{name}: a fixed container name stops --scale"
    assert "cp .env.example .env" in (ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("bash", "sed", "openssl")), reason="bash, sed, openssl")
def test_the_documented_commands_make_an_env_file_with_every_secret(tmp_path):
    docs = (ROOT / "docs" / "deploy.md").read_text()
    block = re.search(r"```bash\n(cp \.env\.example \.env.*?\nrm \.env\.bak)\n", docs, re.S)
    assert block, "docs/deploy.md lost the commands that make .env"
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env.example")
    subprocess.run(["bash", "-euc", block[1]], cwd=tmp_path, check=True, capture_output=True, timeout=30)
    made = read_env_file(tmp_path / ".env")
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0
    for key in SECRETS:
        assert re.fullmatch(r"[0-9a-f]{48}", made[key]), key  # no URL escaping needed in TRACETUNE_CLICKHOUSE_URL
    assert made["TRACETUNE_ALERT_WEBHOOK_SECRET"] != filled_env()["TRACETUNE_ALERT_WEBHOOK_SECRET"]
    settings_mod.load(ROOT / "no-such-tracetune.toml", {k: v for k, v in made.items() if k.startswith("TRACETUNE_")})


def test_every_variable_the_compose_file_reads_is_in_the_env_example():
    used = {m["name"] for m in _VAR.finditer(COMPOSE.read_text()) if m["name"]}
    documented = {*read_env_file(ENV_EXAMPLE), *commented_env()}
    assert used - documented == set()
    assert {"COMPOSE_PROFILES", "TRACETUNE_CLICKHOUSE_CLUSTER"} <= set(commented_env())


def test_every_tracetune_service_runs_a_cli_command(raw):
    entrypoint = re.search(r"(?m)^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text())
    assert entrypoint and json.loads(entrypoint[1]) == ["tracetune"]
    runner = CliRunner()
    assert runner.invoke(cli, ["no-such-command", "--help"]).exit_code != 0  # the check can fail
    services = tracetune_services(raw)
    assert {"collector", "tuner", "analyzer", "dashboard", "standins", "executor", "load"} <= set(services)
    for name, svc in raw["services"].items():
        if name not in services:
            assert not str(svc.get("image", "")).startswith("tracetune"), name
            continue
        command = svc["command"]
        args = shlex.split(command) if isinstance(command, str) else list(command)
        if "entrypoint" in svc:
            entry = svc["entrypoint"]
            entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
            assert entry[0] == "tracetune", f"{name}: entrypoint {entry}"
            args = entry[1:] + args
        result = runner.invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, f"{name}: `tracetune {' '.join(args)}` is not a command: {result.output}"
        assert args[0] != "store", "the ClickHouse server replaces the embedded store"


def test_every_setting_passed_to_a_container_is_a_valid_setting(raw):
    known = {f"TRACETUNE_{name.upper()}" for name in settings_mod.Settings.__dataclass_fields__}
    for key in [*read_env_file(ENV_EXAMPLE), *commented_env()]:
        if key.startswith("TRACETUNE_"):
            assert key in known, f".env.example: {key} is not a tracetune setting (containers would stop)"
    for mode, cluster in (("single", False), ("cluster", True)):
        env_file = filled_env(cluster)
        model = interpolate(raw, env_file)
        for name, svc in tracetune_services(model).items():
            env = {**env_file, **environment(svc)}  # environment: wins over env_file:
            loaded = settings_mod.load(ROOT / "no-such-tracetune.toml", env)
            assert loaded.bind_host == "0.0.0.0"
            assert loaded.clickhouse_cluster == (CLUSTER_NAME if cluster else ""), (name, mode)
            assert urlsplit(loaded.clickhouse_url).hostname == "clickhouse"
            assert loaded.tuner_token and loaded.collector_token
            for url, port in ((loaded.collector_url, loaded.collector_port), (loaded.tuner_url, loaded.tuner_port),
                              (loaded.llm_base_url, loaded.llm_port), (loaded.crm_base_url, loaded.crm_port),
                              (loaded.executor_url, loaded.executor_port)):
                parts = urlsplit(url)
                assert parts.hostname in model["services"] and parts.port == port, (name, url)
    dashboard = environment(interpolate(raw, filled_env())["services"]["dashboard"])
    assert urlsplit(dashboard["TRACETUNE_CLICKHOUSE_URL"]).username == "reader"


def test_healthchecks_probe_each_service_on_its_own_port(raw):
    defaults = settings_mod.Settings()
    services = tracetune_services(raw)
    for name, svc in services.items():
        if name in NO_HEALTH_PORT:
            assert "healthcheck" not in svc, name
            continue
        test = " ".join(svc["healthcheck"]["test"])
        assert "http://127.0.0.1:" in test and "/health" in test, name
        for field in HEALTH_PORTS[name]:
            assert str(getattr(defaults, field)) in test, f"{name}: its healthcheck misses {field}"
    assert "/ping" in " ".join(raw["services"]["clickhouse"]["healthcheck"]["test"])
    assert "ports" not in raw["services"]["executor"], "a host port on the executor stops --scale"


# ---- Dockerfile and deploy/ ----------------------------------------------------------------------

def test_the_dockerfile_builds_the_wheel_and_installs_what_make_install_does():
    text = DOCKERFILE.read_text()
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copied = []
    for line in re.findall(r"(?m)^COPY\s+(.+)$", text):
        parts = line.split()
        if any(p.startswith("--from") for p in parts):
            continue
        for source in [p for p in parts if not p.startswith("--")][:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"
            copied.append(source.rstrip("/"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(pyproject["tool"]["setuptools"]["package-dir"].values()) <= set(copied)
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= set(copied)
    stages = re.findall(r"(?m)^FROM\s+(\S+)", text)
    assert stages[-1] == "python:3.11-slim" and len(stages) >= 2
    make_extra = re.search(r"--no-deps '([^']+)'", (ROOT / "Makefile").read_text())
    assert make_extra and f"pip install --no-deps '{make_extra[1]}'" in text
    runtime = text.split(stages[-1])[-1]
    user = re.search(r"(?m)^USER\s+(\S+)", runtime)
    assert user and user[1] not in ("root", "0")
    assert runtime.index("USER") < runtime.index("RUN tracetune models build")  # models owned by the user
    assert ".env" in ignored
    # ARG and ENV values are in the environment of `RUN tracetune ...`: a TRACETUNE_ name must be a setting
    known = {f"TRACETUNE_{name.upper()}" for name in settings_mod.Settings.__dataclass_fields__}
    for name in re.findall(r"(?m)^(?:ARG|ENV)\s+(.*)$", text):
        for key in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", name):
            assert not key.startswith("TRACETUNE_") or key in known, f"Dockerfile: {key} is not a setting"


def test_the_clickhouse_configuration_parses_and_matches_the_compose_file(raw):
    files = sorted((ROOT / "deploy").rglob("*.xml"))
    assert files
    for path in files:
        assert ET.parse(path).getroot().tag == "clickhouse", path
    cluster = ET.parse(ROOT / "deploy" / "clickhouse" / "topology-cluster.xml").getroot()
    remote = cluster.find("remote_servers")
    assert [c.tag for c in remote] == [CLUSTER_NAME] == [commented_env()["TRACETUNE_CLICKHOUSE_CLUSTER"]]
    shards = remote.find(CLUSTER_NAME).findall("shard")
    hosts = [[r.findtext("host") for r in s.findall("replica")] for s in shards]
    assert [len(s) for s in hosts] == [2, 2]
    services = raw["services"]
    for shard, replicas in enumerate(hosts, start=1):
        for host in replicas:
            env = environment(services[host])
            assert services[host]["hostname"] == host == env["CLICKHOUSE_REPLICA"]
            assert env["CLICKHOUSE_SHARD"] == f"{shard:02d}"
    assert {m.get("from_env") for m in cluster.find("macros")} == {"CLICKHOUSE_SHARD", "CLICKHOUSE_REPLICA"}
    keeper = cluster.find("zookeeper/node/host").text
    assert services[keeper]["profiles"] == ["cluster"]
    raft = ET.parse(ROOT / "deploy" / "clickhouse" / "keeper.xml").getroot()
    assert raft.findtext("keeper_server/raft_configuration/server/hostname") == keeper
    assert "ruok" in raft.findtext("keeper_server/four_letter_word_white_list")
    reader = ET.parse(ROOT / "deploy" / "clickhouse" / "users.d" / "reader.xml").getroot()
    assert reader.find("users/reader/password").get("from_env") in environment(services["clickhouse"])


def test_the_yaml_in_docs_deploy_parses():
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        yaml.safe_load(block)
    exporter = next(yaml.safe_load(b) for b in blocks if "clickhouse" in (yaml.safe_load(b) or {}).get("exporters", {}))
    config = exporter["exporters"]["clickhouse"]
    assert config["create_schema"] is False and config["traces_table_name"] == "otel_traces"
