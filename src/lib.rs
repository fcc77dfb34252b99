//! sqs_ingest: a PostgreSQL extension that ingests user-login events from AWS SQS into `user_logins`,
//! masking `ip` and `device_id` inside the database, transactionally with deleting the messages.
//!
//! Layout: `sqs_ingest_core` (pure Rust) decides; this crate is glue, in floors that import only downwards
//! (docs/architecture.md): surfaces (`api`, `mask`, `bench`, `worker`, this file) → domain (`ingest`, `rekey`,
//! `redrive`) → state (`rows`, `hold`, `audit`, `bookkeeping`, `target`, `keys`) → network (`sqs`) → ground
//! (`runtime`, `xact`, `subxact`, `privilege`, `plans`, `gucs`, `error`).
// SQL functions return `Result<_, ErrorReport>` (spelled out: pgrx's SQL generation reads the `Result`): pgrx
// raises the report unchanged (SQLSTATE, hint) only when it is not boxed, so its size is what it is.
#![allow(clippy::result_large_err)]

use pgrx::prelude::*;

mod api;
mod audit;
mod aws;
mod bench;
mod bookkeeping;
mod citus;
mod error;
mod gucs;
mod hold;
mod ingest;
mod keys;
mod kms;
mod mask;
mod pipeline;
mod plans;
mod privilege;
mod redrive;
mod rekey;
mod replication;
mod rows;
mod runtime;
mod sqs;
mod subxact;
mod target;
mod unmask;
mod worker;
mod xact;

pgrx::pg_module_magic!();

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    // Transaction hooks, in the order they run at each event.
    xact::register(hold::xact_hooks());
    xact::register(worker::xact_hooks());
    xact::register(audit::xact_hooks());
    xact::register(ingest::xact_hooks());
    xact::register(keys::xact_hooks());
    worker::register_static_workers();
}

use pgrx::pg_sys::panic::ErrorReport;

/// One ingest call of a SQL session (`sqs_ingest()`, a batch of `sqs_ingest_drain`): its error, whatever raised
/// it, is remembered for `stats.last_error` before it is raised.
fn session_ingest(
    queue_url: &str,
    max_messages: Option<i64>,
    method: Option<&str>,
) -> std::result::Result<(sqs_ingest_core::queue_url::QueueUrl, ingest::Summary), ErrorReport> {
    let (queue, max_messages, method, shape) = ingest::parse_args(queue_url, max_messages, method)?;
    let opts = ingest::Options {
        max_messages,
        method,
        shape,
        worker: String::new(),
        confirm_wait_s: gucs::wait_time_s(),
        return_after_wake: false,
        progress_notices: true,
        reuse_probe_for: std::time::Duration::ZERO,
    };
    match ingest::catching(|| ingest::ingest(&queue, &opts)) {
        Ok(summary) => Ok((queue, summary)),
        Err(e) => {
            ingest::remember_error(&queue.url, "", opts.shape.pipeline_name(), &e);
            Err(e.into())
        }
    }
}

/// Drains a queue into the target table in the current transaction; messages are deleted after COMMIT.
#[allow(clippy::type_complexity)]
#[pg_extern(name = "sqs_ingest", volatile, parallel_unsafe)]
fn sqs_ingest_fn(
    queue_url: &str,
    max_messages: default!(Option<i64>, "NULL"),
    method: default!(Option<&str>, "NULL"),
) -> std::result::Result<
    TableIterator<
        'static,
        (
            name!(received, i64),
            name!(inserted, i64),
            name!(duplicates, i64),
            name!(dead_lettered, i64),
            name!(deleted, i64),
            name!(elapsed_ms, f64),
        ),
    >,
    ErrorReport,
> {
    let (queue, s) = session_ingest(queue_url, max_messages, method)?;
    if let Some(remaining) = s.fifo_remaining.filter(|n| *n > 0) {
        pgrx::pg_sys::panic::ErrorReport::new(
            pgrx::PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            format!("about {remaining} message(s) remain in FIFO queue {}", queue.name),
            "sqs_ingest",
        )
        .set_detail("Within one transaction SQS delivers no later message of a message group until the messages received from it are deleted, which happens when this transaction commits.")
        .set_hint("Call sqs_ingest() again after COMMIT, or drain FIFO queues with CALL sqs_ingest_drain(...) or a background worker, which commit batch by batch.")
        .report(pgrx::PgLogLevel::NOTICE);
    }
    Ok(TableIterator::once((s.received, s.inserted, s.duplicates, s.dead_lettered, s.deleted, s.elapsed_ms)))
}

/// One batch of `sqs_ingest_drain`: as `sqs_ingest()`, plus whether the queue may hold more for the next batch
/// (`more`; a FIFO queue goes on while batches receive messages), and without the FIFO NOTICE.
#[allow(clippy::type_complexity)]
#[pg_extern(name = "drain_batch", schema = "sqs_ingest", volatile, parallel_unsafe)]
fn drain_batch(
    queue_url: &str,
    max_messages: i64,
    method: Option<&str>,
) -> std::result::Result<
    TableIterator<
        'static,
        (
            name!(received, i64),
            name!(inserted, i64),
            name!(duplicates, i64),
            name!(dead_lettered, i64),
            name!(more, bool),
        ),
    >,
    ErrorReport,
> {
    let (queue, s) = session_ingest(queue_url, Some(max_messages), method)?;
    // Another batch follows: inside sqs_ingest_drain (0.8.0) this batch's deletes may run on while the next one
    // is received and stored — never for a FIFO queue, whose next messages SQS holds back until these are deleted.
    if s.more && !queue.is_fifo() && hold::draining() {
        hold::overlap_next_commit();
    }
    Ok(TableIterator::once((s.received, s.inserted, s.duplicates, s.dead_lettered, s.more)))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("pg_tests.rs");
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
