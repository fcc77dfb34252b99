//! The SQS transport: one interface (a [`Client`] and the calls below) with two clients behind it, the AWS SDK
//! ([`sdk`]) and the direct hot-path client ([`direct`]), chosen per call by `sqs_ingest.sqs_client`. Clients are
//! made lazily after fork, at a backend's first call for an endpoint, region, timeout and credentials, and
//! kept for the backend's life. Calls are futures: the caller runs them with [`crate::runtime`].

mod direct;
mod sdk;

use crate::error::{Error, Result};
use crate::gucs;
use crate::runtime::block_on_uninterruptible;
use direct::Direct;
use futures_util::future::Either;
use futures_util::stream::{self, StreamExt};
use sqs_ingest_core::queue_url::QueueUrl;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

/// One received message, reduced to what ingest needs (the same shape from either client).
pub use sqs_ingest_core::sqs_json::WireMessage as Received;

/// Queue attributes ingest reads before it starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueInfo {
    pub approximate_depth: Option<i64>,
    pub retention_s: Option<i64>,
}

/// Outcome of deleting or changing visibility of a set of messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub succeeded: u64,
    pub failed: u64,
}

/// A connection to one SQS endpoint: the SDK client for every call, and the direct client for the hot path
/// (ReceiveMessage, DeleteMessageBatch, ChangeMessageVisibilityBatch) when `sqs_ingest.sqs_client` is `direct`.
#[derive(Clone)]
pub struct Client {
    sdk: aws_sdk_sqs::Client,
    direct: Option<Arc<Direct>>,
}

thread_local! {
    /// Clients by endpoint, region, timeout and a fingerprint of the credentials: a change of any setting that
    /// shapes a client makes a new one (the key is computed from the settings at every call).
    static CLIENTS: RefCell<HashMap<String, Client>> = RefCell::new(HashMap::new());
}

/// Parses a queue URL argument: an ERROR before any side effect when it is malformed, or when its host is not in
/// `sqs_ingest.allowed_endpoints` (requests carry the server's AWS credentials; they go to trusted hosts only).
pub fn parse_queue_url(queue_url: &str) -> Result<QueueUrl> {
    let queue = QueueUrl::parse(queue_url)
        .map_err(|source| Error::QueueUrl { url: queue_url.chars().take(200).collect(), source })?;
    if !queue.host_allowed(&gucs::allowed_endpoints()) {
        return Err(Error::EndpointNotAllowed(queue.host.chars().take(200).collect()));
    }
    Ok(queue)
}

/// The client for the queue's endpoint and region and the current credential settings.
pub fn client(queue: &QueueUrl) -> Result<Client> {
    let mut both = clients(queue)?;
    if gucs::sqs_client() == gucs::SqsClient::Sdk {
        both.direct = None;
    }
    Ok(both)
}

fn clients(queue: &QueueUrl) -> Result<Client> {
    let region = queue.region.clone().unwrap_or_else(gucs::region);
    let creds = crate::aws::credentials(queue.is_aws())?;
    let timeout = gucs::request_timeout_ms();
    let cache_key = crate::aws::client_key(queue.endpoint.as_deref(), &region, timeout, creds.as_ref());
    if let Some(made) = CLIENTS.with(|m| m.borrow().get(&cache_key).cloned()) {
        return Ok(made);
    }
    let made = block_on_uninterruptible(sdk::connect(queue.endpoint.clone(), region, creds, timeout));
    let made = Client { sdk: made.0, direct: made.1.transpose()?.map(Arc::new) };
    CLIENTS.with(|m| m.borrow_mut().insert(cache_key, made.clone()));
    Ok(made)
}

/// Reads depth and retention; doubles as the connectivity and existence check before any side effect.
pub async fn queue_info(client: &Client, url: &str) -> Result<QueueInfo> {
    sdk::queue_info(&client.sdk, url).await
}

/// Approximate message counts: (visible, in flight, delayed).
pub async fn queue_counts(client: &Client, url: &str) -> Result<(i64, i64, i64)> {
    sdk::queue_counts(&client.sdk, url).await
}

/// Creates a queue; returns the queue URL SQS reports.
pub async fn create_queue(client: &Client, name: &str, visibility_timeout_s: i32) -> Result<String> {
    sdk::create_queue(&client.sdk, name, visibility_timeout_s).await
}

/// One ReceiveMessage call (owned arguments: it is spawned onto the runtime).
pub async fn receive(client: Client, url: String, max: i32, wait_s: i32, visibility_s: i32) -> Result<Vec<Received>> {
    match &client.direct {
        Some(direct) => direct.receive(&url, max, wait_s, visibility_s).await,
        None => sdk::receive(&client.sdk, &url, max, wait_s, visibility_s).await,
    }
}

/// Deletes messages in batches of 10, `concurrency` batches in flight; counts per-entry failures.
pub async fn delete(client: &Client, url: &str, receipts: &[String], concurrency: usize) -> BatchOutcome {
    per_ten_receipts(receipts, concurrency, |chunk| match &client.direct {
        Some(direct) => Either::Left(direct.delete_batch(url, chunk)),
        None => Either::Right(sdk::delete_batch(&client.sdk, url, chunk)),
    })
    .await
}

/// Sets the visibility timeout of held messages (extend while a transaction runs, 0 to release after abort).
pub async fn change_visibility(
    client: &Client,
    url: &str,
    receipts: &[String],
    visibility_s: i32,
    concurrency: usize,
) -> BatchOutcome {
    per_ten_receipts(receipts, concurrency, |chunk| match &client.direct {
        Some(direct) => Either::Left(direct.change_visibility_batch(url, chunk, visibility_s)),
        None => Either::Right(sdk::change_visibility_batch(&client.sdk, url, chunk, visibility_s)),
    })
    .await
}

/// Sends bodies in batches of 10, `concurrency` batches in flight; returns how many SQS accepted.
pub async fn send(client: &Client, url: &str, bodies: &[String], concurrency: usize) -> Result<u64> {
    let calls = bodies.chunks(10).map(|chunk| sdk::send_batch(&client.sdk, url, chunk));
    let mut sent = 0;
    let mut pending = stream::iter(calls).buffer_unordered(concurrency.max(1));
    while let Some(r) = pending.next().await {
        sent += r?;
    }
    Ok(sent)
}

/// One batch request per 10 receipts, `concurrency` in flight; `call` answers (succeeded, failed) entries, or
/// `None` when the whole request failed (all its entries count as failed).
async fn per_ten_receipts<'r, Fut: Future<Output = Option<(usize, usize)>>>(
    receipts: &'r [String],
    concurrency: usize,
    call: impl Fn(&'r [String]) -> Fut,
) -> BatchOutcome {
    let calls = receipts
        .chunks(10)
        .map(|chunk| {
            let n = chunk.len() as u64;
            let request = call(chunk);
            async move {
                match request.await {
                    Some((ok, failed)) => BatchOutcome { succeeded: ok as u64, failed: failed as u64 },
                    None => BatchOutcome { succeeded: 0, failed: n },
                }
            }
        })
        .collect();
    run_bounded(calls, concurrency).await
}

async fn run_bounded<F: Future<Output = BatchOutcome>>(calls: Vec<F>, concurrency: usize) -> BatchOutcome {
    let mut total = BatchOutcome::default();
    let mut pending = stream::iter(calls).buffer_unordered(concurrency.max(1));
    while let Some(o) = pending.next().await {
        total.succeeded += o.succeeded;
        total.failed += o.failed;
    }
    total
}
