-- sqs_ingest 0.8.0 -> 0.9.0 (hand-written; `make test` proves an upgraded database equals a fresh 0.9.0 install).
\echo Use "ALTER EXTENSION sqs_ingest UPDATE TO '0.9.0'" to load this file. \quit

-- Durable before deleted (0.9.0): deletes wait for the standbys sqs_ingest.delete_after names; those they do not
-- confirm in time are deferred (counted here) and the oldest unconfirmed commit is kept for the stats.
ALTER TABLE sqs_ingest.counters
    ADD COLUMN deletes_deferred bigint NOT NULL DEFAULT 0,
    ADD COLUMN deferred_lsn pg_lsn,
    ADD COLUMN deferred_at timestamptz;
COMMENT ON COLUMN sqs_ingest.counters.deletes_deferred IS 'Messages left in the queue after COMMIT because the standbys sqs_ingest.delete_after names did not confirm the commit in time; they come back and are recognised as duplicates. Since 0.9.0';
COMMENT ON COLUMN sqs_ingest.counters.deferred_lsn IS 'End of the WAL of the newest deferred commit counted here since the row was last fully confirmed (sqs_ingest.confirmed_lsn() past it). Since 0.9.0';
COMMENT ON COLUMN sqs_ingest.counters.deferred_at IS 'When the oldest deferred commit counted here since then happened. Since 0.9.0';

CREATE FUNCTION sqs_ingest."confirmed_lsn"() RETURNS pg_lsn
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'confirmed_lsn_wrapper';
REVOKE ALL ON FUNCTION sqs_ingest.confirmed_lsn() FROM PUBLIC;

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
            FILTER (WHERE c.oldest_sent_at IS NOT NULL))[1] AS oldest_sent_at,
       pg_catalog.sum(c.deletes_deferred)::bigint AS deletes_deferred,
       pg_catalog.min(c.deferred_at) FILTER (WHERE c.deferred_lsn OPERATOR(pg_catalog.>) w.confirmed) AS unconfirmed_since
  FROM c LEFT JOIN depth d ON d.queue = c.queue
       CROSS JOIN (SELECT sqs_ingest.confirmed_lsn() AS confirmed) w
 GROUP BY c.queue, c.worker, c.pipeline;

CREATE OR REPLACE VIEW sqs_ingest.metrics_queues AS
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
                    FILTER (WHERE s.oldest_sent_at IS NOT NULL))[1])::float8 AS lag_seconds,
       pg_catalog.sum(s.deletes_deferred)::bigint  AS deletes_deferred,
       EXTRACT(EPOCH FROM pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.min(s.unconfirmed_since))::float8
                                                   AS unconfirmed_seconds
  FROM sqs_ingest.stats s
 GROUP BY s.queue_arn, s.pipeline;

COMMENT ON COLUMN sqs_ingest.stats.deletes_deferred IS 'Messages left in the queue after COMMIT because the standbys sqs_ingest.delete_after names did not confirm the commit within sqs_ingest.standby_wait_timeout; they come back after their visibility timeout and are recognised as duplicates. Since 0.9.0';
COMMENT ON COLUMN sqs_ingest.stats.unconfirmed_since IS 'When the oldest deferred commit that is still beyond sqs_ingest.confirmed_lsn() happened (NULL: none); now() minus it is how long the standbys have been behind. Since 0.9.0';
COMMENT ON VIEW sqs_ingest.metrics_queues IS 'Per queue (ARN) and pipeline: message counters, batches (ingest calls that received messages) and their seconds, depth at the last ingest, last success (Unix time), lag (seconds since the oldest SentTimestamp of the latest batch), deferred deletes (0.9.0) and how long the oldest deferred commit has been unconfirmed by the standbys (seconds, NULL when none; 0.9.0). For prometheus-postgres-exporter; readable by sqs_ingest_monitor. Since 0.7.0';
GRANT EXECUTE ON FUNCTION sqs_ingest.confirmed_lsn() TO sqs_ingest_operator, sqs_ingest_monitor;
COMMENT ON FUNCTION sqs_ingest.confirmed_lsn() IS 'pg_lsn: the WAL position up to which every commit is as durable as sqs_ingest.delete_after requires (flushed locally, and by the standbys it names: physical replication slots and slot-less streaming standbys). Commits beyond it have their deletes waiting or deferred. NULL on a standby. Since 0.9.0';
