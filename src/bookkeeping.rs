//! The extension's own tables: the MessageId ledger, dead letters and the counters behind `sqs_ingest.stats`.
//! Every statement here runs as the extension owner (see [`crate::privilege`]).

use crate::error::{Error, Result};
use pgrx::prelude::*;
use sqs_ingest_core::event::{Rejection, KEPT_BODY_PREFIX_BYTES, MAX_BODY_BYTES};
use sqs_ingest_core::mask::{random_nonce, KeyMaterial};
use sqs_ingest_core::queue_url::{queue_key, QueueUrl};
use std::collections::HashSet;

/// How this database's ledger names a queue: by `sqs_ingest.queue_key(<the queue's ARN>)` (schema 0.5.0 and
/// later: every spelling of one queue reaches the same rows; 0.3.0 and 0.4.0 keyed by the URL's text, see
/// [`adopt_spelling`]) or, in a database whose schema is older than 0.3.0 (new library files installed,
/// `ALTER EXTENSION ... UPDATE` not yet run there), by the URL itself. All work, so a library upgrade never stops
/// ingest before the schema update.
#[derive(Debug, Clone)]
pub enum LedgerQueue {
    Key(i64),
    Url(String),
}

/// The queue's identity ([`QueueUrl::arn`]); the URL text itself when it does not parse (rows of old releases).
pub fn queue_identity(queue_url: &str) -> String {
    QueueUrl::parse(queue_url).map_or_else(|_| queue_url.to_string(), |q| q.arn(&crate::gucs::region()))
}

impl LedgerQueue {
    pub fn of(queue_url: &str) -> Result<LedgerQueue> {
        let keyed = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                             WHERE attrelid OPERATOR(pg_catalog.=) 'sqs_ingest.ledger'::pg_catalog.regclass
                               AND attname OPERATOR(pg_catalog.=) 'queue_key'::pg_catalog.name AND NOT attisdropped)",
        )
        .map_err(|e| Error::Internal(format!("ledger lookup failed: {e}")))?
        .unwrap_or(false);
        if !keyed {
            return Ok(LedgerQueue::Url(queue_url.to_string()));
        }
        // The same key as the SQL function sqs_ingest.queue_key(), without a statement per call.
        let identity = queue_key(&queue_identity(queue_url));
        let spelling = queue_key(queue_url);
        if spelling != identity {
            // One indexed DELETE that finds nothing once the spelling's rows were moved (not cached: a move rolled
            // back with its transaction or savepoint must be made again).
            adopt_spelling(spelling, identity)?;
        }
        Ok(LedgerQueue::Key(identity))
    }

    /// The ledger's queue column, its SQL type and the statement parameter for it.
    fn column_and_arg(&self) -> (&'static str, &'static str, pgrx::datum::DatumWithOid<'static>) {
        match self {
            LedgerQueue::Key(k) => ("queue_key", "int8", (*k).into()),
            LedgerQueue::Url(u) => ("queue_url", "text", u.clone().into()),
        }
    }
}

/// Moves ledger rows written under a URL spelling's own key (releases 0.3.0 and 0.4.0, by a spelling the
/// upgrade script did not know) to the queue's identity key, so the MessageIds they hold stay duplicates. Where
/// both keys hold one MessageId (a message stored twice before 0.5.0), one row is kept.
fn adopt_spelling(spelling: i64, identity: i64) -> Result<()> {
    Spi::run_with_args(
        "WITH moved AS (
            DELETE FROM sqs_ingest.ledger WHERE queue_key OPERATOR(pg_catalog.=) $1
            RETURNING message_id, outcome, ingested_at)
         INSERT INTO sqs_ingest.ledger (queue_key, message_id, outcome, ingested_at)
         SELECT $2, message_id, outcome, ingested_at FROM moved
         ON CONFLICT DO NOTHING",
        &[spelling.into(), identity.into()],
    )
    .map_err(|e| Error::Internal(format!("ledger key update failed: {e}")))
}

