"""Canary verdicts in Monte Carlo: how often `tuner.canary.judge` decides rightly, and after how many tasks.

Each run replays one canary as the loop judges it: tasks arrive at RATE per second, CANARY_SHARE of them
on the canary, and `judge` sees every task so far after each LOOK_SECONDS (the loop's interval) until it
promotes or rolls back, or the canary's time (MAX_SECONDS, the loop's `canary_max_seconds`) runs out (a cheaper
canary that twice its tasks would show runs on up to twice that, as in the loop).
Tasks look like the demo's: ~11% escalate to an LLM (two tiers, 70/30), which sets both the latency tail
and nearly all the cost (per-task cost has a coefficient of variation near 3: cost differences take
thousands of tasks to see); 10% of tasks are labelled; 0.5% fail.

Scenarios: A/A (identical configs; right = neither promoted nor rolled back for a difference), a canary
10% dearer at equal latency and quality (right = rolled back), 30% cheaper (right = promoted), and one
25% dearer that brings a missed p95 target back (right = promoted, the reason saying it is dearer); and two
30% cheaper ones whose decisions predicted lower quality: one under the 0.93 floor (0.90 against the config in
force's 0.95; right = rolled back, not promoted on cost first) and one still over it (0.95 against 0.97; right
= promoted); and three whose decisions bought quality for a floor at risk, predicted 15% dearer: one as
predicted and a little more often right (right = promoted on doing no harm), one 40% dearer (right = rolled
back), one less often right (0.90 against 0.935, under the floor; right = rolled back). Threshold moves, the
canary escalating fewer or more tasks: 8% cheaper (right = promoted) with costs as measured, and with costs
adjusted for whether each config would escalate each task (`canary.Compared`, what the loop does for a canary
changing only cascades) the A/A, 10% dearer by price and by escalating more (right = rolled back) and
8% cheaper (right = promoted); and tier moves (escalations sent to the small tier more often), adjusted for the
escalations alone or for the tier each config draws for each task too (`canary.both_covariates`):
10% cheaper (right = promoted), A/A and 10% dearer (right = rolled back).

    .venv/bin/python bench/canary.py                  # 1000 runs per scenario, about 20 minutes
    .venv/bin/python bench/canary.py --runs 200 --seed 3
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from tracetune.analyzer import SLO  # noqa: E402
from tracetune.tuner.canary import Arm, judge, out_of_time  # noqa: E402

RATE = 15.0  # tasks per second, the load a new user tried the demo at
CANARY_SHARE = 0.2  # the loop's default tuner_canary_share
LOOK_SECONDS = 60.0  # the loop's default interval: judged once a minute
MAX_SECONDS = 1800.0  # the loop's default tuner_canary_max_seconds
MIN_REQUESTS = 200  # the loop's default tuner_canary_min_requests
SLO_DEMO = SLO(pipeline="ticket_triage", p95_ms=500.0, error_rate=0.02, quality_floor=0.93)


@dataclass(frozen=True)
class Config:
    """What one arm's tasks look like: escalation share, LLM latency and price, accuracy, failures."""

    escalation: float = 0.11
    local_ms: float = 40.0  # median of a task that stays local (classify, reply, CRM)
    llm_ms: float = 280.0  # median of the LLM call an escalated task adds
    llm_sigma: float = 0.45
    small_usd: float = 5e-5  # per escalated call on the small tier
    large_usd: float = 1.6e-4
    large_share: float = 0.3
    compute_usd: float = 1e-6  # the local model, per task
    cost_scale: float = 1.0  # multiplies the LLM price (a dearer or cheaper config at equal latency)
    accuracy: float = 0.935
    error_rate: float = 0.005
    labelled: float = 0.1
    lowers_quality: bool = False  # the decision that started the canary predicted lower quality (`judge` is told)
    buys_quality: float | None = None  # it bought quality for a floor at risk at this predicted cost change
    adjusted: bool = False  # a canary changing only the cascade: `judge` gets each task's escalation in force
    routes: bool = False  # and the tier the config in force draws for it (`canary.covariates`): one column per tier

    def tasks(self, rng: np.random.Generator, n: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int, int]:
        """Durations, costs, the local model's confidence, the task's tier draw, errors, correct, labelled: a task
        escalates when its confidence is under the escalation share (a threshold on a uniform confidence), to the
        large tier when its draw is under the large tier's share (the tiers by name, as `routing.pick` does)."""
        confidence = rng.random(n)
        escalated = confidence < self.escalation
        durations = rng.lognormal(np.log(self.local_ms), 0.35, n)
        durations += np.where(escalated, rng.lognormal(np.log(self.llm_ms), self.llm_sigma, n), 0.0)
        draw = rng.random(n)
        tier = np.where(draw < self.large_share, self.large_usd, self.small_usd)
        tokens = rng.normal(1.0, 0.15, n).clip(0.3)  # prompt lengths vary
        costs = self.compute_usd + np.where(escalated, self.cost_scale * tier * tokens, 0.0)
        errors = int((rng.random(n) < self.error_rate).sum())
        labelled = int((rng.random(n) < self.labelled).sum())
        correct = int((rng.random(labelled) < self.accuracy).sum())
        return durations, costs, confidence, draw, errors, correct, labelled


