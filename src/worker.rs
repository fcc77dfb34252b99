//! Background workers: configured by `sqs_ingest.worker_*` GUCs, started by the postmaster when the library
//! is preloaded, or started on demand with `sqs_ingest.worker_start()`. Each worker connects to one database
//! with SPI (never a client connection) and ingests in one transaction per batch, with the same semantics as
//! `sqs_ingest()`: ledger, dead letters, and deletes after each COMMIT. SIGHUP reloads the settings (waking a
//! long poll); SIGTERM stops after the current batch commits; a crashed worker is restarted after
//! `sqs_ingest.worker_restart_delay`.

use crate::error::{Error, Result};
use crate::{gucs, ingest};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The bgw_type every sqs_ingest worker reports in pg_stat_activity.backend_type.
pub const WORKER_TYPE: &str = "sqs_ingest worker";

static LOADED_AT_PRELOAD: AtomicBool = AtomicBool::new(false);
static IN_WORKER: AtomicBool = AtomicBool::new(false);

/// True in a worker that was asked to stop (SIGTERM) or to reload (SIGHUP): long polls return early.
pub fn shutdown_requested() -> bool {
    // SAFETY: sig_atomic_t flags written by signal handlers; read on the main thread.
    IN_WORKER.load(Ordering::Relaxed)
        && unsafe { pg_sys::ShutdownRequestPending != 0 || pg_sys::ConfigReloadPending != 0 }
}

fn stopping() -> bool {
    // SAFETY: as above.
    unsafe { pg_sys::ShutdownRequestPending != 0 }
}

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

fn attach() {
    IN_WORKER.store(true, Ordering::Relaxed);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
}

fn reload_if_asked() {
    if BackgroundWorker::sighup_received() {
        // SAFETY: re-reads postgresql.conf on the worker's main thread, outside any transaction.
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
    // SAFETY: resetting the flag our SIGHUP handler set, after processing it.
    unsafe { pg_sys::ConfigReloadPending = 0 };
}

/// Runs `f` in its own transaction. Commits on Ok (the commit hook then deletes the batch's messages);
/// aborts on Err (held messages are released).
fn in_transaction<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    // SAFETY: the standard bgworker transaction bracket, on the main thread, outside any transaction.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = f();
    // SAFETY: closes the bracket opened above.
    unsafe {
        match &result {
            Ok(_) => {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
    }
    result
}

fn extension_ready() -> bool {
    in_transaction(|| {
        Ok(Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'sqs_ingest')")
            .ok()
            .flatten()
            .unwrap_or(false))
    })
    .unwrap_or(false)
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

fn plan(source: &Source) -> Option<Plan> {
    match source {
        Source::Static => {
            if !gucs::worker_enabled() {
                return None;
            }
            let queues = gucs::worker_queue_urls();
            (!queues.is_empty()).then(|| Plan { queues, batch: gucs::worker_batch_messages(), method: None })
        }
        Source::Dynamic(id) => in_transaction(|| {
            let row = Spi::get_three_with_args::<String, i32, String>(
                "SELECT queue_url, batch_messages, method FROM sqs_ingest.workers WHERE worker_id = $1 AND stopped_at IS NULL",
                &[(*id).into()],
            )
            .map_err(|e| Error::Internal(e.to_string()))?;
            Ok(match row {
                (Some(url), batch, method) => Some(Plan {
                    queues: vec![url],
                    batch: batch.map_or_else(gucs::worker_batch_messages, i64::from),
                    method,
                }),
                _ => None,
            })
        })
        .ok()
        .flatten(),
    }
}

fn record_error(url: &str, label: &str, e: &Error) {
    let text = e.scrubbed();
    log!("sqs_ingest {label}: ingest from {url} failed: {text}");
    let _ = in_transaction(|| {
        let owner = crate::privilege::extension_owner();
        crate::privilege::as_owner(owner, || {
            crate::bookkeeping::add_counters(url, label, crate::bookkeeping::Counters::default(), None, Some(&text))
        })
    });
}

fn run(source: Source, label: String, database: &str) {
    attach();
    BackgroundWorker::connect_worker_to_spi(Some(database), None);
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
        let _ = in_transaction(|| {
            let owner = crate::privilege::extension_owner();
            crate::privilege::as_owner(owner, || {
                Spi::run_with_args(
                    "UPDATE sqs_ingest.workers SET pid = pg_catalog.pg_backend_pid() WHERE worker_id = $1",
                    &[id.into()],
                )
            })
            .map_err(|e| Error::Internal(e.to_string()))
        });
    }
    let mut warned_missing = false;
    let mut ready = false;
    let mut backoff = Duration::ZERO;
    while !stopping() {
        reload_if_asked();
        // Checked in a transaction of its own only until it holds, and again after a failed batch.
        ready = ready || extension_ready();
        if !ready {
            if !warned_missing {
                log!("sqs_ingest {label}: extension sqs_ingest is not installed in database {database}; waiting");
                warned_missing = true;
            }
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(10))) {
                break;
            }
            continue;
        }
        let Some(plan) = plan(&source) else {
            if matches!(source, Source::Dynamic(_)) {
                break; // stopped with worker_stop(): exit 0, so the postmaster does not restart it
            }
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(5))) {
                break;
            }
            continue;
        };
        for url in &plan.queues {
            if stopping() {
                break;
            }
            match batch(url, &label, &plan) {
                Ok(_) => backoff = Duration::ZERO,
                Err(e) => {
                    ready = false;
                    record_error(url, &label, &e);
                    backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                }
            }
        }
        if !backoff.is_zero() && !BackgroundWorker::wait_latch(Some(backoff)) {
            break;
        }
    }
    log!("sqs_ingest {label} stopped");
}