/// Records MessageIds in the ledger; returns the ones that were not there before (the rest are duplicates).
pub fn claim(queue: &LedgerQueue, ids: Vec<String>, outcomes: Vec<String>) -> Result<HashSet<String>> {
    let (column, sql_type, queue_arg) = queue.column_and_arg();
    let sql = format!(
        "INSERT INTO sqs_ingest.ledger ({column}, message_id, outcome)
         SELECT $1::{sql_type}, m, o FROM unnest($2::text[], $3::text[]) AS u(m, o)
         ON CONFLICT DO NOTHING
         RETURNING message_id"
    );
    crate::plans::run(&sql, &[queue_arg, ids.into(), outcomes.into()], |rows| {
        rows.filter_map(|r| r.get::<String>(1).ok().flatten()).collect()
    })
    .map_err(|e| Error::Internal(format!("ledger insert failed: {e}")))
}

/// Marks ledger entries claimed as stored whose rows the table then refused: they are dead letters.
pub fn mark_dead_letters(queue: &LedgerQueue, message_ids: Vec<String>) -> Result<()> {
    let (column, _, queue_arg) = queue.column_and_arg();
    Spi::run_with_args(
        &format!("UPDATE sqs_ingest.ledger SET outcome = 'dead_letter' WHERE {column} = $1 AND message_id = ANY($2)"),
        &[queue_arg, message_ids.into()],
    )
    .map_err(|e| Error::Internal(format!("ledger update failed: {e}")))
}

/// Marks a ledger entry as stored from a dead letter.
pub fn mark_redriven(queue: &LedgerQueue, message_id: &str) -> Result<()> {
    let (column, _, queue_arg) = queue.column_and_arg();
    Spi::run_with_args(
        &format!("UPDATE sqs_ingest.ledger SET outcome = 'redriven' WHERE {column} = $1 AND message_id = $2"),
        &[queue_arg, message_id.into()],
    )
    .map_err(|e| Error::Internal(format!("ledger update failed: {e}")))
}

/// What this database's (possibly not yet updated) schema has, detected once per transaction: new library files
/// keep ingesting into an older schema until `ALTER EXTENSION ... UPDATE` runs there.
#[derive(Debug, Clone, Copy, Default)]
pub struct Schema {
    /// `dead_letters.body_digest` (0.4.0).
    pub body_digest: bool,
    /// `counters.pipeline` (0.6.0).
    pub counters_pipeline: bool,
    /// `keys.wrapped` and `keys.kms_key_arn`: keys wrapped by AWS KMS (0.7.0).
    pub keys_wrapped: bool,
    /// `counters.batches`, `batch_seconds` and `oldest_sent_at`, for the metrics (0.7.0).
    pub counters_batches: bool,
    /// `counters.deletes_deferred`, `deferred_lsn` and `deferred_at`: deletes the standbys did not confirm (0.9.0).
    pub counters_deferred: bool,
}

thread_local! {
    static SCHEMA: std::cell::Cell<Option<(u32, Schema)>> = const { std::cell::Cell::new(None) };
}

impl Schema {
    /// The schema of this database, looked up once per transaction (an `ALTER EXTENSION … UPDATE` commits before
    /// the next transaction sees it).
    pub fn detect() -> Result<Schema> {
        let lxid = crate::privilege::local_xid();
        if let Some((x, schema)) = SCHEMA.get() {
            if x == lxid {
                return Ok(schema);
            }
        }
        let has = |table: &str, column: &str| -> Result<bool> {
            Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                                 WHERE attrelid OPERATOR(pg_catalog.=) $1::pg_catalog.regclass
                                   AND attname OPERATOR(pg_catalog.=) $2::pg_catalog.name
                                   AND NOT attisdropped)",
                &[table.into(), column.into()],
            )
            .map_err(|e| Error::Internal(format!("schema lookup failed: {e}")))
            .map(|b| b.unwrap_or(false))
        };
        let schema = Schema {
            body_digest: has("sqs_ingest.dead_letters", "body_digest")?,
            counters_pipeline: has("sqs_ingest.counters", "pipeline")?,
            keys_wrapped: has("sqs_ingest.keys", "wrapped")?,
            counters_batches: has("sqs_ingest.counters", "batches")?,
            counters_deferred: has("sqs_ingest.counters", "deletes_deferred")?,
        };
        SCHEMA.set(Some((lxid, schema)));
        Ok(schema)
    }
}

