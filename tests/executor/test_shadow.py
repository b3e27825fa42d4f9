"""Shadow trials in the executor runtime: a sample of tasks runs its model steps again under a candidate,
after the answer, in a trace of its own; nothing of it reaches the task, later steps or effects; its cost
is capped."""

from __future__ import annotations

import threading
import time

import pytest

from tests.executor.test_runtime import sample, scored, spans, with_config
from tracetune.executor import Cascade, Infer, Pipeline, Step
from tracetune.tuner.config import ConfigError


@pytest.fixture
def close_after():
    """Pipelines a test builds, closed (shadow workers, batcher threads) when it ends."""
    pipelines: list[Pipeline] = []
    yield pipelines.append
    for pipeline in pipelines:
        pipeline.close()


def _wait_idle(pipeline: Pipeline) -> None:
    """Until the shadow's worker has taken every queued task (and finished the one in hand)."""
    assert pipeline.shadow is None or pipeline.shadow.wait_idle(10), "the shadow's worker did not finish"


def _pipeline(tracer, remote_calls: list[str], written: list[str]) -> Pipeline:
    def remote(text: str) -> str:
        remote_calls.append(text)
        return "remote"

    return Pipeline("shadowed", [
        Step("note", lambda task: None),
        Infer("guess", {"m": scored}),
        Cascade("check", after="guess", remote=remote, threshold=0.5),
        Step("write", lambda task: written.append(f"{task.task_id}:{task.data['guess']}")),  # a write elsewhere
    ], tracer=tracer, outcome=lambda task: task.data["guess"])


def _trial(share: float = 1.0, cap: float = 10.0, **extra) -> dict:
    return {"id": 7, "base_version": 1, "share": share, "steps": {"check": {"cascade_threshold": 0.95}},
            "answer_step": "guess", "unit_costs": {"check.remote": 0.01}, "cost_cap_usd_per_hour": cap,
            "until": time.time() + 600, **extra}


def test_a_shadow_runs_the_changed_steps_after_the_answer_and_nothing_of_it_reaches_the_task(tracer, close_after):
    tracer, exporter = tracer
    calls, written = [], []
    pipeline = _pipeline(tracer, calls, written)
    close_after(pipeline)
    with_config(pipeline, check={"cascade_threshold": 0.5})
    before = {f"t{i}": pipeline.result(pipeline.run("0.8", task_id=f"t{i}")) for i in range(20)}
    written_before = list(written)
    assert calls == [] and all(r == {"guess": "local"} for r in before.values())

    pipeline.apply_shadow(_trial())
    written.clear()
    after = {f"t{i}": pipeline.result(pipeline.run("0.8", task_id=f"t{i}")) for i in range(20)}
    _wait_idle(pipeline)
    # The user's answers and the plain step's writes are what they were without the shadow ...
    assert after == before and written == written_before
    # ... while the shadow, at threshold 0.95, escalated every one of them and answered otherwise.
    assert len(calls) == 20
    roots = spans(exporter, "shadowed shadow")
    assert len(roots) == 20
    real = {s.context.trace_id: s for s in spans(exporter, "shadowed")}
    for root in roots:
        a = root.attributes
        assert a["tracetune.shadow"] == 7 and a["tracetune.shadow_pipeline"] == "shadowed"
        assert "tracetune.pipeline" not in a and "tracetune.config_version" not in a
        assert (a["tracetune.shadow_answer"], a["tracetune.shadow_real_answer"]) == ("remote", "local")
        assert a["tracetune.shadow_cost_usd"] == pytest.approx(0.01) and a["tracetune.shadow_real_cost_usd"] == 0
        linked = int(a["tracetune.shadow_of"], 16)
        assert linked in real and root.context.trace_id != linked  # a trace of its own, linked to the real one
        assert [link.context.trace_id for link in root.links] == [linked]
        assert root.parent is None
    steps = spans(exporter, "shadow check")
    assert len(steps) == 20 and not spans(exporter, "shadow write") and not spans(exporter, "shadow note")
    assert all("tracetune.step" not in s.attributes and s.attributes["tracetune.shadow_step"] == "check"
               for s in steps)
    assert sample("tracetune_shadow_tasks_total", pipeline="shadowed", outcome="ran") >= 20

    pipeline.apply_shadow(None)
    calls.clear()
    pipeline.run("0.8", task_id="t0")
    time.sleep(0.1)
    assert calls == [] and pipeline.shadow is None


