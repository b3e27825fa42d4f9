"""Routing: a weighted choice between a step's model variants (the cascade is `steps.Cascade`)."""

from __future__ import annotations

import random
import threading


class WeightedRouter:
    """Picks a route with probability proportional to its weight (weights come from the tuner)."""

    def __init__(self, weights: dict[str, float], seed: int | None = None):
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.set_weights(weights)

    def set_weights(self, weights: dict[str, float]) -> None:
        routes = [(name, float(w)) for name, w in weights.items() if w > 0]
        if not routes:
            raise ValueError(f"route weights {weights} have no positive weight")
        total = sum(w for _, w in routes)
        with self._lock:
            self.routes = [name for name, _ in routes]
            self.cumulative = []
            acc = 0.0
            for _, w in routes:
                acc += w / total
                self.cumulative.append(acc)

    def choose(self) -> str:
        with self._lock:
            x = self._rng.random()
            for name, edge in zip(self.routes, self.cumulative, strict=True):
                if x < edge:
                    return name
            return self.routes[-1]