/// What a pipeline may map besides the body, kept (sealed) with a pipeline's dead letter so that `redrive()` can
/// store it as the pipeline would: the message attributes and the FIFO system attributes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SealedAttributes {
    pub attributes: Vec<(String, String)>,
    pub group_id: Option<String>,
    pub sequence_number: Option<String>,
}

impl SealedAttributes {
    fn of(m: &sqs_ingest_core::sqs_json::WireMessage) -> Option<SealedAttributes> {
        (!m.attributes.is_empty() || m.group_id.is_some() || m.sequence_number.is_some()).then(|| SealedAttributes {
            attributes: m.attributes.clone(),
            group_id: m.group_id.clone(),
            sequence_number: m.sequence_number.clone(),
        })
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::json!({"a": self.attributes, "g": self.group_id, "s": self.sequence_number})
            .to_string()
            .into_bytes()
    }

    /// Decodes what [`Self::encode`] wrote (anything else reads as no attributes).
    pub fn decode(bytes: &[u8]) -> SealedAttributes {
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
        let text = |k: &str| v.get(k).and_then(serde_json::Value::as_str).map(str::to_string);
        SealedAttributes {
            attributes: v
                .get("a")
                .and_then(serde_json::Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|p| Some((p.get(0)?.as_str()?.to_string(), p.get(1)?.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
            group_id: text("g"),
            sequence_number: text("s"),
        }
    }
}

/// Dead letters of one batch, as column arrays.
#[derive(Default)]
pub struct DeadLetters {
    pub message_ids: Vec<String>,
    pub sent_ms: Vec<Option<i64>>,
    pub receive_counts: Vec<Option<i32>>,
    pub reason_codes: Vec<String>,
    pub reasons: Vec<String>,
    pub bodies: Vec<Vec<u8>>,
    pub body_bytes: Vec<i32>,
    pub digests: Vec<Option<Vec<u8>>>,
    /// Sealed [`SealedAttributes`], when the message had any (stored for a pipeline's dead letters only).
    pub attributes: Vec<Option<Vec<u8>>>,
}

impl DeadLetters {
    /// Adds a rejected message: its body encrypted whole, or, when it is too large ever to be stored, only its
    /// first [`KEPT_BODY_PREFIX_BYTES`] bytes encrypted plus a keyed digest of the whole body.
    pub fn push(&mut self, key: &KeyMaterial, m: sqs_ingest_core::sqs_json::WireMessage, reason: &Rejection) {
        let body = m.body.as_bytes();
        let (kept, digest) = if body.len() > MAX_BODY_BYTES {
            (&body[..KEPT_BODY_PREFIX_BYTES], Some(key.body_digest(body).to_vec()))
        } else {
            (body, None)
        };
        self.bodies.push(key.seal_blob(random_nonce(), kept));
        self.attributes.push(SealedAttributes::of(&m).map(|a| key.seal_blob(random_nonce(), &a.encode())));
        self.digests.push(digest);
        self.body_bytes.push(body.len() as i32);
        self.message_ids.push(m.message_id);
        self.sent_ms.push(m.sent_timestamp_ms);
        self.receive_counts.push(m.receive_count);
        self.reason_codes.push(reason.code().to_string());
        self.reasons.push(reason.to_string());
    }
}

/// Stores a batch's dead letters (`pipeline`: the declared pipeline that rejected them, None for the login one).
pub fn store_dead_letters(
    queue_url: &str,
    key_id: i32,
    schema: Schema,
    pipeline: Option<(&str, i64)>,
    d: DeadLetters,
) -> Result<()> {
    if d.message_ids.is_empty() {
        return Ok(());
    }
    let attributes = d.attributes;
    // Pipelines exist only in a 0.6.0 schema, which has the column; the login pipeline leaves it NULL.
    let (attributes_array, attributes_alias) =
        if pipeline.is_some() { (", $12::pg_catalog.bytea[]", ", a") } else { ("", "") };
    let (pipeline_column, pipeline_value, pipeline_update) = match pipeline {
        Some(_) => (
            ", pipeline, attributes_encrypted, pipeline_id",
            ", $11::pg_catalog.text, a, $13::pg_catalog.int8",
            ", pipeline = EXCLUDED.pipeline, attributes_encrypted = EXCLUDED.attributes_encrypted, pipeline_id = EXCLUDED.pipeline_id",
        ),
        None => ("", "", ""),
    };
    let (digest_column, digest_value, digest_update) = if schema.body_digest {
        (", body_digest", ", g", ", body_digest = EXCLUDED.body_digest")
    } else {
        ("", "", "")
    };
    let sql = format!(
        "INSERT INTO sqs_ingest.dead_letters
            (queue_url, message_id, sent_at, receive_count, reason_code, reason, key_id, body_encrypted, body_bytes{digest_column}{pipeline_column})
         SELECT $1::pg_catalog.text, m, pg_catalog.to_timestamp(s OPERATOR(pg_catalog./) 1000.0::pg_catalog.float8),
                c, rc, r, $2::pg_catalog.int4, b, n{digest_value}{pipeline_value}
           FROM unnest($3::pg_catalog.text[], $4::pg_catalog.int8[], $5::pg_catalog.int4[],
                                  $6::pg_catalog.text[], $7::pg_catalog.text[], $8::pg_catalog.bytea[],
                                  $9::pg_catalog.int4[], $10::pg_catalog.bytea[]{attributes_array})
                AS u(m, s, c, rc, r, b, n, g{attributes_alias})
         ON CONFLICT (queue_url, message_id) DO UPDATE
            SET reason_code = EXCLUDED.reason_code, reason = EXCLUDED.reason, key_id = EXCLUDED.key_id,
                body_encrypted = EXCLUDED.body_encrypted, body_bytes = EXCLUDED.body_bytes{digest_update}{pipeline_update},
                received_at = pg_catalog.now(), redriven_at = NULL"
    );
    crate::plans::run(
        &sql,
        &[
            queue_url.into(),
            key_id.into(),
            d.message_ids.into(),
            d.sent_ms.into(),
            d.receive_counts.into(),
            d.reason_codes.into(),
            d.reasons.into(),
            d.bodies.into(),
            d.body_bytes.into(),
            d.digests.into(),
        ]
        .into_iter()
        .chain(pipeline.map(|(name, _)| name.into()))
        .chain(pipeline.map(|_| attributes.into()))
        .chain(pipeline.map(|(_, id)| id.into()))
        .collect::<Vec<_>>(),
        |_| (),
    )
    .map_err(|e| Error::Internal(format!("dead letter insert failed: {e}")))
}

/// Counter increments for one queue and worker label.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub received: i64,
    pub inserted: i64,
    pub duplicates: i64,
    pub dead_lettered: i64,
    /// Messages a pipeline's filter did not match (0.6.0).
    pub filtered: i64,
    pub deleted: i64,
    pub delete_failures: i64,
    /// Ingest calls (transactions) that received messages, and their wall-clock seconds (0.7.0).
    pub batches: i64,
    pub batch_seconds: f64,
    /// The oldest SentTimestamp (ms since the epoch) among the messages counted (0.7.0).
    pub oldest_sent_ms: Option<i64>,
}

/// Adds to this backend's counter row for the current hour. Rows are keyed by backend pid, so concurrent
/// sessions never wait on each other's counter rows.
/// `pipeline`: the declared pipeline the counts are of ("" for the login pipeline, and in a schema before 0.6.0).
/// Counts messages whose deletes were deferred (their commit not confirmed by its standbys, see
/// `crate::replication`): `deletes_deferred`, and since when the row has held an unconfirmed deferral (the time of
/// the oldest, and the WAL end of the newest, deferred commit counted in it since it was last fully confirmed),
/// which `sqs_ingest.stats.unconfirmed_since` shows until `sqs_ingest.confirmed_lsn()` passes it. Written by the
/// audit worker; nothing on a schema before 0.9.0.
pub fn add_deferred(queue_url: &str, worker: &str, pipeline: &str, messages: i64, lsn: u64, at_ms: i64) -> Result<()> {
    if !Schema::detect()?.counters_deferred {
        return Ok(());
    }
    let lsn = format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff);
    crate::plans::run(
        "INSERT INTO sqs_ingest.counters AS k
            (queue_url, worker, backend_pid, hour, pipeline, deletes_deferred, deferred_lsn, deferred_at)
         VALUES ($1::text, $2::text, pg_catalog.pg_backend_pid(), pg_catalog.date_trunc('hour', pg_catalog.now()),
                 $3::text, $4::int8, $5::text::pg_catalog.pg_lsn,
                 pg_catalog.to_timestamp($6::int8::pg_catalog.float8 OPERATOR(pg_catalog./) 1000))
         ON CONFLICT (queue_url, worker, backend_pid, hour, pipeline) DO UPDATE SET
            deletes_deferred = k.deletes_deferred OPERATOR(pg_catalog.+) EXCLUDED.deletes_deferred,
            -- While the row's newest deferral is unconfirmed, its oldest time stays and the newest LSN is kept (so
            -- the row shows unconfirmed until every deferral counted in it is confirmed); once confirmed, a new
            -- deferral starts afresh.
            deferred_lsn = CASE WHEN k.deferred_lsn IS NULL
                                  OR k.deferred_lsn OPERATOR(pg_catalog.<=) sqs_ingest.confirmed_lsn()
                                THEN EXCLUDED.deferred_lsn
                                ELSE pg_catalog.pg_lsn_larger(k.deferred_lsn, EXCLUDED.deferred_lsn) END,
            deferred_at = CASE WHEN k.deferred_lsn IS NULL
                                 OR k.deferred_lsn OPERATOR(pg_catalog.<=) sqs_ingest.confirmed_lsn()
                               THEN EXCLUDED.deferred_at
                               ELSE pg_catalog.timestamptz_smaller(k.deferred_at, EXCLUDED.deferred_at) END",
        &[queue_url.into(), worker.into(), pipeline.into(), messages.into(), lsn.into(), at_ms.into()],
        |_| (),
    )
    .map_err(|e| Error::Internal(format!("counter update failed: {e}")))
}

