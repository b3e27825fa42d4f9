"""Knob, PipelineConfig and PipelineSpec as pure functions: values in, values or one-line errors out."""

from __future__ import annotations

import json
import math

import pytest

from tracetune.tuner.config import ConfigError, Knob, PipelineConfig, PipelineSpec


def spec(**extra_classify: Knob) -> PipelineSpec:
    return PipelineSpec("triage", {
        "classify": {"batch_max_size": Knob("int", 8, 1, 1024, "items"),
                     "route_weights": Knob("weights", {"a": 0.5, "b": 0.5}),
                     "cache_enabled": Knob("bool", True), **extra_classify},
        "escalate": {"cascade_threshold": Knob("float", 0.45, 0, 1)},
    }, {"p95_ms": 500.0})


def error(call, *args) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# Knob.check


@pytest.mark.parametrize(("knob", "value", "expected"), [
    (Knob("bool", True), False, False),
    (Knob("int", 8, 1, 1024), 16.0, 16),
    (Knob("float", 0.45, 0, 1), 1, 1.0),
    (Knob("float", 0.45, 0, 1), 0, 0.0),
    (Knob("int", 8, 1), 10**6, 10**6),
])
def test_check_coerces_to_the_kind(knob, value, expected):
    checked = knob.check("steps.s.k", value)
    assert checked == expected and type(checked) is type(expected)


@pytest.mark.parametrize(("knob", "value", "words"), [
    (Knob("bool", True), 1, "true or false"),
    (Knob("bool", True), "true", "true or false"),
    (Knob("int", 8, 1, 1024), True, "must be a number"),
    (Knob("float", 0.5, 0, 1), False, "must be a number"),
    (Knob("int", 8, 1, 1024), "8", "must be a number"),
    (Knob("int", 8, 1, 1024), 2.5, "whole number"),
    (Knob("int", 8, 1, 1024, "items"), 0, "between 1 and 1024 items, got 0"),
    (Knob("int", 8, 1, 1024, "items"), 2000, "between 1 and 1024 items, got 2000"),
    (Knob("float", 1.0, low=0, unit="s"), -1, "at least 0 s"),
    (Knob("float", 1.0, high=5), 6, "at most 5, got 6"),
    (Knob("float", 0.5, 0, 1), math.nan, "must be a number"),
    (Knob("float", 0.5), math.inf, "must be a number"),
    (Knob("int", 8), -math.inf, "must be a number"),
])
def test_check_rejects_in_one_line_naming_the_field(knob, value, words):
    message = error(knob.check, "steps.s.k", value)
    assert message.startswith("steps.s.k ") and words in message


def test_weights_are_checked_against_the_declared_routes():
    knob = Knob("weights", {"a": 0.5, "b": 0.5})
    assert knob.check("steps.s.w", {"a": 3, "b": 1}) == {"a": 3.0, "b": 1.0}
    assert knob.check("steps.s.w", {"b": 1}) == {"a": 0.0, "b": 1.0}  # a route left out gets 0

    unknown = error(knob.check, "steps.s.w", {"a": 1, "c": 1})
    assert "steps.s.w" in unknown and "'c'" in unknown and "['a', 'b']" in unknown
    assert "steps.s.w.a" in error(knob.check, "steps.s.w", {"a": -1, "b": 1})
    assert "steps.s.w.a" in error(knob.check, "steps.s.w", {"a": True, "b": 1})
    assert "steps.s.w.b" in error(knob.check, "steps.s.w", {"a": 1, "b": math.nan})
    assert "positive weight" in error(knob.check, "steps.s.w", {"a": 0, "b": 0})
    assert "positive weight" in error(knob.check, "steps.s.w", {})
    assert "map routes" in error(knob.check, "steps.s.w", [0.5, 0.5])


def test_a_knob_of_unknown_kind_is_refused():
    assert "'nope'" in error(Knob, "nope", 1)


# PipelineSpec: JSON form


def test_spec_round_trips_through_json():
    declared = spec(batch_max_wait_ms=Knob("float", 5.0, 0, 10_000, "ms", "longest wait for a batch"))
    data = json.loads(json.dumps(declared.to_dict()))
    assert PipelineSpec.from_dict(data) == declared
    assert data["steps"]["classify"]["batch_max_wait_ms"] == {
        "kind": "float", "default": 5.0, "low": 0, "high": 10_000, "unit": "ms", "help": "longest wait for a batch"}
    assert data["steps"]["classify"]["cache_enabled"] == {"kind": "bool", "default": True}
    assert data["slo"] == {"p95_ms": 500.0}


