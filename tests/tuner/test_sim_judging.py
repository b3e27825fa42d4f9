"""The simulation's fidelity to the executor (one arrival trace through both), its canaries, the baselines'
controllers, and the oracles and verdict a tuner is judged by."""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import replace

import pytest

from tests.tuner.test_simulate import _Classifier, _Tier, workload
from tracetune.analyzer import SLO, load_prices
from tracetune.executor.batcher import Batcher
from tracetune.executor.cache import TTLCache
from tracetune.tuner import calibration, oracles, simarms, simulate
from tracetune.tuner.batching import ServiceModel
from tracetune.tuner.loop import LoopSettings


@pytest.fixture(scope="module")
def spec():
    from tracetune.demo import triage

    return triage.build({v: _Classifier() for v in triage.VARIANTS}, llm={t: _Tier() for t in triage.LLM_TIERS},
                        crm_url="http://127.0.0.1:9").spec()


SERVICE_MS = 10.0
WAIT_MS = 60.0
SIZE = 4


def _bursts(seed: int, count: int = 18) -> tuple[float, ...]:
    """Bursts of 1-4 requests (never more than a batch) 500-700 ms apart: each burst waits its max_wait, then
    leaves in one batch per length bucket, long before the next burst (so thread timing cannot merge them)."""
    rng = random.Random(seed)
    t, out = 0.5, []
    for _ in range(count):
        out += [t] * rng.randint(1, SIZE)
        t += rng.uniform(0.5, 0.7)
    return tuple(out)


def test_one_trace_through_the_executor_batcher_and_the_simulation_forms_the_same_batches(spec):
    """The simulation forms batches by the executor's own rules (tracetune.base.batching): the same trace through
    the real threaded `Batcher` and through the simulation gives the same batches, bucketed by length."""
    arrivals = _bursts(3)
    steady = replace(calibration.DEMO, routes={**calibration.DEMO.routes, "fp32": replace(
        calibration.DEMO.routes["fp32"], service=ServiceModel(SERVICE_MS, 0.0), service_sigma=0.0)})
    config = {"classify": {"route_weights": {"fp32": 1.0, "int8": 0.0}, "cache_enabled": False,
                           "batch_max_size": SIZE, "batch_max_wait_ms": WAIT_MS, "length_bucketing": True}}
    w = simulate.Workload(arrivals, arrivals[-1] + 5, duplicate_ratio=0.0, seed=4)
    sim = simulate._Simulation(spec, steady, w, None, simulate.Arm("s", "static", config), load_prices(),
                               LoopSettings(), 5.0, 1)
    sim.run()
    lengths = [int(sim.length[sim.ticket[i]]) for i in range(len(arrivals))]
    simulated = [sorted(b) for b in sim.batch_tasks]
    assert any(len(b) > 1 for b in simulated) and len(simulated) > len(set(arrivals))  # buckets split bursts

    seen: list[list[int]] = []
    lock = threading.Lock()

    def run_batch(items):
        with lock:
            seen.append(sorted(items))
        time.sleep(SERVICE_MS / 1000)
        return items

    batcher = Batcher("replay", run_batch, max_size=SIZE, max_wait_ms=WAIT_MS, length=lambda i: lengths[i],
                      bucket_by_length=True)
    try:
        start = time.monotonic()
        futures = []
        for at in sorted(set(arrivals)):
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            # A burst lands at once, as in the simulation, however busy the machine is.
            futures += batcher.submit_many([i for i, t in enumerate(arrivals) if t == at])
        for f in futures:
            f.result(timeout=30)
    finally:
        batcher.close()
    assert seen == simulated


