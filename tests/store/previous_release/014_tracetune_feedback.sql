-- Quality labels real users give a pipeline's answers (POST /v1/pipelines/{p}/feedback), append-only.
-- `step` is empty for the pipeline's answer, else the step whose output was judged; join on trace_id
-- with otel_traces to score routes and cascade outcomes.
CREATE TABLE IF NOT EXISTS tracetune_feedback (
    created_at DateTime64(3, 'UTC') DEFAULT now64(3),
    pipeline LowCardinality(String),
    trace_id String,
    step LowCardinality(String),
    label LowCardinality(String),
    source LowCardinality(String)
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(created_at)
ORDER BY (pipeline, created_at)
