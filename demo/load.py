"""Open-loop load for a pipeline: Poisson arrivals whatever the latency, as real traffic arrives.

Arrival rate follows a pattern (steady, step, burst, daily); a share of tickets repeat recent ones
(cache hits); drift can be injected from a given second (category mix, text length, unseen
vocabulary). Every request's ground truth and answer go to `tracetune_ground_truth`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from tracetune.demo.corpus import CATEGORIES, Ticket, make_ticket

PATTERNS = ("steady", "step", "burst", "daily", "daily_bursts")
DRIFTS = ("category_mix", "text_length", "unseen_vocab")
GROUND_TRUTH_COLUMNS = ["sent_at", "run_id", "pipeline", "trace_id", "tenant", "label", "predicted", "scenario",
                        "duplicate", "status", "latency_ms"]

_UNSEEN = ["zorblat", "quixel", "fennimore", "vantrope", "krellium", "oblasted", "glimmix", "trundle", "yarpish"]
_LONG_TAIL = ("I also wanted to mention that our team has been using the product for a long time and we "
              "generally like it, but this issue has been causing a lot of extra work for several people. ")


@dataclass(frozen=True)
class Drift:
    kind: str
    at_seconds: float

    @classmethod
    def parse(cls, text: str) -> Drift:
        """'category_mix@30' -> Drift('category_mix', 30.0)."""
        kind, _, at = text.partition("@")
        if kind not in DRIFTS or not at:
            raise ValueError(f"drift {text!r} is not understood; use KIND@SECONDS with KIND one of {', '.join(DRIFTS)}")
        try:
            seconds = float(at)
        except ValueError:
            raise ValueError(f"drift {text!r}: {at!r} is not a number of seconds") from None
        return cls(kind, seconds)


@dataclass
class LoadPlan:
    rate: float = 20.0
    duration: float | None = 60.0
    pattern: str = "steady"
    duplicate_ratio: float = 0.2
    invalid_ratio: float = 0.005  # empty tickets, which the pipeline must refuse (real traffic has some)
    drifts: list[Drift] = field(default_factory=list)
    tenants: list[str] = field(default_factory=lambda: ["acme", "globex", "initech"])
    seed: int = 1
    max_in_flight: int = 512
    period_seconds: float = 120.0  # one "day" of the daily pattern; the burst cycle is a quarter of it

    def validate(self) -> None:
        """Raise PlanError naming the first bad field (the CLI names its flag)."""
        if self.rate <= 0:
            raise PlanError("rate", f"rate must be above 0 requests/s, got {self.rate:g} (to send nothing, do not "
                                    "run the load)")
        if self.pattern not in PATTERNS:
            raise PlanError("pattern", f"pattern {self.pattern!r} is not one of {', '.join(PATTERNS)}")
        if not 0 <= self.duplicate_ratio < 1:
            raise PlanError("duplicate_ratio", f"duplicate ratio must be in [0, 1), got {self.duplicate_ratio}")
        if not 0 <= self.invalid_ratio < 1:
            raise PlanError("invalid_ratio", f"invalid ratio must be in [0, 1), got {self.invalid_ratio}")
        if self.duration is not None and self.duration <= 0:
            raise PlanError("duration", f"duration must be above 0 s, got {self.duration:g}")
        if self.period_seconds <= 0:
            raise PlanError("period_seconds", f"period must be above 0 s, got {self.period_seconds:g}")


class PlanError(ValueError):
    """A LoadPlan field out of range: `field` says which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def rate_at(plan: LoadPlan, t: float) -> float:
    """Arrival rate (requests/s) at `t` seconds into the run."""
    if plan.pattern == "step":
        half = (plan.duration or plan.period_seconds) / 2
        return plan.rate * (2.0 if t >= half else 1.0)
    if plan.pattern == "burst":
        cycle = plan.period_seconds / 4
        return plan.rate * (5.0 if (t % cycle) < cycle / 6 else 1.0)
    if plan.pattern == "daily":
        return plan.rate * (1.0 + 0.6 * math.sin(2 * math.pi * t / plan.period_seconds))
    if plan.pattern == "daily_bursts":
        # A compressed day (trough at 0.4x, peak at 1.6x) with a 3x burst of 1/30 of a day twice a day,
        # one on the rise and one past the peak, as a newsletter or an incident brings.
        day = 1.0 + 0.6 * math.sin(2 * math.pi * t / plan.period_seconds)
        phase = (t % plan.period_seconds) / plan.period_seconds
        burst = any(start <= phase < start + 1 / 30 for start in (0.1, 0.35))
        return plan.rate * day * (3.0 if burst else 1.0)
    return plan.rate


