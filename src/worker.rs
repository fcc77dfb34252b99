//! Background workers: configured by `sqs_ingest.worker_*` GUCs, started by the postmaster when the library
//! is preloaded, or started on demand with `sqs_ingest.worker_start()`. Each worker connects to one database
//! with SPI (never a client connection) and ingests in one transaction per batch, with the same semantics as
//! `sqs_ingest()`: ledger, dead letters, and deletes after each COMMIT. SIGHUP reloads the settings (waking a
//! long poll); SIGTERM stops after the current batch commits; a crashed worker is restarted after
//! `sqs_ingest.worker_restart_delay`.
//!
//! Who a worker is: static workers connect as `sqs_ingest.worker_role` (unset: they do not ingest); dynamic
//! workers as the role that called `worker_start()`, so a worker has exactly its starter's privileges. Like every
//! caller, a worker connected as a superuser writes a table a non-superuser owns as that owner
//! ([`crate::privilege::writer_for`]), and its own statements run with a pinned search_path.

use crate::error::{Error, Result};
use crate::privilege::{as_owner, extension_owner, pinned};
use crate::runtime::{install_worker_signal_handlers, reload_if_requested, sleep, stop_requested};
use crate::{gucs, hold, ingest};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder};
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The bgw_type every sqs_ingest worker reports in pg_stat_activity.backend_type.
pub const WORKER_TYPE: &str = "sqs_ingest worker";

static LOADED_AT_PRELOAD: AtomicBool = AtomicBool::new(false);

/// Whether the library was loaded through shared_preload_libraries (required for workers).
pub fn preloaded() -> bool {
    LOADED_AT_PRELOAD.load(Ordering::Relaxed)
}

/// Registers the GUC-configured workers; only possible while the postmaster loads preloaded libraries.
pub fn register_static_workers() {
    // SAFETY: a plain read of a postmaster flag during _PG_init.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    LOADED_AT_PRELOAD.store(true, Ordering::Relaxed);
    // The postmaster runs in the data directory: dynamic workers recorded there come back after a restart.
    if durable::any() {
        BackgroundWorkerBuilder::new("sqs_ingest launcher")
            .set_type("sqs_ingest launcher")
            .set_library("sqs_ingest")
            .set_function("sqs_ingest_launcher_main")
            .enable_spi_access()
            .set_start_time(pgrx::bgworkers::BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(None)
            .load();
    }
    for index in 0..gucs::worker_count() {
        BackgroundWorkerBuilder::new(&format!("sqs_ingest worker {index}"))
            .set_type(WORKER_TYPE)
            .set_library("sqs_ingest")
            .set_function("sqs_ingest_worker_main")
            .set_argument(index.into_datum())
            .enable_spi_access()
            .set_start_time(pgrx::bgworkers::BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(Some(Duration::from_secs(gucs::worker_restart_s() as u64)))
            .load();
    }
}

/// Runs `f` in its own transaction. Commits on Ok (the commit hook then deletes the batch's messages);
/// aborts on Err (held messages are released). A COMMIT that fails (a deferred trigger or constraint, a
/// serialization failure at commit) aborts and returns the error: a worker records it and carries on.
fn in_transaction<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    // SAFETY: the standard bgworker transaction bracket, on the main thread, outside any transaction.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = f().and_then(|value| {
        ingest::catching(|| {
            // SAFETY: closes the bracket opened above.
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Ok(())
        })
        .map(|()| value)
    });
    if result.is_err() {
        // SAFETY: aborts the transaction opened above (or the failed commit), resetting memory and resources.
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    result
}

/// Whether the extension is installed in the worker's database (Err: the lookup itself failed; try again).
fn extension_ready() -> Result<bool> {
    in_transaction(|| {
        pinned(|| {
            Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'sqs_ingest')")
        })
        .map(|found| found.unwrap_or(false))
        .map_err(|e| Error::Internal(e.to_string()))
    })
}

/// Where a worker's queues and options come from.
enum Source {
    Static,
    Dynamic(i32),
}

struct Plan {
    queues: Vec<String>,
    batch: i64,
    method: Option<String>,
}