BASE = Config()


def _escalation_for(config: Config, ratio: float) -> float:
    """The escalation share that makes `config`'s mean cost per task `ratio` times what it is."""
    llm = config.cost_scale * (config.large_share * config.large_usd + (1 - config.large_share) * config.small_usd)
    return (ratio * (config.compute_usd + config.escalation * llm) - config.compute_usd) / llm


def _large_share_for(config: Config, ratio: float) -> float:
    """The large tier's share that makes `config`'s mean cost per task `ratio` times what it is."""
    llm = config.cost_scale * (config.large_share * config.large_usd + (1 - config.large_share) * config.small_usd)
    target = (ratio * (config.compute_usd + config.escalation * llm) - config.compute_usd) / config.escalation
    return (target / config.cost_scale - config.small_usd) / (config.large_usd - config.small_usd)


def _scale_for(config: Config, ratio: float) -> float:
    """The LLM price multiplier that makes `config`'s mean cost per task `ratio` times what it is."""
    llm = config.escalation * (config.large_share * config.large_usd + (1 - config.large_share) * config.small_usd)
    return (ratio * (config.compute_usd + llm) - config.compute_usd) / llm


SCENARIOS: dict[str, tuple[Config, Config, str]] = {
    "A/A (identical configs)": (BASE, BASE, "none"),
    "10% dearer, equal SLO": (BASE, Config(cost_scale=_scale_for(BASE, 1.10)), "rollback"),
    "30% cheaper, equal SLO": (BASE, Config(cost_scale=_scale_for(BASE, 0.70)), "promote"),
    "25% dearer, brings p95 back": (Config(llm_ms=520.0), Config(llm_ms=300.0, cost_scale=_scale_for(BASE, 1.25)),
                                    "promote"),
    "30% cheaper, quality under the floor": (
        Config(accuracy=0.95), Config(accuracy=0.90, cost_scale=_scale_for(BASE, 0.70), lowers_quality=True),
        "rollback"),
    "30% cheaper, lower quality over the floor": (
        Config(accuracy=0.97), Config(accuracy=0.95, cost_scale=_scale_for(BASE, 0.70), lowers_quality=True),
        "promote"),
    "15% dearer as predicted, buys quality for a floor at risk": (
        BASE, Config(accuracy=0.945, cost_scale=_scale_for(BASE, 1.15), buys_quality=0.15), "promote"),
    "40% dearer, 15% predicted, buys quality": (
        BASE, Config(accuracy=0.945, cost_scale=_scale_for(BASE, 1.40), buys_quality=0.15), "rollback"),
    "buys quality but is less often right": (
        BASE, Config(accuracy=0.90, cost_scale=_scale_for(BASE, 1.15), buys_quality=0.15), "rollback"),
    # A threshold move: the canary escalates fewer (or more) tasks, the rest as in force.
    "8% cheaper, escalating fewer": (BASE, Config(escalation=_escalation_for(BASE, 0.92)), "promote"),
    "A/A, costs adjusted for escalations": (BASE, Config(adjusted=True), "none"),
    "10% dearer, costs adjusted": (BASE, Config(cost_scale=_scale_for(BASE, 1.10), adjusted=True), "rollback"),
    "10% dearer escalating more, adjusted": (
        BASE, Config(escalation=_escalation_for(BASE, 1.10), adjusted=True), "rollback"),
    "8% cheaper escalating fewer, adjusted": (
        BASE, Config(escalation=_escalation_for(BASE, 0.92), adjusted=True), "promote"),
    # A tier move: escalations sent to the small tier more often, the rest as in force.
    "10% cheaper by tier, adjusted for escalations": (
        BASE, Config(large_share=_large_share_for(BASE, 0.90), adjusted=True), "promote"),
    "10% cheaper by tier, adjusted for the tier in force too": (
        BASE, Config(large_share=_large_share_for(BASE, 0.90), adjusted=True, routes=True), "promote"),
    "A/A, adjusted for the tier in force": (BASE, Config(adjusted=True, routes=True), "none"),
    "10% dearer by tier, adjusted for the tier in force": (
        BASE, Config(large_share=_large_share_for(BASE, 1.10), adjusted=True, routes=True), "rollback"),
}
"""Scenario -> (config in force, canary, the right answer: promote, rollback, or none = change nothing)."""


