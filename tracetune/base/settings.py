"""One validated Settings object for every tracetune process.

Values come from defaults, then `tracetune.toml` (flat keys or one table per component:
`[store] port = 8123` is `store_port`), then `TRACETUNE_<FIELD>` environment variables.
Bad values stop the process at start with one line naming the field and how to fix it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
import secrets
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "TRACETUNE_"
CONFIG_FILE = "tracetune.toml"


class SettingsError(ValueError):
    """A setting has a bad value; the message names the field and the fix."""


@dataclass(frozen=True)
class Settings:
    """Every knob of every tracetune process, validated once at start (see `load` and `validate`).

    Frozen: a process reads its settings once; children get the same values through `as_env()`.
    Secrets left empty are generated once into files of mode 0600 in `home`.
    """

    # Where data lives and which ClickHouse to use.
    home: Path = Path(".tracetune")
    clickhouse_url: str = ""  # empty: the embedded store (chDB) at store_host:store_port
    database: str = "tracetune"
    # A ClickHouse cluster's name (from the server's remote_servers): the schema becomes Replicated local
    # tables plus Distributed tables ON CLUSTER (docs/deploy.md). Empty: one server (or the embedded store).
    clickhouse_cluster: str = ""
    bind_host: str = "127.0.0.1"

    store_port: int = 8123
    collector_port: int = 4318
    collector_grpc_port: int = 4317
    tuner_port: int = 8700
    executor_port: int = 9464
    dashboard_port: int = 8501
    llm_port: int = 8808
    crm_port: int = 8809

    # Collector batching and backpressure.
    collector_batch_rows: int = 100_000
    collector_flush_seconds: float = 1.0
    collector_max_queue_rows: int = 0  # spans waiting for ClickHouse; 0: only collector_wal_max_bytes bounds them
    collector_max_body_bytes: int = 16 * 1024 * 1024
    collector_body_timeout_seconds: float = 30.0  # a request body slower than this gets 408
    # Convert batches to Arrow in a child process (collector/converter.py), so receiving and converting use
    # two cores instead of taking turns on the GIL; off: in the collector's own process.
    collector_convert_process: bool = True
    # Collector write-ahead log (<home>/wal): how much may wait for ClickHouse (past it: 503), segment size
    # (a segment's space comes back once its records are in ClickHouse), and how long SIGTERM may take.
    collector_wal_max_bytes: int = 512 * 1024 * 1024
    collector_wal_segment_bytes: int = 8 * 1024 * 1024
    collector_stop_seconds: float = 10.0

    # Executor: the pipelines it runs, as import strings package.module:attribute, comma-separated
    # (a list in tracetune.toml). The attribute is a Pipeline, or a function returning one (given
    # the Settings if it takes an argument).
    pipelines: str = "tracetune.demo.triage:ticket_triage"
    executor_config_poll_seconds: float = 5.0
    load_rate: float = 20.0  # requests per second of the demo load
    executor_max_in_flight: int = 256  # tasks past this get 503 + Retry-After

    # Remote services the pipeline calls. Empty URLs mean the bundled stand-ins on llm_port / crm_port.
    llm_url: str = ""  # any OpenAI-compatible base URL, e.g. https://api.example.com/v1
    llm_model: str = "standin-small"  # the model pipelines call (in the demo: the cheap tier)
    llm_large_model: str = "standin-large"  # the demo's pricier, more accurate tier, weighed against llm_model
    llm_api_key: str = ""
    crm_url: str = ""
    # Where other processes reach the collector, the tuner, the dashboard and the executor when they do not run on this
    # host (e.g. http://tuner:8700 in docker-compose). Empty: http://<bind_host>:<port>.
    collector_endpoint: str = ""
    tuner_endpoint: str = ""
    dashboard_endpoint: str = ""
    executor_endpoint: str = ""

    # Analyzer: prices file (empty: the bundled prices.toml) and how often drift and SLO state refresh.
    prices_file: str = ""
    analyzer_interval_seconds: float = 30.0
    # Alert notifications, grouped by alertname and pipeline with Alertmanager's timers: the wait before a
    # new group's first notification, between notifications of a changed group, and before repeating one.
    alert_group_wait_seconds: float = 30.0
    alert_group_interval_seconds: float = 300.0
    alert_repeat_interval_seconds: float = 14_400.0
    # Several analyzer or tuner replicas over one store: one holds a lease in ClickHouse and works, the
    # others stand by and take over once it has not been renewed for `lease_seconds`.
    lease_seconds: float = 30.0

    # The embedded store's users: `default` (reads and writes) and `reader` (read-only, for the dashboard
    # and CLI). Empty: a password generated once into <home>/store.password / store_reader.password (0600).
    store_password: str = ""
    store_reader_password: str = ""
    # The store confines its process with Linux Landlock (docs/store.md); where the kernel lacks it, it
    # logs that it runs unconfined, or refuses to start when this is true.
    store_require_sandbox: bool = False

    # Tuner write calls need this bearer token (reads are open on loopback).
    tuner_token: str = ""
    # The tuning loop inside `tracetune tuner`: how often it looks (0: never), what one look covers, how
    # long after a change it waits, how many requests a decision needs, how stale a cached answer may be.
    tuner_interval_seconds: float = 60.0
    tuner_window_seconds: int = 300
    # Labelled answers are pooled over this longer window for the cascade's models (a route's and a tier's
    # answer at a given confidence do not depend on the config in force); everything else is the last window's.
    tuner_label_window_seconds: int = 3600
    tuner_cooldown_seconds: float = 300.0
    tuner_min_requests: int = 200
    cache_staleness_limit_seconds: float = 3600.0
    # A change is tried on this share of tasks first (0: straight to every task), judged once each arm
    # has `tuner_canary_min_requests` tasks, and rolled back if it has not by `tuner_canary_max_seconds`.
    tuner_canary_share: float = 0.2
    tuner_canary_min_requests: int = 200
    tuner_canary_max_seconds: float = 1800.0
    # A tuner proposal waiting for an operator (approval modes, docs/tuner.md) expires after this.
    tuner_approval_expiry_seconds: float = 3600.0
    # Shadow trials (docs/tuner.md): a plan moving a quality-affecting knob (route weights, a cascade
    # threshold) first runs on this share of tasks beside the config in force, its answers recorded and
    # never returned (0: no shadow, straight to the canary); judged on `tuner_shadow_min_samples` shadowed
    # tasks, rejected past `tuner_shadow_max_seconds`; its own runs cost at most this many USD per hour.
    tuner_shadow_share: float = 0.0
    tuner_shadow_min_samples: int = 200
    tuner_shadow_max_seconds: float = 1800.0
    tuner_shadow_cost_cap_usd_per_hour: float = 1.0
    # Spans sent to the collector (OTLP/HTTP and gRPC) need this bearer token.
    collector_token: str = ""

    # Alert delivery (docs/alerts.md): a generic webhook (Alertmanager v4 JSON), a Slack incoming webhook,
    # PagerDuty Events API v2; each is off while its URL / routing key is empty. Every request is signed
    # (Standard Webhooks) with `alert_webhook_secret` (whsec_...); empty: generated once into
    # <home>/alert_webhook.secret (0600).
    alert_webhook_url: str = ""
    alert_webhook_secret: str = ""
    alert_slack_url: str = ""
    alert_pagerduty_routing_key: str = ""
    alert_pagerduty_url: str = "https://events.pagerduty.com/v2/enqueue"
    # Where on-call reads docs/runbooks.md, e.g. https://git.example.com/ops/tracetune/blob/main/ : every alert's
    # `runbook_url` annotation becomes a link under it. Empty: the annotation is the path in the repository.
    alert_runbook_base_url: str = ""

    # HTTP surfaces (tuner API, executor task API and metrics, collector, dashboard): the Host header must name
    # the bound address (any, when bound to 0.0.0.0), a name in a *_endpoint setting, or one listed here
    # (comma-separated; "*": any), so a web page cannot reach them through a name it re-bound to this host.
    allowed_hosts: str = ""
    # Body limits of the JSON APIs (bigger bodies get 413); the collector's is collector_max_body_bytes.
    tuner_max_body_bytes: int = 1024 * 1024
    executor_max_body_bytes: int = 1024 * 1024
    # Executor task calls need this bearer token; empty: generated once into <home>/executor.token (0600).
    executor_token: str = ""

    _origin: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived values -------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def embedded(self) -> bool:
        return not self.clickhouse_url

    @property
    def store_url(self) -> str:
        return f"http://{self.bind_host}:{self.store_port}"

    @property
    def collector_url(self) -> str:
        return self.collector_endpoint.rstrip("/") or f"http://{self.bind_host}:{self.collector_port}"

    @property
    def tuner_url(self) -> str:
        return self.tuner_endpoint.rstrip("/") or f"http://{self.bind_host}:{self.tuner_port}"

    @property
    def dashboard_url(self) -> str:
        return self.dashboard_endpoint.rstrip("/") or f"http://{self.bind_host}:{self.dashboard_port}"

    @property
    def llm_base_url(self) -> str:
        return self.llm_url or f"http://{self.bind_host}:{self.llm_port}/v1"

    @property
    def crm_base_url(self) -> str:
        return self.crm_url or f"http://{self.bind_host}:{self.crm_port}"

    @property
    def executor_url(self) -> str:
        return self.executor_endpoint.rstrip("/") or f"http://{self.bind_host}:{self.executor_port}"

    @property
    def executor_metrics_url(self) -> str:
        return f"{self.executor_url}/metrics"

    @property
    def pipeline_targets(self) -> list[str]:
        """The `pipelines` setting as a list of import strings."""
        return [p.strip() for p in self.pipelines.split(",") if p.strip()]

    @property
    def host_names(self) -> list[str]:
        """Names the HTTP surfaces answer to besides their bind address: `allowed_hosts` and the *_endpoint hosts."""
        names = [name.strip() for name in self.allowed_hosts.split(",") if name.strip()]
        for endpoint in (self.collector_endpoint, self.tuner_endpoint, self.dashboard_endpoint, self.executor_endpoint):
            if endpoint and urlsplit(endpoint).hostname:
                names.append(urlsplit(endpoint).hostname or "")
        return names

    def secret(self, name: str) -> str:
        """The bearer token `<name>_token`, else one generated once into <home>/<name>.token (mode 0600)."""
        return getattr(self, f"{name}_token") or _secret_file(self.home / f"{name}.token")

    def alert_secret(self) -> str:
        """The alert signing secret `alert_webhook_secret`, else one generated once into <home>/alert_webhook.secret."""
        return self.alert_webhook_secret or _secret_file(self.home / "alert_webhook.secret", _new_webhook_secret)

    def store_credentials(self, readonly: bool = False) -> tuple[str, str]:
        """(user, password) for the embedded store: `reader` for read-only work, else `default`."""
        if readonly:
            return "reader", self.store_reader_password or _secret_file(self.store_password_file(True))
        return "default", self.store_password or _secret_file(self.store_password_file(False))

    def store_password_file(self, readonly: bool = False) -> Path:
        """Where a generated store password lives (used unless the password setting is given)."""
        return self.home / ("store_reader.password" if readonly else "store.password")

    def clickhouse_target(self, readonly: bool = False) -> dict[str, Any]:
        """Connection arguments for clickhouse-connect (embedded store or TRACETUNE_CLICKHOUSE_URL).

        `readonly` picks the embedded store's read-only user; a URL's own user serves both.
        """
        if self.embedded:
            username, password = self.store_credentials(readonly)
            return {"host": self.bind_host, "port": self.store_port, "database": self.database,
                    "username": username, "password": password, "secure": False}
        parts = urlsplit(self.clickhouse_url)
        database = parts.path.strip("/") or self.database
        return {
            "host": parts.hostname,
            "port": parts.port or (8443 if parts.scheme == "https" else 8123),
            "database": database,
            "username": parts.username or "default",
            "password": parts.password or "",
            "secure": parts.scheme == "https",
        }

    def as_env(self) -> dict[str, str]:
        """The environment that hands these exact settings to a child process."""
        env = {}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            env[ENV_PREFIX + f.name.upper()] = str(getattr(self, f.name))
        return env

    def origin(self, name: str) -> str:
        """Where setting `name` came from: a file, an environment variable, "command line", the running stack
        (STACK_ORIGIN ...) or "default"."""
        return self._origin.get(name, "default")

    def replace(self, **changes: Any) -> Settings:
        return validate(dataclasses.replace(self, **changes))


STACK_ORIGIN = "the running stack"
"""How a setting read from a running stack's record names its origin: "the running stack pid N in FOLDER (...)"."""