/// What to ingest now; `Ok(None)`: nothing (a static worker disabled, a dynamic worker stopped or gone); `Err`:
/// the lookup failed (try again later).
fn plan(source: &Source) -> Result<Option<Plan>> {
    match source {
        Source::Static => {
            if !gucs::worker_enabled() {
                return Ok(None);
            }
            let queues = gucs::worker_queue_urls();
            Ok((!queues.is_empty()).then(|| Plan { queues, batch: gucs::worker_batch_messages(), method: None }))
        }
        Source::Dynamic(id) => in_transaction(|| {
            // SAFETY: a plain read of the role this worker connected as.
            let me = unsafe { pg_sys::GetUserId() };
            as_owner(extension_owner(), || {
                // A worker has its starter's privileges, so it stops (for good) when its role may no longer
                // operate sqs_ingest: a revoked membership is not brought back to life by a restart.
                let allowed = Spi::get_one_with_args::<bool>(
                    "SELECT pg_has_role($1, 'sqs_ingest_operator', 'USAGE')",
                    &[me.into()],
                )?
                .unwrap_or(false);
                if !allowed {
                    Spi::run_with_args(
                        "UPDATE sqs_ingest.workers SET stopped_at = now() WHERE worker_id = $1 AND stopped_at IS NULL",
                        &[(*id).into()],
                    )?;
                    log!("sqs_ingest dynamic worker {id}: its role is no longer a member of sqs_ingest_operator; stopped");
                    return Ok(None);
                }
                let row = Spi::get_three_with_args::<String, i32, String>(
                    "SELECT queue_url, batch_messages, method FROM sqs_ingest.workers
                      WHERE worker_id = $1 AND stopped_at IS NULL AND run_as::oid = $2",
                    &[(*id).into(), me.into()],
                )?;
                Ok(match row {
                    (Some(url), batch, method) => Some(Plan {
                        queues: vec![url],
                        batch: batch.map_or_else(gucs::worker_batch_messages, i64::from),
                        method,
                    }),
                    _ => None,
                })
            })
            .map_err(|e: pgrx::spi::SpiError| Error::Internal(e.to_string()))
        }),
    }
}

/// A dynamic worker that exits for good removes its restart record.
fn forget_self(dynamic: Option<i32>) {
    if let Some(id) = dynamic {
        // SAFETY: a plain read of a backend global.
        durable::forget(unsafe { pg_sys::MyDatabaseId }.to_u32(), id);
    }
}

/// Records a failed batch in the counters: of its queue, or of the pipeline it names (under that pipeline's queue;
/// under its name if the pipeline is gone).
fn record_error(url: &str, label: &str, e: &Error) {
    let text = e.scrubbed();
    log!("sqs_ingest {label}: ingest from {url} failed: {text}");
    let _ = in_transaction(|| {
        let (queue_url, pipeline) = if crate::pipeline::is_name(url) {
            let queue_url = crate::pipeline::load(url).map(|p| p.queue_url).unwrap_or_else(|_| url.to_string());
            (queue_url, url)
        } else {
            (url.to_string(), "")
        };
        as_owner(extension_owner(), || {
            let none = crate::bookkeeping::Counters::default();
            crate::bookkeeping::add_counters(&queue_url, label, pipeline, none, None, Some(&text))
        })
    });
}

/// Where a worker connects, and as whom.
enum Connection {
    /// Static workers: the database and role named in postgresql.conf.
    Named { database: String, role: String },
    /// Dynamic workers: the database and role of the `worker_start()` call.
    Oids { database: pg_sys::Oid, role: pg_sys::Oid },
}