def test_a_shadow_samples_its_share_of_tasks_by_a_hash_of_their_id(tracer, close_after):
    tracer, exporter = tracer
    calls, written = [], []
    pipeline = _pipeline(tracer, calls, written)
    close_after(pipeline)
    with_config(pipeline, check={"cascade_threshold": 0.5})
    pipeline.apply_shadow(_trial(share=0.25))
    for i in range(400):
        pipeline.run("0.8", task_id=f"task-{i}")
    _wait_idle(pipeline)
    shadowed = len(spans(exporter, "shadowed shadow")) + int(sample("tracetune_shadow_tasks_total",
                                                                    pipeline="shadowed", outcome="busy"))
    assert 0.17 < shadowed / 400 < 0.33
    chosen = {s.attributes["tracetune.shadow_of"] for s in spans(exporter, "shadowed shadow")}
    assert chosen  # the same tasks every time: by a hash of the id
    exporter.clear()
    for i in range(400):
        pipeline.run("0.8", task_id=f"task-{i}")
    _wait_idle(pipeline)
    assert len(spans(exporter, "shadowed shadow")) == len(chosen)


def test_the_shadow_cost_cap_holds_and_then_the_executor_stops_shadowing(tracer, close_after):
    tracer, exporter = tracer
    calls, written = [], []
    pipeline = _pipeline(tracer, calls, written)
    close_after(pipeline)
    with_config(pipeline, check={"cascade_threshold": 0.5})
    capped_before = sample("tracetune_shadow_tasks_total", pipeline="shadowed", outcome="capped")
    spent_before = sample("tracetune_shadow_cost_usd_total", pipeline="shadowed")
    pipeline.apply_shadow(_trial(cap=0.05))  # 0.01 USD a shadow run: five runs reach the cap
    for i in range(30):
        pipeline.run("0.8", task_id=f"c{i}")
        _wait_idle(pipeline)
    roots = spans(exporter, "shadowed shadow")
    spent = sum(r.attributes["tracetune.shadow_cost_usd"] for r in roots)
    assert len(roots) == 5 and spent == pytest.approx(0.05) and len(calls) == 5
    assert pipeline.shadow.spent_last_hour() == pytest.approx(0.05)
    assert sample("tracetune_shadow_cost_usd_total", pipeline="shadowed") - spent_before == pytest.approx(0.05)
    assert sample("tracetune_shadow_tasks_total", pipeline="shadowed", outcome="capped") - capped_before == 25


def test_a_shadow_never_delays_the_answer_behind_a_slow_candidate(tracer, close_after):
    """The shadow runs after the answer on one worker: a remote that hangs holds the worker, not the tasks."""
    tracer, _ = tracer
    release, entered = threading.Event(), threading.Event()

    def hanging(text: str) -> str:
        entered.set()
        release.wait()
        return "late"

    pipeline = Pipeline("patient", [Infer("guess", {"m": scored}),
                                    Cascade("check", after="guess", remote=hanging, threshold=0.5)], tracer=tracer)
    close_after(pipeline)
    with_config(pipeline, check={"cascade_threshold": 0.5})
    pipeline.apply_shadow(_trial() | {"steps": {"check": {"cascade_threshold": 0.9}}})
    answers: list[str] = []
    tasks = threading.Thread(target=lambda: answers.extend(
        pipeline.run("0.8", task_id=f"p{i}").data["guess"] for i in range(5)))
    try:
        tasks.start()
        tasks.join(20)  # a shadow run in the task's way would hang here until the release below
        assert not tasks.is_alive() and answers == ["local"] * 5
        assert entered.wait(5)  # the shadow did call the hanging remote, behind the answers
    finally:
        release.set()
    _wait_idle(pipeline)


def test_a_shadow_that_does_not_fit_is_refused_and_the_one_in_hand_goes_on(tracer, close_after):
    tracer, _ = tracer
    pipeline = _pipeline(tracer, [], [])
    close_after(pipeline)
    with_config(pipeline, check={"cascade_threshold": 0.5})
    with pytest.raises(ConfigError, match="steps.check.cascade_threshold"):
        pipeline.apply_shadow(_trial() | {"steps": {"check": {"cascade_threshold": 3.0}}})
    with pytest.raises(ConfigError, match="changes no knob"):
        pipeline.apply_shadow(_trial() | {"steps": {"check": {"cascade_threshold": 0.5}}})
    with pytest.raises(ConfigError, match="share"):
        pipeline.apply_shadow(_trial(share=0.0))
    assert pipeline.shadow is None
