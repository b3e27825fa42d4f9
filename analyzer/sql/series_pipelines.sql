-- Pipelines with tasks or step spans in the window, by name: only the rollup's key columns are read (no
-- quantile state), so the dashboard's pipeline picker costs next to nothing. {rollup_table}, {time_column},
-- {time_floor} come from the allow-list in analyzer/series.py, never from user text.
SELECT DISTINCT pipeline
FROM {rollup_table}
WHERE {time_column} >= {time_floor}(now() - toIntervalSecond({window_seconds:UInt32}))
  AND kind IN ('step', 'root') AND pipeline != ''
ORDER BY pipeline
