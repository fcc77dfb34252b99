//! The backend's network runtime and its worker signal regime: what the network code and the background workers
//! share (ground floor: nothing of ours imported but the error type).
//!
//! A tokio runtime is created lazily at a backend's first network call (never in the postmaster, never in
//! `_PG_init`). Only the backend's main thread touches Postgres: network futures run inside [`block_on`], which
//! polls them on the main thread and wakes every 100 ms to service Postgres interrupts (cancel,
//! `statement_timeout`, terminate), because an SDK call does not service them by itself. The runtime's single
//! worker thread (all signals blocked) drives background tasks: prefetched receives, visibility heartbeats.
//!
//! Signals follow Postgres' own background workers (`worker_spi`, `autoprewarm`): SIGHUP is
//! `SignalHandlerForConfigReload` (sets `ConfigReloadPending`), SIGTERM is `SignalHandlerForShutdownRequest` (sets
//! `ShutdownRequestPending`), both set the process latch; the worker reads only those two flags, sleeps with
//! `WaitLatch(…, WL_EXIT_ON_PM_DEATH)`, and a long poll in [`block_on`] ends early when either is set.

use crate::error::{Error, Result};
use pgrx::pg_sys;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

fn block_signals_in_this_thread() {
    // SAFETY: builds a full signal set and applies it to the calling (runtime) thread only, so Postgres'
    // signals (SIGINT, SIGTERM, SIGUSR1, ...) are always delivered to the backend's main thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Keeps freed memory in this process instead of handing it back to the kernel after every statement.
///
/// glibc trims the heap top (and unmaps large chunks) as soon as a statement's memory context is freed, so each
/// batch's INSERT page-faulted the same memory in again: `make bench`'s perf profile put malloc, free and page
/// faults at about a quarter of the main thread's CPU. Raised limits cut the backend's CPU per message by ~8 µs
/// (A/B on this machine, 46–47 vs 55–58 µs). Set once per backend, at its first SQS call (only backends that
/// ingest): at most 16 MB of free heap top are kept, and allocations under 4 MB come from the heap.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator tunables for this process; it is called once, from the
    // main thread, before the runtime's threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TOP_PAD, 1 << 20);
    }
}

/// The backend's runtime, created on first use (never in the postmaster).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        keep_freed_memory();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .thread_name("sqs_ingest-net")
            .on_thread_start(block_signals_in_this_thread)
            .enable_all()
            .build()
            .expect("cannot start the sqs_ingest network runtime")
    })
}

/// Runs a future to completion on the main thread, servicing Postgres interrupts every 100 ms.
pub fn block_on<F: Future>(fut: F) -> Result<F::Output> {
    let rt = runtime();
    let mut fut = Box::pin(fut);
    // Commits whose deletes wait for their standbys are settled from every wait of the main thread.
    crate::replication::poll();
    // Already done (a prefetched receive usually is): take it without arming the interrupt timer.
    {
        let _context = rt.enter();
        if let Some(out) = futures_util::FutureExt::now_or_never(&mut fut) {
            return Ok(out);
        }
    }
    loop {
        let step = rt.block_on(async {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.tick().await;
            let mut gates = tokio::time::interval(GATE_POLL);
            loop {
                tokio::select! {
                    out = &mut fut => return Some(out),
                    _ = gates.tick(), if crate::replication::waiting() => crate::replication::poll(),
                    _ = tick.tick() => {
                        // SAFETY: a sig_atomic_t flag set by signal handlers; read on the main thread.
                        if unsafe { pg_sys::InterruptPending } != 0 || worker_signalled() {
                            return None;
                        }
                    }
                }
            }
        });
        match step {
            Some(out) => return Ok(out),
            None => {
                // Raises for cancel/timeout/terminate; returns for harmless interrupts, and we keep waiting.
                pgrx::check_for_interrupts!();
                if worker_signalled() {
                    return Err(Error::Interrupted);
                }
            }
        }
    }
}

/// How often a wait settles the commits whose deletes wait for their standbys ([`crate::replication::poll`]).
const GATE_POLL: Duration = Duration::from_millis(2);

