"""Registers a pipeline's declaration with the tuner, then polls its config (ETag / If-None-Match).

At start the executor sends the pipeline's spec (`PUT /v1/pipelines/{p}/spec`: every step's knobs
with defaults and bounds, and the starting SLO); the tuner answers with the config in force. From
then on a poll costs a 304 unless the version (or the canary on trial) changed. A tuner that forgot
the pipeline (404) gets the spec again. A config with a `canary` part runs that share of tasks on the
canary's values (`Pipeline.apply_canary`); one without it ends the canary. Likewise a `shadow` part
starts a shadow trial (`Pipeline.apply_shadow`), and its absence stops it.
"""

from __future__ import annotations

import logging
import threading

import httpx

from tracetune.executor.pipelines import Pipeline
from tracetune.tuner.config import ConfigError, PipelineConfig

log = logging.getLogger("tracetune.executor")


class ConfigPoller:
    """Keeps `pipeline` on the tuner's current config, polling every `interval` seconds."""

    def __init__(self, tuner_url: str, pipeline: Pipeline, token: str = "", interval: float = 5.0):
        root = f"{tuner_url.rstrip('/')}/v1/pipelines/{pipeline.name}"
        self.url = f"{root}/config"
        self.spec_url = f"{root}/spec"
        self.pipeline = pipeline
        self.interval = interval
        self.etag: str | None = None
        self.version: int | None = None
        self.canary: tuple[int, float] | None = None  # the canary's version and share, as applied
        self.shadow: tuple | None = None  # the shadow trial's id, share and cap, as applied
        self.registered = False
        self.polls = 0
        self.not_modified = 0
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._stop = threading.Event()
        self._client = httpx.Client(timeout=5)
        self._thread = threading.Thread(target=self._loop, name=f"config-poller-{pipeline.name}", daemon=True)

    def register(self) -> None:
        """Send the pipeline's declaration; apply the config the tuner answers with."""
        response = self._client.put(self.spec_url, json=self.pipeline.spec().to_dict(), headers=self._headers)
        if response.status_code in (401, 403, 422):
            raise ConfigError(f"the tuner refused {self.pipeline.name}'s declaration "
                              f"({response.status_code}: {response.text[:300]})")
        response.raise_for_status()
        self.registered = True
        self._apply(response.json(), response.headers.get("etag"))

    def poll_once(self) -> bool:
        """Fetch the config; True if a new version was applied."""
        if not self.registered:
            self.register()
            return True
        headers = {"If-None-Match": self.etag} if self.etag else {}
        response = self._client.get(self.url, headers=headers)
        self.polls += 1
        if response.status_code == 304:
            self.not_modified += 1
            return False
        if response.status_code == 404:
            self.registered = False
            self.register()
            return True
        response.raise_for_status()
        return self._apply(response.json(), response.headers.get("etag"))

    def _apply(self, body: dict, etag: str | None) -> bool:
        config = PipelineConfig.from_dict(body)
        self.etag = etag
        changed = False
        if config.version != self.version:
            try:
                self.pipeline.apply_config(config)
            except ConfigError as exc:
                log.warning("%s config version %s does not fit the pipeline, keeping version %s: %s",
                            config.pipeline, config.version, self.version, exc)
                return False
            log.info("applied %s config version %s", config.pipeline, config.version)
            self.version, changed = config.version, True
        canary_changed = self._apply_canary(body.get("canary"), changed)
        return self._apply_shadow(body.get("shadow"), changed) or canary_changed or changed

    def _apply_shadow(self, shadow: dict | None, base_changed: bool) -> bool:
        key = (shadow.get("id"), shadow.get("share"), shadow.get("cost_cap_usd_per_hour"), shadow.get("until")) \
            if isinstance(shadow, dict) else None
        if key == self.shadow and not base_changed:
            return False
        try:
            self.pipeline.apply_shadow(shadow if key is not None else None)
            if key is not None:
                log.info("%s shadow trial %s on %.0f%% of tasks", self.pipeline.name, key[0], 100 * float(key[1]))
        except (ConfigError, TypeError, ValueError) as exc:
            log.warning("%s shadow trial %s does not fit the pipeline, not shadowing: %s", self.pipeline.name,
                        key, exc)
            self.pipeline.apply_shadow(None)
        self.shadow = key
        return key is not None or base_changed

    def _apply_canary(self, canary: dict | None, base_changed: bool) -> bool:
        key = (canary["version"], canary["share"]) if isinstance(canary, dict) else None
        if key == self.canary and not base_changed:
            return False
        try:
            if key is None:
                self.pipeline.apply_canary(None)
            else:
                trial = PipelineConfig.from_dict({"pipeline": self.pipeline.name, "version": canary["version"],
                                                  "steps": canary.get("steps", {})})
                self.pipeline.apply_canary(trial, float(canary["share"]))
                log.info("%s canary version %s on %.0f%% of tasks", self.pipeline.name, key[0], 100 * key[1])
        except (ConfigError, TypeError, ValueError) as exc:
            log.warning("%s canary %s does not fit the pipeline, running every task on version %s: %s",
                        self.pipeline.name, key, self.version, exc)
            self.pipeline.apply_canary(None)
        self.canary = key
        return key is not None or base_changed

    def start(self, wait_first: float = 30.0) -> ConfigPoller:
        """Register and apply the tuner's config before returning (or give up after `wait_first` s
        and keep trying in the background, running on the declared defaults meanwhile)."""
        waited = 0.0
        while waited < wait_first:
            try:
                self.poll_once()
                break
            except ConfigError:
                raise
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("tuner not reachable yet at %s: %s", self.spec_url, exc)
                self._stop.wait(0.5)
                waited += 0.5
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._client.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll_once()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("config poll failed, keeping version %s: %s", self.version, exc)