fn run(source: Source, label: String, connection: Connection) {
    install_worker_signal_handlers();
    let database = match connection {
        Connection::Named { database, role } => {
            BackgroundWorker::connect_worker_to_spi(Some(&database), Some(&role));
            database
        }
        Connection::Oids { database, role } => {
            BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), Some(role));
            // A catalog lookup: only inside a transaction.
            in_transaction(|| {
                // SAFETY: the worker is connected and in a transaction; the name is copied at once.
                Ok(unsafe {
                    let name = pg_sys::get_database_name(database);
                    if name.is_null() {
                        database.to_u32().to_string()
                    } else {
                        std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
                    }
                })
            })
            .unwrap_or_default()
        }
    };
    let database = database.as_str();
    // SAFETY: sets this worker's own application_name (shown by pg_stat_activity and worker_status()).
    unsafe {
        let name = std::ffi::CString::new(label.clone()).unwrap_or_default();
        pg_sys::SetConfigOption(
            c"application_name".as_ptr(),
            name.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
    }
    log!("sqs_ingest {label} started in database {database}");
    if let Source::Dynamic(id) = source {
        // SAFETY: a plain read of a backend global.
        durable::note_connected(unsafe { pg_sys::MyDatabaseId }.to_u32(), id);
    }
    if let Source::Dynamic(id) = source {
        let _ = in_transaction(|| {
            as_owner(extension_owner(), || {
                Spi::run_with_args(
                    "UPDATE sqs_ingest.workers SET pid = pg_catalog.pg_backend_pid() WHERE worker_id = $1",
                    &[id.into()],
                )
            })
            .map_err(|e| Error::Internal(e.to_string()))
        });
    }
    let dynamic = match &source {
        Source::Dynamic(id) => Some(*id),
        Source::Static => None,
    };
    let mut warned_missing = false;
    let mut ready = false;
    // Queues whose last batch (or dry run) succeeded; see batch().
    let mut checked = std::collections::HashSet::new();
    let mut backoff = Duration::ZERO;
    while !stop_requested() {
        reload_if_requested();
        // Checked in a transaction of its own only until it holds, and again after a failed batch.
        if !ready {
            match extension_ready() {
                Ok(true) => ready = true,
                Ok(false) if dynamic.is_some() => {
                    // The extension (and with it the worker's row) was dropped: exit for good.
                    log!("sqs_ingest {label}: extension sqs_ingest is no longer installed in database {database}; exiting");
                    forget_self(dynamic);
                    break;
                }
                Ok(false) | Err(_) => {
                    if !warned_missing {
                        log!(
                            "sqs_ingest {label}: extension sqs_ingest is not installed in database {database}; waiting"
                        );
                        warned_missing = true;
                    }
                    if !sleep(Duration::from_secs(10)) {
                        break;
                    }
                    continue;
                }
            }
        }
        let plan = match plan(&source) {
            Ok(Some(plan)) => plan,
            Ok(None) if dynamic.is_some() => {
                // Stopped with worker_stop(), or its row is gone: exit 0 for good (the postmaster does not restart
                // it, and it is not started again after a server restart).
                forget_self(dynamic);
                break;
            }
            Ok(None) | Err(_) => {
                if !sleep(Duration::from_secs(5)) {
                    break;
                }
                continue;
            }
        };
        for url in &plan.queues {
            if stop_requested() {
                break;
            }
            match batch(url, &label, &plan, &mut checked) {
                Ok(_) => backoff = Duration::ZERO,
                Err(e) => {
                    ready = false;
                    record_error(url, &label, &e);
                    backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                }
            }
        }
        if !backoff.is_zero() && !sleep(backoff) {
            break;
        }
    }
    hold::finish_pending_at_exit();
    ingest::save_deferred();
    log!("sqs_ingest {label} stopped");
}

/// One batch: wait for messages outside any transaction (an idle worker holds no transaction id and no snapshot,
/// so it never holds VACUUM back), then store them and whatever else is ready, up to the batch size, in one
/// transaction; its COMMIT deletes them from SQS.
///
/// After a failure (and before the first batch) a dry run in a transaction of its own checks everything but the
/// messages first — the queue answers, the target resolves and may be written, the keys are there — so a worker
/// that cannot store does not keep receiving, and releasing, the head of the queue: each receive counts towards
/// `sqs_ingest.max_receive_count` (and an SQS redrive policy).
fn batch(url: &str, label: &str, plan: &Plan, checked: &mut std::collections::HashSet<String>) -> Result<i64> {
    // A pipeline is read from its table (in a transaction of its own, before the wait), a queue URL only parsed.
    let parse = || ingest::parse_args(url, Some(plan.batch), plan.method.as_deref());
    let (queue, max, method, shape) = if crate::pipeline::is_name(url) { in_transaction(parse)? } else { parse()? };
    let opts = ingest::Options {
        max_messages: max,
        method,
        shape,
        worker: label.to_string(),
        // Never long-poll inside the transaction: gather what is ready now, commit, and wait outside.
        confirm_wait_s: 0,
        return_after_wake: true,
        progress_notices: false,
        reuse_probe_for: Duration::from_secs(10),
    };
    if !checked.contains(url) {
        let dry = ingest::Options { max_messages: Some(0), ..opts.clone() };
        in_transaction(|| ingest::catching(|| ingest::ingest(&queue, &dry)))?;
        checked.insert(url.to_string());
    }
    let waited = ingest::wait_for_messages(&queue, plan.batch, gucs::worker_wait_s());
    if !matches!(&waited, Ok(w) if !w.is_empty()) {
        // Idle (or failing): the deletes the last batch left running have had the whole wait; they are waited
        // for now (their failures are written with the next batch's counters) rather than at the next commit.
        hold::finish_pending();
        ingest::save_deferred();
    }
    let waited = waited?;
    if waited.is_empty() {
        return Ok(0);
    }
    // A full batch means more is likely waiting: its deletes may run on while the next batch is received and
    // stored (never for a FIFO queue, whose next messages SQS holds back until these are deleted).
    let fifo = queue.is_fifo();
    let summary = in_transaction(|| {
        let summary = ingest::catching(|| ingest::ingest_waited(&queue, &opts, waited))?;
        if !fifo && max.is_some_and(|m| summary.received >= m) {
            hold::overlap_next_commit();
        }
        Ok(summary)
    });
    if summary.is_err() {
        checked.remove(url);
    }
    Ok(summary?.received)
}

