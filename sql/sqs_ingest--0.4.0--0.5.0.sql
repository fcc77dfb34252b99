-- sqs_ingest 0.4.0 -> 0.5.0 (hand-written; `make test` proves an upgraded database equals a fresh 0.5.0 install).
\echo Use "ALTER EXTENSION sqs_ingest UPDATE TO '0.5.0'" to load this file. \quit

-- A queue is its identity, not its spelling (0.5.0) ---------------------------------------------------------
CREATE FUNCTION sqs_ingest."queue_arn"(
	"queue_url" TEXT /* &str */
) RETURNS TEXT /* core::option::Option<alloc::string::String> */
STABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'queue_arn_wrapper';
REVOKE ALL ON FUNCTION sqs_ingest.queue_arn(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sqs_ingest.queue_arn(text) TO PUBLIC;
COMMENT ON FUNCTION sqs_ingest.queue_arn(text) IS 'The queue''s ARN (arn:aws:sqs:region:account:name), the same for every spelling of its URL; region from the URL, else sqs_ingest.region. NULL for text that is not a queue URL';
COMMENT ON FUNCTION sqs_ingest.queue_key(text) IS 'Key of a queue in sqs_ingest.ledger: the first 64 bits of the SHA-256 of the text, as int8; the ledger keys a queue by queue_key(queue_arn(url)) since 0.5.0';
COMMENT ON COLUMN sqs_ingest.ledger.queue_key IS 'Queue the message came from: sqs_ingest.queue_key(sqs_ingest.queue_arn(queue_url)), the same for every spelling of its URL (0.5.0)';

-- The ledger was keyed by queue_key(<URL text>): rows of every spelling this database knows (from its counters,
-- dead letters and workers) move to queue_key(<ARN>). A spelling not known here is moved by the first ingest
-- that uses it. Where two spellings hold one MessageId (a message stored twice before 0.5.0), one row is kept.
WITH spellings AS (
    SELECT DISTINCT u.queue_url FROM (
        SELECT queue_url FROM sqs_ingest.counters
        UNION SELECT queue_url FROM sqs_ingest.dead_letters
        UNION SELECT queue_url FROM sqs_ingest.workers) u
), moves AS (
    SELECT sqs_ingest.queue_key(s.queue_url) AS old_key, sqs_ingest.queue_key(sqs_ingest.queue_arn(s.queue_url)) AS new_key
      FROM spellings s
     WHERE sqs_ingest.queue_arn(s.queue_url) IS NOT NULL
), moved AS (
    DELETE FROM sqs_ingest.ledger l USING moves m
     WHERE l.queue_key = m.old_key AND m.old_key <> m.new_key
    RETURNING m.new_key, l.message_id, l.outcome, l.ingested_at
)
INSERT INTO sqs_ingest.ledger (queue_key, message_id, outcome, ingested_at)
SELECT new_key, message_id, outcome, ingested_at FROM moved
ON CONFLICT DO NOTHING;

-- Stats add up every spelling of a queue (the view was created by bootstrap.sql before 0.5.0). Replaced, not
-- dropped: views of the operators' own over it (dashboards) keep working; its columns keep their names and types,
-- queue_arn is added at the end.
-- Counters per queue (by its ARN, so every spelling of one queue adds up; 0.5.0) and worker.
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
       c.queue                                   AS queue_arn
  FROM c LEFT JOIN depth d ON d.queue = c.queue
 GROUP BY c.queue, c.worker;
REVOKE ALL ON sqs_ingest.stats FROM PUBLIC;
GRANT SELECT ON sqs_ingest.stats TO sqs_ingest_operator;
COMMENT ON VIEW sqs_ingest.stats IS 'Ingest counters per queue (every spelling of its URL together) and worker, last success, last error (scrubbed), and the queue depth seen at the last ingest';
COMMENT ON COLUMN sqs_ingest.stats.queue_url IS 'The URL the queue was last ingested by (a queue is keyed by queue_arn)';
COMMENT ON COLUMN sqs_ingest.stats.deleted IS 'Messages handed to the commit hook for deletion; failures after commit are in delete_failures';
COMMENT ON COLUMN sqs_ingest.stats.approximate_depth IS 'Messages SQS reported available at the last ingest (never 0 while a FIFO queue still holds messages); NULL if unknown';
COMMENT ON COLUMN sqs_ingest.stats.queue_arn IS 'The queue''s identity, sqs_ingest.queue_arn(queue_url). Since 0.5.0';

-- The drain procedure goes on through FIFO queues (a batch tells it whether the queue may hold more).
CREATE FUNCTION sqs_ingest."drain_batch"(
	"queue_url" TEXT, /* &str */
	"max_messages" bigint, /* i64 */
	"method" TEXT /* core::option::Option<&str> */
) RETURNS TABLE (
	"received" bigint,  /* i64 */
	"inserted" bigint,  /* i64 */
	"duplicates" bigint,  /* i64 */
	"dead_lettered" bigint,  /* i64 */
	"more" bool  /* bool */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'drain_batch_wrapper';
REVOKE ALL ON FUNCTION sqs_ingest.drain_batch(text, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sqs_ingest.drain_batch(text, bigint, text) TO sqs_ingest_operator;
COMMENT ON FUNCTION sqs_ingest.drain_batch(text, bigint, text) IS 'One batch of sqs_ingest_drain: as sqs_ingest(), plus whether the queue may hold more (a FIFO queue goes on while batches receive messages). Since 0.5.0';

CREATE OR REPLACE PROCEDURE sqs_ingest_drain(
    queue_url       text,
    max_messages    bigint  DEFAULT NULL,
    method          text    DEFAULT NULL,
    batch_messages  integer DEFAULT 1000,
    INOUT received      bigint DEFAULT NULL,
    INOUT inserted      bigint DEFAULT NULL,
    INOUT duplicates    bigint DEFAULT NULL,
    INOUT dead_lettered bigint DEFAULT NULL,
    INOUT deleted       bigint DEFAULT NULL,
    INOUT delete_failures bigint DEFAULT NULL,
    INOUT elapsed_ms    double precision DEFAULT NULL)
LANGUAGE plpgsql
AS $$
DECLARE
    r         record;
    d         record;
    want      pg_catalog.int8;
    started   pg_catalog.timestamptz := pg_catalog.clock_timestamp();
BEGIN
    IF batch_messages IS NULL OR batch_messages OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'batch_messages must be at least 1, not %', batch_messages
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use a batch of 100 to 10000 messages.';
    END IF;
    IF max_messages IS NOT NULL AND max_messages OPERATOR(pg_catalog.<) 1 THEN
        RAISE EXCEPTION 'max_messages must be at least 1 (or NULL for no limit), not %', max_messages
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass NULL to drain the whole queue.';
    END IF;
    received := 0; inserted := 0; duplicates := 0; dead_lettered := 0; deleted := 0; delete_failures := 0;
    LOOP
        want := CASE WHEN max_messages IS NULL THEN batch_messages::pg_catalog.int8
                     ELSE pg_catalog.int8smaller(batch_messages::pg_catalog.int8,
                                                 max_messages OPERATOR(pg_catalog.-) received) END;
        EXIT WHEN want OPERATOR(pg_catalog.<=) 0::pg_catalog.int8;
        SELECT * INTO r FROM sqs_ingest.drain_batch(queue_url, want, method);
        COMMIT;  -- the commit hook deletes this batch's messages from SQS now
        SELECT * INTO d FROM sqs_ingest.last_commit_deletes();
        received := received OPERATOR(pg_catalog.+) r.received;
        inserted := inserted OPERATOR(pg_catalog.+) r.inserted;
        duplicates := duplicates OPERATOR(pg_catalog.+) r.duplicates;
        dead_lettered := dead_lettered OPERATOR(pg_catalog.+) r.dead_lettered;
        IF r.received OPERATOR(pg_catalog.>) 0::pg_catalog.int8 THEN
            deleted := deleted OPERATOR(pg_catalog.+) d.deleted;
            delete_failures := delete_failures OPERATOR(pg_catalog.+) d.failed;
        END IF;
        -- Until the queue was confirmed empty (a FIFO queue: until a batch receives nothing, since each COMMIT
        -- lets the next messages of the groups it held through).
        EXIT WHEN NOT r.more;
    END LOOP;
    PERFORM sqs_ingest.flush_stats();
    elapsed_ms := pg_catalog.date_part('epoch'::pg_catalog.text,
                      pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) started)
                  OPERATOR(pg_catalog.*) 1000::pg_catalog.float8;
END
$$;
-- Dynamic workers come back after a server restart since 0.5.0 (each is recorded under the data directory when it
-- starts). Workers started by 0.4.0 were not recorded: rows of those not running now are marked stopped (start
-- them again with worker_start()).
UPDATE sqs_ingest.workers SET stopped_at = pg_catalog.now()
 WHERE stopped_at IS NULL
   AND (pid IS NULL OR pid NOT IN (SELECT a.pid FROM pg_catalog.pg_stat_activity a WHERE a.backend_type = 'sqs_ingest worker'));
COMMENT ON COLUMN sqs_ingest.workers.stopped_at IS 'Set by sqs_ingest.worker_stop(); the worker then exits for good. While NULL the worker is wanted: it comes back after a server restart (0.5.0); worker_status() shows what runs';
COMMENT ON COLUMN sqs_ingest.dead_letters.reason_code IS 'Stable reason slug: not_json, not_object, missing_field, wrong_type, nul_byte, value_too_long, invalid_app_version, body_too_large, refused_by_table (0.4.0), too_many_receives, no_message_id, no_receipt_handle (0.5.0)';
