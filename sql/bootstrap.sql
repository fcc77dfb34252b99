-- sqs_ingest bootstrap: the extension's own tables, roles and views.
-- Runs before any function is created. Everything here lives in schema sqs_ingest and belongs to the
-- extension; the target table (user_logins) does not, so DROP EXTENSION never drops ingested data.

CREATE SCHEMA IF NOT EXISTS sqs_ingest;
COMMENT ON SCHEMA sqs_ingest IS 'sqs_ingest: keys, ledger, dead letters, audit trail, stats and functions';
REVOKE ALL ON SCHEMA sqs_ingest FROM PUBLIC;

-- Roles are cluster-wide: create them only if an earlier database did not.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'sqs_ingest_unmasker') THEN
        CREATE ROLE sqs_ingest_unmasker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'sqs_ingest_masker') THEN
        CREATE ROLE sqs_ingest_masker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'sqs_ingest_operator') THEN
        CREATE ROLE sqs_ingest_operator NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'sqs_ingest_monitor') THEN
        CREATE ROLE sqs_ingest_monitor NOLOGIN;
    END IF;
END
$roles$;
COMMENT ON ROLE sqs_ingest_unmasker IS 'May call sqs_ingest.unmask() (every call is audited) and sqs_ingest.mask()';
COMMENT ON ROLE sqs_ingest_masker IS 'May call sqs_ingest.mask() to look rows up by a clear value';
COMMENT ON ROLE sqs_ingest_operator IS 'May run ingest, read stats and dead-letter metadata, redrive, control workers';
COMMENT ON ROLE sqs_ingest_monitor IS 'May read the sqs_ingest.metrics_* views (counts and ages only: no queue contents, no PII, no secret); for a Prometheus exporter. Since 0.7.0';
GRANT USAGE ON SCHEMA sqs_ingest TO sqs_ingest_unmasker, sqs_ingest_masker, sqs_ingest_operator, sqs_ingest_monitor;

-- Keys -----------------------------------------------------------------------------------------------------
CREATE SEQUENCE sqs_ingest.key_id_seq AS integer;
CREATE TABLE sqs_ingest.keys (
    key_id     integer PRIMARY KEY DEFAULT pg_catalog.nextval('sqs_ingest.key_id_seq'),
    key_bytes  bytea CHECK (pg_catalog.length(key_bytes) = 32),
    active     boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    wrapped    bytea,
    kms_key_arn text,
    CONSTRAINT keys_clear_or_wrapped CHECK ((key_bytes IS NULL) <> (wrapped IS NULL)
                                            AND (wrapped IS NULL) = (kms_key_arn IS NULL))
);
ALTER SEQUENCE sqs_ingest.key_id_seq OWNED BY sqs_ingest.keys.key_id;
CREATE UNIQUE INDEX keys_one_active ON sqs_ingest.keys (active) WHERE active;
REVOKE ALL ON sqs_ingest.keys, sqs_ingest.key_id_seq FROM PUBLIC;
COMMENT ON TABLE sqs_ingest.keys IS 'Masking master keys (256-bit). Readable only by the extension owner. Back this table up: losing it loses the PII';
COMMENT ON COLUMN sqs_ingest.keys.key_id IS 'Key id embedded in every token (enc:<key_id>:..., hmac:<key_id>:...)';
COMMENT ON COLUMN sqs_ingest.keys.key_bytes IS 'The secret key in the clear (NULL when wrapped by KMS); subkeys for SIV, HMAC and dead-letter encryption are derived from it';
COMMENT ON COLUMN sqs_ingest.keys.active IS 'The one key new tokens are made with; older keys still unmask';
COMMENT ON COLUMN sqs_ingest.keys.created_at IS 'When the key was generated';
COMMENT ON COLUMN sqs_ingest.keys.wrapped IS 'The key wrapped by AWS KMS (its CiphertextBlob, bound to key_id by the encryption context sqs_ingest_key_id); NULL when in the clear. Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.keys.kms_key_arn IS 'ARN of the KMS key that wrapped it: a backend needs kms:Decrypt on it to use the key. Since 0.7.0';