/// Entry point of the GUC-configured workers; the argument is the worker's index.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn sqs_ingest_worker_main(arg: pg_sys::Datum) {
    // SAFETY: the postmaster passes the Int32 datum set with set_argument.
    let index = unsafe { i32::from_polymorphic_datum(arg, false, pg_sys::INT4OID) }.unwrap_or(0);
    let label = format!("worker {index}");
    let Some(role) = gucs::worker_role() else {
        // Never ingest as the bootstrap superuser by default: that would run code of whoever owns the target.
        // It connects to no database (shared catalogs only) and runs no statement: it is listed by worker_status()
        // and pg_stat_activity, and says why it idles.
        install_worker_signal_handlers();
        BackgroundWorker::connect_worker_to_spi(None, None);
        log!("sqs_ingest {label}: sqs_ingest.worker_role is not set, so the static workers do not ingest; set it in postgresql.conf and restart");
        while !stop_requested() && sleep(Duration::from_secs(3600)) {}
        return;
    };
    run(Source::Static, label, Connection::Named { database: gucs::worker_database(), role });
}

/// One row of `worker_status()`: pid, label, database, queue URLs, state, backend start.
pub type Status =
    (i32, String, Option<String>, Option<String>, Option<String>, Option<pgrx::datum::TimestampWithTimeZone>);

/// Every running sqs_ingest worker of the server (static and dynamic), from pg_stat_activity; a dynamic worker's
/// queue by its id and pid, never by a recorded pid alone (it may be stale).
pub fn status() -> Result<Vec<Status>> {
    let static_urls = gucs::worker_queue_urls().join(",");
    let rows = crate::privilege::pinned(|| {
        Spi::connect(|c| {
            let rows = c.select(
                "SELECT a.pid, a.application_name::text, a.datname::text, a.state::text, a.backend_start
               FROM pg_catalog.pg_stat_activity a WHERE a.backend_type = 'sqs_ingest worker' ORDER BY a.pid",
                None,
                &[],
            )?;
            Ok::<_, pgrx::spi::SpiError>(
                rows.map(|r| {
                    (
                        r.get::<i32>(1).ok().flatten().unwrap_or_default(),
                        r.get::<String>(2).ok().flatten().unwrap_or_default(),
                        r.get::<String>(3).ok().flatten(),
                        r.get::<String>(4).ok().flatten(),
                        r.get::<pgrx::datum::TimestampWithTimeZone>(5).ok().flatten(),
                    )
                })
                .collect::<Vec<_>>(),
            )
        })
    })
    .map_err(|e| Error::Internal(e.to_string()))?;
    let owner = extension_owner();
    let out: Vec<_> = rows
        .into_iter()
        .map(|(pid, label, db, state, start)| {
            let urls = if let Some(id) = label.strip_prefix("dynamic worker ") {
                // By the worker's id (its label), never by a recorded pid, which may be stale.
                let id: i32 = id.parse().unwrap_or(-1);
                as_owner(owner, || {
                    Spi::get_one_with_args::<String>(
                        "SELECT queue_url FROM sqs_ingest.workers WHERE worker_id = $1 AND pid = $2",
                        &[id.into(), pid.into()],
                    )
                })
                .ok()
                .flatten()
            } else {
                Some(static_urls.clone())
            };
            (pid, label, db, urls, state, start)
        })
        .collect();
    Ok(out)
}

/// Starts in a row that may fail to connect before a dynamic worker gives up.
const MAX_FAILED_STARTS: u32 = 5;

