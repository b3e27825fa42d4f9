"""The batching policy: batch size, wait and length bucketing from the batch spans the analyzer measured.

Pure functions over numbers (no store, no clock); `tuner/loop.py` feeds them one observation window and
guards what they propose (`clamp_change`, cooldown, canary). The models, and why each is good enough:

- Service time: base + per_item * size * (1 + padding_factor * padding_ratio), least squares over batch
  spans. Encoders pay a fixed launch cost plus work per padded token; the bench's curves are straight.
- Batcher queue: the embedded Markov chain of a bulk-service queue (M/G^[1,B]/1) at dispatch epochs, with
  the Batcher's max_wait rule; solved numerically. Closed forms (Kingman on batches) were 50-75% off a
  simulation because batch size and queueing feed back on each other; this is within 10% at utilisation
  <= 0.85 (tests simulate the Batcher) and conservative (+10-40%) nearer saturation.
- p95: a request waits uniformly within the window its batch collected arrivals in (a timed-out head waits
  it all, a filled batch closes at a Gamma time), then its batch's service. Poisson arrivals are uniform
  in a window, and keeping the batch-size spread is what sets the tail.
- Utilisation = arrival rate / (servers * B / service(B)); at or above 1 the queue has no steady state,
  so p95 is inf. `servers` > 1 splits arrivals evenly (pessimistic against one shared queue).
- Length bucketing: only its lower padding is modelled (observed * `bucketed_padding_scale`); the bench
  measured 2.3-3.2x throughput from it. Smaller per-bucket batches at low load are ignored.
- AIMD (Clipper, NSDI '17) while no model fits: +1 under margin * target, x0.5 over the target. It needs
  only the observed p95, so it is safe on thin data, and it settles near the knee of the curve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tracetune.tuner.config import Knob, KnobValue
from tracetune.tuner.proposal import Proposal, int_bounds

__all__ = ["BatchSample", "ServiceModel", "aimd_batch_size", "batching_policy", "fit_service_time",
           "predict_batching"]

WAIT_GRID_MS: tuple[float, ...] = (0, 1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)
MIN_BATCH_SAMPLES = 20
# Length bucketing keeps about a quarter of the padding a batch had without it (bench/executor.py, section 3).
BUCKETED_PADDING_SCALE = 0.25


@dataclass(frozen=True)
class BatchSample:
    """One batch span: its size, how long it ran, and the share of its padded length that was padding."""

    size: int
    duration_ms: float
    padding_ratio: float = 0.0


@dataclass(frozen=True)
class ServiceModel:
    """Fitted service time of one batch: intercept + per-item slope, the slope scaled up by padding."""

    base_ms: float
    per_item_ms: float
    padding_factor: float = 0.0  # multiplies per-item cost by (1 + padding_factor * padding_ratio)
    samples: int = 0

    def batch_ms(self, size: int, padding_ratio: float = 0.0) -> float:
        return self.base_ms + self.per_item_ms * size * (1 + self.padding_factor * padding_ratio)


def _scipy_stats():
    """scipy.stats, imported on first use: it takes seconds, and most processes that import this never model."""
    from scipy import stats

    return stats


def fit_service_time(samples: Sequence[BatchSample], min_samples: int = MIN_BATCH_SAMPLES) -> ServiceModel | None:
    """Least squares of duration on size and size * padding; None on too few samples or one batch size.

    Coefficients are clipped at 0 (a negative base or slope is noise, not physics)."""
    if len(samples) < min_samples:
        return None
    size = np.array([s.size for s in samples], dtype=float)
    padding = np.array([s.padding_ratio for s in samples], dtype=float)
    duration = np.array([s.duration_ms for s in samples], dtype=float)
    keep = np.isfinite(size) & np.isfinite(padding) & np.isfinite(duration) & (size >= 1)
    size, padding, duration = size[keep], padding[keep], duration[keep]
    if len(size) < min_samples or len(np.unique(size)) < 2:
        return None
    columns = [np.ones_like(size), size]
    padded = size * padding
    if np.ptp(padding) > 1e-9:
        columns.append(padded)
    x = np.column_stack(columns)
    if np.linalg.matrix_rank(x) < x.shape[1]:  # padding moves with size: cannot tell them apart
        x = x[:, :2]
    coef, *_ = np.linalg.lstsq(x, duration, rcond=None)
    base, per_item = max(0.0, float(coef[0])), max(0.0, float(coef[1]))
    factor = max(0.0, float(coef[2]) / per_item) if x.shape[1] == 3 and per_item > 0 else 0.0
    return ServiceModel(base, per_item, factor, int(len(size)))


def predict_batching(model: ServiceModel, arrival_rate: float, max_size: int, max_wait_ms: float,
                     padding_ratio: float = 0.0, servers: int = 1, *, max_states: int = 1024) -> dict[str, float]:
    """Queueing prediction for the micro-batcher at Poisson `arrival_rate` (req/s); see the module docstring.

    Keys: batch_size (mean per batch), utilisation (arrival / capacity), busy (share of time computing),
    p95_ms and mean_ms (a request, arrival to result), capacity_rps, compute_ms_per_request.
    """
    if int(max_size) < 1 or max_wait_ms < 0 or int(servers) < 1 or arrival_rate < 0 \
            or not math.isfinite(arrival_rate) or not math.isfinite(max_wait_ms):
        raise ValueError(f"predict_batching needs max_size >= 1, max_wait_ms >= 0, servers >= 1 and a finite "
                         f"arrival rate >= 0, got {max_size}, {max_wait_ms}, {servers}, {arrival_rate}")
    size, wait, servers = int(max_size), float(max_wait_ms), int(servers)
    per_item = model.per_item_ms * (1 + model.padding_factor * padding_ratio)

    def service(b):
        return model.base_ms + per_item * b

    full = service(size)
    capacity = servers * size / full * 1000 if full > 0 else math.inf
    utilisation = arrival_rate / capacity
    result = {"capacity_rps": capacity, "utilisation": utilisation}
    if arrival_rate == 0:  # a lone request waits out max_wait (unless a batch of one is already full)
        alone = (wait if size > 1 else 0.0) + service(1)
        return {**result, "batch_size": 1.0, "busy": 0.0, "p95_ms": alone, "mean_ms": alone,
                "compute_ms_per_request": service(1)}
    if utilisation >= 1:
        return {**result, "batch_size": float(size), "busy": 1.0, "p95_ms": math.inf, "mean_ms": math.inf,
                "compute_ms_per_request": full / size}
    rate = arrival_rate / 1000 / servers  # per ms, per server
    states = min(size, 64) + 16
    while True:
        chain = _batcher_chain(rate, size, wait, service, states)
        if chain is not None or states >= max_states:
            break
        states = min(2 * states, max_states)
    if chain is None:  # so close to saturation that the queue outgrows the chain: treat as saturated
        return {**result, "batch_size": float(size), "busy": 1.0, "p95_ms": math.inf, "mean_ms": math.inf,
                "compute_ms_per_request": full / size}
    return {**result, **chain}


def _batcher_chain(rate: float, size: int, wait: float, service, states: int) -> dict[str, float] | None:
    """The embedded Markov chain on `states` queue lengths; None when its top state holds real mass."""
    k = states
    q = np.arange(1, k + 1)  # requests waiting when a batch leaves (state i is q = i + 1)
    b = np.minimum(q, size)
    s = service(b.astype(float))
    left = q - b
    ext = np.where(wait > s, wait - s, 0.0)  # a short next batch waits this much longer (head age ~ s)
    cap = min(size, k)
    # after[i, r]: r = left + arrivals during the service, r in 0..k (k absorbs the rest)
    need = np.arange(k + 1)[None, :] - left[:, None]
    after = np.where(need >= 0, _scipy_stats().poisson.pmf(np.maximum(need, 0), (rate * s)[:, None]), 0.0)
    after[:, k] += _scipy_stats().poisson.sf(k - left, rate * s)
    # fresh batch when nobody waits: the head + Poisson(rate * wait) more, closed at max_size
    fresh = np.zeros(k)
    if size > 1 and wait > 0:
        fresh[:cap - 1] = _scipy_stats().poisson.pmf(np.arange(cap - 1), rate * wait)
        fresh[cap - 1] = _scipy_stats().poisson.sf(cap - 2, rate * wait)
    else:
        fresh[0] = 1.0
    busy = after[:, 1:].copy()
    short = np.arange(1, cap)  # r < max_size: the batch waits out its extension
    if wait > 0 and cap > 1:
        for e in np.unique(ext[ext > 0]):
            rows = np.flatnonzero(ext == e)
            grow = q[None, :] - short[:, None]
            move = np.where(grow >= 0, _scipy_stats().poisson.pmf(np.maximum(grow, 0), rate * e), 0.0)
            move[:, cap - 1] = _scipy_stats().poisson.sf(cap - short - 1, rate * e)
            move[:, cap:] = 0.0
            busy[np.ix_(rows, short - 1)] -= after[np.ix_(rows, short)]
            busy[rows] += after[np.ix_(rows, short)] @ move
    idle = after[:, 0]
    system = (busy + idle[:, None] * fresh[None, :]).T - np.eye(k)
    system[-1] = 1.0
    rhs = np.zeros(k)
    rhs[-1] = 1.0
    try:
        pi = np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:
        return None
    pi = np.clip(pi, 0, None)
    pi /= pi.sum()
    if k > 1 and pi[-1] > 1e-5:  # the truncated tail must not reach the 95th percentile
        return None
    mean_batch, mean_service = float(pi @ b), float(pi @ s)
    parts = _Mixture()
    # fresh batches: the head waits until the batch closes, the others arrived uniformly since
    fresh_flow = float(pi @ idle) * fresh
    filled = cap == size and size > 1 and wait > 0  # a full fresh batch closes at Gamma(size - 1) < wait
    timed_out = fresh_flow[:cap - 1] if filled else fresh_flow
    hold = np.where(q[:len(timed_out)] < size, wait, 0.0)  # a batch of one with max_size 1 leaves at once
    parts.add(timed_out, hold, 0.0, s[:len(timed_out)])
    parts.add(timed_out * (b[:len(timed_out)] - 1), 0.0, hold, s[:len(timed_out)])
    if filled:
        close = _fill_times(np.array([size - 1.0]), np.array([wait]), rate)[0]
        parts.add(fresh_flow[cap - 1] / len(close), close, 0.0, s[cap - 1])
        parts.add(fresh_flow[cap - 1] * (size - 1) / len(close), 0.0, close, s[cap - 1])
    # busy batches: requests that came during the last service (and its extension), plus any carried over
    flow = pi[:, None] * busy  # from state i (row) to the next dispatch state (column)
    if filled:  # batches filled up during their extension close at a Gamma time, not at the mean
        extended = pi * np.clip(busy[:, cap - 1] - after[:, cap], 0, None)
        flow[:, cap - 1] -= extended
    carried = np.minimum(left[:, None], b[None, :])
    new = b[None, :] - carried
    arrived = np.maximum(q[None, :] - left[:, None], 1)
    window = s[:, None] + np.where(q[None, :] < size, ext[:, None], 0.0)
    parts.add(flow * new, window * (1 - new / arrived), window * new / arrived, s[None, :])
    # carried requests arrived before the last dispatch, over ~left/rate but within the services that built
    # the backlog (conditioning on a backlog packs arrivals closer than 1/rate)
    backlog = np.minimum(left / rate, s * np.ceil(left / b))
    share = np.divide(carried, left[:, None], out=np.zeros(carried.shape), where=left[:, None] > 0)
    parts.add(flow * carried, s[:, None] + backlog[:, None] * (1 - share), backlog[:, None] * share, s[None, :])
    if filled and extended.sum() > 0:
        rows = np.flatnonzero(extended > 0)
        r = np.arange(1, size)
        reach = after[np.ix_(rows, r)] * _scipy_stats().poisson.sf(size - r - 1, rate * ext[rows, None])
        before = (reach @ r) / np.maximum(reach.sum(axis=1), 1e-300)  # mean r of those that filled up
        close = _fill_times(np.maximum(1.0, np.round(size - before)), ext[rows], rate)  # rows x points
        points = close.shape[1]
        span = s[rows, None] + close
        weight = extended[rows, None] / points
        parts.add(weight * (size - left[rows, None]), 0.0, span, s[cap - 1])
        lag = backlog[rows, None]
        parts.add(weight * left[rows, None], s[rows, None], np.broadcast_to(lag, span.shape), s[cap - 1])
    weights, start, span = parts.arrays()
    return {"batch_size": mean_batch, "busy": min(1.0, rate * mean_service / mean_batch),
            "p95_ms": _mixture_quantile(weights, start, span, 0.95), "mean_ms": float(weights @ (start + span / 2)),
            "compute_ms_per_request": mean_service / mean_batch}


def _fill_times(missing: np.ndarray, limit: np.ndarray, rate: float, points: int = 8) -> np.ndarray:
    """Equal-probability points of the time `missing` more Poisson arrivals take, given it is under `limit`."""
    u = (np.arange(points) + 0.5) / points
    reached = _scipy_stats().gamma.cdf(limit, missing, scale=1 / rate)
    return _scipy_stats().gamma.ppf(u[None, :] * reached[:, None], missing[:, None], scale=1 / rate)


class _Mixture:
    """Request latencies as weighted uniforms on (low, low + span), each plus its batch's service time."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, weight, low, span, service) -> None:
        weight = np.asarray(weight, dtype=float)
        shape = np.broadcast_shapes(weight.shape, np.shape(low), np.shape(span), np.shape(service))
        self.parts.append(tuple(np.ravel(np.broadcast_to(np.asarray(x, dtype=float), shape))
                                for x in (weight, np.add(low, service), span)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        weight, start, span = (np.concatenate([p[i] for p in self.parts]) for i in range(3))
        keep = weight > 1e-10 * weight.sum()
        return weight[keep] / weight[keep].sum(), start[keep], span[keep]


def _mixture_quantile(weights: np.ndarray, start: np.ndarray, span: np.ndarray, level: float) -> float:
    """The `level` quantile of a mixture of uniforms on (start, start + span) (span 0: a point), by bisection."""
    width = np.where(span > 0, span, 1.0)
    low, high = float(start.min()), float((start + span).max())
    for _ in range(48):
        mid = (low + high) / 2
        below = np.where(span > 0, np.clip((mid - start) / width, 0, 1), (start <= mid).astype(float))
        if weights @ below < level:
            low = mid
        else:
            high = mid
    return high


def aimd_batch_size(current: int, observed_p95_ms: float, target_ms: float, knob: Knob,
                    increase: int = 1, decrease: float = 0.5, margin: float = 0.8) -> int:
    """Clipper's AIMD: +`increase` while p95 is under `margin` * target, x`decrease` once over it, else hold."""
    low, high = int_bounds(knob)
    if observed_p95_ms > target_ms:
        proposed = min(current - 1, math.floor(current * decrease))
    elif observed_p95_ms < margin * target_ms:
        proposed = current + increase
    else:
        proposed = current
    return max(low, min(high, proposed))


def _size_grid(knob: Knob, current: int) -> list[int]:
    low, high = int_bounds(knob)
    grid = {low, high, current}
    power = 1
    while power <= high:
        grid.add(power)
        power *= 2
    return sorted(x for x in grid if low <= x <= high)


def _wait_grid(knob: Knob | None, current: float, target_ms: float) -> list[float]:
    if knob is None:
        return [current]
    low = knob.low if knob.low is not None else 0.0
    high = knob.high if knob.high is not None else math.inf
    return sorted({float(w) for w in WAIT_GRID_MS if low <= w <= high and w < target_ms} | {float(current)})


def batching_policy(model: ServiceModel | None, arrival_rate: float, current: Mapping[str, KnobValue],
                    knobs: Mapping[str, Knob], p95_target_ms: float, observed_p95_ms: float | None,
                    padding_ratio: float = 0.0, margin: float = 0.8, step: str = "", *, servers: int = 1,
                    sizes: Sequence[int] | None = None, waits: Sequence[float] | None = None,
                    bucketed_padding_scale: float = BUCKETED_PADDING_SCALE, material_padding: float = 0.1,
                    min_gain: float = 0.02, cost_share: float | None = None,
                    min_pipeline_gain: float = 0.02) -> Proposal | None:
    """Batch size, wait and bucketing for the lowest compute per request with predicted p95 <= margin * target.

    With no model (thin data), or a model the observed p95 contradicts, AIMD on batch_max_size. None when
    the current config is best (or within `min_gain` of it), or when it meets the target and the saving,
    weighed by the step's `cost_share` of the pipeline's cost, is under `min_pipeline_gain` (longer waits
    for a negligible saving only spend latency headroom). `sizes` / `waits` override the search grid.
    """
    size_knob = knobs.get("batch_max_size")
    if size_knob is None:
        return None
    wait_knob, bucket_knob = knobs.get("batch_max_wait_ms"), knobs.get("length_bucketing")
    size_now = int(current.get("batch_max_size", size_knob.default))
    wait_now = float(current.get("batch_max_wait_ms", wait_knob.default if wait_knob else 0.0))
    bucket_now = bool(current.get("length_bucketing", bucket_knob.default)) if bucket_knob else False
    limit = margin * p95_target_ms
    if model is None:
        return _aimd_proposal(size_now, size_knob, observed_p95_ms, p95_target_ms, margin, step,
                              "no service-time model yet (thin data)")
    now = predict_batching(model, arrival_rate, size_now, wait_now, padding_ratio, servers)
    # The model contradicted by what the config in force does, either way: it says this config meets the target
    # and the step misses it, or that it misses the target and the step meets it with the margin to spare (a
    # model fitted on batches of one under load knows nothing of batching's gain). The observed p95 decides.
    if observed_p95_ms is not None and ((observed_p95_ms > p95_target_ms and now["p95_ms"] <= limit)
                                        or (observed_p95_ms <= limit < now["p95_ms"])):
        return _aimd_proposal(size_now, size_knob, observed_p95_ms, p95_target_ms, margin, step,
                              f"the model predicts p95 {now['p95_ms']:.0f} ms here but {observed_p95_ms:.0f} ms "
                              f"was observed")
    buckets = [bucket_now]
    if bucket_knob is not None and not bucket_now and padding_ratio >= material_padding:
        buckets.append(True)  # never proposed off: its padding without bucketing is not observed
    size_grid = sorted(set(sizes)) if sizes is not None else _size_grid(size_knob, size_now)
    wait_grid = sorted(set(waits)) if waits is not None else _wait_grid(wait_knob, wait_now, p95_target_ms)
    candidates = []
    for bucket in buckets:
        padding = padding_ratio if bucket == bucket_now else padding_ratio * bucketed_padding_scale
        for wait in wait_grid:
            previous = None
            for size in size_grid:
                guess = predict_batching(model, arrival_rate, size, wait, padding, servers)
                candidates.append((size, wait, bucket, guess))
                if previous is not None and all(math.isclose(guess[key], previous[key], rel_tol=1e-4) for key in
                                                ("p95_ms", "compute_ms_per_request")):
                    break  # max_size no longer binds: larger ones predict the same
                previous = guess
    feasible = [c for c in candidates if c[3]["p95_ms"] <= limit]
    if feasible:
        cheapest = min(c[3]["compute_ms_per_request"] for c in feasible)
        near = [c for c in feasible if c[3]["compute_ms_per_request"] <= cheapest * 1.01]
        near = [c for c in near if c[1] == min(c[1] for c in near)]  # ties: the shorter wait
        fastest = min(c[3]["p95_ms"] for c in near)
        size, wait, bucket, best = min((c for c in near if c[3]["p95_ms"] <= fastest * 1.01),  # then near now
                                       key=lambda c: (abs(math.log2(c[0] / size_now)), c[0], c[2] != bucket_now))
        if now["p95_ms"] <= limit and now["compute_ms_per_request"] <= best["compute_ms_per_request"] * (1 + min_gain):
            return None
        saving = 1 - best["compute_ms_per_request"] / now["compute_ms_per_request"] \
            if now["compute_ms_per_request"] > 0 else 0.0
        meets = now["p95_ms"] <= limit and (observed_p95_ms is None or observed_p95_ms <= p95_target_ms)
        if meets and cost_share is not None and saving * cost_share < min_pipeline_gain:
            return None
    else:
        size, wait, bucket, best = min(candidates, key=lambda c: (c[3]["p95_ms"], -c[3]["capacity_rps"]))
        if best["p95_ms"] >= now["p95_ms"] and now["capacity_rps"] >= best["capacity_rps"]:
            return None
    values: dict[str, KnobValue] = {}
    if size != size_now:
        values["batch_max_size"] = int(size)
    if wait_knob is not None and wait != wait_now:
        values["batch_max_wait_ms"] = float(wait)
    if bucket_knob is not None and bucket != bucket_now:
        values["length_bucketing"] = bool(bucket)
    if not values:
        return None
    observed = f", {observed_p95_ms:.0f} ms observed" if observed_p95_ms is not None else ""
    verdict = f"<= {limit:.0f} ms" if feasible else f"> {limit:.0f} ms (no config meets it, least latency)"
    config = f"batch {size}, wait {wait:g} ms" + (", length bucketing" if bucket else "")
    reason = (f"at {arrival_rate:.1f} req/s {config}: predicted p95 {best['p95_ms']:.0f} ms {verdict}, "
              f"{margin:.0%} of the {p95_target_ms:.0f} ms target, at {best['compute_ms_per_request']:.2f} compute "
              f"ms/request (mean batch {best['batch_size']:.1f}); now batch {size_now}, wait {wait_now:g} ms: "
              f"p95 {now['p95_ms']:.0f} ms predicted{observed}, {now['compute_ms_per_request']:.2f} ms/request")
    predicted = {key: float(best[key]) for key in ("p95_ms", "compute_ms_per_request", "batch_size", "utilisation",
                                                   "capacity_rps") if math.isfinite(best[key])}  # JSON has no inf
    if math.isfinite(now["compute_ms_per_request"]):  # what `loop.cost_effect` compares the move with
        predicted["compute_ms_per_request_before"] = float(now["compute_ms_per_request"])
    return Proposal(step, values, reason, predicted)


def _aimd_proposal(size_now: int, knob: Knob, observed: float | None, target: float, margin: float, step: str,
                   why: str) -> Proposal | None:
    if observed is None:
        return None
    size = aimd_batch_size(size_now, observed, target, knob, margin=margin)
    if size == size_now:
        return None
    move = "+1 while under" if size > size_now else "x0.5 when over"
    reason = (f"{why}: p95 {observed:.0f} ms vs {target:.0f} ms target ({margin:.0%} margin {margin * target:.0f} ms),"
              f" AIMD {move}: batch_max_size {size_now} -> {size}")
    return Proposal(step, {"batch_max_size": size}, reason, {})