@pytest.mark.parametrize(("data", "words"), [
    ([], "pipeline name"),
    ({"steps": {}}, "pipeline name"),
    ({"pipeline": 3}, "pipeline name"),
    ({"pipeline": "p", "steps": ["s"]}, "steps must map"),
    ({"pipeline": "p", "steps": {"s": 1}}, "steps must map"),
    ({"pipeline": "p", "slo": [500]}, "slo must be an object"),
    ({"pipeline": "p", "steps": {"s": {"k": 5}}}, "steps.s.k must be an object with kind and default"),
    ({"pipeline": "p", "steps": {"s": {"k": {"kind": "int"}}}}, "steps.s.k must be an object with kind and default"),
    ({"pipeline": "p", "steps": {"s": {"k": {"kind": "int", "default": 1, "max": 3}}}}, "steps.s.k has unknown fields"),
    ({"pipeline": "p", "steps": {"s": {"k": {"kind": "nope", "default": 1}}}}, "steps.s.k"),
    ({"pipeline": "p", "steps": {"s": {"k": {"kind": "int", "default": 0, "low": 1}}}}, "steps.s.k.default"),
    ({"pipeline": "p", "steps": {"s": {"k": {"kind": "bool", "default": "yes"}}}}, "steps.s.k.default"),
    ({"pipeline": "p", "steps": {"s": {"k": {"kind": "weights", "default": {}}}}}, "steps.s.k.default"),
])
def test_spec_from_dict_rejects_malformed_declarations(data, words):
    assert words in error(PipelineSpec.from_dict, data)


def test_defaults_are_the_declared_values_at_version_1():
    declared = PipelineSpec("p", {**spec().steps, "clean": {}})
    config = declared.defaults()
    assert config == PipelineConfig("p", 1, {
        "classify": {"batch_max_size": 8, "route_weights": {"a": 0.5, "b": 0.5}, "cache_enabled": True},
        "escalate": {"cascade_threshold": 0.45}})  # a step without knobs has no entry
    assert declared.defaults(version=0).version == 0
    assert config.knob("classify", "batch_max_size") == 8 and config.knob("clean", "x", "none") == "none"


# PipelineSpec: check and merge


def test_check_coerces_values_and_names_unknown_steps_and_knobs():
    declared = spec()
    checked = declared.check(PipelineConfig("triage", 3, {"classify": {"batch_max_size": 16.0}}))
    assert checked == PipelineConfig("triage", 3, {"classify": {"batch_max_size": 16}})

    step = error(declared.check, PipelineConfig("triage", 1, {"route": {"x": 1}}))
    assert step.startswith("steps.route:") and "classify, escalate" in step
    knob = error(declared.check, PipelineConfig("triage", 1, {"classify": {"batch_size": 1}}))
    assert knob.startswith("steps.classify.batch_size:")
    assert "batch_max_size, route_weights, cache_enabled" in knob
    bounds = error(declared.check, PipelineConfig("triage", 1, {"escalate": {"cascade_threshold": 2}}))
    assert bounds.startswith("steps.escalate.cascade_threshold must be between 0 and 1")


def test_merge_bumps_the_version_and_keeps_untouched_knobs():
    declared = spec()
    current = declared.defaults()
    merged = declared.merge(current, {"classify": {"batch_max_size": 32, "route_weights": {"b": 1}}})
    assert merged.version == 2
    assert merged.steps == {
        "classify": {"batch_max_size": 32, "route_weights": {"a": 0.0, "b": 1.0}, "cache_enabled": True},
        "escalate": {"cascade_threshold": 0.45}}
    assert current == declared.defaults()  # not changed in place
    assert "steps.classify.batch_max_size" in error(declared.merge, current, {"classify": {"batch_max_size": 0}})
    assert "steps.classify must be an object" in error(declared.merge, current, {"classify": 32})
    assert "steps.nope" in error(declared.merge, current, {"nope": {"x": 1}})


# PipelineSpec.reconcile


def test_reconcile_starts_a_new_pipeline_on_its_defaults():
    declared = spec()
    assert declared.reconcile(None) == (declared.defaults(), "declared defaults")