def test_the_simulated_cache_hits_where_the_executors_cache_would(spec):
    """Replaying the simulation's own lookups and stores through the executor's TTLCache on the same clock
    gives the hits the simulation recorded (TTL short enough to expire entries within the run)."""
    config = {"classify": {"route_weights": {"fp32": 1.0, "int8": 0.0}, "cache_ttl_seconds": 20.0,
                           "cache_max_entries": 50}}
    sim = simulate._Simulation(spec, calibration.DEMO, workload(4, rate=10, duplicates=0.4, pattern="steady"), None,
                               simulate.Arm("s", "static", config), load_prices(), LoopSettings(), 5.0, 1)
    sim.run()
    spans = sim.model_spans.all()
    events = []  # (time, order, kind, key): lookups at a span's start, stores at a miss's end
    for start, duration, cache, ticket in zip(spans["start"], spans["duration"], spans["cache"], spans["ticket"],
                                              strict=True):
        events.append((float(start), 1, "get", int(ticket), int(cache)))
        if cache == 1:
            events.append((float(start) + float(duration) / 1000, 0, "put", int(ticket), 1))
    now = [0.0]
    store = TTLCache(50, 20.0, clock=lambda: now[0])
    got, want = [], []
    for when, _, kind, ticket, cache in sorted(events, key=lambda e: (e[0], e[1])):
        now[0] = when
        if kind == "put":
            store.put(f"fp32|{ticket}", True)
        else:
            got.append(store.get(f"fp32|{ticket}") is not TTLCache.MISSING)
            want.append(cache == 0)
    assert sum(want) > 50  # repeats hit
    assert got == want


def test_the_tuner_arm_tries_each_change_on_a_canary_first(spec):
    """The loop's canary in virtual time: a share of tasks runs the trial's version until `canary.judge` decides."""
    settings = LoopSettings()
    sim = simulate._Simulation(spec, calibration.DEMO, workload(16, rate=20), SLO(spec.pipeline, **spec.slo),
                               simulate.Arm("tuner", "tuner"), load_prices(), settings, 5.0, 1)
    sim.run()
    kinds = [d["kind"] for d in sim.decisions]
    assert kinds and kinds[0] == "canary_start"
    assert set(kinds) <= {"canary_start", "canary_promote", "canary_rollback"}
    first_end = next(d for d in sim.decisions if d["kind"] != "canary_start")
    start = sim.decisions[0]["at_seconds"]
    roots = sim.requests.all()
    during = (roots["start"] >= start + 5) & (roots["start"] < first_end["at_seconds"])
    on_trial = roots["version"][during] != 1
    assert on_trial.mean() == pytest.approx(settings.canary_share, abs=0.05)
    assert sim.canaries["promoted"] + sim.canaries["rolled_back"] >= 1


def test_a_canary_lane_shares_the_parts_its_changes_do_not_touch(spec):
    """As Step.fork: a canary that changes only the cascade threshold uses the classify batchers and caches of
    the config in force; one that changes batching gets batchers of its own."""
    sim = simulate._Simulation(spec, calibration.DEMO, workload(1, rate=5), None, simulate.Arm("d"), load_prices(),
                               LoopSettings(), 5.0, 1)
    base = sim.lane
    same = simulate._Lane(sim, spec.merge(sim.config, {"escalate": {"cascade_threshold": 0.5}}), base)
    assert same.batchers["classify"] is base.batchers["classify"] and same.model_cache is base.model_cache
    assert same.limit is base.limit and same.threshold == 0.5 and base.threshold == 0.6
    batched = simulate._Lane(sim, spec.merge(sim.config, {"classify": {"batch_max_size": 2}}), base)
    assert batched.batchers["classify"] is not base.batchers["classify"] and batched.model_cache is base.model_cache
    assert all(b.size == 2 for b in batched.batchers["classify"].values())
    assert all(b.size == 8 for b in base.batchers["classify"].values())


def test_aimd_grows_every_numeric_knob_while_objectives_hold_and_halves_when_missed(spec):
    sim = simulate._Simulation(spec, calibration.DEMO, workload(8, rate=10), SLO(spec.pipeline, **spec.slo),
                               simulate.Arm("aimd", "aimd"), load_prices(), LoopSettings(), 5.0, 1)
    sim.run()
    first = sim.decisions[0]
    numeric = {(d.step, d.name) for d in simarms.space(spec) if d.knob.kind in ("int", "float")}
    moved = {(step, knob) for step, values in first["changes"].items() for knob in values}
    assert moved == numeric  # every numeric knob, none of the bools or weights
    assert first["changes"]["escalate"]["cascade_threshold"] == pytest.approx(0.6 + 0.06)
    strict = SLO(spec.pipeline, p95_ms=1.0)  # missed from the start
    sim = simulate._Simulation(spec, calibration.DEMO, workload(8, rate=10), strict, simulate.Arm("aimd", "aimd"),
                               load_prices(), LoopSettings(), 5.0, 1)
    sim.run()
    assert sim.decisions[0]["changes"]["classify"]["batch_max_size"] == 4  # 1 + (8 - 1) / 2, rounded