def _from_running_stack(values: dict[str, Any], origin: dict[str, str], known: dict[str, Any],
                        environ: dict[str, str]) -> None:
    from tracetune.base import stacks

    home = values.get("home")
    try:
        stack = stacks.find(Path(home) if home is not None else None, environ)
    except stacks.SeveralStacks as exc:
        raise SettingsError(str(exc)) from None
    if stack is None:
        return
    said = f"{STACK_ORIGIN} {stack.describe()}"
    for name, raw in stack.settings.items():
        if name in known and name not in values:
            values[name] = _convert(name, known[name].type, raw, said)
            origin[name] = said


def _new_webhook_secret() -> str:
    """A Standard Webhooks signing secret: whsec_ and the base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def _secret_file(path: Path, make: Callable[[], str] = lambda: secrets.token_urlsafe(24)) -> str:
    """The secret in `path`, generated on first use: written whole to a 0600 file, then linked into place.

    Linking makes the file appear complete or not at all, so two processes starting at once agree
    on one secret, and it is never readable by others, not even for an instant.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(make())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race; use its secret
        finally:
            os.unlink(tmp)
    mode = path.stat().st_mode
    if mode & 0o077:
        raise SettingsError(f"{path} is readable by other users (mode {mode & 0o777:o}); run: chmod 600 {path}")
    return path.read_text().strip()