/// Entry point of workers started with `sqs_ingest.worker_start()`; the argument is the row in sqs_ingest.workers.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn sqs_ingest_dynamic_worker_main(arg: pg_sys::Datum) {
    // SAFETY: as above.
    let id = unsafe { i32::from_polymorphic_datum(arg, false, pg_sys::INT4OID) }.unwrap_or(0);
    let extra: Vec<u32> = BackgroundWorker::get_extra().split('|').filter_map(|f| f.parse().ok()).collect();
    let [database, role] = extra[..] else {
        log!("sqs_ingest dynamic worker {id}: started by an older library (no role recorded); start it again with sqs_ingest.worker_start()");
        return;
    };
    // A worker that cannot connect (its role lost LOGIN, the database refuses connections or is gone) would be
    // restarted every worker_restart_delay forever, and again after every server start: after a few starts in a
    // row that never got connected, it gives up for good (exit 0) and drops its restart record.
    if durable::note_start(database, id).is_some_and(|n| n > MAX_FAILED_STARTS) {
        log!("sqs_ingest dynamic worker {id}: {MAX_FAILED_STARTS} starts in a row could not connect to its database as its role; giving up (start it again with sqs_ingest.worker_start())");
        durable::forget(database, id);
        return;
    }
    run(
        Source::Dynamic(id),
        format!("dynamic worker {id}"),
        Connection::Oids { database: pg_sys::Oid::from(database), role: pg_sys::Oid::from(role) },
    );
}

/// Starts a worker for one queue in the current database, connected as the calling role (it has exactly that
/// role's privileges). Refused beyond `sqs_ingest.max_dynamic_workers` running in this database. The worker starts
/// when the calling transaction commits. Returns its worker id.
pub fn start_dynamic(queue_url: &str, batch_messages: Option<i32>, method: Option<&str>) -> Result<i32> {
    if !preloaded() {
        return Err(Error::NotPreloaded(
            "sqs_ingest background workers need the library preloaded (shared_preload_libraries does not include sqs_ingest)".into(),
        ));
    }
    ingest::parse_args(queue_url, batch_messages.map(i64::from), method)?;
    // SAFETY: plain reads of the current role and database on the main thread.
    let (role, database) = unsafe { (pg_sys::GetUserId(), pg_sys::MyDatabaseId) };
    // A worker's batch is one transaction holding that many messages: only a superuser goes beyond the size a
    // superuser set for the static workers.
    let most = gucs::worker_batch_messages();
    // SAFETY: a catalog lookup of the current role on the main thread, inside a transaction.
    if batch_messages.is_some_and(|b| i64::from(b) > most) && !unsafe { pg_sys::superuser() } {
        return Err(Error::Postgres {
            code: pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            message: format!(
                "batch_messages {} is more than sqs_ingest.worker_batch_messages ({most}), the most a non-superuser may ask for",
                batch_messages.unwrap_or_default()
            ),
            hint: Some("Pass a smaller batch_messages (or none), or have a superuser raise sqs_ingest.worker_batch_messages.".into()),
        });
    }
    if !pinned(|| crate::privilege::can_login(role)) {
        return Err(Error::NotAllowed(format!(
            "role \"{}\" cannot log in, so a worker cannot connect as it",
            crate::privilege::role_name(role)
        )));
    }
    // The cap below counts rows under a table lock; a snapshot older than the lock (REPEATABLE READ, SERIALIZABLE)
    // would not see the rows of transactions that committed while this one waited, and so let them all in.
    // SAFETY: a plain read of the transaction's isolation level on the main thread.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return Err(Error::Postgres {
            code: pgrx::PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
            message: "sqs_ingest.worker_start() must run in a READ COMMITTED transaction".into(),
            hint: Some("It counts the workers that concurrent transactions start; run it outside REPEATABLE READ and SERIALIZABLE transactions.".into()),
        });
    }
    let cap = gucs::max_dynamic_workers();
    let id = as_owner(extension_owner(), || -> Result<i32> {
        // Serialises concurrent starts, so two of them cannot both see room for one more.
        Spi::run("LOCK TABLE sqs_ingest.workers IN SHARE ROW EXCLUSIVE MODE")
            .map_err(|e| Error::Internal(e.to_string()))?;
        // Every worker started and not stopped that runs or will come back at the next server start (it has a
        // restart record: one ended by pg_terminate_backend, or not launched for want of a slot) counts. Rows
        // whose worker gave up for good (its role or database refused its connections) do not.
        let rows: Vec<(i32, bool)> = Spi::connect(|c| {
            let rows = c.select(
                "SELECT w.worker_id, w.pid IS NOT NULL AND w.pid IN (
                        SELECT a.pid FROM pg_stat_activity a
                         WHERE a.backend_type = 'sqs_ingest worker'
                           AND a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()))
                   FROM sqs_ingest.workers w WHERE w.stopped_at IS NULL",
                None,
                &[],
            )?;
            Ok::<_, pgrx::spi::SpiError>(
                rows.map(|r| {
                    (
                        r.get::<i32>(1).ok().flatten().unwrap_or_default(),
                        r.get::<bool>(2).ok().flatten().unwrap_or(false),
                    )
                })
                .collect(),
            )
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        // Workers this transaction started count too: they start at its COMMIT, all at once.
        let starting = PENDING_STARTS.with(|p| p.borrow().iter().filter(|(_, (_, db, _))| *db == database).count());
        let running = (rows.iter().filter(|(id, live)| *live || durable::exists(database.to_u32(), *id)).count()
            + starting) as i64;
        if running >= cap {
            return Err(Error::Limit(format!(
                "this database already has {running} dynamic sqs_ingest worker(s) started and not stopped, the most sqs_ingest.max_dynamic_workers ({cap}) allows"
            )));
        }
        Spi::get_one_with_args::<i32>(
            "INSERT INTO sqs_ingest.workers (queue_url, batch_messages, method, run_as) VALUES ($1, $2, $3, $4::oid::regrole) RETURNING worker_id",
            &[queue_url.into(), batch_messages.into(), method.map(str::to_string).into(), role.into()],
        )
        .map_err(|e| Error::Internal(e.to_string()))?
        .ok_or_else(|| Error::Internal("worker row not created".into()))
    })?;
    // The worker reads its row, so it must be committed first: the worker is started at commit.
    crate::xact::ensure_registered();
    PENDING_STARTS.with(|p| p.borrow_mut().push((current_subxact(), (id, database, role))));
    Ok(id)
}

