"""Fixtures that start real things: the embedded store as its own process, on free ports."""

from __future__ import annotations

import fcntl
import os
import secrets
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, start_process, stop_process, wait_until
from tracetune import store
from tracetune.base import settings as settings_mod
from tracetune.base.settings import Settings

# Commands find running stacks through a per-user folder (tracetune/base/stacks.py): each test process has its own,
# so a stack that another test or the developer runs is never found by a command under test.
os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="tracetune-tests-runtime-")


def _share_one_tls_context() -> None:
    """httpx builds a TLS context for every client, reading certifi's CA bundle (about 20 ms of CPU), and
    every top-level httpx.get/post/request makes a client: thousands of times in this suite, which speaks
    plain HTTP to 127.0.0.1 only. The test processes build the default context once and share it (an
    SSLContext is safe to share); any other `verify` or a client certificate still gets its own."""
    try:
        from httpx._transports import default as transports

        build = transports.create_ssl_context
    except (ImportError, AttributeError):  # an httpx without this private hook: each client builds its own
        return
    shared: dict[bool, object] = {}

    def create_ssl_context(verify=True, cert=None, trust_env=True):
        if verify is not True or cert is not None:
            return build(verify=verify, cert=cert, trust_env=trust_env)
        if trust_env not in shared:
            shared[trust_env] = build(verify=verify, cert=cert, trust_env=trust_env)
        return shared[trust_env]

    transports.create_ssl_context = create_ssl_context


_share_one_tls_context()