pub fn add_counters(
    queue_url: &str,
    worker: &str,
    pipeline: &str,
    c: Counters,
    depth: Option<i64>,
    error: Option<&str>,
) -> Result<()> {
    let schema = Schema::detect()?;
    let by_pipeline = schema.counters_pipeline;
    let (mut column, mut value, key) = if by_pipeline {
        (", pipeline".to_string(), ", $11::text".to_string(), ", pipeline")
    } else {
        Default::default()
    };
    let mut metrics = "";
    if schema.counters_batches {
        column.push_str(", batches, batch_seconds, oldest_sent_at");
        value.push_str(", $12, $13, pg_catalog.to_timestamp($14::pg_catalog.float8 OPERATOR(pg_catalog./) 1000)");
        metrics = ",
            batches = k.batches + EXCLUDED.batches,
            batch_seconds = k.batch_seconds + EXCLUDED.batch_seconds,
            oldest_sent_at = COALESCE(EXCLUDED.oldest_sent_at, k.oldest_sent_at)";
    }
    let sql = format!(
        "INSERT INTO sqs_ingest.counters AS k
            (queue_url, worker, backend_pid, hour, received, inserted, duplicates, dead_lettered, deleted,
             delete_failures, last_success_at, last_error, last_error_at, approximate_depth, depth_at{column})
         VALUES ($1::text, $2::text, pg_catalog.pg_backend_pid(), pg_catalog.date_trunc('hour', pg_catalog.now()),
                 $3, $4, $5, $6, $7, $8,
                 CASE WHEN $9::text IS NULL THEN pg_catalog.now() END,
                 $9, CASE WHEN $9::text IS NOT NULL THEN pg_catalog.now() END,
                 $10, CASE WHEN $10::int8 IS NOT NULL THEN pg_catalog.now() END{value})
         ON CONFLICT (queue_url, worker, backend_pid, hour{key}) DO UPDATE SET
            received = k.received + EXCLUDED.received,
            inserted = k.inserted + EXCLUDED.inserted,
            duplicates = k.duplicates + EXCLUDED.duplicates,
            dead_lettered = k.dead_lettered + EXCLUDED.dead_lettered,
            deleted = k.deleted + EXCLUDED.deleted,
            delete_failures = k.delete_failures + EXCLUDED.delete_failures,
            last_success_at = COALESCE(EXCLUDED.last_success_at, k.last_success_at),
            last_error = COALESCE(EXCLUDED.last_error, k.last_error),
            last_error_at = COALESCE(EXCLUDED.last_error_at, k.last_error_at),
            approximate_depth = COALESCE(EXCLUDED.approximate_depth, k.approximate_depth),
            depth_at = COALESCE(EXCLUDED.depth_at, k.depth_at){metrics}"
    );
    let mut args: Vec<pgrx::datum::DatumWithOid> = vec![
        queue_url.into(),
        worker.into(),
        c.received.into(),
        c.inserted.into(),
        c.duplicates.into(),
        c.dead_lettered.into(),
        c.deleted.into(),
        c.delete_failures.into(),
        error.map(str::to_string).into(),
        depth.into(),
    ];
    if by_pipeline {
        args.push(pipeline.into());
    }
    if schema.counters_batches {
        // A schema with the metrics columns has the pipeline column too (0.6.0 < 0.7.0).
        args.push(c.batches.into());
        args.push(c.batch_seconds.into());
        args.push(c.oldest_sent_ms.map(|ms| ms as f64).into());
    }
    crate::plans::run(&sql, &args, |_| ()).map_err(|e| Error::Internal(format!("counter update failed: {e}")))?;
    if c.filtered > 0 {
        // Only pipelines filter, and they exist only once the schema is 0.6.0 (which has the column).
        crate::plans::run(
            "UPDATE sqs_ingest.counters SET filtered = filtered + $3
              WHERE queue_url = $1::text AND worker = $2::text AND backend_pid = pg_catalog.pg_backend_pid()
                AND hour = pg_catalog.date_trunc('hour', pg_catalog.now()) AND pipeline = $4::text",
            &[queue_url.into(), worker.into(), c.filtered.into(), pipeline.into()],
            |_| (),
        )
        .map_err(|e| Error::Internal(format!("counter update failed: {e}")))?;
    }
    Ok(())
}

/// Deletes ledger entries older than the queue's retention (plus a day): SQS can no longer redeliver them.
pub fn prune_ledger(queue: &LedgerQueue, retention_s: i64) -> Result<i64> {
    let (column, _, queue_arg) = queue.column_and_arg();
    Spi::get_one_with_args::<i64>(
        &format!(
            "WITH gone AS (
                DELETE FROM sqs_ingest.ledger
                 WHERE {column} = $1 AND ingested_at < pg_catalog.now() - pg_catalog.make_interval(secs => $2)
                RETURNING 1)
             SELECT pg_catalog.count(*) FROM gone"
        ),
        &[queue_arg, ((retention_s + 86_400) as f64).into()],
    )
    .map(|n| n.unwrap_or(0))
    .map_err(|e| Error::Internal(format!("ledger prune failed: {e}")))
}
