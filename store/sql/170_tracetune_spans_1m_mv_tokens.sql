-- Token counts in the per-minute rollup: each LLM call counted once, on its step span.
-- The rule (the same in analyzer/cost.py and tuner/calibration.py): a span's input tokens are its
-- `tracetune.llm.input_tokens` when it has that attribute (the executor's step spans since the attribute
-- exists), else its `gen_ai.usage.input_tokens` (step spans of older executors; an app's own spans, where the
-- span naming the step is the call, as in the README); output tokens the same. The rows of this view are
-- roots, steps and batch spans (the WHERE below), and cost prices the step rows' tokens: a call's CLIENT
-- span `chat {model}` carries no `tracetune.step` (nor `tracetune.pipeline`), so its `gen_ai.usage.*` (the
-- OTel GenAI conventions' copy, for GenAI-aware tools) is never a second count.
-- MODIFY QUERY swaps the view's SELECT in place, without a moment where spans are inserted with no view
-- (a DROP and CREATE would have one); rows already rolled up keep the counts they were written with.
ALTER TABLE tracetune_spans_1m_mv MODIFY QUERY
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
    toUInt64(sum(if(mapContains(SpanAttributes, 'tracetune.llm.input_tokens'),
                    toUInt64OrZero(SpanAttributes['tracetune.llm.input_tokens']),
                    toUInt64OrZero(SpanAttributes['gen_ai.usage.input_tokens'])))) AS input_tokens,
    toUInt64(sum(if(mapContains(SpanAttributes, 'tracetune.llm.output_tokens'),
                    toUInt64OrZero(SpanAttributes['tracetune.llm.output_tokens']),
                    toUInt64OrZero(SpanAttributes['gen_ai.usage.output_tokens'])))) AS output_tokens
FROM otel_traces
WHERE (SpanAttributes['tracetune.pipeline'] != ''
       AND (SpanAttributes['tracetune.step'] != '' OR ParentSpanId = ''))
   OR SpanAttributes['tracetune.batch_of'] != ''
GROUP BY minute, service, kind, pipeline, step, route, tenant, model, status