/// Marks this database's dynamic workers (of one queue, or all) stopped; each is signalled when the calling
/// transaction commits (a rolled-back stop stops nothing) and exits after its current batch. Returns how many.
pub fn stop_dynamic(queue_url: Option<&str>) -> Result<i64> {
    let stopped: Vec<(i32, Option<i32>)> = as_owner(extension_owner(), || {
        Spi::connect_mut(|c| {
            // Any spelling of the queue's URL names its workers. A recorded pid is signalled only if it is, now,
            // that very worker (its label in this database); a pid from before a restart may be anyone's.
            let rows = c.update(
                "WITH stopped AS (
                    UPDATE sqs_ingest.workers SET stopped_at = now()
                     WHERE stopped_at IS NULL
                       AND ($1::text IS NULL OR queue_url = $1
                            OR sqs_ingest.queue_arn(queue_url) = sqs_ingest.queue_arn($1))
                    RETURNING worker_id, pid)
                 SELECT s.worker_id, a.pid
                   FROM stopped s
                   LEFT JOIN pg_stat_activity a
                     ON a.pid = s.pid AND a.backend_type = 'sqs_ingest worker' AND a.datid = (
                            SELECT oid FROM pg_database WHERE datname = current_database())
                    AND a.application_name = 'dynamic worker ' || s.worker_id",
                None,
                &[queue_url.map(str::to_string).into()],
            )?;
            Ok::<_, pgrx::spi::SpiError>(
                rows.map(|r| (r.get::<i32>(1).ok().flatten().unwrap_or_default(), r.get::<i32>(2).ok().flatten()))
                    .collect(),
            )
        })
    })
    .map_err(|e| Error::Internal(e.to_string()))?;
    crate::xact::ensure_registered();
    let subxact = current_subxact();
    PENDING_STOPS.with(|p| p.borrow_mut().extend(stopped.iter().map(|(id, pid)| (subxact, (*id, *pid)))));
    Ok(stopped.len() as i64)
}

type Start = (i32, pg_sys::Oid, pg_sys::Oid);
/// A stopped worker's id, and its pid if it was running as that worker when stopped.
type Stop = (i32, Option<i32>);

