"""Config versions and pipeline declarations in ClickHouse (both append-only).

`tracetune_config_versions` holds every config served, one row per version; `tracetune_pipeline_specs`
every distinct declaration an executor registered. `register` brings the two together: a new
pipeline gets its declared defaults as version 1, a changed declaration a reconciled next version.

A version on trial as a canary (`tuner.canary`) is stored like any other but is not the config in
force until promoted: `latest` skips versions whose canary was not promoted, and every new version
is numbered after the highest stored one, so a version number names one config for good.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace

from tracetune.tuner.config import PipelineConfig, PipelineSpec

# The config in force: the highest version that is not a canary still on trial, rolled back or cancelled.
LATEST_SQL = """
SELECT config FROM tracetune_config_versions
WHERE pipeline = {pipeline:String} AND version < {below:UInt32}
  AND version NOT IN (SELECT version FROM tracetune_canaries WHERE pipeline = {pipeline:String}
                      GROUP BY version HAVING argMax(status, (changed_at, seq)) != 'promoted')
ORDER BY version DESC LIMIT 1
"""

TOP_VERSION_SQL = """
SELECT max(version) FROM tracetune_config_versions WHERE pipeline = {pipeline:String}
"""

CONFIG_AT_SQL = """
SELECT config FROM tracetune_config_versions
WHERE pipeline = {pipeline:String} AND version = {version:UInt32}
LIMIT 1
"""

LATEST_SPEC_SQL = """
SELECT spec FROM tracetune_pipeline_specs
WHERE pipeline = {pipeline:String}
ORDER BY registered_at DESC LIMIT 1
"""

PIPELINES_SQL = """
SELECT pipeline, max(version) AS latest_version, argMax(created_at, version) AS changed_at
FROM tracetune_config_versions
WHERE (pipeline, version) NOT IN (SELECT pipeline, version FROM tracetune_canaries GROUP BY pipeline, version
                                  HAVING argMax(status, (changed_at, seq)) != 'promoted')
GROUP BY pipeline ORDER BY pipeline
"""

# One tuner process writes versions. Hold this lock to read the config, change it and record the
# decision as one step (the API and the tuning loop both do); re-entrant, so holders may call
# `register` and `change`, which take it too.
write_lock = threading.RLock()


def latest(client, pipeline: str, below: int | None = None) -> PipelineConfig | None:
    """The config in force (or the one in force before version `below`), None for an unknown pipeline."""
    rows = client.query(LATEST_SQL, parameters={"pipeline": pipeline,
                                                "below": 2**32 - 1 if below is None else below}).result_rows
    return PipelineConfig.from_dict(json.loads(rows[0][0])) if rows else None


def at(client, pipeline: str, version: int) -> PipelineConfig | None:
    """Version `version` as stored (in force or not), or None."""
    rows = client.query(CONFIG_AT_SQL, parameters={"pipeline": pipeline, "version": version}).result_rows
    return PipelineConfig.from_dict(json.loads(rows[0][0])) if rows else None


def latest_spec(client, pipeline: str) -> PipelineSpec | None:
    rows = client.query(LATEST_SPEC_SQL, parameters={"pipeline": pipeline}).result_rows
    return PipelineSpec.from_dict(json.loads(rows[0][0])) if rows else None


def pipelines(client) -> list[dict]:
    """Every pipeline with a config: name, the version in force and when it was stored."""
    return [{"pipeline": p, "version": int(v), "changed_at": str(t)}
            for p, v, t in client.query(PIPELINES_SQL).result_rows]


def save_next(client, config: PipelineConfig, author: str, reason: str) -> PipelineConfig:
    """Store `config` numbered after every stored version of its pipeline (canaries included); the stored config."""
    with write_lock:
        top = client.query(TOP_VERSION_SQL, parameters={"pipeline": config.pipeline}).result_rows
        config = replace(config, version=max(config.version, int(top[0][0] or 0) + 1 if top else 1))
        _save(client, config, author, reason)
        return config


def _save(client, config: PipelineConfig, author: str, reason: str) -> None:
    client.insert(
        "tracetune_config_versions",
        [[config.pipeline, config.version, json.dumps(config.to_dict()), author, reason]],
        column_names=["pipeline", "version", "config", "author", "reason"],
    )


def register(client, spec: PipelineSpec, source: str = "") -> tuple[PipelineConfig, str | None]:
    """Store `spec` if it changed; the config in force, reconciled with the declaration, and the
    reason a new version was stored for it (None when the config already fitted)."""
    with write_lock:
        if latest_spec(client, spec.pipeline) != spec:
            client.insert("tracetune_pipeline_specs", [[spec.pipeline, json.dumps(spec.to_dict()), source]],
                          column_names=["pipeline", "spec", "source"])
        current = latest(client, spec.pipeline)
        change = spec.reconcile(current)
        if change is None:
            return current, None
        config, reason = change
        return save_next(client, config, author="tracetune", reason=reason), reason


def change(client, spec: PipelineSpec, steps: dict, author: str, reason: str) -> PipelineConfig:
    """The pipeline's next version with `steps` (step -> knob -> value) applied; ConfigError if they
    do not fit the declaration."""
    with write_lock:
        current = latest(client, spec.pipeline) or spec.defaults(version=0)
        config = spec.merge(current, steps)
        if config.steps == current.steps:
            return current
        return save_next(client, config, author=author, reason=reason)
