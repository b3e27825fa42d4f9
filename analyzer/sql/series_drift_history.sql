-- Every stored drift run's statistics in the window (analyzer loop runs, tracetune_drift), oldest first.
SELECT computed_at, pipeline, step, feature, kind, statistic, value, p_value, n_reference, n_current,
       reference_start, reference_end, current_start, current_end, status
FROM tracetune_drift
WHERE computed_at >= now64(3) - toIntervalSecond({window_seconds:UInt32})
  AND ({pipeline:String} = '' OR pipeline = {pipeline:String})
ORDER BY computed_at, pipeline, step, feature, statistic