def test_gateway_rule_takes_the_cheapest_route_that_holds_the_floor(spec):
    prices = load_prices()
    cal = calibration.DEMO
    config = simarms.gateway_config(spec, cal, SLO(spec.pipeline, quality_floor=0.9), prices)
    assert config["classify"]["route_weights"] == {"fp32": 0.0, "int8": 1.0}  # both hold 0.9: the cheaper
    assert config["escalate"]["route_weights"] == {"llm-small": 0.0, "llm-large": 1.0}  # only large holds 0.9
    config = simarms.gateway_config(spec, cal, SLO(spec.pipeline, quality_floor=0.99), prices)
    assert config["classify"]["route_weights"] == {"fp32": 1.0, "int8": 0.0}  # none holds: the most accurate


def test_space_draws_stay_inside_the_declaration(spec):
    rng = random.Random(2)
    for _ in range(50):
        config = simarms.sample(spec, rng)
        spec.merge(spec.defaults(), config)  # ConfigError if any value is out of its declared bounds
        spec.merge(spec.defaults(), simarms.perturb(spec, config, rng))
    dims = {(d.step, d.name): d for d in simarms.space(spec)}
    assert dims[("classify", "cache_ttl_seconds")].log and not dims[("escalate", "cascade_threshold")].log


def test_wilson_bound():
    from scipy.stats import binomtest

    for right, n in ((93, 100), (930, 1000), (7, 10)):  # one-sided 95% = the low end of the two-sided 90% interval
        reference = binomtest(right, n).proportion_ci(confidence_level=0.90, method="wilson").low
        assert oracles.quality_bound(right, n) == pytest.approx(reference, abs=1e-6)
    assert oracles.quality_bound(930, 1000) < 0.93 < oracles.quality_bound(9500, 10000)
    assert math.isnan(oracles.quality_bound(0, 0))


def _row(cost, half, windows=1.0, quality=0.95, n=10_000):
    return {"cost_per_1k": cost, "cost_per_1k_half": half, "slo_windows": windows, "quality_after": quality,
            "labelled_after": n}


def test_verdict_needs_every_check():
    slo = SLO("p", p95_ms=500, quality_floor=0.93)
    default, oracle = _row(10.0, 10.0), _row(2.0, 2.0)
    assert oracles.verdict(_row(4.0, 2.1), default, oracle, slo)["passed"]
    for bad, check in ((_row(4.0, 2.2), "vs_static_oracle_last_half"), (_row(5.1, 2.0), "vs_default"),
                       (_row(4.0, 2.0, windows=0.98), "slo_windows"),
                       (_row(4.0, 2.0, quality=0.931, n=2000), "quality_bound")):
        v = oracles.verdict(bad, default, oracle, slo)
        assert not v["passed"] and [k for k, c in v["checks"].items() if not c["ok"]] == [check]


def test_the_closest_infeasible_run_weighs_the_quality_bound_beside_the_windows():
    slo = SLO("p", p95_ms=500, quality_floor=0.88)
    fast_but_wrong = _row(0.04, 0.04, windows=1.0, quality=0.78)
    at_the_floor_missing_windows = _row(0.3, 0.3, windows=0.90, quality=0.90)
    assert oracles.shortfall(_row(0.3, 0.3, windows=0.99, quality=0.90), slo) == 0.0
    assert oracles.shortfall(at_the_floor_missing_windows, slo) == pytest.approx(0.09 / 0.99)
    assert oracles.shortfall(fast_but_wrong, slo) > 0.8  # (0.88 - 0.774) / 0.12
    assert oracles.shortfall(at_the_floor_missing_windows, slo) < oracles.shortfall(fast_but_wrong, slo)
    assert oracles.shortfall(fast_but_wrong, SLO("p", p95_ms=500)) == 0.0  # no floor: windows alone


def test_hindsight_oracle_is_the_cheapest_candidate_holding_every_objective_on_the_seed():
    slo = SLO("p", p95_ms=500, quality_floor=0.93)
    under_floor = {**_row(1.0, 1.0, quality=0.931, n=2000), "grid_config": "under"}  # bound 0.9205
    slow = {**_row(1.5, 1.5, windows=0.98), "grid_config": "slow"}
    dear_first_half = {**_row(9.0, 2.0), "grid_config": "holds"}  # judged on the last half, as the verdict is
    holds_dearer = {**_row(2.5, 2.5), "grid_config": "dearer"}
    best = oracles.hindsight([under_floor, slow, holds_dearer, dear_first_half], slo)
    assert best["feasible"] and best["grid_config"] == "holds" and best["arm"] == "static oracle (hindsight)"
    assert best["candidates"] == 4
    none = oracles.hindsight([under_floor, slow], slo)
    assert not none["feasible"] and math.isnan(none["cost_per_1k_half"])


