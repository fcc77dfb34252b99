-- sqs_ingest 0.5.0 -> 0.6.0 (hand-written; `make test` proves an upgraded database equals a fresh 0.6.0 install).
\echo Use "ALTER EXTENSION sqs_ingest UPDATE TO '0.6.0'" to load this file. \quit

-- Pipelines (0.6.0): any queue into any table, declared with sqs_ingest.pipeline_create() ----------------
CREATE TABLE sqs_ingest.pipelines (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    queue_url   text NOT NULL,
    target      text NOT NULL,
    target_owner text NOT NULL,
    columns     jsonb NOT NULL CHECK (pg_catalog.jsonb_typeof(columns) = 'object'),
    envelope    text NOT NULL DEFAULT 'none' CHECK (envelope IN ('none', 'sns', 'eventbridge')),
    filter      jsonpath,
    filter_fate text NOT NULL DEFAULT 'delete' CHECK (filter_fate IN ('delete', 'release', 'dead_letter')),
    owner       text NOT NULL,
    declared_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    id          bigint GENERATED ALWAYS AS IDENTITY UNIQUE
);
REVOKE ALL ON sqs_ingest.pipelines FROM PUBLIC;
GRANT SELECT ON sqs_ingest.pipelines TO sqs_ingest_operator;
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.pipelines', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.pipelines_id_seq', '');
COMMENT ON TABLE sqs_ingest.pipelines IS 'Pipelines declared with sqs_ingest.pipeline_create(): which queue goes into which table, column by column; run one with sqs_ingest(''<name>''). Since 0.6.0';
COMMENT ON COLUMN sqs_ingest.pipelines.target IS 'The target table, schema-qualified at declaration; it must exist (pipelines never create tables)';
COMMENT ON COLUMN sqs_ingest.pipelines.target_owner IS 'The role that owned the target at declaration: ingest refuses a table of that name owned by another role (one swapped in under the name)';
COMMENT ON COLUMN sqs_ingest.pipelines.columns IS 'Per target column: a source ($.json.path, body, attribute:<name>, sqs:<attribute>, envelope:$.path) or {"from": source, "mask": "encrypt"|"hmac", "transform": "app_version", "required": bool, "default": text, "json_type": "string"}';
COMMENT ON COLUMN sqs_ingest.pipelines.envelope IS 'none, sns (an SNS notification without raw delivery is unwrapped to its Message) or eventbridge (unwrapped to its detail)';
COMMENT ON COLUMN sqs_ingest.pipelines.filter IS 'SQL/JSON path predicate over {"body": ..., "attributes": {...}, "sqs": {...}}; NULL: every message';
COMMENT ON COLUMN sqs_ingest.pipelines.filter_fate IS 'What happens to a message the filter does not match: delete (after COMMIT), release (back to the queue) or dead_letter';
COMMENT ON COLUMN sqs_ingest.pipelines.declared_at IS 'When it was last declared or replaced';
COMMENT ON COLUMN sqs_ingest.pipelines.id IS 'This declaration of the name (replace keeps it; drop and declare again makes a new one): dead letters record it, and redrive() takes only those of the same declaration';
COMMENT ON COLUMN sqs_ingest.pipelines.owner IS 'The role that declared it; only it (or a superuser) may replace or drop it';

CREATE  FUNCTION sqs_ingest."pipeline_create"(
	"name" TEXT, /* & str */
	"queue_url" TEXT, /* & str */
	"target" TEXT, /* & str */
	"columns" jsonb, /* pgrx :: JsonB */
	"envelope" TEXT DEFAULT 'none', /* & str */
	"filter" TEXT DEFAULT NULL, /* Option < & str > */
	"filter_fate" TEXT DEFAULT 'delete', /* & str */
	"replace" bool DEFAULT false /* bool */
) RETURNS VOID /* std :: result :: Result < (), ErrorReport > */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'pipeline_create_wrapper';

CREATE  FUNCTION sqs_ingest."pipeline_drop"(
	"name" TEXT /* & str */
) RETURNS bool /* std :: result :: Result < bool, ErrorReport > */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'pipeline_drop_wrapper';

