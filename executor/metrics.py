"""Prometheus metrics of the executor, served on /metrics; every series is labelled by pipeline."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STEP_SECONDS = Histogram("tracetune_step_duration_seconds", "Step latency", ["pipeline", "step"],
                         buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
TASKS_TOTAL = Counter("tracetune_tasks_total", "Tasks finished", ["pipeline", "status"])
TASKS_IN_FLIGHT = Gauge("tracetune_tasks_in_flight", "Tasks running now", ["pipeline"])
QUEUE_DEPTH = Gauge("tracetune_batch_queue_depth", "Requests waiting in a step's batchers", ["pipeline", "step"])
BATCH_SIZE = Histogram("tracetune_batch_size", "Requests per batch", ["pipeline", "step"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
CACHE_TOTAL = Counter("tracetune_cache_requests_total", "Cache look-ups", ["pipeline", "step", "result"])
CACHE_HIT_RATIO = Gauge("tracetune_cache_hit_ratio", "Cache hits / look-ups since start", ["pipeline", "step"])
ROUTE_TOTAL = Counter("tracetune_route_requests_total", "Requests a step sent to each route",
                      ["pipeline", "step", "route"])
CASCADE_TOTAL = Counter("tracetune_cascade_total", "Tasks a cascade step handed to the remote model, by outcome",
                        ["pipeline", "step", "outcome"])
REMOTE_IN_FLIGHT = Gauge("tracetune_remote_in_flight", "Remote calls a step has in flight", ["pipeline", "step"])
CONFIG_VERSION = Gauge("tracetune_config_version", "Tuner config version in force", ["pipeline"])
KNOB_VALUE = Gauge("tracetune_knob_value", "Knob values in force (booleans as 0/1, route weights per route)",
                   ["pipeline", "step", "knob"])
RETRIES_TOTAL = Counter("tracetune_retries_total", "Retried calls to remote services", ["pipeline", "step"])
DEAD_LETTERS_TOTAL = Counter("tracetune_dead_letters_total", "Tasks dead-lettered after exhausting retries",
                             ["pipeline", "step"])
DEAD_LETTER_REPLAYS_TOTAL = Counter("tracetune_dead_letter_replays_total",
                                    "Dead letters sent again, by outcome (replayed: the service took it; failed)",
                                    ["pipeline", "step", "outcome"])
COLD_STARTS_TOTAL = Counter("tracetune_cold_starts_total",
                            "First requests a model variant served since this executor started (one per variant)",
                            ["pipeline", "step", "route"])
COLD_START_SECONDS = Gauge("tracetune_cold_start_duration_seconds",
                           "Latency of the first request a model variant served since this executor started",
                           ["pipeline", "step", "route"])