def test_reconcile_keeps_a_config_that_fits():
    declared = spec()
    assert declared.reconcile(declared.defaults()) is None
    tuned = declared.merge(declared.defaults(), {"classify": {"batch_max_size": 64}})
    assert declared.reconcile(tuned) is None
    stored = PipelineConfig.from_dict(json.loads(json.dumps(tuned.to_dict())))
    assert declared.reconcile(stored) is None


def test_reconcile_gives_a_new_knob_its_default():
    tuned = spec().merge(spec().defaults(), {"classify": {"batch_max_size": 64}})
    config, reason = spec(batch_max_wait_ms=Knob("float", 5.0, 0, 100)).reconcile(tuned)
    assert config.version == tuned.version + 1
    assert config.steps["classify"] == {"batch_max_size": 64, "route_weights": {"a": 0.5, "b": 0.5},
                                        "cache_enabled": True, "batch_max_wait_ms": 5.0}
    assert "classify.batch_max_wait_ms" in reason and "dropped" not in reason


def test_reconcile_drops_knobs_no_longer_declared():
    declared = spec()
    current = PipelineConfig("triage", 4, {**declared.defaults().steps,
                                           "classify": {**declared.defaults().steps["classify"], "old_knob": 3},
                                           "gone": {"x": 1}})
    config, reason = declared.reconcile(current)
    assert config == declared.defaults(version=5)
    assert "dropped" in reason and "classify.old_knob" in reason and "gone.x" in reason
    assert "defaults for" not in reason


def test_reconcile_resets_a_value_the_new_bounds_refuse():
    tuned = spec().merge(spec().defaults(), {"classify": {"batch_max_size": 512, "cache_enabled": False}})
    narrower = PipelineSpec("triage", {**spec().steps, "classify": {
        **spec().steps["classify"], "batch_max_size": Knob("int", 8, 1, 64)}})
    config, reason = narrower.reconcile(tuned)
    assert config.version == 3
    assert config.steps["classify"]["batch_max_size"] == 8  # back to the default
    assert config.steps["classify"]["cache_enabled"] is False  # still allowed, so kept
    assert "classify.batch_max_size" in reason


def test_reconcile_names_values_the_declaration_reshapes():
    """A weights knob gaining a route keeps the stored weights and gives the new route 0, with a reason."""
    tuned = spec().merge(spec().defaults(), {"classify": {"route_weights": {"a": 1.0, "b": 0.0}}})
    wider = spec(route_weights=Knob("weights", {"a": 0.4, "b": 0.4, "c": 0.2}))
    config, reason = wider.reconcile(tuned)
    assert config.steps["classify"]["route_weights"] == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert reason == "declaration changed: adjusted classify.route_weights"
    assert wider.reconcile(config) is None


def test_a_knob_default_takes_the_knob_kind():
    knob = Knob("float", 5, 0, 10)
    assert knob.default == 5.0 and isinstance(knob.default, float)
    declared = PipelineSpec("p", {"s": {"wait": knob}})
    assert declared.reconcile(declared.defaults()) is None


@pytest.mark.parametrize("fields, words", [
    ({"low": 10, "high": 1}, ["reversed", "low 10 > high 1"]),
    ({"low": "a"}, ["low must be a finite number", "'a'"]),
    ({"high": math.inf}, ["high must be a finite number"]),
])
def test_knob_bounds_are_checked(fields, words):
    message = error(Knob.from_dict, "steps.s.k", {"kind": "int", "default": 5, **fields})
    assert message.startswith("steps.s.k") and all(word in message for word in words)


# PipelineConfig


def test_config_json_form_and_etag():
    config = spec().defaults(version=7)
    assert PipelineConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.etag == '"triage-v7"' and config.etag != spec().defaults(version=8).etag


@pytest.mark.parametrize("data", [
    {"pipeline": "p", "steps": {"classify": 8}},
    {"pipeline": "p", "steps": {"classify": [8]}},
    {"pipeline": "p", "steps": ["classify"]},
    {"steps": {}},
    {"pipeline": "p", "steps": []},
    {"pipeline": "p", "version": "x"},
    {"pipeline": "p", "version": -1},
    "p",
])
def test_config_from_dict_rejects_non_object_steps(data):
    error(PipelineConfig.from_dict, data)
