-- sqs_ingest finalize: runs after every function exists. Privileges, the drain procedure, comments.

-- Re-key with the documented signature: target defaults to the configured table, resolved when called.
CREATE FUNCTION sqs_ingest.rekey(target regclass DEFAULT 'user_logins'::text::regclass)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT sqs_ingest.rekey_table(target::oid) $$;

-- Drain a large queue in many transactions: each batch commits (and is deleted from SQS) before the next.
-- It runs as the caller, who may be a superuser in a database whose owner planted operators, functions or types
-- in a schema on the caller's search_path; a procedure that COMMITs cannot carry SET search_path, so every
-- operator, function and type in its body is schema-qualified instead.
CREATE PROCEDURE sqs_ingest_drain(
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
    -- Collect the delete outcomes of this procedure's commits (0.8.0: a batch's deletes run on while the next
    -- batch is received and stored).
    PERFORM sqs_ingest.drain_deletes(true);
    LOOP
        want := CASE WHEN max_messages IS NULL THEN batch_messages::pg_catalog.int8
                     ELSE pg_catalog.int8smaller(batch_messages::pg_catalog.int8,
                                                 max_messages OPERATOR(pg_catalog.-) received) END;
        EXIT WHEN want OPERATOR(pg_catalog.<=) 0::pg_catalog.int8;
        SELECT * INTO r FROM sqs_ingest.drain_batch(queue_url, want, method);
        COMMIT;  -- the commit hook starts deleting this batch's messages from SQS
        received := received OPERATOR(pg_catalog.+) r.received;
        inserted := inserted OPERATOR(pg_catalog.+) r.inserted;
        duplicates := duplicates OPERATOR(pg_catalog.+) r.duplicates;
        dead_lettered := dead_lettered OPERATOR(pg_catalog.+) r.dead_lettered;
        -- Until the queue was confirmed empty (a FIFO queue: until a batch receives nothing, since each COMMIT
        -- lets the next messages of the groups it held through).
        EXIT WHEN NOT r.more;
    END LOOP;
    SELECT * INTO d FROM sqs_ingest.drain_deletes(false);  -- waits for the deletes still running
    deleted := d.deleted;
    delete_failures := d.failed;
    PERFORM sqs_ingest.flush_stats();
    elapsed_ms := pg_catalog.date_part('epoch'::pg_catalog.text,
                      pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) started)
                  OPERATOR(pg_catalog.*) 1000::pg_catalog.float8;
END
$$;

-- AWS secrets are accepted only from the server's configuration files (0.4.0): settings made earlier with
-- ALTER DATABASE/ROLE ... SET are readable by every login role, so they are removed (with a WARNING).
DO $scrub$
DECLARE
    s record;
BEGIN
    FOR s IN
        SELECT db.datname, ro.rolname, pg_catalog.split_part(c, '=', 1) AS name
          FROM pg_catalog.pg_db_role_setting x
          LEFT JOIN pg_catalog.pg_database db ON db.oid OPERATOR(pg_catalog.=) x.setdatabase
          LEFT JOIN pg_catalog.pg_roles ro ON ro.oid OPERATOR(pg_catalog.=) x.setrole,
               LATERAL pg_catalog.unnest(x.setconfig) AS c
         WHERE c OPERATOR(pg_catalog.~~*) 'sqs\_ingest.aws\_%'
    LOOP
        IF s.rolname IS NULL AND s.datname IS NULL THEN
            EXECUTE pg_catalog.format('ALTER ROLE ALL RESET %s', s.name);
        ELSIF s.rolname IS NULL THEN
            EXECUTE pg_catalog.format('ALTER DATABASE %I RESET %s', s.datname, s.name);
        ELSIF s.datname IS NULL THEN
            EXECUTE pg_catalog.format('ALTER ROLE %I RESET %s', s.rolname, s.name);
        ELSE
            EXECUTE pg_catalog.format('ALTER ROLE %I IN DATABASE %I RESET %s', s.rolname, s.datname, s.name);
        END IF;
        RAISE WARNING 'sqs_ingest: removed % from the settings of %', s.name,
            pg_catalog.concat_ws(' in ', 'role ' OPERATOR(pg_catalog.||) s.rolname, 'database ' OPERATOR(pg_catalog.||) s.datname)
            USING HINT = 'Set AWS credentials with ALTER SYSTEM (or postgresql.conf), or use the AWS default credential chain.';
    END LOOP;