_IMPORT_STRING = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_PORT_FIELDS = [f.name for f in fields(Settings) if f.name.endswith("_port")]
_POSITIVE_FIELDS = ["tuner_window_seconds", "tuner_label_window_seconds", "tuner_min_requests",
                    "cache_staleness_limit_seconds",
                    "tuner_canary_min_requests", "tuner_canary_max_seconds", "tuner_approval_expiry_seconds",
                    "tuner_shadow_min_samples", "tuner_shadow_max_seconds",
                    "analyzer_interval_seconds", "lease_seconds", "executor_max_in_flight", "collector_batch_rows",
                    "collector_flush_seconds", "collector_max_body_bytes", "collector_wal_max_bytes",
                    "collector_wal_segment_bytes", "collector_stop_seconds", "collector_body_timeout_seconds",
                    "tuner_max_body_bytes", "executor_max_body_bytes",
                    "executor_config_poll_seconds", "alert_group_interval_seconds", "alert_repeat_interval_seconds"]


def _convert(name: str, kind: Any, raw: Any, origin: str) -> Any:
    kind_name = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind_name == "int":
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind_name == "float":
            return float(raw)
        if kind_name == "bool":
            return _boolean(raw)
        if kind_name == "Path":
            return Path(str(raw))
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return ",".join(raw)  # a TOML list of strings, e.g. pipelines = ["a.b:c", "d.e:f"]
        return str(raw)
    except (TypeError, ValueError):
        raise SettingsError(
            f"{name} = {raw!r} (from {origin}) is not a valid {kind_name}; "
            f"set {ENV_PREFIX}{name.upper()} to a {kind_name}"
        ) from None


