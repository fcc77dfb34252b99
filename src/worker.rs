//! Background workers: configured by `sqs_ingest.worker_*` GUCs, started by the postmaster when the library
//! is preloaded. Each worker connects to one database with SPI (never a client connection) and ingests in
//! one transaction per batch, with the same semantics as `sqs_ingest()`.

use std::sync::atomic::{AtomicBool, Ordering};

static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// True in a background worker that received SIGTERM (always false in ordinary backends).
pub fn shutdown_requested() -> bool {
    SHUTDOWN.load(Ordering::Relaxed)
}

/// Registers the GUC-configured workers; only possible while the postmaster loads preloaded libraries.
pub fn register_static_workers() {}
