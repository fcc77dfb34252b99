-- sqs_ingest 0.3.0 -> 0.4.0 (hand-written; `make test` proves an upgraded database equals a fresh 0.4.0 install).
\echo Use "ALTER EXTENSION sqs_ingest UPDATE TO '0.4.0'" to load this file. \quit

-- Dynamic workers connect as the role that started them. Workers started by 0.3.0 ran as the bootstrap
-- superuser and recorded no role: they are marked stopped (start them again with worker_start()).
ALTER TABLE sqs_ingest.workers ADD COLUMN run_as regrole;
COMMENT ON COLUMN sqs_ingest.workers.run_as IS 'Role the worker connects as: the role that called worker_start(). Since 0.4.0';
UPDATE sqs_ingest.workers SET stopped_at = pg_catalog.now() WHERE stopped_at IS NULL;

COMMENT ON COLUMN sqs_ingest.dead_letters.reason_code IS 'Stable reason slug: not_json, not_object, missing_field, wrong_type, nul_byte, value_too_long, invalid_app_version, body_too_large, refused_by_table (0.4.0: the target table refused the row; the reason gives the SQLSTATE and constraint or column name)';

-- Bodies too large ever to be redriven keep a 4 KiB encrypted prefix and a keyed digest.
ALTER TABLE sqs_ingest.dead_letters ADD COLUMN body_digest bytea;
COMMENT ON COLUMN sqs_ingest.dead_letters.body_digest IS 'For a body over 64 KiB (never redrivable): HMAC-SHA256 of the whole body under the key''s HMAC subkey; body_encrypted then holds only its first 4 KiB. NULL otherwise. Since 0.4.0';

-- mask() audit trail (0.4.0) --------------------------------------------------------------------------------
-- A deterministic mask is an equality oracle (a masker can test guesses of a clear value against stored tokens):
-- calls outside ingest are counted, one row per role and transaction.
CREATE TABLE sqs_ingest.mask_audit (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    first_call_at  timestamptz NOT NULL,
    last_call_at   timestamptz NOT NULL,
    session_role   text NOT NULL,
    effective_role text NOT NULL,
    backend_pid    integer NOT NULL,
    calls          bigint NOT NULL CHECK (calls > 0),
    rolled_back    boolean NOT NULL
);
REVOKE ALL ON sqs_ingest.mask_audit FROM PUBLIC;
COMMENT ON TABLE sqs_ingest.mask_audit IS 'sqs_ingest.mask() calls outside ingest, one row per role and transaction; written as the extension owner, not modifiable by callers. Since 0.4.0';
COMMENT ON COLUMN sqs_ingest.mask_audit.id IS 'Surrogate key';
COMMENT ON COLUMN sqs_ingest.mask_audit.first_call_at IS 'Wall-clock time of the first call in the transaction';
COMMENT ON COLUMN sqs_ingest.mask_audit.last_call_at IS 'When the transaction ended (or the role changed)';
COMMENT ON COLUMN sqs_ingest.mask_audit.session_role IS 'session_user of the caller';
COMMENT ON COLUMN sqs_ingest.mask_audit.effective_role IS 'current_user of the caller';
COMMENT ON COLUMN sqs_ingest.mask_audit.backend_pid IS 'Backend that made the calls';
COMMENT ON COLUMN sqs_ingest.mask_audit.calls IS 'Number of mask() calls (values masked)';
COMMENT ON COLUMN sqs_ingest.mask_audit.rolled_back IS 'The calls'' transaction rolled back (the tokens were still returned); written by the audit worker';

SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.mask_audit', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.mask_audit_id_seq', '');

-- Every statement runs with a pinned search_path or schema-qualified operators.
CREATE OR REPLACE FUNCTION sqs_ingest.rekey(target regclass DEFAULT 'user_logins'::text::regclass)
RETURNS bigint
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT sqs_ingest.rekey_table(target::oid) $$;

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
        SELECT * INTO r FROM @extschema@.sqs_ingest(queue_url, want, method);
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
        EXIT WHEN r.received OPERATOR(pg_catalog.<) want;  -- the queue was confirmed empty
    END LOOP;
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