_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _boolean(raw: Any) -> bool:
    """A TOML boolean, or true/false, 1/0, yes/no, on/off in any case (as_env writes True/False)."""
    if isinstance(raw, bool):
        return raw
    value = _BOOLEANS.get(str(raw).strip().lower())
    if value is None:
        raise ValueError(raw)
    return value


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "_"))
        else:
            flat[name] = value
    return flat


def validate(s: Settings) -> Settings:
    """Check every value once, at start; raise SettingsError naming the first bad field."""
    def where(name: str) -> str:
        return s._origin.get(name, "default")

    for name in _PORT_FIELDS:
        port = getattr(s, name)
        if not 1 <= port <= 65535:
            raise SettingsError(f"{name} = {port} (from {where(name)}) must be a TCP port between 1 and 65535")
    for name in _POSITIVE_FIELDS:
        if getattr(s, name) <= 0:
            raise SettingsError(f"{name} = {getattr(s, name)} (from {where(name)}) must be greater than 0")
    for name in ("tuner_interval_seconds", "tuner_cooldown_seconds", "alert_group_wait_seconds",
                 "collector_max_queue_rows"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{name} = {getattr(s, name)} (from {where(name)}) must be 0 or more")
    if not 0 <= s.tuner_canary_share < 1:
        raise SettingsError(f"tuner_canary_share = {s.tuner_canary_share} (from {where('tuner_canary_share')}) "
                            f"must be at least 0 (no canary) and below 1")
    if not 0 <= s.tuner_shadow_share <= 1:
        raise SettingsError(f"tuner_shadow_share = {s.tuner_shadow_share} (from {where('tuner_shadow_share')}) "
                            f"must be between 0 (no shadow trials) and 1")
    if not s.tuner_shadow_cost_cap_usd_per_hour >= 0:
        raise SettingsError(f"tuner_shadow_cost_cap_usd_per_hour = {s.tuner_shadow_cost_cap_usd_per_hour} (from "
                            f"{where('tuner_shadow_cost_cap_usd_per_hour')}) must be 0 or more")
    if s.load_rate < 0:
        raise SettingsError(f"load_rate = {s.load_rate} (from {where('load_rate')}) must be 0 or more")
    if s.clickhouse_url:
        parts = urlsplit(s.clickhouse_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(
                f"clickhouse_url = {s.clickhouse_url!r} (from {where('clickhouse_url')}) must look like "
                "http://user:pass@host:8123/database"
            )
    for name in ("llm_url", "crm_url", "collector_endpoint", "tuner_endpoint", "dashboard_endpoint",
                 "executor_endpoint", "alert_webhook_url", "alert_slack_url", "alert_pagerduty_url",
                 "alert_runbook_base_url"):
        url = getattr(s, name)
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise SettingsError(f"{name} = {url!r} (from {where(name)}) must be an http(s) URL")
    for name in s.allowed_hosts.split(","):
        if name.strip() and not re.fullmatch(r"\*|[A-Za-z0-9._-]+|\[?[0-9A-Fa-f:.]+\]?", name.strip()):
            raise SettingsError(f"allowed_hosts: {name.strip()!r} (from {where('allowed_hosts')}) is not a host name; "
                                "list names without scheme or port, e.g. tracetune.example.com,10.0.0.5 (or *)")
    if s.alert_webhook_secret:
        _check_webhook_secret(s.alert_webhook_secret, where("alert_webhook_secret"))
    existing = next((p for p in (s.home, *s.home.parents) if p.exists()), None)  # what mkdir would build on
    if existing is not None and not existing.is_dir():
        raise SettingsError(f"home = {str(s.home)!r} (from {where('home')}): {existing} is a file, not a directory; "
                            "point TRACETUNE_HOME at a directory (it is created if missing)")
    if s.clickhouse_cluster and not s.clickhouse_cluster.replace("_", "").replace("-", "").isalnum():
        raise SettingsError(f"clickhouse_cluster = {s.clickhouse_cluster!r} (from {where('clickhouse_cluster')}) "
                            "may hold only letters, digits, _ and -")
    if not s.database.replace("_", "").isalnum():
        raise SettingsError(
            f"database = {s.database!r} (from {where('database')}) may hold only letters, digits and _"
        )
    if not s.pipeline_targets:
        raise SettingsError(f"pipelines (from {where('pipelines')}) names no pipeline; "
                            "set it to import strings like my_package.pipelines:reviews")
    for target in s.pipeline_targets:
        if not _IMPORT_STRING.match(target):
            raise SettingsError(f"pipelines: {target!r} (from {where('pipelines')}) must look like "
                                "package.module:attribute")
    return s


def _check_webhook_secret(secret: str, origin: str) -> None:
    """A Standard Webhooks symmetric secret: `whsec_` + base64 of 24 to 64 random bytes."""
    key = b""
    if secret.startswith("whsec_"):
        try:
            key = base64.b64decode(secret[len("whsec_"):], validate=True)
        except (binascii.Error, ValueError):
            key = b""
    if not 24 <= len(key) <= 64:
        raise SettingsError(
            f"alert_webhook_secret (from {origin}) must be whsec_ followed by the base64 of 24 to 64 random bytes; "
            "leave it empty to have one generated, or make one with: python -c \"import base64, secrets; "
            "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\""
        )


def load(config_file: str | os.PathLike | None = None, environ: dict[str, str] | None = None,
         discover: bool = False, **overrides: Any) -> Settings:
    """Build Settings from defaults, the TOML file, the environment and explicit overrides.

    discover: settings none of those gave come from the running stack's record (base/stacks.py): the one whose
    home is the given home, else this folder's, else the only one running; several running and none named is a
    SettingsError."""
    environ = dict(os.environ if environ is None else environ)
    known = {f.name: f for f in fields(Settings) if not f.name.startswith("_")}
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}

    path = Path(config_file or environ.get(ENV_PREFIX + "CONFIG", CONFIG_FILE))
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path} is not valid TOML: {exc}") from None
        for name, raw in _flatten(data).items():
            if name not in known:
                raise SettingsError(f"{path}: unknown setting {name!r}; known settings: {', '.join(known)}")
            values[name] = _convert(name, known[name].type, raw, str(path))
            origin[name] = str(path)

    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in known:
            raise SettingsError(f"{key} is not a tracetune setting; known settings: {', '.join(known)}")
        values[name] = _convert(name, known[name].type, raw, key)
        origin[name] = key

    for name, raw in overrides.items():
        if raw is None:
            continue
        values[name] = _convert(name, known[name].type, raw, "command line")
        origin[name] = "command line"

    if discover:
        _from_running_stack(values, origin, known, environ)
    return validate(Settings(**values, _origin=origin))