thread_local! {
    /// Starts and stops of the current transaction, each with the subtransaction that made it: a rolled-back
    /// savepoint takes its own away.
    static PENDING_STARTS: std::cell::RefCell<Vec<(pg_sys::SubTransactionId, Start)>> = const { std::cell::RefCell::new(Vec::new()) };
    static PENDING_STOPS: std::cell::RefCell<Vec<(pg_sys::SubTransactionId, Stop)>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn current_subxact() -> pg_sys::SubTransactionId {
    // SAFETY: reading the current subtransaction id inside a transaction on the main thread.
    unsafe { pg_sys::GetCurrentSubTransactionId() }
}

/// Subtransaction hooks: a rolled-back savepoint forgets its starts and stops; a released one hands them up.
pub fn after_subxact_abort(my: pg_sys::SubTransactionId) {
    PENDING_STARTS.with(|p| p.borrow_mut().retain(|(s, _)| *s < my));
    PENDING_STOPS.with(|p| p.borrow_mut().retain(|(s, _)| *s < my));
}

pub fn after_subxact_commit(my: pg_sys::SubTransactionId, parent: pg_sys::SubTransactionId) {
    PENDING_STARTS.with(|p| p.borrow_mut().iter_mut().filter(|(s, _)| *s >= my).for_each(|(s, _)| *s = parent));
    PENDING_STOPS.with(|p| p.borrow_mut().iter_mut().filter(|(s, _)| *s >= my).for_each(|(s, _)| *s = parent));
}

/// Whether `pid` is, right now, an sqs_ingest ingest worker connected to this backend's database.
fn is_our_worker(pid: i32) -> bool {
    // SAFETY: shared-memory lookups of another process by pid; the returned type name is only compared.
    unsafe {
        let kind = pg_sys::GetBackgroundWorkerTypeByPid(pid);
        if kind.is_null() || std::ffi::CStr::from_ptr(kind).to_bytes() != WORKER_TYPE.as_bytes() {
            return false;
        }
        let proc_ = pg_sys::BackendPidGetProc(pid);
        !proc_.is_null() && (*proc_).databaseId == pg_sys::MyDatabaseId
    }
}

/// Called by the commit hook: launches the workers started, and signals those stopped, in the committed transaction.
pub fn after_commit() {
    // SAFETY: a plain read of a backend global.
    let database = unsafe { pg_sys::MyDatabaseId };
    for (_, (id, pid)) in PENDING_STOPS.with(|p| std::mem::take(&mut *p.borrow_mut())) {
        durable::forget(database.to_u32(), id);
        // SIGTERM: the worker commits its current batch, sees its row stopped, and exits for good. Only ever a
        // process that is one of our workers in this database now (checked again: it may have exited since).
        if let Some(pid) = pid.filter(|pid| is_our_worker(*pid)) {
            // SAFETY: sends SIGTERM to a process verified above to be one of this extension's workers.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let starts = PENDING_STARTS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for (_, (id, database, role)) in starts {
        // Recorded first, so the worker comes back after a server restart even if no slot is free right now.
        if let Err(e) = durable::remember(database.to_u32(), id, role.to_u32()) {
            warning!("sqs_ingest: dynamic worker {id} will not come back after a server restart: cannot record it under the data directory: {e}");
        }
        if !launch_dynamic(id, database, role) {
            warning!("sqs_ingest: could not start dynamic worker {id}: no free background worker slot (raise max_worker_processes); it starts at the next server start");
        }
    }
}

/// Registers one dynamic worker with the postmaster; false when no background worker slot is free.
fn launch_dynamic(id: i32, database: pg_sys::Oid, role: pg_sys::Oid) -> bool {
    BackgroundWorkerBuilder::new(&format!("sqs_ingest dynamic worker {id}"))
        .set_type(WORKER_TYPE)
        .set_library("sqs_ingest")
        .set_function("sqs_ingest_dynamic_worker_main")
        .set_argument(id.into_datum())
        .set_extra(&format!("{}|{}", database.to_u32(), role.to_u32()))
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(gucs::worker_restart_s() as u64)))
        .load_dynamic()
        .is_ok()
}

/// Dynamic workers survive server restarts: each one started and not stopped has a file under the data directory
/// (`sqs_ingest_workers/<database oid>.<worker id>`, holding `<database oid>|<role oid>`), and at server start a
/// short-lived launcher starts them again. A worker removes its file when it exits for good (its row stopped or
/// gone, the extension dropped); `worker_stop()` removes it at COMMIT.
mod durable {
    use std::path::{Path, PathBuf};

    /// Under the data directory (every server process's working directory): protected like the data itself.
    pub const DIR: &str = "sqs_ingest_workers";

    fn file(database: u32, id: i32) -> PathBuf {
        Path::new(DIR).join(format!("{database}.{id}"))
    }

    pub fn remember(database: u32, id: i32, role: u32) -> std::io::Result<()> {
        write(database, id, role, 0)
    }

    /// The record holds `<database>|<role>|<starts that did not get connected>`.
    fn write(database: u32, id: i32, role: u32, failed_starts: u32) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(DIR)?;
        let tmp = Path::new(DIR).join(format!("{database}.{id}.tmp"));
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        write!(f, "{database}|{role}|{failed_starts}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, file(database, id))
    }

