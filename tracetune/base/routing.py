"""Which route a task takes: a uniform draw per task and step, read against the routes' weights.

The executor draws a task's number from its task id (or its root span) and the step's name (`draw`), so the
draw is fixed before any config is applied, and `pick` maps it onto the routes by name in one fixed order. A
canary's tasks and the config in force's then take the same route wherever the two configs' weights agree, and
which route the config in force would have given any task is known from its spans: `canary.arms` reads that as
a covariate, the spread of cost a route move does not cause taken out of the test. The tuner's simulation draws
its tasks' numbers its own way and picks with the same `pick`.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping

import numpy as np

__all__ = ["Order", "at", "draw", "key", "moves", "order", "pick", "picks"]

_SCALE = float(1 << 64)


def key(task_id: str, trace_id: str, span_id: str) -> str:
    """What a task's draws are taken from: its task id, or without one its root span's trace and span ids (hex, as
    the store keeps them). Tasks a caller runs inside one trace of its own share that trace id, never their span's."""
    return f"task:{task_id}" if task_id else f"span:{trace_id.lower()}/{span_id.lower()}"


def draw(task_key: str, step: str) -> float:
    """A number in [0, 1), uniform over tasks, for the task of `task_key` (`key`) at `step`: each step's is
    independent of the others'."""
    digest = hashlib.blake2b(f"{task_key}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


Order = tuple[list[str], list[float]]


def order(weights: Mapping[str, float]) -> Order:
    """The routes with a positive weight, by name, and the upper edge of each one's share of [0, 1)."""
    routes = sorted(name for name, weight in weights.items() if weight > 0)
    if not routes:
        raise ValueError(f"route weights {dict(weights)} have no positive weight")
    shares = np.array([float(weights[name]) for name in routes])
    edges = np.cumsum(shares) / shares.sum()
    edges[-1] = 1.0
    return routes, edges.tolist()


def at(ordered: Order, u: float) -> str:
    """The route a draw `u` falls on, in routes `order`ed once (the executor's router and the simulation keep
    them between weight changes)."""
    routes, edges = ordered
    return routes[min(bisect.bisect_right(edges, u), len(routes) - 1)]


def pick(weights: Mapping[str, float], u: float) -> str:
    """The route a task whose draw is `u` takes under `weights`."""
    return at(order(weights), u)


def picks(weights: Mapping[str, float], u: np.ndarray) -> list[str]:
    """`pick` for many draws at once."""
    routes, edges = order(weights)
    index = np.minimum(np.searchsorted(edges, np.asarray(u, dtype=float), side="right"), len(routes) - 1)
    return [routes[i] for i in index]


def moves(before: Mapping[str, float], after: Mapping[str, float]) -> dict[tuple[str, str], float]:
    """(route before, route after) -> the share of draws that take the one under `before` and the other under
    `after`, for the pairs that differ: the tasks a change of weights sends another way (none where the two
    configs' weights agree)."""
    old, new = order(before), order(after)
    cuts = sorted({0.0, *old[1], *new[1]})
    found: dict[tuple[str, str], float] = {}
    for low, high in zip(cuts, cuts[1:], strict=False):
        middle = (low + high) / 2
        pair = (at(old, middle), at(new, middle))
        if pair[0] != pair[1]:  # the cuts are distinct: every interval has a length
            found[pair] = found.get(pair, 0.0) + high - low
    return found