CREATE TABLE sqs_ingest.key_events (
    key_id   integer NOT NULL,
    event    text NOT NULL CHECK (event IN ('generated', 'activated', 'retired', 'wrapped')),
    at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    by_role  text NOT NULL DEFAULT CURRENT_USER
);
REVOKE ALL ON sqs_ingest.key_events FROM PUBLIC;
COMMENT ON TABLE sqs_ingest.key_events IS 'History of key generation and rotation (no key material); also tells a lost key table from a new install';
COMMENT ON COLUMN sqs_ingest.key_events.key_id IS 'Key the event is about';
COMMENT ON COLUMN sqs_ingest.key_events.event IS 'generated, activated, retired (no longer used for new tokens) or wrapped (by KMS, with sqs_ingest.kms_wrap_keys())';
COMMENT ON COLUMN sqs_ingest.key_events.at IS 'Transaction time';
COMMENT ON COLUMN sqs_ingest.key_events.by_role IS 'Role that caused it';

-- Ledger of ingested MessageIds ---------------------------------------------------------------------------
-- Keyed by a 64-bit digest of the queue URL rather than the URL itself: the index tuples stay small and compare
-- as integers, which roughly halves the cost of the per-message ledger insert (see CHANGELOG.md, "Measurements by release").
CREATE FUNCTION sqs_ingest.queue_key(queue_url text) RETURNS int8
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN ('x' || pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(queue_url, 'UTF8')), 'hex'), 16))::pg_catalog.bit(64)::pg_catalog.int8;
COMMENT ON FUNCTION sqs_ingest.queue_key(text) IS 'Key of a queue in sqs_ingest.ledger: the first 64 bits of the SHA-256 of the text, as int8; the ledger keys a queue by queue_key(queue_arn(url)) since 0.5.0';

CREATE TABLE sqs_ingest.ledger (
    queue_key   int8 NOT NULL,
    message_id  text COLLATE "C" NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('stored', 'dead_letter', 'redriven', 'filtered')),
    ingested_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (queue_key, message_id)
);
CREATE INDEX ledger_age ON sqs_ingest.ledger (ingested_at);
REVOKE ALL ON sqs_ingest.ledger FROM PUBLIC;
COMMENT ON TABLE sqs_ingest.ledger IS 'Every MessageId ingested, written in the same transaction as its row: a redelivered message is a duplicate. Pruned after the queue retention';
COMMENT ON COLUMN sqs_ingest.ledger.queue_key IS 'Queue the message came from: sqs_ingest.queue_key(sqs_ingest.queue_arn(queue_url)), the same for every spelling of its URL (0.5.0)';
COMMENT ON COLUMN sqs_ingest.ledger.message_id IS 'SQS MessageId';
COMMENT ON COLUMN sqs_ingest.ledger.outcome IS 'stored, dead_letter, redriven (stored later from a dead letter), or filtered (a pipeline''s filter did not match; deleted, 0.6.0)';
COMMENT ON COLUMN sqs_ingest.ledger.ingested_at IS 'Transaction time of ingest';

-- Dead letters ---------------------------------------------------------------------------------------------
CREATE TABLE sqs_ingest.dead_letters (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue_url      text NOT NULL,
    message_id     text NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    sent_at        timestamptz,
    receive_count  integer,
    reason_code    text NOT NULL,
    reason         text NOT NULL,
    key_id         integer NOT NULL,
    body_encrypted bytea NOT NULL,
    body_bytes     integer NOT NULL,
    redriven_at    timestamptz,
    body_digest    bytea,
    pipeline       text,
    attributes_encrypted bytea,
    pipeline_id    bigint,
    UNIQUE (queue_url, message_id)
);
REVOKE ALL ON sqs_ingest.dead_letters FROM PUBLIC;
GRANT SELECT (id, queue_url, message_id, received_at, sent_at, receive_count, reason_code, reason, body_bytes, redriven_at, pipeline)
    ON sqs_ingest.dead_letters TO sqs_ingest_operator;
