//! The SQL surface in schema `sqs_ingest`: masking, keys, dead letters, queue tools and worker control.
//! Privileges are set in `sql/finalize.sql`: nothing here but `app_version_text` is executable by PUBLIC.

use pgrx::prelude::*;

#[pg_schema]
pub mod sqs_ingest {
    use crate::ingest;
    use crate::privilege::{as_owner, extension_owner};
    use crate::{gucs, hold, keys, runtime, sqs};
    use pgrx::pg_sys::panic::ErrorReport;
    use pgrx::prelude::*;
    use sqs_ingest_core::version;

    /// Reverses an `enc:` token. Every call is audited in `sqs_ingest.unmask_audit` and the server log.
    #[pg_extern(volatile, parallel_unsafe, strict)]
    fn unmask(token: &str) -> std::result::Result<String, ErrorReport> {
        Ok(crate::unmask::unmask(token)?)
    }

    /// Makes a freshly generated key the active one; older keys still unmask. Returns the new key id.
    #[pg_extern(volatile, parallel_unsafe)]
    fn rotate_key() -> std::result::Result<i32, ErrorReport> {
        Ok(keys::rotate()?)
    }

    /// Wraps every masking key stored in the clear with the AWS KMS key `sqs_ingest.kms_key_id` names, and
    /// removes the clear bytes. Returns how many keys it wrapped; tokens are unchanged.
    #[pg_extern(volatile, parallel_unsafe)]
    fn kms_wrap_keys() -> std::result::Result<i64, ErrorReport> {
        Ok(keys::wrap_all()?)
    }

    /// Rewrites the reversible tokens of `target` that use an older key to the active key. Returns the count.
    #[pg_extern(volatile, parallel_unsafe, name = "rekey_table")]
    fn rekey_table(target_oid: pg_sys::Oid) -> std::result::Result<i64, ErrorReport> {
        Ok(crate::rekey::rekey(target_oid)?)
    }