@dataclass(frozen=True)
class Outcome:
    """How one canary ended: the action, after how many tasks on each arm and how many seconds, and why."""

    action: str  # promote, rollback, or none (the time ran out first; the loop then keeps the config in force)
    on_evidence: bool  # decided before the time ran out
    canary_tasks: int
    tasks: int
    seconds: float
    reason: str


def one_canary(base: Config, trial: Config, rng: np.random.Generator, slo: SLO = SLO_DEMO, *, rate: float = RATE,
               share: float = CANARY_SHARE, look: float = LOOK_SECONDS, max_seconds: float = MAX_SECONDS,
               min_requests: int = MIN_REQUESTS) -> Outcome:
    """One canary judged every `look` seconds on all its tasks so far, as the loop does."""
    parts: dict[str, list] = {"bd": [], "bc": [], "bx": [], "bu": [], "cd": [], "cc": [], "cx": [], "cu": []}
    counts = np.zeros(6, dtype=int)  # base errors, correct, labelled; canary errors, correct, labelled
    seconds = 0.0
    while True:
        seconds += look
        n = rng.poisson(rate * look)
        n_canary = rng.binomial(n, share)
        bd, bc, bx, bu, *b = base.tasks(rng, n - n_canary)
        cd, cc, cx, cu, *c = trial.tasks(rng, n_canary)
        for key, value in (("bd", bd), ("bc", bc), ("bx", bx), ("bu", bu), ("cd", cd), ("cc", cc), ("cx", cx),
                           ("cu", cu)):
            parts[key].append(value)
        counts += np.array([*b, *c])
        # Adjusted: each task's escalation under the config in force, from its confidence (`canary.escalated_by`),
        # and with `routes`, that times the tier the config in force draws for it, one column per tier; then the
        # same as the canary's config gives them (`canary.both_covariates`).
        x: dict[str, np.ndarray | None] = {"b": None, "c": None}
        for arm in ("b", "c") if trial.adjusted else ():
            confidence, draw = np.concatenate(parts[arm + "x"]), np.concatenate(parts[arm + "u"])
            columns = []
            for config in (base, trial):
                escalated = (confidence < config.escalation).astype(float)
                large = draw < config.large_share
                columns += [escalated] if not trial.routes else [escalated * large, escalated * ~large]
            x[arm] = np.column_stack(columns)
        base_arm = Arm(np.concatenate(parts["bd"]), np.concatenate(parts["bc"]), *map(int, counts[:3]), x["b"])
        canary_arm = Arm(np.concatenate(parts["cd"]), np.concatenate(parts["cc"]), *map(int, counts[3:]), x["c"])
        clock = out_of_time(seconds, max_seconds)
        expired = clock["expired"]
        verdict = judge(base_arm, canary_arm, slo, min_requests=min_requests, lowers_quality=trial.lowers_quality,
                        buys_quality=trial.buys_quality, **clock)
        if verdict.action != "wait":
            decided = not (expired and verdict.reason.startswith(("no evidence", "too few")))
            action = verdict.action if decided else "none"
            return Outcome(action, decided, canary_arm.n, canary_arm.n + base_arm.n, seconds, verdict.reason)


