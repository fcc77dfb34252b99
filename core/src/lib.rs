//! Pure-Rust core of `sqs_ingest`: everything that can be decided without a live Postgres or a network.
//!
//! The pgrx extension is thin glue over this crate. Nothing here links pgrx or tokio, so every rule about
//! message validation, masking tokens, version packing, queue URLs and secret scrubbing is unit-tested with
//! plain `cargo test -p sqs_ingest_core`.

pub mod concurrency;
pub mod durability;
pub mod event;
pub mod mask;
pub mod pipeline;
mod prf;
pub mod queue_url;
pub mod scrub;
pub mod sqs_error;
pub mod sqs_json;
pub mod version;
