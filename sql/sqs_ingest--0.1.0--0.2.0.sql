-- sqs_ingest 0.1.0 -> 0.2.0 (hand-written; `make test` proves an upgraded database equals a fresh 0.2.0 install).
\echo Use "ALTER EXTENSION sqs_ingest UPDATE TO '0.2.0'" to load this file. \quit

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