def test_per_phase_oracle_takes_each_phases_cheapest_feasible_run():
    slo = SLO("p", p95_ms=500, quality_floor=0.5)

    def run(name, costs, p95s):
        return {"grid_config": name, "windows": [
            {"minute": m, "requests": 100, "cost_per_1k": c, "p95_ms": p, "p99_ms": p, "right": 90}
            for m, (c, p) in enumerate(zip(costs, p95s, strict=True))]}

    rows = [run("a", [1, 1, 1, 1], [100, 100, 100, 100]), run("b", [0.5, 0.5, 3, 3], [100, 100, 900, 900]),
            run("c", [5, 5, 0.8, 0.8], [100, 100, 100, 100])]
    best = oracles.per_phase(rows, [(0, 120), (120, 240)], slo, skip_seconds=0)
    assert [p["config"] for p in best["phases"]] == ["b", "c"]
    assert best["cost_per_1k"] == pytest.approx(0.65) and best["feasible"]


def test_search_finds_a_feasible_config_cheaper_than_the_default(spec):
    slo = SLO(spec.pipeline, **spec.slo)
    w = workload(8, rate=10)
    best, rows = oracles.search(spec, calibration.DEMO, w, slo=slo, evaluations=14, seed=1)
    assert len(rows) == 14 and rows[0]["grid_config"] == {}
    assert best["feasible"] and best["cost_per_1k"] < rows[0]["cost_per_1k"]
    assert best["cost_per_1k"] == min(r["cost_per_1k"] for r in rows if r["feasible"])


def test_search_starts_from_the_corners_and_runs_its_screened_best_in_full(spec):
    corners = oracles.corners(spec)
    # Every routed step on each route alone, every switch both ways: all combinations.
    routed = [d for d in simarms.space(spec) if d.knob.kind == "weights"]
    switches = [d for d in simarms.space(spec) if d.knob.kind == "bool"]
    assert len(corners) == math.prod(len(d.knob.default) for d in routed) * 2 ** len(switches)
    assert len({repr(c) for c in corners}) == len(corners)
    assert {"fp32": 0.0, "int8": 1.0} in [c["classify"]["route_weights"] for c in corners]
    assert {"llm-small": 1.0, "llm-large": 0.0} in [c["escalate"]["route_weights"] for c in corners]
    slo = SLO(spec.pipeline, **spec.slo)
    full, short = workload(8, rate=10), workload(4, rate=10)
    seen, log = [], []
    best, rows = oracles.search(spec, calibration.DEMO, full, slo=slo, evaluations=12, seed=1, screen=short,
                                finalists=3, phases=0, progress=lambda done, total: seen.append((done, total)),
                                log=log)
    assert [r["screened"] for r in log] == [True] * 12 + [False] * len(rows)  # every run, screened ones too
    # 12 screening runs on the short load, then the default and the 3 cheapest feasible in full.
    assert seen[-1][0] == 12 + len(rows) and 2 <= len(rows) <= 4 and rows[0]["grid_config"] == {}
    assert all(r["requests"] > 0 and r["windows"][-1]["minute"] >= 7 for r in rows)  # full runs, 8 minutes
    assert best in [dict(r) for r in rows] and (not best["feasible"] or best["cost_per_1k"] == min(
        r["cost_per_1k"] for r in rows if r["feasible"]))


