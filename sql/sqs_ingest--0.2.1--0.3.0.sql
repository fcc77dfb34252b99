-- sqs_ingest 0.2.1 -> 0.3.0 (hand-written; `make test` proves an upgraded database equals a fresh 0.3.0 install).
\echo Use "ALTER EXTENSION sqs_ingest UPDATE TO '0.3.0'" to load this file. \quit

-- The ledger is keyed by a 64-bit digest of the queue URL instead of the URL (smaller index tuples compared as
-- integers; message ids compare bytewise), and its age index no longer carries the URL. Existing rows keep their
-- identity: each URL is converted with the same function ingest uses, so earlier MessageIds stay duplicates.
CREATE FUNCTION sqs_ingest.queue_key(queue_url text) RETURNS int8
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN ('x' || pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(queue_url, 'UTF8')), 'hex'), 16))::pg_catalog.bit(64)::pg_catalog.int8;
COMMENT ON FUNCTION sqs_ingest.queue_key(text) IS 'Key of a queue URL in sqs_ingest.ledger: the first 64 bits of its SHA-256, as int8';
REVOKE ALL ON FUNCTION sqs_ingest.queue_key(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sqs_ingest.queue_key(text) TO PUBLIC;

-- Renamed before the type change, so the primary key index rebuilt by it names its column queue_key too.
DROP INDEX sqs_ingest.ledger_age;
ALTER TABLE sqs_ingest.ledger RENAME COLUMN queue_url TO queue_key;
ALTER TABLE sqs_ingest.ledger
    ALTER COLUMN queue_key TYPE int8 USING sqs_ingest.queue_key(queue_key),
    ALTER COLUMN message_id TYPE text COLLATE "C";
CREATE INDEX ledger_age ON sqs_ingest.ledger (ingested_at);
COMMENT ON COLUMN sqs_ingest.ledger.queue_key IS 'Queue the message came from: sqs_ingest.queue_key(queue_url)';
