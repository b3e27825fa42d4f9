"""Routing: a weighted choice between a step's model variants (the cascade is `steps.Cascade`)."""

from __future__ import annotations

import random
import threading

from tracetune.base import routing


class WeightedRouter:
    """Picks a route with probability proportional to its weight (weights come from the tuner): by the task's
    own draw when it is given (`routing.draw`, from its task id or its root span), else by a draw of its own."""

    def __init__(self, weights: dict[str, float], seed: int | None = None):
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.set_weights(weights)

    def set_weights(self, weights: dict[str, float]) -> None:
        ordered = routing.order(weights)
        with self._lock:
            self.ordered = ordered

    def choose(self, task_key: str = "", step: str = "") -> str:
        """The route of the task whose `routing.key` is `task_key` at `step`; without a key, a random one."""
        u = routing.draw(task_key, step) if task_key else None
        with self._lock:
            return routing.at(self.ordered, self._rng.random() if u is None else u)