fn batch(url: &str, label: &str, plan: &Plan) -> Result<i64> {
    let (queue, max, method) = ingest::parse_args(url, Some(plan.batch), plan.method.as_deref())?;
    let opts = ingest::Options {
        max_messages: max,
        method,
        worker: label.to_string(),
        confirm_wait_s: gucs::worker_wait_s(),
        return_after_wake: true,
        progress_notices: false,
        reuse_probe_for: Duration::from_secs(10),
    };
    let summary = in_transaction(|| ingest::ingest(&queue, &opts))?;
    Ok(summary.received)
}

/// Entry point of the GUC-configured workers; the argument is the worker's index.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn sqs_ingest_worker_main(arg: pg_sys::Datum) {
    // SAFETY: the postmaster passes the Int32 datum set with set_argument.
    let index = unsafe { i32::from_polymorphic_datum(arg, false, pg_sys::INT4OID) }.unwrap_or(0);
    run(Source::Static, format!("worker {index}"), &gucs::worker_database());
}

/// Entry point of workers started with `sqs_ingest.worker_start()`; the argument is the row in sqs_ingest.workers.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn sqs_ingest_dynamic_worker_main(arg: pg_sys::Datum) {
    // SAFETY: as above.
    let id = unsafe { i32::from_polymorphic_datum(arg, false, pg_sys::INT4OID) }.unwrap_or(0);
    let db = BackgroundWorker::get_extra().to_string();
    run(Source::Dynamic(id), format!("dynamic worker {id}"), &db);
}

/// Starts a worker for one queue in the current database. Returns its worker id.
pub fn start_dynamic(queue_url: &str, batch_messages: Option<i32>, method: Option<&str>) -> Result<i32> {
    if !preloaded() {
        return Err(Error::NotPreloaded(
            "sqs_ingest background workers need the library preloaded (shared_preload_libraries does not include sqs_ingest)".into(),
        ));
    }
    ingest::parse_args(queue_url, batch_messages.map(i64::from), method)?;
    let db = Spi::get_one::<String>("SELECT pg_catalog.current_database()::text")
        .map_err(|e| Error::Internal(e.to_string()))?
        .unwrap_or_default();
    let owner = crate::privilege::extension_owner();
    let id = crate::privilege::as_owner(owner, || {
        Spi::get_one_with_args::<i32>(
            "INSERT INTO sqs_ingest.workers (queue_url, batch_messages, method) VALUES ($1, $2, $3) RETURNING worker_id",
            &[queue_url.into(), batch_messages.into(), method.map(str::to_string).into()],
        )
    })
    .map_err(|e| Error::Internal(e.to_string()))?
    .ok_or_else(|| Error::Internal("worker row not created".into()))?;
    // The worker reads its row, so it must be committed first: the worker is started at commit.
    crate::hold::ensure_callbacks();
    PENDING_STARTS.with(|p| p.borrow_mut().push((id, db)));
    Ok(id)
}

thread_local! {
    static PENDING_STARTS: std::cell::RefCell<Vec<(i32, String)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Called by the commit hook: launches the workers started in the committed transaction.
pub fn launch_pending() {
    let starts = PENDING_STARTS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for (id, db) in starts {
        let loaded = BackgroundWorkerBuilder::new(&format!("sqs_ingest dynamic worker {id}"))
            .set_type(WORKER_TYPE)
            .set_library("sqs_ingest")
            .set_function("sqs_ingest_dynamic_worker_main")
            .set_argument(id.into_datum())
            .set_extra(&db)
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(gucs::worker_restart_s() as u64)))
            .load_dynamic();
        if loaded.is_err() {
            warning!("sqs_ingest: could not start dynamic worker {id}: no free background worker slot (raise max_worker_processes)");
        }
    }
}

/// Forgets workers started in an aborted transaction.
pub fn forget_pending() {
    PENDING_STARTS.with(|p| p.borrow_mut().clear());
}
