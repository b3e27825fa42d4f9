"""Polls the tuner for the pipeline's config (ETag / If-None-Match) and applies new versions."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import httpx

from tracetune.tuner.config import PipelineConfig

log = logging.getLogger("tracetune.executor")


class ConfigPoller:
    def __init__(self, tuner_url: str, pipeline: str, apply: Callable[[PipelineConfig], None],
                 interval: float = 5.0):
        self.url = f"{tuner_url.rstrip('/')}/v1/pipelines/{pipeline}/config"
        self.apply = apply
        self.interval = interval
        self.etag: str | None = None
        self.version: int | None = None
        self.polls = 0
        self.not_modified = 0
        self._stop = threading.Event()
        self._client = httpx.Client(timeout=5)
        self._thread = threading.Thread(target=self._loop, name="config-poller", daemon=True)

    def poll_once(self) -> bool:
        """Fetch the config; True if a new version was applied."""
        headers = {"If-None-Match": self.etag} if self.etag else {}
        response = self._client.get(self.url, headers=headers)
        self.polls += 1
        if response.status_code == 304:
            self.not_modified += 1
            return False
        response.raise_for_status()
        config = PipelineConfig.from_dict(response.json())
        self.apply(config)
        self.etag = response.headers.get("etag")
        if config.version != self.version:
            log.info("applied %s config version %s", config.pipeline, config.version)
        self.version = config.version
        return True

    def start(self, wait_first: float = 30.0) -> ConfigPoller:
        """Apply the tuner's config before returning (or give up after `wait_first` s and keep polling)."""
        waited = 0.0
        while waited < wait_first:
            try:
                self.poll_once()
                break
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("tuner not reachable yet at %s: %s", self.url, exc)
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