    /// Rekeys every table that holds tokens: the login pipeline's target and every pipeline's (see
    /// `crate::rekey::rekey_all`). Returns each table with its rewritten token count.
    #[pg_extern(volatile, parallel_unsafe)]
    fn rekey_all(
    ) -> std::result::Result<TableIterator<'static, (name!(target, String), name!(tokens, i64))>, ErrorReport> {
        Ok(TableIterator::new(crate::rekey::rekey_all()?))
    }

    /// Prints a packed app_version (M*10000 + m*100 + p) as "M.m.p".
    #[pg_extern(immutable, parallel_safe, strict)]
    fn app_version_text(code: i32) -> Option<String> {
        version::unpack(code)
    }

    /// The queue's ARN, `arn:aws:sqs:<region>:<account>:<name>`: its identity whatever the spelling of its URL
    /// (host name or address, LocalStack's path and domain forms, AWS's current and legacy hosts). The region is
    /// the one the URL names, else `sqs_ingest.region` (requests are signed for it). The ledger, `stats` and
    /// `worker_stop()` key a queue by it. NULL for text that is not a queue URL (no error: views call it).
    #[pg_extern(stable, strict, parallel_safe)]
    fn queue_arn(queue_url: &str) -> Option<String> {
        sqs_ingest_core::queue_url::QueueUrl::parse(queue_url).ok().map(|q| q.arn(&gucs::region()))
    }

    /// Re-processes one dead letter (after its cause was fixed). Returns true if it is now stored.
    #[pg_extern(volatile, parallel_unsafe)]
    fn redrive(message_id: &str, queue_url: default!(Option<&str>, "NULL")) -> std::result::Result<bool, ErrorReport> {
        Ok(crate::redrive::redrive(message_id, queue_url)?)
    }

    /// Declares (or, with `replace`, redeclares) a pipeline: messages of `queue_url` into `target`, each column
    /// of `columns` mapped from a source with optional mask, transform, required, default and json_type (README,
    /// "Pipelines"). Checked completely before it is stored: 22023, 42703, 42P01, 42501, 42710.
    #[allow(clippy::too_many_arguments)]
    #[pg_extern(volatile, parallel_unsafe)]
    fn pipeline_create(
        name: &str,
        queue_url: &str,
        target: &str,
        columns: pgrx::JsonB,
        envelope: default!(&str, "'none'"),
        filter: default!(Option<&str>, "NULL"),
        filter_fate: default!(&str, "'delete'"),
        replace: default!(bool, false),
    ) -> std::result::Result<(), ErrorReport> {
        Ok(crate::pipeline::declare(&crate::pipeline::Declaration {
            name,
            queue_url,
            target,
            columns: &columns.0,
            envelope,
            filter,
            filter_fate,
            replace,
        })?)
    }

    /// Drops a pipeline (its declaration only: the table, ledger and dead letters stay). False if there was none.
    #[pg_extern(volatile, parallel_unsafe, strict)]
    fn pipeline_drop(name: &str) -> std::result::Result<bool, ErrorReport> {
        Ok(crate::pipeline::drop(name)?)
    }

    /// Delete outcome after this backend's last commit that held messages: (deleted, failed).
    #[pg_extern(volatile, parallel_unsafe)]
    fn last_commit_deletes() -> TableIterator<'static, (name!(deleted, i64), name!(failed, i64))> {
        let o = hold::last_commit();
        TableIterator::once((o.succeeded as i64, o.failed as i64))
    }

    /// Used by `sqs_ingest_drain` before its first batch (`start` true: collect the delete outcomes of its commits
    /// from now on) and after its last (false: wait for the deletes still running, each within its commit's
    /// `sqs_ingest.post_commit_timeout`, and return the total: (deleted, failed)). Since 0.8.0.
    #[pg_extern(volatile, parallel_unsafe, strict)]
    fn drain_deletes(start: bool) -> TableIterator<'static, (name!(deleted, i64), name!(failed, i64))> {
        let o = hold::drain_deletes(start);
        TableIterator::once((o.succeeded as i64, o.failed as i64))
    }

    /// Sends message bodies to a queue (batches of 10). Returns how many SQS accepted.
    #[pg_extern(volatile, parallel_unsafe)]
    fn queue_send(queue_url: &str, bodies: Vec<Option<String>>) -> std::result::Result<i64, ErrorReport> {
        let queue = sqs::parse_queue_url(queue_url)?;
        let client = sqs::client(&queue)?;
        let bodies: Vec<String> = bodies.into_iter().flatten().collect();
        Ok(runtime::block_on(sqs::send(&client, &queue.url, &bodies, 8))?? as i64)
    }

    /// Creates a queue named by the last segment of `queue_url` at its endpoint. Returns the queue URL SQS reports.
    #[pg_extern(volatile, parallel_unsafe)]
    fn queue_create(
        queue_url: &str,
        visibility_timeout: default!(i32, 30),
    ) -> std::result::Result<String, ErrorReport> {
        let queue = sqs::parse_queue_url(queue_url)?;
        let client = sqs::client(&queue)?;
        Ok(runtime::block_on(sqs::create_queue(&client, &queue.name, visibility_timeout))??)
    }

    /// Approximate message counts of a queue: visible, in flight (received, not deleted), delayed.
    #[pg_extern(volatile, parallel_unsafe)]
    fn queue_depth(
        queue_url: &str,
    ) -> std::result::Result<
        TableIterator<'static, (name!(visible, i64), name!(in_flight, i64), name!(delayed, i64))>,
        ErrorReport,
    > {
        let queue = sqs::parse_queue_url(queue_url)?;
        let client = sqs::client(&queue)?;
        let (visible, in_flight, delayed) = runtime::block_on(sqs::queue_counts(&client, &queue.url))??;
        Ok(TableIterator::once((visible, in_flight, delayed)))
    }

    /// Starts a background worker for one queue in this database (needs shared_preload_libraries). Returns its id.
    #[pg_extern(volatile, parallel_unsafe)]
    fn worker_start(
        queue_url: &str,
        batch_messages: default!(Option<i32>, "NULL"),
        method: default!(Option<&str>, "NULL"),
    ) -> std::result::Result<i32, ErrorReport> {
        Ok(crate::worker::start_dynamic(queue_url, batch_messages, method)?)
    }

    /// Stops this database's dynamic workers (of one queue, or all); each finishes its current batch. Returns how many.
    #[pg_extern(volatile, parallel_unsafe)]
    fn worker_stop(queue_url: default!(Option<&str>, "NULL")) -> std::result::Result<i64, ErrorReport> {
        Ok(crate::worker::stop_dynamic(queue_url)?)
    }

    /// Every running sqs_ingest worker of the server: static (GUC) and dynamic ones.
    #[allow(clippy::type_complexity)]
    #[pg_extern(volatile, parallel_unsafe)]
    fn worker_status() -> std::result::Result<
        TableIterator<
            'static,
            (
                name!(pid, i32),
                name!(worker, String),
                name!(database, Option<String>),
                name!(queue_urls, Option<String>),
                name!(state, Option<String>),
                name!(backend_start, Option<pgrx::datum::TimestampWithTimeZone>),
            ),
        >,
        ErrorReport,
    > {
        Ok(TableIterator::new(crate::worker::status()?))
    }

    /// The WAL position up to which every commit is as durable as `sqs_ingest.delete_after` requires: flushed
    /// locally and by the standbys it names (see `crate::replication`). Messages of commits beyond it are not
    /// deleted yet. NULL on a standby. Since 0.9.0.
    #[pg_extern(volatile, parallel_safe)]
    fn confirmed_lsn() -> Option<crate::replication::Lsn> {
        crate::replication::confirmed_lsn().map(crate::replication::Lsn)
    }

    /// Records counters for a queue (used by sqs_ingest_drain to add post-commit delete outcomes).
    #[pg_extern(volatile, parallel_unsafe)]
    fn flush_stats() -> std::result::Result<(), ErrorReport> {
        let owner = extension_owner();
        Ok(as_owner(owner, || ingest::flush_unreported(""))?)
    }
}