# `make test` runs everything; `make test-fast` (-m "not e2e and not slow") leaves out the tests below for
# the edit-test loop. Everything under tests/e2e is marked `e2e` (whole stacks of real processes). `slow`
# marks the modules and tests here, each with why it takes its time; a test can also say
# @pytest.mark.slow itself. Keep the list short: what is left out here runs only in `make test`.
SLOW: dict[str, str] = {
    "tests/tracetune/test_wheel.py": "builds the wheel and installs it into a fresh venv",
    "tests/demo/test_rag.py": "builds the RAG demo's models; real ONNX sessions against a stand-in LLM server",
    "tests/collector/test_otlp_sdk.py": "the OpenTelemetry SDK exporting into a real collector process",
    "tests/collector/test_durability.py": "SIGKILLs a collector mid-write and restarts it",
    "tests/collector/test_crash_states.py": "recovers every crash state of the log protocol",
    "tests/collector/test_edges.py": "damaged log records, a full disk, SIGTERM with the store away (real processes)",
    "tests/dashboard/test_browser.py": "drives the dashboard in Chromium",
    "tests/tuner/test_sim_judging.py": "simulations of the canary judge and the batcher",
    "tests/executor/test_dead_letters.py": "a tuner and an executor process per test, and CLI processes",
    "tests/executor/test_signals.py": "a tuner, a collector and two executor starts, real ONNX variants",
    "tests/analyzer/test_drift.py::test_injected_drift_is_flagged_within_2_minutes_until_it_ends_and_a_steady_stream_never":
        "15 simulated minutes of demo traffic per case, refreshed every 30 s",
    "tests/collector/test_hostile.py::test_fuzzed_spans_never_get_a_5xx": "property-based fuzzing",
    "tests/collector/test_hostile.py::test_fuzzed_bodies_and_headers_never_get_a_5xx": "property-based fuzzing",
    "tests/collector/test_hostile.py::test_mutated_valid_protobuf_never_gets_a_5xx": "property-based fuzzing",
    "tests/collector/test_columns.py::test_arrow_columns_equal_the_reference_rows":
        "property-based: 150 generated batches through both conversions",
    "tests/tracetune/test_supervisor.py::test_children_stop_when_the_supervisor_is_killed": "SIGKILLs a whole stack",
    "tests/tracetune/test_cli.py::test_stats_errors_slo_and_drift_answer_tables_and_json": "many CLI processes",
    "tests/tracetune/test_cli.py::test_alerts_commands_test_silence_list_and_show_deliveries": "many CLI processes",
    "tests/tracetune/test_cli.py::test_tables_fit_100_columns_and_wide_shows_every_column": "many CLI processes",
    "tests/tracetune/test_cli.py::test_an_unknown_pipeline_is_named_with_the_known_ones":
        "a CLI process per analyzer command over a seeded store",
    "tests/tracetune/test_cli.py::test_analyzer_command_mistakes_are_one_line":
        "a CLI process per mistake, twelve of them, each against the store",
    "tests/tuner/test_bench_frontier.py": "runs bench/tuner.py in its own process five times, one a 10-run search",
    "tests/tuner/test_canary.py::test_canaries_change_nothing_on_a_a_roll_back_a_dearer_one_and_promote_cheaper_or_fixing_ones":
        "simulates 40 canaries of each of bench/canary.py's scenarios",
    "tests/tuner/test_simulate.py::test_every_arm_on_a_few_virtual_minutes": "a simulation of every arm",
    "tests/tuner/test_simulate.py::test_oracle_picks_the_cheapest_config_inside_the_slo":
        "simulates every config the oracle searches",
    "tests/tuner/test_approval.py::test_replicas_answering_one_proposal_at_once_end_it_once":
        "four processes, each importing the tuner, answer one proposal at one moment",
    "tests/tuner/test_approval.py::test_a_proposal_nobody_answers_expires_is_recorded_and_can_no_longer_be_approved":
        "waits out a proposal's expiry",
    "tests/tuner/test_approval.py::test_on_call_is_told_when_a_waiting_proposal_restores_a_missed_objective":
        "answers four proposals, each after the proposal lease's 1 s settle",
    "tests/tuner/test_approval.py::test_in_auto_mode_a_marked_change_class_waits_and_an_unmarked_one_goes_ahead":
        "the loop over a store of spans, and an answer after the proposal lease's 1 s settle",
    "tests/tuner/test_approval.py::test_a_stale_proposal_is_not_applied_blindly":
        "the loop over a store of spans, and an answer after the proposal lease's 1 s settle",
    "tests/tuner/test_approval.py::test_an_approval_without_canaries_applies_the_proposal_to_every_task":
        "the loop over a store of spans, and an answer after the proposal lease's 1 s settle",
    "tests/dashboard/test_approvals.py::test_tuner_page_lists_waiting_proposals_and_approves_one_with_the_token_after_a_review":
        "the tuner loop over a store of spans, then the page against a tuner API server",
    "tests/store/test_cluster.py::test_the_cluster_schema_is_created_by_the_engine_and_the_queries_run_on_it_unchanged":
        "an engine process of its own creates the schema's cluster form and runs the analyzer's queries on it",
    "tests/analyzer/test_delivery.py::test_a_restart_mid_retry_still_delivers":
        "SIGKILLs a delivery worker process mid-retry and starts another",
    "tests/store/test_lease.py": "waits out real lease terms: renewals, a standby's takeover, hand-overs",
    "tests/store/test_concurrency.py": "queries that run for seconds beside others, cancelled and timed out",
    "tests/store/test_migrations.py::test_a_data_folder_of_the_previous_release_is_upgraded_with_its_rows":
        "two store processes on one data folder, the previous release's schema then the current",
    "tests/store/test_migrations.py::test_the_store_commands_migrate_at_once_and_show_the_state":
        "`tracetune store migrate` and `status` processes",
    "tests/store/test_sessions.py::test_an_idle_session_expires_after_its_timeout": "waits out a session timeout",
    "tests/store/test_sessions.py::test_a_busy_session_refuses_a_second_request": "a query that runs for seconds",
    "tests/store/test_streaming.py::test_a_slow_first_chunk_still_lets_other_queries_run": "a 2 s query beside others",
    "tests/collector/test_columns.py::test_a_batch_converted_in_chunks_is_the_reference_rows":
        "property-based: 80 generated batches in every chunk size",
    "tests/collector/test_columns.py::test_attribute_values_in_any_encoding_are_the_reference_values":
        "property-based: 300 generated wire encodings",
    "tests/collector/test_receiver.py::test_a_body_that_never_finishes_gets_408": "waits out the body timeout",
    "tests/collector/test_receiver.py::test_full_queue_is_503_and_acknowledged_spans_survive_an_outage_and_a_restart":
        "retries against a store that is away, and a stop that waits out its 1 s timeout",
    "tests/collector/test_receiver.py::test_health_says_stalled_when_the_writer_makes_no_progress":
        "waits for the writer's stall to show, and a stop with the store away",
    "tests/collector/test_hostile.py::test_slow_and_silent_connections_are_closed":
        "waits out the header timeout of 50 connections",
    "tests/executor/test_llm.py::test_rate_limit_answers_429_with_retry_after_and_the_client_recovers":
        "the client waits out Retry-After",
}
# Tests using these fixtures are `slow` too: models_dir trains and exports the demo's ONNX models.
SLOW_FIXTURES = frozenset({"models_dir"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests/e2e as `e2e`, and SLOW and the users of SLOW_FIXTURES as `slow`."""
    for item in items:
        path = item.path.relative_to(config.rootpath).as_posix()
        if path.startswith("tests/e2e/"):
            item.add_marker(pytest.mark.e2e)
        if path in SLOW or f"{path}::{item.name}" in SLOW or f"{path}::{item.originalname}" in SLOW \
                or SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def make_settings(home: Path, **overrides) -> Settings:
    """Settings on free ports under `home`, ignoring any tracetune.toml or TRACETUNE_* of the caller."""
    ports = {name: free_port() for name in ("store_port", "collector_port", "collector_grpc_port", "tuner_port",
                                            "executor_port", "dashboard_port", "llm_port", "crm_port")}
    # Explicit store passwords, so settings moved to another home still reach the session's store.
    passwords = {"store_password": secrets.token_urlsafe(16), "store_reader_password": secrets.token_urlsafe(16)}
    values = {"home": str(home), **ports, **passwords, **overrides}
    return settings_mod.load(config_file=home / "none.toml", environ={}, **values)


@pytest.fixture(scope="session")
def store_settings(tmp_path_factory) -> Iterator[Settings]:
    """One embedded store process for the whole session; tests take their own database."""
    home = tmp_path_factory.mktemp("store-home")
    settings = make_settings(home)
    proc = start_process(["store"], settings, home / "store.log")
    try:
        store.wait_ready(settings, 60)
    except TimeoutError:
        stop_process(proc)
        raise RuntimeError("embedded store did not start:\n" + (home / "store.log").read_text()[-3000:]) from None
    yield settings
    stop_process(proc)


class Databases:
    """Fresh databases (the schema applied) in one worker's session store, handed to one test at a time.

    Creating a database with the schema costs about half a second of the store's time. So a test's database
    comes back after it and goes to a later test emptied, when the test left the schema's tables with the
    definitions and the applied migrations they were made with; the tables, views and dictionaries it added
    beside them are dropped. Otherwise, or when it cannot be read, it is left alone and never handed out
    again. Emptying truncates every table that holds a part, active or outdated (TRUNCATE also forgets the
    table's insert deduplication tokens): every insert leaves a part, and only a DROP PARTITION (which
    forgets the partition's tokens itself) or a cleaned-up mutation deleting every row removes all of them,
    which nothing does to the schema's tables. The tables a test never wrote to (most of the schema's 30-odd,
    in most tests) are left as they are: truncating them all cost the store about 50 ms a test.
    """

    SHAPE_SQL = """SELECT (SELECT groupArray((name, create_table_query)) FROM (SELECT name, create_table_query
                   FROM system.tables WHERE database = currentDatabase() ORDER BY name)),
                  (SELECT groupArray(version) FROM (SELECT version FROM tracetune_schema_migrations
                   ORDER BY version)),
                  (SELECT groupUniqArray(table) FROM system.parts WHERE database = currentDatabase()
                   AND table != 'tracetune_schema_migrations')"""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.shapes: dict[str, tuple] = {}  # database -> its shape when made
        self.clients: dict[str, store.Client] = {}  # database -> the client that empties it
        self.idle: list[Settings] = []

    def take(self) -> Settings:
        if self.idle:
            return self.idle.pop()
        settings = self.settings.replace(database=f"t_{uuid.uuid4().hex[:12]}")
        client = store.connect(settings)
        self.shapes[settings.database], _ = self._shape(client)
        self.clients[settings.database] = client
        return settings

    def give_back(self, settings: Settings) -> None:
        from clickhouse_connect.driver.exceptions import ClickHouseError

        client = self.clients.pop(settings.database)
        made = self.shapes[settings.database]
        try:
            shape, written = self._shape(client)
            if shape != made and self._drop_added(client, made, shape):
                shape, written = self._shape(client)
            if shape != made:
                return
            for table in written:
                client.command(f"TRUNCATE TABLE `{table}`")
        except (ClickHouseError, OSError):
            return
        self.clients[settings.database] = client
        self.idle.append(settings)

    @staticmethod
    def _drop_added(client, made: tuple, shape: tuple) -> bool:
        """Drop the tables, views and dictionaries a test added beside the schema's, when it left those and
        the migrations as they were made; whether it did (the caller then checks the shape again). One that
        others still depend on (a dictionary's source table) is dropped in a later round, after them."""
        from clickhouse_connect.driver.exceptions import ClickHouseError

        before, after = dict(made[0]), dict(shape[0])
        if shape[1] != made[1] or any(after.get(name) != query for name, query in before.items()):
            return False
        added = sorted(set(after) - set(before))
        while added:
            left = []
            for name in added:
                kind = "DICTIONARY" if after[name].startswith("CREATE DICTIONARY") else "TABLE"
                try:
                    client.command(f"DROP {kind} IF EXISTS `{name}` SYNC")
                except ClickHouseError:
                    left.append(name)
            if len(left) == len(added):
                return False
            added = left
        return True

    def _shape(self, client) -> tuple[tuple, list[str]]:
        """(tables and migrations, the tables holding parts)."""
        tables, migrations, written = client.query(self.SHAPE_SQL).result_rows[0]
        return (tuple(tables), tuple(migrations)), written


@pytest.fixture(scope="session")
def databases(store_settings: Settings) -> Databases:
    return Databases(store_settings)


@pytest.fixture
def db_settings(databases: Databases) -> Iterator[Settings]:
    """Settings pointing at a fresh database (with the schema applied) in the session store: empty, its
    schema as the migrations made it (see Databases)."""
    settings = databases.take()
    yield settings
    databases.give_back(settings)


@pytest.fixture
def client(db_settings: Settings):
    return store.connect(db_settings, ensure_schema=False)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The demo models, built once per test run with the real training and ONNX export.

    Under pytest-xdist every worker asks for them: the first builds them into a folder the workers
    share (under a lock), the others find them built and reuse them."""
    from tracetune.demo.models import build_models

    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else \
        tmp_path_factory.getbasetemp()
    path = shared / "models"
    path.mkdir(exist_ok=True)
    with open(shared / "models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_models(path)
    return path


@pytest.fixture
def collector(db_settings, tmp_path) -> Iterator[Settings]:
    """A real collector process writing into the test's database; its settings (URL, token in its home)."""
    import httpx

    settings = db_settings.replace(home=tmp_path / "home", collector_flush_seconds=0.2)
    proc = start_process(["collector"], settings, tmp_path / "collector.log")

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "collector.log").read_text())
        try:
            return httpx.get(f"{settings.collector_url}/health").status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 60, message="collector /health")
    yield settings
    stop_process(proc)