def peak_rate(plan: LoadPlan) -> float:
    return plan.rate * {"steady": 1.0, "step": 2.0, "burst": 5.0, "daily": 1.6, "daily_bursts": 4.8}[plan.pattern]


def arrivals(plan: LoadPlan, rng: random.Random):
    """Arrival offsets (s) of a non-homogeneous Poisson process, by thinning at the peak rate."""
    peak, t = peak_rate(plan), 0.0
    while plan.duration is None or t < plan.duration:
        t += rng.expovariate(peak)
        if plan.duration is not None and t >= plan.duration:
            return
        if rng.random() < rate_at(plan, t) / peak:
            yield t


class TicketSource:
    """Draws tickets with ground truth, repeating recent ones and drifting on schedule."""

    def __init__(self, plan: LoadPlan, rng: random.Random):
        self.plan = plan
        self.rng = rng
        self.recent: deque[Ticket] = deque(maxlen=100)

    def active(self, t: float) -> list[str]:
        return [d.kind for d in self.plan.drifts if t >= d.at_seconds]

    def draw(self, t: float) -> tuple[Ticket, bool, str]:
        drifts = self.active(t)
        if self.rng.random() < self.plan.invalid_ratio:
            return Ticket(text="   ", category=""), False, "invalid"
        if self.recent and self.rng.random() < self.plan.duplicate_ratio:
            return self.rng.choice(self.recent), True, "+".join(drifts) or "baseline"
        category = None
        if "category_mix" in drifts and self.rng.random() < 0.6:
            category = self.rng.choice(["billing", "refund"])
        ticket = make_ticket(self.rng, category if category in CATEGORIES else None)
        text = ticket.text
        if "text_length" in drifts:
            text = text + " " + _LONG_TAIL * self.rng.randint(2, 5)
        if "unseen_vocab" in drifts:
            words = text.split()
            for _ in range(max(1, len(words) // 4)):
                words.insert(self.rng.randrange(len(words) + 1), self.rng.choice(_UNSEEN))
            text = " ".join(words)
        ticket = Ticket(text=text, category=ticket.category)
        self.recent.append(ticket)
        return ticket, False, "+".join(drifts) or "baseline"


class QuestionSource:
    """Draws product questions (`demo.knowledge`) with their answers, repeating recent ones; drift kinds
    that concern tickets (category mix) do not apply, text length and unseen words do."""

    def __init__(self, plan: LoadPlan, rng: random.Random):
        from tracetune.demo import knowledge

        self.plan, self.rng = plan, rng
        self.values = knowledge.facts()
        self.make = knowledge.make_question
        self.recent: deque[Ticket] = deque(maxlen=100)

    def draw(self, t: float) -> tuple[Ticket, bool, str]:
        drifts = [d.kind for d in self.plan.drifts if t >= d.at_seconds]
        if self.rng.random() < self.plan.invalid_ratio:
            return Ticket(text="   ", category=""), False, "invalid"
        if self.recent and self.rng.random() < self.plan.duplicate_ratio:
            return self.rng.choice(self.recent), True, "+".join(drifts) or "baseline"
        question = self.make(self.rng, self.values)
        text = question.text
        if "text_length" in drifts:
            text = text + " " + _LONG_TAIL * self.rng.randint(1, 2)
        if "unseen_vocab" in drifts:
            text = f"{self.rng.choice(_UNSEEN)} {text} {self.rng.choice(_UNSEEN)}"
        ticket = Ticket(text=text, category=question.answer)
        self.recent.append(ticket)
        return ticket, False, "+".join(drifts) or "baseline"


# What each demo pipeline is sent, and the field of its answer compared with the ground truth; any other
# pipeline gets tickets and its answer's "category".
SOURCES = {"rag_answering": (QuestionSource, "answer")}


def source_for(pipeline: str) -> tuple[type, str]:
    return SOURCES.get(pipeline, (TicketSource, "category"))


@dataclass
class LoadReport:
    run_id: str
    sent: int = 0
    ok: int = 0
    rejected: int = 0  # 4xx: the pipeline refused the input
    failed: int = 0  # 5xx, timeouts, connection errors
    overloaded: int = 0  # 429/503 from the executor
    dropped: int = 0  # not sent: more than max_in_flight outstanding
    correct: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else 0.0

        return {"run_id": self.run_id, "sent": self.sent, "ok": self.ok, "rejected": self.rejected,
                "failed": self.failed, "overloaded": self.overloaded, "dropped": self.dropped,
                "accuracy": round(self.correct / self.ok, 4) if self.ok else None,
                "client_p50_ms": pct(0.5), "client_p95_ms": pct(0.95), "client_p99_ms": pct(0.99)}


async def run_load(plan: LoadPlan, executor_url: str, pipeline: str, record=None, progress=None,
                   stop: asyncio.Event | None = None, *, token: str) -> LoadReport:
    """Drive `pipeline` on the executor at `executor_url` with its task `token`; `record(rows)` receives
    ground-truth rows."""
    plan.validate()
    rng = random.Random(plan.seed)
    source_type, answer_field = source_for(pipeline)
    source = source_type(plan, rng)
    report = LoadReport(run_id=uuid.uuid4().hex[:12])
    pending: list[list[Any]] = []
    in_flight: set[asyncio.Task] = set()
    url = f"{executor_url.rstrip('/')}/v1/pipelines/{pipeline}/tasks"
    limits = httpx.Limits(max_connections=plan.max_in_flight, max_keepalive_connections=plan.max_in_flight)

    async def one(client: httpx.AsyncClient, ticket: Ticket, duplicate: bool, scenario: str, tenant: str) -> None:
        sent_at = datetime.now(UTC)
        started = time.perf_counter()
        trace_id, predicted, status = "", "", 0
        try:
            response = await client.post(url, json={"text": ticket.text, "tenant": tenant})
            status = response.status_code
            body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
            trace_id = body.get("trace_id", "")
            predicted = (body.get("result") or {}).get(answer_field, "")
        except httpx.HTTPError:
            status = 0
        latency = (time.perf_counter() - started) * 1000
        if status == 200:
            report.ok += 1
            report.correct += predicted == ticket.category
            report.latencies_ms.append(latency)
        elif status in (429, 503):
            report.overloaded += 1
        elif 400 <= status < 500:
            report.rejected += 1
        else:
            report.failed += 1
        pending.append([sent_at, report.run_id, pipeline, trace_id, tenant, ticket.category, predicted, scenario,
                        int(duplicate), status, latency])
        if progress:
            progress(report)

    async def flush() -> None:
        if record and pending:
            rows = pending[:]
            del pending[:len(rows)]
            await asyncio.get_running_loop().run_in_executor(None, record, rows)

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=30, limits=limits, headers=headers) as client:
        started = time.monotonic()
        last_flush = started
        for offset in arrivals(plan, rng):
            delay = started + offset - time.monotonic()
            if delay > 0:
                if stop is not None:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        break
                    except TimeoutError:
                        pass
                else:
                    await asyncio.sleep(delay)
            elif stop is not None and stop.is_set():
                break
            ticket, duplicate, scenario = source.draw(offset)
            report.sent += 1
            if len(in_flight) >= plan.max_in_flight:
                report.dropped += 1
                continue
            task = asyncio.create_task(one(client, ticket, duplicate, scenario, rng.choice(plan.tenants)))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            if time.monotonic() - last_flush > 2:
                last_flush = time.monotonic()
                await flush()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
        await flush()
    return report


def ground_truth_writer(client):
    """A `record` callback inserting ground-truth rows with clickhouse-connect."""
    def record(rows: list[list[Any]]) -> None:
        client.insert("tracetune_ground_truth", rows, column_names=GROUND_TRUTH_COLUMNS)
    return record
