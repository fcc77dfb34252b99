//! Stop and reload requests a background worker has received (ground floor: nothing of ours imported). The
//! network layer polls them while it waits, so a worker's long poll ends as soon as it is asked to stop or reload.

use pgrx::pg_sys;
use std::sync::atomic::{AtomicBool, Ordering};

static IN_WORKER: AtomicBool = AtomicBool::new(false);

/// Called once by a background worker after it installed its signal handlers.
pub fn mark_worker() {
    IN_WORKER.store(true, Ordering::Relaxed);
}

/// True in a worker that was asked to stop (SIGTERM) or to reload (SIGHUP): long polls return early.
pub fn shutdown_requested() -> bool {
    // SAFETY: sig_atomic_t flags written by signal handlers; read on the main thread.
    IN_WORKER.load(Ordering::Relaxed)
        && unsafe { pg_sys::ShutdownRequestPending != 0 || pg_sys::ConfigReloadPending != 0 }
}
