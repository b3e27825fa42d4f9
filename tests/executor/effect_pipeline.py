"""A one-step pipeline for real executor processes in tests: file a follow-up at the CRM (`crm_url`), with
quick retries, dead letters in the store the settings name. Run it with
`tracetune executor --pipeline tests.executor.effect_pipeline:followups`."""

from __future__ import annotations

from tracetune import store
from tracetune.base.settings import Settings
from tracetune.executor import DeadLetters, Effect, Pipeline, RetryPolicy

NAME = "followups"
ATTEMPTS = 2  # per task, and per replay


def followups(settings: Settings) -> Pipeline:
    letters = DeadLetters(lambda: store.connect(settings, ensure_schema=False))
    return Pipeline(NAME, [
        Effect("create_followup", settings.crm_base_url + "/v1/followups", lambda task: {"ticket": task.text},
               dead_letters=letters, policy=RetryPolicy(max_attempts=ATTEMPTS, base_delay=0.01, max_delay=0.05)),
    ])