COMMENT ON TABLE sqs_ingest.dead_letters IS 'Messages that could not be stored, with the reason; the body is encrypted because it may hold PII';
COMMENT ON COLUMN sqs_ingest.dead_letters.id IS 'Surrogate key';
COMMENT ON COLUMN sqs_ingest.dead_letters.queue_url IS 'Queue the message came from';
COMMENT ON COLUMN sqs_ingest.dead_letters.message_id IS 'SQS MessageId (argument of sqs_ingest.redrive)';
COMMENT ON COLUMN sqs_ingest.dead_letters.received_at IS 'When it was dead-lettered';
COMMENT ON COLUMN sqs_ingest.dead_letters.sent_at IS 'SQS SentTimestamp';
COMMENT ON COLUMN sqs_ingest.dead_letters.receive_count IS 'SQS ApproximateReceiveCount when it was dead-lettered';
COMMENT ON COLUMN sqs_ingest.dead_letters.reason_code IS 'Stable reason slug: not_json, not_object, missing_field, wrong_type, nul_byte, value_too_long, invalid_app_version, body_too_large, refused_by_table (0.4.0), too_many_receives, no_message_id, no_receipt_handle (0.5.0), invalid_value, filtered, filter_error (0.6.0, pipelines)';
COMMENT ON COLUMN sqs_ingest.dead_letters.reason IS 'Precise reason, naming the field (never its value)';
COMMENT ON COLUMN sqs_ingest.dead_letters.key_id IS 'Key the body is encrypted with';
COMMENT ON COLUMN sqs_ingest.dead_letters.body_encrypted IS 'AES-256-GCM encrypted body (random nonce); readable only through sqs_ingest.dead_letter_body() by the owner';
COMMENT ON COLUMN sqs_ingest.dead_letters.body_bytes IS 'Size of the original body';
COMMENT ON COLUMN sqs_ingest.dead_letters.redriven_at IS 'When sqs_ingest.redrive() stored it';
COMMENT ON COLUMN sqs_ingest.dead_letters.body_digest IS 'For a body over 64 KiB (never redrivable): HMAC-SHA256 of the whole body under the key''s HMAC subkey; body_encrypted then holds only its first 4 KiB. NULL otherwise. Since 0.4.0';
COMMENT ON COLUMN sqs_ingest.dead_letters.attributes_encrypted IS 'A pipeline''s dead letter: its message attributes and FIFO group and sequence, AES-256-GCM encrypted like the body, for redrive. Since 0.6.0';
COMMENT ON COLUMN sqs_ingest.dead_letters.pipeline_id IS 'The declaration of that pipeline (sqs_ingest.pipelines.id). Since 0.6.0';
COMMENT ON COLUMN sqs_ingest.dead_letters.pipeline IS 'The pipeline that dead-lettered it (NULL: the login pipeline, sqs_ingest(<queue url>)). Since 0.6.0';

-- Unmask audit trail ---------------------------------------------------------------------------------------
CREATE TABLE sqs_ingest.unmask_audit (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    called_at    timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    session_role text NOT NULL,
    effective_role text NOT NULL,
    backend_pid  integer NOT NULL DEFAULT pg_catalog.pg_backend_pid(),
    key_id       integer,
    succeeded    boolean NOT NULL,
    failure      text
);
REVOKE ALL ON sqs_ingest.unmask_audit FROM PUBLIC;
COMMENT ON TABLE sqs_ingest.unmask_audit IS 'One row per sqs_ingest.unmask() call; written as the extension owner, not modifiable by callers';
COMMENT ON COLUMN sqs_ingest.unmask_audit.id IS 'Surrogate key';
COMMENT ON COLUMN sqs_ingest.unmask_audit.called_at IS 'Wall-clock time of the call';
COMMENT ON COLUMN sqs_ingest.unmask_audit.session_role IS 'session_user of the caller';
COMMENT ON COLUMN sqs_ingest.unmask_audit.effective_role IS 'current_user of the caller (differs under SET ROLE or SECURITY DEFINER)';
COMMENT ON COLUMN sqs_ingest.unmask_audit.backend_pid IS 'Backend that made the call';
COMMENT ON COLUMN sqs_ingest.unmask_audit.key_id IS 'Key id named by the token (NULL if the token was unreadable)';
COMMENT ON COLUMN sqs_ingest.unmask_audit.succeeded IS 'Whether the value was revealed';
COMMENT ON COLUMN sqs_ingest.unmask_audit.failure IS 'Why it was refused';

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

