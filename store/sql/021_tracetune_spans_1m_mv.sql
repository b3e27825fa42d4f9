-- Errors in either spelling: the contrib clickhouseexporter and our collector write pdata's `Error`,
-- older exporters the proto enum name `STATUS_CODE_ERROR`. The histogram bucket takes log2 of a Float64
-- (Duration + 1 would wrap to 0 at 2^64 - 1 and fail the insert), so it stays within 0..512.
-- 170_tracetune_spans_1m_mv_tokens.sql replaces this SELECT: its token counts read `tracetune.llm.*` first.
CREATE MATERIALIZED VIEW IF NOT EXISTS tracetune_spans_1m_mv TO tracetune_spans_1m AS
SELECT
    toStartOfMinute(Timestamp) AS minute,
    ServiceName AS service,
    multiIf(SpanAttributes['tracetune.batch_of'] != '', 'batch',
            SpanAttributes['tracetune.step'] != '', 'step', 'root') AS kind,
    if(kind = 'batch', SpanAttributes['tracetune.batch_pipeline'], SpanAttributes['tracetune.pipeline']) AS pipeline,
    if(kind = 'batch', SpanAttributes['tracetune.batch_of'], SpanAttributes['tracetune.step']) AS step,
    SpanAttributes['tracetune.route'] AS route,
    SpanAttributes['tracetune.tenant'] AS tenant,
    SpanAttributes['gen_ai.request.model'] AS model,
    StatusCode AS status,
    toUInt64(count()) AS requests,
    toUInt64(countIf(StatusCode IN ('Error', 'STATUS_CODE_ERROR'))) AS errors,
    toUInt64(sum(Duration)) AS duration_sum_ns,
    toUInt64(sumIf(Duration, SpanAttributes['tracetune.batch_size'] = '')) AS unbatched_duration_sum_ns,
    max(Duration) AS duration_max_ns,
    quantilesDDState(0.005, 0.5, 0.9, 0.95, 0.99)(Duration) AS duration_q,
    sumMapState(map(toUInt16(floor(log2(toFloat64(Duration) + 1) * 8)), toUInt64(1))) AS duration_hist,
    toUInt64(countIf(SpanAttributes['tracetune.cache'] = 'hit')) AS cache_hits,
    toUInt64(countIf(SpanAttributes['tracetune.cache'] IN ('hit', 'miss'))) AS cache_lookups,
    toUInt64(countIf(SpanAttributes['tracetune.batch_size'] != '')) AS batched,
    toUInt64(sum(toUInt64OrZero(SpanAttributes['tracetune.batch_size']))) AS batch_size_sum,
    sum(toFloat64OrZero(SpanAttributes['tracetune.queue_ms'])) AS queue_ms_sum,
    toUInt64(sum(toUInt64OrZero(SpanAttributes['gen_ai.usage.input_tokens']))) AS input_tokens,
    toUInt64(sum(toUInt64OrZero(SpanAttributes['gen_ai.usage.output_tokens']))) AS output_tokens
FROM otel_traces
WHERE (SpanAttributes['tracetune.pipeline'] != ''
       AND (SpanAttributes['tracetune.step'] != '' OR ParentSpanId = ''))
   OR SpanAttributes['tracetune.batch_of'] != ''
GROUP BY minute, service, kind, pipeline, step, route, tenant, model, status