END
$scrub$;

-- Counters per queue (by its ARN, so every spelling of one queue adds up; 0.5.0) and worker.
CREATE VIEW sqs_ingest.stats AS
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
REVOKE ALL ON sqs_ingest.stats FROM PUBLIC;
GRANT SELECT ON sqs_ingest.stats TO sqs_ingest_operator;
COMMENT ON VIEW sqs_ingest.stats IS 'Ingest counters per queue (every spelling of its URL together) and worker, last success, last error (scrubbed), and the queue depth seen at the last ingest';
COMMENT ON COLUMN sqs_ingest.stats.queue_url IS 'The URL the queue was last ingested by (a queue is keyed by queue_arn)';
COMMENT ON COLUMN sqs_ingest.stats.deleted IS 'Messages handed to the commit hook for deletion; failures after commit are in delete_failures';
COMMENT ON COLUMN sqs_ingest.stats.approximate_depth IS 'Messages SQS reported available at the last ingest (never 0 while a FIFO queue still holds messages); NULL if unknown';
COMMENT ON COLUMN sqs_ingest.stats.queue_arn IS 'The queue''s identity, sqs_ingest.queue_arn(queue_url). Since 0.5.0';
COMMENT ON COLUMN sqs_ingest.stats.pipeline IS 'The declared pipeline ('''' for the login pipeline, sqs_ingest(<queue url>)): every pipeline of a queue has its row. Since 0.6.0';
COMMENT ON COLUMN sqs_ingest.stats.filtered IS 'Messages a pipeline''s filter did not match and deleted or released (those it dead-letters count in dead_lettered). Since 0.6.0';
COMMENT ON COLUMN sqs_ingest.stats.batches IS 'Ingest calls (transactions) that received messages. Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.stats.batch_seconds IS 'Their wall-clock seconds, summed (batch_seconds / batches: the mean batch duration). Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.stats.oldest_sent_at IS 'The oldest SentTimestamp among the messages of the latest batch (now() minus it: the lag). Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.stats.deletes_deferred IS 'Messages left in the queue after COMMIT because the standbys sqs_ingest.delete_after names did not confirm the commit within sqs_ingest.standby_wait_timeout; they come back after their visibility timeout and are recognised as duplicates. Since 0.9.0';
COMMENT ON COLUMN sqs_ingest.stats.unconfirmed_since IS 'When the oldest deferred commit that is still beyond sqs_ingest.confirmed_lsn() happened (NULL: none); now() minus it is how long the standbys have been behind. Since 0.9.0';

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
                    FILTER (WHERE s.oldest_sent_at IS NOT NULL))[1])::float8 AS lag_seconds,
       pg_catalog.sum(s.deletes_deferred)::bigint  AS deletes_deferred,
       EXTRACT(EPOCH FROM pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.min(s.unconfirmed_since))::float8
                                                   AS unconfirmed_seconds
  FROM sqs_ingest.stats s
 GROUP BY s.queue_arn, s.pipeline;
COMMENT ON VIEW sqs_ingest.metrics_queues IS 'Per queue (ARN) and pipeline: message counters, batches (ingest calls that received messages) and their seconds, depth at the last ingest, last success (Unix time), lag (seconds since the oldest SentTimestamp of the latest batch), deferred deletes (0.9.0) and how long the oldest deferred commit has been unconfirmed by the standbys (seconds, NULL when none; 0.9.0). For prometheus-postgres-exporter; readable by sqs_ingest_monitor. Since 0.7.0';

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


-- Privileges: nothing but app_version_text, queue_key and queue_arn is PUBLIC.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA sqs_ingest FROM PUBLIC;
REVOKE ALL ON FUNCTION sqs_ingest(text, bigint, text) FROM PUBLIC;
REVOKE ALL ON PROCEDURE sqs_ingest_drain(text, bigint, text, integer, bigint, bigint, bigint, bigint, bigint, bigint, double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sqs_ingest.app_version_text(integer) TO PUBLIC;
GRANT EXECUTE ON FUNCTION sqs_ingest.queue_key(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION sqs_ingest.queue_arn(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION sqs_ingest.unmask(text) TO sqs_ingest_unmasker;
GRANT EXECUTE ON FUNCTION sqs_ingest.mask(text, text) TO sqs_ingest_unmasker, sqs_ingest_masker;
GRANT EXECUTE ON FUNCTION sqs_ingest(text, bigint, text) TO sqs_ingest_operator;
GRANT EXECUTE ON PROCEDURE sqs_ingest_drain(text, bigint, text, integer, bigint, bigint, bigint, bigint, bigint, bigint, double precision) TO sqs_ingest_operator;
GRANT EXECUTE ON FUNCTION sqs_ingest.last_commit_deletes() TO sqs_ingest_operator;
GRANT EXECUTE ON FUNCTION sqs_ingest.drain_deletes(boolean) TO sqs_ingest_operator;
GRANT EXECUTE ON FUNCTION sqs_ingest.drain_batch(text, bigint, text) TO sqs_ingest_operator;
GRANT EXECUTE ON FUNCTION sqs_ingest.flush_stats() TO sqs_ingest_operator;
GRANT EXECUTE ON FUNCTION sqs_ingest.redrive(text, text) TO sqs_ingest_operator;
GRANT EXECUTE ON FUNCTION sqs_ingest.queue_depth(text) TO sqs_ingest_operator;
GRANT EXECUTE ON FUNCTION sqs_ingest.confirmed_lsn() TO sqs_ingest_operator, sqs_ingest_monitor;

COMMENT ON FUNCTION sqs_ingest(text, bigint, text) IS 'Drain an SQS queue into the target table (sqs_ingest.target_table) in this transaction; messages are deleted from SQS after COMMIT';
COMMENT ON PROCEDURE sqs_ingest_drain(text, bigint, text, integer, bigint, bigint, bigint, bigint, bigint, bigint, double precision) IS 'Drain a queue committing every batch_messages messages (for large queues); CALL it outside an explicit transaction block';
COMMENT ON FUNCTION sqs_ingest.mask(text, text) IS 'Mask a value with the active key: encrypt (reversible, default from sqs_ingest.masking_method) or hmac';
COMMENT ON FUNCTION sqs_ingest.unmask(text) IS 'Reveal the value of an enc: token; audited in sqs_ingest.unmask_audit; granted via role sqs_ingest_unmasker';
COMMENT ON FUNCTION sqs_ingest.rotate_key() IS 'Generate a new active masking key; tokens of older keys still unmask';
COMMENT ON FUNCTION sqs_ingest.kms_wrap_keys() IS 'Wrap every masking key stored in the clear with the AWS KMS key sqs_ingest.kms_key_id names (Encrypt; the clear bytes are removed); returns how many; tokens are unchanged. Errors: 22023 setting unset, 42501 no KMS access, 55000 KMS key disabled, 58000 KMS unreachable. Since 0.7.0';
COMMENT ON FUNCTION sqs_ingest.rekey(regclass) IS 'Rewrite enc: tokens of older keys in the table to the active key (masked_ip and masked_device_id, and every column a pipeline into the table masks with encrypt, 0.6.0); returns how many tokens changed';
COMMENT ON FUNCTION sqs_ingest.rekey_table(oid) IS 'Implementation of sqs_ingest.rekey';
COMMENT ON FUNCTION sqs_ingest.rekey_all() IS 'Rekey every table that holds tokens: the login pipeline''s target and every pipeline''s target (each column a pipeline masks with encrypt); returns each table and its rewritten token count. Since 0.6.0';
COMMENT ON FUNCTION sqs_ingest.queue_arn(text) IS 'The queue''s ARN (arn:aws:sqs:region:account:name), the same for every spelling of its URL; region from the URL, else sqs_ingest.region. NULL for text that is not a queue URL';
COMMENT ON FUNCTION sqs_ingest.app_version_text(integer) IS 'Print a packed app_version (M*10000+m*100+p) as M.m.p';
COMMENT ON FUNCTION sqs_ingest.redrive(text, text) IS 'Re-process one dead letter by message id (after fixing its cause); true if it is now stored';
COMMENT ON FUNCTION sqs_ingest.drain_batch(text, bigint, text) IS 'One batch of sqs_ingest_drain: as sqs_ingest(), plus whether the queue may hold more (a FIFO queue goes on while batches receive messages). Since 0.5.0';
COMMENT ON FUNCTION sqs_ingest.drain_deletes(boolean) IS 'Used by sqs_ingest_drain: start (true) collecting the delete outcomes of its commits, or (false) wait for the deletes still running and return the total (deleted, failed). Since 0.8.0';
COMMENT ON FUNCTION sqs_ingest.last_commit_deletes() IS 'Messages deleted from SQS (and failures) after this session''s last committing ingest';
COMMENT ON FUNCTION sqs_ingest.flush_stats() IS 'Write this session''s post-commit delete outcomes and remembered errors to sqs_ingest.stats';
COMMENT ON FUNCTION sqs_ingest.queue_send(text, text[]) IS 'Send message bodies to a queue (operations and tests); superuser only by default';
COMMENT ON FUNCTION sqs_ingest.queue_create(text, integer) IS 'Create the queue named by a queue URL at its endpoint; superuser only by default';
COMMENT ON FUNCTION sqs_ingest.queue_depth(text) IS 'Approximate visible, in-flight and delayed message counts of a queue';
COMMENT ON FUNCTION sqs_ingest.confirmed_lsn() IS 'pg_lsn: the WAL position up to which every commit is as durable as sqs_ingest.delete_after requires (flushed locally, and by the standbys it names: physical replication slots and slot-less streaming standbys). Commits beyond it have their deletes waiting or deferred. NULL on a standby. Since 0.9.0';
COMMENT ON FUNCTION sqs_ingest.bench_raw_drain(text, bigint) IS 'Benchmark baseline: receive and DISCARD messages without touching tables; superuser only';
GRANT EXECUTE ON FUNCTION sqs_ingest.worker_start(text, integer, text) TO sqs_ingest_operator;
GRANT EXECUTE ON FUNCTION sqs_ingest.worker_stop(text) TO sqs_ingest_operator;
GRANT EXECUTE ON FUNCTION sqs_ingest.worker_status() TO sqs_ingest_operator;
COMMENT ON FUNCTION sqs_ingest.worker_start(text, integer, text) IS 'Start a background worker for one queue in this database (needs shared_preload_libraries = sqs_ingest); returns its id';
COMMENT ON FUNCTION sqs_ingest.worker_stop(text) IS 'Stop this database''s dynamic workers (of one queue or all) after their current batch; returns how many';
COMMENT ON FUNCTION sqs_ingest.worker_status() IS 'Running sqs_ingest workers: pid, label, database, queues, state';
GRANT EXECUTE ON FUNCTION sqs_ingest.pipeline_create(text, text, text, jsonb, text, text, text, boolean) TO sqs_ingest_operator;
GRANT EXECUTE ON FUNCTION sqs_ingest.pipeline_drop(text) TO sqs_ingest_operator;
COMMENT ON FUNCTION sqs_ingest.pipeline_create(text, text, text, jsonb, text, text, text, boolean) IS 'Declare a pipeline: a queue into an existing table, column by column (source, mask, transform, required, default), with an optional envelope and filter; checked completely before it is stored (22023, 42703, 42P01, 42501, 42710). Run it with sqs_ingest(''<name>''). Since 0.6.0';
COMMENT ON FUNCTION sqs_ingest.pipeline_drop(text) IS 'Drop a pipeline''s declaration (its table, ledger and dead letters stay); only its declaring role or a superuser. Since 0.6.0';

-- 0.2.0: purge old, already handled dead letters (see sql/sqs_ingest--0.1.0--0.2.0.sql for the upgrade).
CREATE FUNCTION sqs_ingest.purge_dead_letters(older_than interval DEFAULT '30 days', include_unhandled boolean DEFAULT false)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM sqs_ingest.dead_letters
         WHERE received_at < now() - older_than AND (redriven_at IS NOT NULL OR include_unhandled)
        RETURNING 1)
    SELECT count(*) FROM gone
$$;
REVOKE ALL ON FUNCTION sqs_ingest.purge_dead_letters(interval, boolean) FROM PUBLIC;
COMMENT ON FUNCTION sqs_ingest.purge_dead_letters(interval, boolean) IS 'Delete dead letters older than older_than that were redriven (or all of them with include_unhandled); returns how many';
