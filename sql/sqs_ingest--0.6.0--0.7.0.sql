-- sqs_ingest 0.6.0 -> 0.7.0 (hand-written; `make test` proves an upgraded database equals a fresh 0.7.0 install).
\echo Use "ALTER EXTENSION sqs_ingest UPDATE TO '0.7.0'" to load this file. \quit

-- Keys under AWS KMS (0.7.0): a key is stored in the clear or wrapped, never both ------------------------
ALTER TABLE sqs_ingest.keys
    ALTER COLUMN key_bytes DROP NOT NULL,
    ADD COLUMN wrapped bytea,
    ADD COLUMN kms_key_arn text,
    ADD CONSTRAINT keys_clear_or_wrapped CHECK ((key_bytes IS NULL) <> (wrapped IS NULL)
                                                AND (wrapped IS NULL) = (kms_key_arn IS NULL));
COMMENT ON COLUMN sqs_ingest.keys.key_bytes IS 'The secret key in the clear (NULL when wrapped by KMS); subkeys for SIV, HMAC and dead-letter encryption are derived from it';
COMMENT ON COLUMN sqs_ingest.keys.wrapped IS 'The key wrapped by AWS KMS (its CiphertextBlob, bound to key_id by the encryption context sqs_ingest_key_id); NULL when in the clear. Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.keys.kms_key_arn IS 'ARN of the KMS key that wrapped it: a backend needs kms:Decrypt on it to use the key. Since 0.7.0';
ALTER TABLE sqs_ingest.key_events DROP CONSTRAINT key_events_event_check,
    ADD CONSTRAINT key_events_event_check CHECK (event IN ('generated', 'activated', 'retired', 'wrapped'));
COMMENT ON COLUMN sqs_ingest.key_events.event IS 'generated, activated, retired (no longer used for new tokens) or wrapped (by KMS, with sqs_ingest.kms_wrap_keys())';

CREATE FUNCTION sqs_ingest."kms_wrap_keys"() RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'kms_wrap_keys_wrapper';
REVOKE ALL ON FUNCTION sqs_ingest.kms_wrap_keys() FROM PUBLIC;
COMMENT ON FUNCTION sqs_ingest.kms_wrap_keys() IS 'Wrap every masking key stored in the clear with the AWS KMS key sqs_ingest.kms_key_id names (Encrypt; the clear bytes are removed); returns how many; tokens are unchanged. Errors: 22023 setting unset, 42501 no KMS access, 55000 KMS key disabled, 58000 KMS unreachable. Since 0.7.0';

-- Metrics (0.7.0) ----------------------------------------------------------------------------------------
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'sqs_ingest_monitor') THEN
        CREATE ROLE sqs_ingest_monitor NOLOGIN;
    END IF;
END
$roles$;
COMMENT ON ROLE sqs_ingest_monitor IS 'May read the sqs_ingest.metrics_* views (counts and ages only: no queue contents, no PII, no secret); for a Prometheus exporter. Since 0.7.0';
GRANT USAGE ON SCHEMA sqs_ingest TO sqs_ingest_monitor;

ALTER TABLE sqs_ingest.counters
    ADD COLUMN batches bigint NOT NULL DEFAULT 0,
    ADD COLUMN batch_seconds double precision NOT NULL DEFAULT 0,
    ADD COLUMN oldest_sent_at timestamptz;
COMMENT ON COLUMN sqs_ingest.counters.batches IS 'Ingest calls (transactions) that received messages. Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.counters.batch_seconds IS 'Their wall-clock time in seconds, summed. Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.counters.oldest_sent_at IS 'The oldest SentTimestamp among the messages of the last such call. Since 0.7.0';

CREATE OR REPLACE VIEW sqs_ingest.stats AS
WITH c AS (
    SELECT COALESCE(sqs_ingest.queue_arn(k.queue_url), k.queue_url) AS queue, k.*
      FROM sqs_ingest.counters k
), depth AS (
    SELECT DISTINCT ON (c.queue) c.queue, c.approximate_depth
      FROM c WHERE c.depth_at IS NOT NULL
     ORDER BY c.queue, c.depth_at DESC
)
SELECT (pg_catalog.array_agg(c.queue_url ORDER BY c.hour DESC))[1] AS queue_url,
       c.worker,
       pg_catalog.sum(c.received)::bigint        AS received,
       pg_catalog.sum(c.inserted)::bigint        AS inserted,
       pg_catalog.sum(c.duplicates)::bigint      AS duplicates,
       pg_catalog.sum(c.dead_lettered)::bigint   AS dead_lettered,
       pg_catalog.sum(c.deleted)::bigint         AS deleted,
       pg_catalog.sum(c.delete_failures)::bigint AS delete_failures,
       pg_catalog.max(c.last_success_at)         AS last_success_at,
       (pg_catalog.array_agg(c.last_error ORDER BY c.last_error_at DESC)
            FILTER (WHERE c.last_error IS NOT NULL))[1] AS last_error,
       pg_catalog.max(c.last_error_at)           AS last_error_at,
       pg_catalog.max(d.approximate_depth)       AS approximate_depth,
       c.queue                                   AS queue_arn,
       pg_catalog.sum(c.filtered)::bigint        AS filtered,
       c.pipeline                                AS pipeline,
       pg_catalog.sum(c.batches)::bigint         AS batches,
       pg_catalog.sum(c.batch_seconds)           AS batch_seconds,
       (pg_catalog.array_agg(c.oldest_sent_at ORDER BY c.last_success_at DESC NULLS LAST)
            FILTER (WHERE c.oldest_sent_at IS NOT NULL))[1] AS oldest_sent_at
  FROM c LEFT JOIN depth d ON d.queue = c.queue
 GROUP BY c.queue, c.worker, c.pipeline;