def run(scenario: str, runs: int, seed: int, progress=None, **options) -> dict:
    """`runs` canaries of one scenario: the share of each outcome, and tasks and minutes to a verdict."""
    base, trial, right = SCENARIOS[scenario]
    rng = np.random.default_rng(seed)
    outcomes = []
    for _ in range(runs):
        outcomes.append(one_canary(base, trial, rng, **options))
        if progress:
            progress()
    actions = [o.action for o in outcomes]
    ended = {"promote": "promote", "rollback": "rollback", "none": "rollback"}
    share = {a: actions.count(a) / runs for a in ("promote", "rollback", "none")}
    if right == "none":
        correct = share["none"]
    else:
        correct = sum(ended[a] == right for a in actions) / runs
    return {"scenario": scenario, "runs": runs, "right": right, "correct": correct, **share,
            "median_canary_tasks": float(np.median([o.canary_tasks for o in outcomes])),
            "median_tasks": float(np.median([o.tasks for o in outcomes])),
            "median_minutes": float(np.median([o.seconds for o in outcomes])) / 60,
            "example": outcomes[0].reason}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="canaries per scenario")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=RATE, help="tasks per second")
    parser.add_argument("--share", type=float, default=CANARY_SHARE, help="share of tasks on the canary")
    parser.add_argument("--max-minutes", type=float, default=MAX_SECONDS / 60, help="a canary's time")
    args = parser.parse_args(argv)
    console = Console(width=max(130, Console().width))
    problem = ("--runs must be at least 1" if args.runs < 1 else "--rate must be above 0" if not args.rate > 0
               else "--share must be between 0 and 1" if not 0 < args.share < 1
               else "--max-minutes must be at least 1" if not args.max_minutes >= 1 else None)
    if problem:
        console.print(f"Error: {problem}", style="red", highlight=False)
        return 2
    options = {"rate": args.rate, "share": args.share, "max_seconds": 60 * args.max_minutes}
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        for i, scenario in enumerate(SCENARIOS):
            task = bar.add_task(scenario, total=args.runs)
            rows.append(run(scenario, args.runs, args.seed + i, progress=lambda t=task: bar.advance(t), **options))
    table = Table(title=f"Canary verdicts: {args.runs} runs each, {args.rate:g} tasks/s, {args.share:.0%} on the "
                        f"canary, judged every {LOOK_SECONDS:g} s, at most {args.max_minutes:g} min")
    for column in ("scenario", "right answer", "right", "promoted", "rolled back", "no evidence",
                   "median tasks", "canary tasks", "median min"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for r in rows:
        table.add_row(r["scenario"], {"none": "change nothing"}.get(r["right"], r["right"]), f"{r['correct']:.1%}",
                      f"{r['promote']:.1%}", f"{r['rollback']:.1%}", f"{r['none']:.1%}", f"{r['median_tasks']:.0f}",
                      f"{r['median_canary_tasks']:.0f}", f"{r['median_minutes']:.0f}")
    console.print(table)
    console.print("right: share of runs ending as they should (A/A: neither promoted nor rolled back for a "
                  "difference); no evidence: the canary's time ran out (the loop keeps the config in force); "
                  "median tasks: on both arms, to the verdict.")
    for r in rows:
        console.print(f"[bold]{r['scenario']}[/bold], first run: {r['example']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