def test_the_static_oracle_is_the_cheapest_feasible_on_a_second_seed_too(spec):
    """A config called feasible on the search seed that misses the floor on the validation seed (classify on
    int8 alone with nothing escalated, 0.79 right) is passed over for the next cheapest that holds there; a
    config found twice is run once; with none holding there, the search seed's cheapest, not validated."""
    slo = SLO(spec.pipeline, **spec.slo)
    lucky = {"classify": {"route_weights": {"fp32": 0.0, "int8": 1.0}}, "escalate": {"cascade_threshold": 0.0}}
    rows = [{"grid_config": lucky, "feasible": True, "cost_per_1k": 0.0001},
            {"grid_config": lucky, "feasible": True, "cost_per_1k": 0.0001},
            {"grid_config": {}, "feasible": True, "cost_per_1k": 0.009},
            {"grid_config": {"escalate": {"cascade_threshold": 0.9}}, "feasible": False, "cost_per_1k": 0.001}]
    best, run = oracles.validated(spec, calibration.DEMO, rows, workload(8, rate=10, seed=2), slo=slo)
    assert best["grid_config"] == {} and best["validated"] and run == 2
    alone, run = oracles.validated(spec, calibration.DEMO, rows[:2], workload(8, rate=10, seed=2), slo=slo)
    assert alone["grid_config"] == lucky and not alone["validated"] and run == 1


def test_optuna_arm_runs_trials_as_canaries(spec):
    pytest.importorskip("optuna")
    row = simulate.simulate(spec, calibration.DEMO, workload(12, rate=20), simulate.Arm("optuna", "optuna", seed=1))
    kinds = [d["kind"] for d in row["decisions"]]
    assert kinds.count("canary_start") >= 4
    assert row["canaries"]["promoted"] + row["canaries"]["rolled_back"] >= kinds.count("canary_start") - 1


def _two_model_steps():
    """A pipeline of another shape, declared with the executor's own step classes: two model steps (one of
    them a pair of rerankers) before a two-tier cascade with an answer cache, no side effect."""
    from tracetune.executor import Batching, Cache, Cascade, Infer, Pipeline, Step

    spec = Pipeline("answers", [
        Step("normalize", lambda task: None),
        Infer("embed", {"fp32": lambda xs: xs}, batching=Batching(max_size=8, max_wait_ms=5.0),
              cache=Cache(ttl_seconds=600, max_entries=1000)),
        Step("retrieve", lambda task: None),
        Infer("rerank", {"small": lambda xs: xs, "large": lambda xs: xs}, weights={"small": 0.5, "large": 0.5},
              batching=Batching(max_size=4, max_wait_ms=10.0)),
        Cascade("generate", after="rerank", remote={"llm-small": lambda x: x, "llm-large": lambda x: x},
                weights={"llm-small": 0.5, "llm-large": 0.5}, threshold=0.7, route="llm",
                cache=Cache(enabled=False, ttl_seconds=600, max_entries=1000)),
    ], slo={"p95_ms": 1500.0, "quality_floor": 0.9}).spec()
    demo = calibration.DEMO
    cal = replace(demo, routes={"small": demo.routes["int8"], "large": replace(demo.routes["fp32"], accuracy=0.95)},
                  models={"embed": {"fp32": demo.routes["fp32"]}}, plain_ms={"retrieve": 2.0}, effect_share=0.0)
    return spec, cal


def test_a_pipeline_of_another_shape_runs_on_its_declared_steps():
    spec, cal = _two_model_steps()
    sim = simulate._Simulation(spec, cal, workload(6, rate=10, duplicates=0.3), SLO(spec.pipeline, **spec.slo),
                               simulate.Arm("tuner", "tuner"), load_prices(), LoopSettings(label_window_seconds=300),
                               5.0, 1)
    assert sim.models == ["embed", "rerank"] and sim.model_step == "rerank" and sim.effect is None
    assert [kind for kind, _ in sim.stages] == ["model", "model", "cascade"]
    assert sim.gaps[1] == pytest.approx(0.002)  # retrieve, between embed and rerank
    sim.run()
    obs = sim.observe(360.0)
    assert set(obs.steps["rerank"]) == {"small", "large"} and set(obs.steps["embed"]) == {"fp32"}
    assert obs.batches["embed"] and obs.batches["rerank"]
    assert sum(r.hits for r in obs.steps["embed"].values()) > 0  # repeats hit the embed cache
    assert obs.steps["embed"]["fp32"].cost > 0
    assert len(obs.cascade_samples["generate"]) == pytest.approx(obs.requests, abs=5)  # spans at the window's edges
    assert sim.decisions and sim.decisions[0]["kind"] == "canary_start"  # the same loop, on the declared knobs
    with pytest.raises(ValueError, match="no physics for model steps"):
        simulate._Simulation(spec, replace(cal, models={}), workload(1, rate=1), None, simulate.Arm("d"),
                             load_prices(), LoopSettings(), 5.0, 1)
