-- sqs_ingest 0.7.0 -> 0.8.0 (hand-written; `make test` proves an upgraded database equals a fresh 0.8.0 install).
\echo Use "ALTER EXTENSION sqs_ingest UPDATE TO '0.8.0'" to load this file. \quit

-- Throughput (0.8.0): sqs_ingest_drain lets a batch's deletes run on while the next batch is received and
-- stored, and collects their outcomes with drain_deletes() instead of last_commit_deletes() after each COMMIT.
CREATE FUNCTION sqs_ingest."drain_deletes"(
	"start" bool /* bool */
) RETURNS TABLE (
	"deleted" bigint,  /* i64 */
	"failed" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'drain_deletes_wrapper';
REVOKE ALL ON FUNCTION sqs_ingest.drain_deletes(boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sqs_ingest.drain_deletes(boolean) TO sqs_ingest_operator;
COMMENT ON FUNCTION sqs_ingest.drain_deletes(boolean) IS 'Used by sqs_ingest_drain: start (true) collecting the delete outcomes of its commits, or (false) wait for the deletes still running and return the total (deleted, failed). Since 0.8.0';

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