/// Runs a future until it completes, `deadline` passes, or (with `honour_terminate`) the backend is told to
/// terminate or a worker to stop (checked every 100 ms; never raises: used after commit). `None` when it did not
/// complete.
pub fn block_on_until<F: Future>(fut: F, deadline: std::time::Instant, honour_terminate: bool) -> Option<F::Output> {
    crate::replication::poll();
    runtime().block_on(async {
        let mut fut = std::pin::pin!(fut);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        // Not at once: a task whose gate the poll above just settled gets its turn before any deadline is judged.
        tick.tick().await;
        let mut gates = tokio::time::interval(GATE_POLL);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                _ = gates.tick(), if crate::replication::waiting() => crate::replication::poll(),
                _ = tick.tick() => {
                    // SAFETY: sig_atomic_t flags set by signal handlers; read on the main thread.
                    let terminating = honour_terminate
                        && unsafe { pg_sys::ProcDiePending != 0 || pg_sys::ShutdownRequestPending != 0 };
                    if terminating || std::time::Instant::now() >= deadline {
                        return None;
                    }
                }
            }
        }
    })
}

/// Runs a future to completion without servicing interrupts (used after commit, where nothing may raise).
pub fn block_on_uninterruptible<F: Future>(fut: F) -> F::Output {
    runtime().block_on(fut)
}

static IN_WORKER: AtomicBool = AtomicBool::new(false);

// Postgres' own handlers (postmaster/interrupt.c), declared here as the C functions they are: pgrx's bindings wrap
// every Postgres function in a Rust guard, which is not a signal handler.
unsafe extern "C-unwind" {
    fn SignalHandlerForConfigReload(signal: std::ffi::c_int);
    fn SignalHandlerForShutdownRequest(signal: std::ffi::c_int);
}

/// Installs Postgres' own SIGHUP and SIGTERM handlers in a background worker and unblocks signals (the
/// postmaster starts workers with signals blocked). Call first thing in a worker's entry point.
pub fn install_worker_signal_handlers() {
    IN_WORKER.store(true, Ordering::Relaxed);
    // SAFETY: installs Postgres' exported handlers on the worker's main thread before it does anything else.
    unsafe {
        pqsignal(pg_sys::SIGHUP as i32, Some(SignalHandlerForConfigReload));
        pqsignal(pg_sys::SIGTERM as i32, Some(SignalHandlerForShutdownRequest));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

/// Postgres' `pqsignal()`: from 18 the backend's variant is exported as `pqsignal_be` (port.h maps the name).
///
/// # Safety
/// As `pqsignal()`: main thread, a handler that is async-signal-safe.
unsafe fn pqsignal(signo: std::ffi::c_int, func: pg_sys::pqsigfunc) {
    // SAFETY: forwarded from the caller.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        pg_sys::pqsignal(signo, func);
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(signo, func);
    }
}

/// A background worker was asked to stop (SIGTERM): it finishes the current batch and exits.
pub fn stop_requested() -> bool {
    // SAFETY: a sig_atomic_t flag written by the signal handler; read on the main thread.
    unsafe { pg_sys::ShutdownRequestPending != 0 }
}

/// Re-reads the configuration if a SIGHUP arrived since the last call (outside any transaction).
pub fn reload_if_requested() {
    // SAFETY: the flag is a sig_atomic_t set by SignalHandlerForConfigReload; it is cleared before the file is
    // read, as Postgres' own workers do, so a SIGHUP arriving meanwhile is not lost.
    unsafe {
        if pg_sys::ConfigReloadPending != 0 {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
    }
}

/// Sleeps on the process latch for up to `timeout` (a signal wakes it; the process exits if the postmaster
/// died) and services interrupts. False when the worker was asked to stop.
pub fn sleep(timeout: Duration) -> bool {
    // SAFETY: the standard latch wait of a background worker, on its main thread.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout.as_millis().min(i64::MAX as u128) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
    !stop_requested()
}

/// True in a worker asked to stop or to reload: a long poll returns early so the worker acts on it.
fn worker_signalled() -> bool {
    // SAFETY: sig_atomic_t flags written by signal handlers; read on the main thread.
    IN_WORKER.load(Ordering::Relaxed)
        && unsafe { pg_sys::ShutdownRequestPending != 0 || pg_sys::ConfigReloadPending != 0 }
}
