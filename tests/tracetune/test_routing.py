"""The route a task takes: its draw (from its trace id) against the weights, the same way in every config."""

from __future__ import annotations

import numpy as np
import pytest

from tracetune.base import routing


def test_a_draw_is_the_same_for_a_task_and_step_and_uniform_over_tasks():
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    task = routing.key("", trace, "00f067aa0ba902b7")
    assert task == routing.key("", trace.upper(), "00F067AA0BA902B7")  # as the store or the SDK spells them
    assert routing.key("", trace, "00f067aa0ba902b8") != task  # tasks run in one caller's trace: their own span
    assert routing.key("order-7", trace, "00f067aa0ba902b7") == routing.key("order-7", "", "")  # a task id wins
    assert routing.draw(task, "rerank") == routing.draw(task, "rerank")
    assert routing.draw(task, "rerank") != routing.draw(task, "generate")  # each step its own
    rng = np.random.default_rng(3)
    u = np.array([routing.draw(routing.key(f"{rng.integers(1 << 62)}", "", ""), "rerank") for _ in range(20_000)])
    assert ((u >= 0) & (u < 1)).all()
    assert np.histogram(u, bins=10, range=(0, 1))[0] == pytest.approx(np.full(10, 2_000), abs=200)  # ~4.7 sigma


def test_routes_are_picked_by_name_so_configs_agreeing_on_a_share_send_the_same_tasks_there():
    u = np.random.default_rng(5).random(50_000)
    before = routing.picks({"small": 0.3, "large": 0.7}, u)
    after = routing.picks({"large": 0.59, "small": 0.41}, u)  # the order given does not matter
    assert np.mean(np.array(before) == "small") == pytest.approx(0.3, abs=0.01)
    assert np.mean(np.array(after) == "small") == pytest.approx(0.41, abs=0.01)
    moved = np.array(before) != np.array(after)
    assert moved.mean() == pytest.approx(0.11, abs=0.01)  # only the tasks between the two shares move
    assert all(b == "large" and a == "small" for b, a in zip(np.array(before)[moved], np.array(after)[moved],
                                                               strict=True))
    assert routing.pick({"a": 0.0, "b": 1.0}, 0.0) == "b"  # a route weighted 0 takes nothing
    with pytest.raises(ValueError, match="no positive weight"):
        routing.order({"a": 0.0})


def test_the_tasks_a_change_of_weights_sends_another_way_are_the_ones_picked_differently():
    u = np.random.default_rng(9).random(100_000)
    for before, after in (({"a": 0.2, "b": 0.5, "c": 0.3}, {"a": 0.4, "b": 0.1, "c": 0.5}),
                          ({"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.5}),
                          ({"small": 0.3, "large": 0.7}, {"small": 0.3, "large": 0.7})):
        old, new = np.array(routing.picks(before, u)), np.array(routing.picks(after, u))
        seen: dict[tuple[str, str], float] = {}
        for pair in set(zip(old[old != new], new[old != new], strict=True)):
            seen[pair] = float(np.mean((old == pair[0]) & (new == pair[1])))
        assert routing.moves(before, after) == pytest.approx(seen, abs=0.005), (before, after)
    assert routing.moves({"a": 0.2, "b": 0.8}, {"a": 0.2, "b": 0.8}) == {}
