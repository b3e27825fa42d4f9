-- Every price table published from prices.toml, one row per version + content hash (append-only).
-- The analyzer prices spans with the latest row; every cost figure names its `version`.
CREATE TABLE IF NOT EXISTS tracetune_prices (
    version String,
    hash String,
    loaded_at DateTime64(3) DEFAULT now64(3),
    body String
) ENGINE = ReplacingMergeTree()
ORDER BY (version, hash)