COMMENT ON COLUMN sqs_ingest.stats.batches IS 'Ingest calls (transactions) that received messages. Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.stats.batch_seconds IS 'Their wall-clock seconds, summed (batch_seconds / batches: the mean batch duration). Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.stats.oldest_sent_at IS 'The oldest SentTimestamp among the messages of the latest batch (now() minus it: the lag). Since 0.7.0';

-- Metrics (0.7.0): what a Prometheus exporter reads (prometheus/sqs_ingest_queries.yaml), per queue (by ARN) and
-- pipeline: counts, durations, ages and depths only; no queue contents, no PII, no secret.
CREATE VIEW sqs_ingest.metrics_queues AS
SELECT s.queue_arn                                 AS queue,
       s.pipeline,
       pg_catalog.sum(s.received)::bigint          AS received,
       pg_catalog.sum(s.inserted)::bigint          AS inserted,
       pg_catalog.sum(s.duplicates)::bigint        AS duplicates,
       pg_catalog.sum(s.dead_lettered)::bigint     AS dead_lettered,
       pg_catalog.sum(s.filtered)::bigint          AS filtered,
       pg_catalog.sum(s.deleted)::bigint           AS deleted,
       pg_catalog.sum(s.delete_failures)::bigint   AS delete_failures,
       pg_catalog.sum(s.batches)::bigint           AS batches,
       pg_catalog.sum(s.batch_seconds)             AS batch_seconds,
       pg_catalog.max(s.approximate_depth)         AS approximate_depth,
       EXTRACT(EPOCH FROM pg_catalog.max(s.last_success_at))::float8 AS last_success_time,
       EXTRACT(EPOCH FROM pg_catalog.now() OPERATOR(pg_catalog.-)
               (pg_catalog.array_agg(s.oldest_sent_at ORDER BY s.last_success_at DESC NULLS LAST)
                    FILTER (WHERE s.oldest_sent_at IS NOT NULL))[1])::float8 AS lag_seconds
  FROM sqs_ingest.stats s
 GROUP BY s.queue_arn, s.pipeline;
COMMENT ON VIEW sqs_ingest.metrics_queues IS 'Per queue (ARN) and pipeline: message counters, batches (ingest calls that received messages) and their seconds, depth at the last ingest, last success (Unix time) and lag (seconds since the oldest SentTimestamp of the latest batch). For prometheus-postgres-exporter; readable by sqs_ingest_monitor. Since 0.7.0';

CREATE VIEW sqs_ingest.metrics_unmask AS
SELECT CASE WHEN a.succeeded THEN 'succeeded' ELSE 'refused' END AS result, pg_catalog.count(*) AS calls
  FROM sqs_ingest.unmask_audit a
 GROUP BY 1;
COMMENT ON VIEW sqs_ingest.metrics_unmask IS 'unmask() calls by result (succeeded, refused), from sqs_ingest.unmask_audit; readable by sqs_ingest_monitor. Since 0.7.0';

CREATE VIEW sqs_ingest.metrics_keys AS
SELECT EXTRACT(EPOCH FROM pg_catalog.now() OPERATOR(pg_catalog.-)
               pg_catalog.max(k.created_at) FILTER (WHERE k.active))::float8 AS active_key_age_seconds,
       pg_catalog.count(*) AS keys,
       pg_catalog.count(*) FILTER (WHERE k.wrapped IS NOT NULL) AS wrapped_keys
  FROM sqs_ingest.keys k;
COMMENT ON VIEW sqs_ingest.metrics_keys IS 'Age of the active masking key (seconds; NULL before the first key), how many keys exist and how many are wrapped by AWS KMS (no key material); readable by sqs_ingest_monitor. Since 0.7.0';

REVOKE ALL ON sqs_ingest.metrics_queues, sqs_ingest.metrics_unmask, sqs_ingest.metrics_keys FROM PUBLIC;
GRANT SELECT ON sqs_ingest.metrics_queues, sqs_ingest.metrics_unmask, sqs_ingest.metrics_keys
   TO sqs_ingest_monitor, sqs_ingest_operator;
