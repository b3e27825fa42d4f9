"""Config versions and pipeline declarations in ClickHouse (both append-only).

`tracetune_config_versions` holds every config served, one row per version; `tracetune_pipeline_specs`
every distinct declaration an executor registered. `register` brings the two together: a new
pipeline gets its declared defaults as version 1, a changed declaration a reconciled next version.
"""

from __future__ import annotations

import json
import threading

from tracetune.tuner.config import PipelineConfig, PipelineSpec

LATEST_SQL = """
SELECT config FROM tracetune_config_versions
WHERE pipeline = {pipeline:String}
ORDER BY version DESC LIMIT 1
"""

LATEST_SPEC_SQL = """
SELECT spec FROM tracetune_pipeline_specs
WHERE pipeline = {pipeline:String}
ORDER BY registered_at DESC LIMIT 1
"""

PIPELINES_SQL = """
SELECT pipeline, max(version) AS latest_version, argMax(created_at, version) AS changed_at
FROM tracetune_config_versions
GROUP BY pipeline ORDER BY pipeline
"""

# One tuner process writes versions. Hold this lock to read the config, change it and record the
# decision as one step (the API and the tuning loop both do); re-entrant, so holders may call
# `register` and `change`, which take it too.
write_lock = threading.RLock()


def latest(client, pipeline: str) -> PipelineConfig | None:
    rows = client.query(LATEST_SQL, parameters={"pipeline": pipeline}).result_rows
    return PipelineConfig.from_dict(json.loads(rows[0][0])) if rows else None


def latest_spec(client, pipeline: str) -> PipelineSpec | None:
    rows = client.query(LATEST_SPEC_SQL, parameters={"pipeline": pipeline}).result_rows
    return PipelineSpec.from_dict(json.loads(rows[0][0])) if rows else None


def pipelines(client) -> list[dict]:
    """Every pipeline with a config: name, current version and when it changed."""
    return [{"pipeline": p, "version": int(v), "changed_at": str(t)}
            for p, v, t in client.query(PIPELINES_SQL).result_rows]


def save(client, config: PipelineConfig, author: str, reason: str) -> None:
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
        save(client, config, author="tracetune", reason=reason)
        return config, reason


def change(client, spec: PipelineSpec, steps: dict, author: str, reason: str) -> PipelineConfig:
    """The pipeline's next version with `steps` (step -> knob -> value) applied; ConfigError if they
    do not fit the declaration."""
    with write_lock:
        current = latest(client, spec.pipeline) or spec.defaults(version=0)
        config = spec.merge(current, steps)
        if config.steps == current.steps:
            return current
        save(client, config, author=author, reason=reason)
        return config