CREATE  FUNCTION sqs_ingest."rekey_all"() RETURNS TABLE (
	"target" TEXT,  /* String */
	"tokens" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'rekey_all_wrapper';
REVOKE ALL ON FUNCTION sqs_ingest.rekey_all() FROM PUBLIC;
COMMENT ON FUNCTION sqs_ingest.rekey_all() IS 'Rekey every table that holds tokens: the login pipeline''s target and every pipeline''s target (each column a pipeline masks with encrypt); returns each table and its rewritten token count. Since 0.6.0';
COMMENT ON FUNCTION sqs_ingest.rekey(regclass) IS 'Rewrite enc: tokens of older keys in the table to the active key (masked_ip and masked_device_id, and every column a pipeline into the table masks with encrypt, 0.6.0); returns how many tokens changed';

REVOKE ALL ON FUNCTION sqs_ingest.pipeline_create(text, text, text, jsonb, text, text, text, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION sqs_ingest.pipeline_drop(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sqs_ingest.pipeline_create(text, text, text, jsonb, text, text, text, boolean) TO sqs_ingest_operator;
GRANT EXECUTE ON FUNCTION sqs_ingest.pipeline_drop(text) TO sqs_ingest_operator;
COMMENT ON FUNCTION sqs_ingest.pipeline_create(text, text, text, jsonb, text, text, text, boolean) IS 'Declare a pipeline: a queue into an existing table, column by column (source, mask, transform, required, default), with an optional envelope and filter; checked completely before it is stored (22023, 42703, 42P01, 42501, 42710). Run it with sqs_ingest(''<name>''). Since 0.6.0';
COMMENT ON FUNCTION sqs_ingest.pipeline_drop(text) IS 'Drop a pipeline''s declaration (its table, ledger and dead letters stay); only its declaring role or a superuser. Since 0.6.0';

-- A pipeline's filter may delete a message it does not match: the ledger records it as filtered.
ALTER TABLE sqs_ingest.ledger DROP CONSTRAINT ledger_outcome_check;
ALTER TABLE sqs_ingest.ledger ADD CONSTRAINT ledger_outcome_check
    CHECK (outcome IN ('stored', 'dead_letter', 'redriven', 'filtered'));
COMMENT ON COLUMN sqs_ingest.ledger.outcome IS 'stored, dead_letter, redriven (stored later from a dead letter), or filtered (a pipeline''s filter did not match; deleted, 0.6.0)';

-- Which pipeline dead-lettered a message (NULL: the login pipeline).
ALTER TABLE sqs_ingest.dead_letters ADD COLUMN pipeline text;
ALTER TABLE sqs_ingest.dead_letters ADD COLUMN attributes_encrypted bytea;
ALTER TABLE sqs_ingest.dead_letters ADD COLUMN pipeline_id bigint;
COMMENT ON COLUMN sqs_ingest.dead_letters.pipeline_id IS 'The declaration of that pipeline (sqs_ingest.pipelines.id). Since 0.6.0';
COMMENT ON COLUMN sqs_ingest.dead_letters.attributes_encrypted IS 'A pipeline''s dead letter: its message attributes and FIFO group and sequence, AES-256-GCM encrypted like the body, for redrive. Since 0.6.0';
GRANT SELECT (pipeline) ON sqs_ingest.dead_letters TO sqs_ingest_operator;
COMMENT ON COLUMN sqs_ingest.dead_letters.pipeline IS 'The pipeline that dead-lettered it (NULL: the login pipeline, sqs_ingest(<queue url>)). Since 0.6.0';
COMMENT ON COLUMN sqs_ingest.dead_letters.reason_code IS 'Stable reason slug: not_json, not_object, missing_field, wrong_type, nul_byte, value_too_long, invalid_app_version, body_too_large, refused_by_table (0.4.0), too_many_receives, no_message_id, no_receipt_handle (0.5.0), invalid_value, filtered, filter_error (0.6.0, pipelines)';

-- Counters per pipeline too, and the messages a filter deleted or released.
ALTER TABLE sqs_ingest.counters ADD COLUMN filtered bigint NOT NULL DEFAULT 0;
ALTER TABLE sqs_ingest.counters ADD COLUMN pipeline text NOT NULL DEFAULT '';
ALTER TABLE sqs_ingest.counters DROP CONSTRAINT counters_pkey;
ALTER TABLE sqs_ingest.counters ADD PRIMARY KEY (queue_url, worker, backend_pid, hour, pipeline);
COMMENT ON COLUMN sqs_ingest.counters.pipeline IS 'The declared pipeline counted ('''' for the login pipeline). Since 0.6.0';

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
       c.queue                                   AS queue_arn,
       pg_catalog.sum(c.filtered)::bigint        AS filtered,
       c.pipeline                                AS pipeline
  FROM c LEFT JOIN depth d ON d.queue = c.queue
 GROUP BY c.queue, c.worker, c.pipeline;
REVOKE ALL ON sqs_ingest.stats FROM PUBLIC;
GRANT SELECT ON sqs_ingest.stats TO sqs_ingest_operator;
COMMENT ON COLUMN sqs_ingest.stats.pipeline IS 'The declared pipeline ('''' for the login pipeline, sqs_ingest(<queue url>)): every pipeline of a queue has its row. Since 0.6.0';
COMMENT ON COLUMN sqs_ingest.stats.filtered IS 'Messages a pipeline''s filter did not match and deleted or released (those it dead-letters count in dead_lettered). Since 0.6.0';