-- Counters behind sqs_ingest.stats -------------------------------------------------------------------------
CREATE TABLE sqs_ingest.counters (
    queue_url         text NOT NULL,
    worker            text NOT NULL,
    backend_pid       integer NOT NULL,
    hour              timestamptz NOT NULL,
    received          bigint NOT NULL DEFAULT 0,
    inserted          bigint NOT NULL DEFAULT 0,
    duplicates        bigint NOT NULL DEFAULT 0,
    dead_lettered     bigint NOT NULL DEFAULT 0,
    deleted           bigint NOT NULL DEFAULT 0,
    delete_failures   bigint NOT NULL DEFAULT 0,
    last_success_at   timestamptz,
    last_error        text,
    last_error_at     timestamptz,
    approximate_depth bigint,
    depth_at          timestamptz,
    filtered          bigint NOT NULL DEFAULT 0,
    pipeline          text NOT NULL DEFAULT '',
    batches           bigint NOT NULL DEFAULT 0,
    batch_seconds     double precision NOT NULL DEFAULT 0,
    oldest_sent_at    timestamptz,
    deletes_deferred  bigint NOT NULL DEFAULT 0,
    deferred_lsn      pg_lsn,
    deferred_at       timestamptz,
    PRIMARY KEY (queue_url, worker, backend_pid, hour, pipeline)
);
REVOKE ALL ON sqs_ingest.counters FROM PUBLIC;
COMMENT ON TABLE sqs_ingest.counters IS 'Per queue, worker, backend and hour counters; one row per backend so concurrent ingests never wait on each other';
COMMENT ON COLUMN sqs_ingest.counters.worker IS 'Empty for SQL sessions, "worker N" for background workers';
COMMENT ON COLUMN sqs_ingest.counters.last_error IS 'Last error, scrubbed of secrets';
COMMENT ON COLUMN sqs_ingest.counters.pipeline IS 'The declared pipeline counted ('''' for the login pipeline). Since 0.6.0';
COMMENT ON COLUMN sqs_ingest.counters.batches IS 'Ingest calls (transactions) that received messages. Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.counters.batch_seconds IS 'Their wall-clock time in seconds, summed. Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.counters.oldest_sent_at IS 'The oldest SentTimestamp among the messages of the last such call. Since 0.7.0';
COMMENT ON COLUMN sqs_ingest.counters.deletes_deferred IS 'Messages left in the queue after COMMIT because the standbys sqs_ingest.delete_after names did not confirm the commit in time; they come back and are recognised as duplicates. Since 0.9.0';
COMMENT ON COLUMN sqs_ingest.counters.deferred_lsn IS 'End of the WAL of the newest deferred commit counted here since the row was last fully confirmed (sqs_ingest.confirmed_lsn() past it). Since 0.9.0';
COMMENT ON COLUMN sqs_ingest.counters.deferred_at IS 'When the oldest deferred commit counted here since then happened. Since 0.9.0';

-- The view sqs_ingest.stats is created in finalize.sql (it keys a queue by sqs_ingest.queue_arn()).

-- pg_dump includes these tables, so a dump restores keys, ledger, dead letters and the audit trail.
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.keys', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.key_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.key_events', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.ledger', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.dead_letters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.unmask_audit', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.unmask_audit_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.counters', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.mask_audit', '');
SELECT pg_catalog.pg_extension_config_dump('sqs_ingest.mask_audit_id_seq', '');

-- Workers started with sqs_ingest.worker_start() --------------------------------------------------------
CREATE TABLE sqs_ingest.workers (
    worker_id      integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue_url      text NOT NULL,
    batch_messages integer,
    method         text,
    started_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    stopped_at     timestamptz,
    pid            integer,
    run_as         regrole
);
REVOKE ALL ON sqs_ingest.workers FROM PUBLIC;
GRANT SELECT ON sqs_ingest.workers TO sqs_ingest_operator;
COMMENT ON TABLE sqs_ingest.workers IS 'Workers started with sqs_ingest.worker_start() in this database';
COMMENT ON COLUMN sqs_ingest.workers.queue_url IS 'Queue the worker ingests from';
COMMENT ON COLUMN sqs_ingest.workers.batch_messages IS 'Messages per transaction (NULL: sqs_ingest.worker_batch_messages)';
COMMENT ON COLUMN sqs_ingest.workers.method IS 'Masking method (NULL: sqs_ingest.masking_method)';
COMMENT ON COLUMN sqs_ingest.workers.stopped_at IS 'Set by sqs_ingest.worker_stop(); the worker then exits for good. While NULL the worker is wanted: it comes back after a server restart (0.5.0); worker_status() shows what runs';
COMMENT ON COLUMN sqs_ingest.workers.pid IS 'Backend pid of the running worker';
COMMENT ON COLUMN sqs_ingest.workers.run_as IS 'Role the worker connects as: the role that called worker_start(). Since 0.4.0';

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