    fn read(database: u32, id: i32) -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(file(database, id)).ok()?;
        let mut fields = text.trim().split('|');
        let (db, role) = (fields.next()?.parse::<u32>().ok()?, fields.next()?.parse::<u32>().ok()?);
        let failed_starts = fields.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        (db == database).then_some((role, failed_starts))
    }

    /// A start that has not connected yet; returns how many in a row (None: not recorded).
    pub fn note_start(database: u32, id: i32) -> Option<u32> {
        let (role, failed) = read(database, id)?;
        write(database, id, role, failed + 1).ok()?;
        Some(failed + 1)
    }

    /// The worker connected: its start failures are forgotten.
    pub fn note_connected(database: u32, id: i32) {
        if let Some((role, failed)) = read(database, id) {
            if failed > 0 {
                let _ = write(database, id, role, 0);
            }
        }
    }

    pub fn exists(database: u32, id: i32) -> bool {
        file(database, id).exists()
    }

    pub fn forget(database: u32, id: i32) {
        let _ = std::fs::remove_file(file(database, id));
    }

    /// Every recorded worker: (worker id, database oid, role oid).
    pub fn recorded() -> Vec<(i32, u32, u32)> {
        let Ok(entries) = std::fs::read_dir(DIR) else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (database, id) = name.split_once('.')?;
                let (database, id): (u32, i32) = (database.parse().ok()?, id.parse().ok()?);
                let (role, _) = read(database, id)?;
                Some((id, database, role))
            })
            .collect()
    }

    /// Whether any worker is recorded (read by the postmaster while it loads the library).
    pub fn any() -> bool {
        std::fs::read_dir(DIR).is_ok_and(|mut d| d.next().is_some())
    }
}

/// Entry point of the launcher the postmaster starts once at server start when dynamic workers are recorded: it
/// starts each again (unless its database or role is gone) and exits.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn sqs_ingest_launcher_main(_arg: pg_sys::Datum) {
    install_worker_signal_handlers();
    // Shared catalogs only (pg_database, pg_authid): it runs no statement.
    BackgroundWorker::connect_worker_to_spi(None, None);
    let mut started = 0;
    for (id, database, role) in durable::recorded() {
        let exists = in_transaction(|| {
            // SAFETY: syscache lookups of shared catalogs inside a transaction; the returned names are only
            // tested for NULL.
            Ok(unsafe {
                !pg_sys::get_database_name(pg_sys::Oid::from(database)).is_null()
                    && !pg_sys::GetUserNameFromId(pg_sys::Oid::from(role), true).is_null()
            })
        })
        .unwrap_or(false);
        if !exists {
            log!(
                "sqs_ingest launcher: dynamic worker {id} is not started again: its database or role no longer exists"
            );
            durable::forget(database, id);
        } else if launch_dynamic(id, pg_sys::Oid::from(database), pg_sys::Oid::from(role)) {
            started += 1;
        } else {
            log!("sqs_ingest launcher: could not start dynamic worker {id}: no free background worker slot (raise max_worker_processes)");
        }
    }
    log!("sqs_ingest launcher: started {started} dynamic worker(s) again");
}

/// Refuses PREPARE TRANSACTION while the transaction started or stopped workers: the prepared transaction may be
/// committed or rolled back later by another session, which would not act on them.
pub fn before_prepare() {
    let pending = PENDING_STARTS.with(|p| !p.borrow().is_empty()) || PENDING_STOPS.with(|p| !p.borrow().is_empty());
    if pending {
        pgrx::pg_sys::panic::ErrorReport::new(
            pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "a transaction that started or stopped sqs_ingest workers cannot be prepared for two-phase commit",
            "sqs_ingest",
        )
        .set_hint("Call worker_start() and worker_stop() in an ordinary transaction.")
        .report(pgrx::PgLogLevel::ERROR);
    }
}

/// This module's transaction hooks.
pub fn xact_hooks() -> crate::xact::Hooks {
    crate::xact::Hooks {
        pre_prepare: Some(before_prepare),
        commit: Some(after_commit),
        abort: Some(after_abort),
        subxact_abort: Some(after_subxact_abort),
        subxact_commit: Some(after_subxact_commit),
        ..Default::default()
    }
}

/// Forgets the starts and stops of an aborted transaction.
pub fn after_abort() {
    PENDING_STARTS.with(|p| p.borrow_mut().clear());
    PENDING_STOPS.with(|p| p.borrow_mut().clear());
}
