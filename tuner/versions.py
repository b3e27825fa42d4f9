"""Config versions in ClickHouse (`tracetune_config_versions`, append-only)."""

from __future__ import annotations

import json

from tracetune.tuner.config import PipelineConfig, default_config

LATEST_SQL = """
SELECT config FROM tracetune_config_versions
WHERE pipeline = {pipeline:String}
ORDER BY version DESC LIMIT 1
"""


def latest(client, pipeline: str) -> PipelineConfig | None:
    rows = client.query(LATEST_SQL, parameters={"pipeline": pipeline}).result_rows
    return PipelineConfig.from_dict(json.loads(rows[0][0])) if rows else None


def save(client, config: PipelineConfig, author: str, reason: str) -> None:
    client.insert(
        "tracetune_config_versions",
        [[config.pipeline, config.version, json.dumps(config.to_dict()), author, reason]],
        column_names=["pipeline", "version", "config", "author", "reason"],
    )


def ensure_default(client, pipeline: str) -> PipelineConfig:
    """The pipeline's current config, storing the static default first if it has none."""
    current = latest(client, pipeline)
    if current is None:
        current = default_config(pipeline)
        save(client, current, author="tracetune", reason="static default")
    return current
