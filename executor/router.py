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
        routes, edges = routing.order(weights)
        with self._lock:
            self.routes, self.edges = routes, edges

    def choose(self, u: float | None = None) -> str:
        with self._lock:
            if u is None:
                u = self._rng.random()
            for name, edge in zip(self.routes, self.edges, strict=True):
                if u < edge:
                    return name
            return self.routes[-1]

