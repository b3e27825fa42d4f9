-- The alert outbox (analyzer/delivery.py): one row per request to send, written before anything is sent
-- (append-only). `delivery_id` is the Standard Webhooks `webhook-id` (msg_...), the same on every retry;
-- ids of one process sort in the order they were made. `body` is the JSON to send without secrets
-- (a PagerDuty routing key is added at send time). A row with no attempt below is pending.
CREATE TABLE IF NOT EXISTS tracetune_alert_outbox (
    created_at DateTime64(6, 'UTC'),
    delivery_id String,
    receiver LowCardinality(String) COMMENT 'name of the configured receiver: webhook, slack, pagerduty',
    kind LowCardinality(String) COMMENT 'webhook | slack | pagerduty',
    group_key String COMMENT 'deliveries of one receiver and group key are sent in order',
    notification_status LowCardinality(String) COMMENT 'firing | resolved',
    body String
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(created_at)
ORDER BY (created_at, delivery_id)
;
-- Every delivery attempt (append-only): the newest row of a delivery (highest attempt) is its state:
-- retrying (next try at next_attempt_at), delivered or failed (permanent 4xx, or gave up).
CREATE TABLE IF NOT EXISTS tracetune_alert_deliveries (
    recorded_at DateTime64(6, 'UTC'),
    delivery_id String,
    receiver LowCardinality(String),
    attempt UInt16,
    status LowCardinality(String) COMMENT 'retrying | delivered | failed',
    http_status UInt16 COMMENT '0 when the attempt got no HTTP answer (connection error, timeout)',
    error String,
    duration_ms Float64,
    next_attempt_at DateTime64(3, 'UTC') COMMENT 'when a retrying delivery is due again'
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(recorded_at)
ORDER BY (delivery_id, attempt, recorded_at)
