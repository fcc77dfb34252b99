//! The SQS clients: a per-backend tokio runtime, the AWS SDK client and the direct hot-path client
//! ([`crate::direct`]), created lazily after fork.
//!
//! Only the backend's main thread touches Postgres. Network futures run inside [`block_on`], which polls them on
//! the main thread and wakes every 100 ms to service Postgres interrupts (cancel, `statement_timeout`,
//! terminate), because an SDK call does not service them by itself. The runtime's single worker thread (signals
//! blocked) drives background tasks: prefetching receives and extending the visibility of held messages.

use crate::direct::Direct;
use crate::error::{Error, Result};
use crate::gucs;
use aws_sdk_sqs::config::{Credentials, Region};
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use futures_util::stream::{self, StreamExt};
use pgrx::pg_sys;
use sqs_ingest_core::queue_url::QueueUrl;
use sqs_ingest_core::sqs_error::Observed;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

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

/// The SDK client for every call, and the direct client for the hot path when `sqs_ingest.sqs_client` is
/// `direct` (see [`crate::direct`]).
#[derive(Clone)]
pub struct Client {
    pub sdk: aws_sdk_sqs::Client,
    direct: Option<Arc<Direct>>,
}

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

thread_local! {
    static CLIENTS: RefCell<HashMap<String, Client>> = RefCell::new(HashMap::new());
}

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
            loop {
                tokio::select! {
                    out = &mut fut => return Some(out),
                    _ = tick.tick() => {
                        // SAFETY: a sig_atomic_t flag set by signal handlers; read on the main thread.
                        if unsafe { pg_sys::InterruptPending } != 0 || crate::signals::shutdown_requested() {
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
                if crate::signals::shutdown_requested() {
                    return Err(Error::Interrupted);
                }
            }
        }
    }
}

/// Runs a future until it completes, `deadline` passes, or the backend is told to terminate (checked every
/// 100 ms; never raises: used after commit). `None` when it did not complete.
pub fn block_on_until<F: Future>(fut: F, deadline: std::time::Instant) -> Option<F::Output> {
    runtime().block_on(async {
        let mut fut = std::pin::pin!(fut);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                _ = tick.tick() => {
                    // SAFETY: sig_atomic_t flags set by signal handlers; read on the main thread.
                    let terminating = unsafe { pg_sys::ProcDiePending != 0 || pg_sys::ShutdownRequestPending != 0 };
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

fn http_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::tls;
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https()
}

/// The clients for the queue's endpoint/region and the current credential settings (cached per backend).
pub fn client(queue: &QueueUrl) -> Result<Client> {
    let mut both = clients(queue)?;
    if gucs::sqs_client() == gucs::SqsClient::Sdk {
        both.direct = None;
    }
    Ok(both)
}

fn clients(queue: &QueueUrl) -> Result<Client> {
    let region = queue.region.clone().unwrap_or_else(gucs::region);
    let static_creds = match (gucs::aws_access_key_id(), gucs::aws_secret_access_key()) {
        (Some(id), Some(secret)) => {
            Some(Credentials::new(id, secret, gucs::aws_session_token(), None, "sqs_ingest GUCs"))
        }
        (None, None) => None,
        _ => {
            return Err(Error::InvalidArgument(
                "sqs_ingest.aws_access_key_id and sqs_ingest.aws_secret_access_key must be set together".into(),
            ))
        }
    };
    // Non-AWS endpoints (LocalStack, ElasticMQ) accept any signature: without configured credentials, sign
    // with placeholders instead of waiting on instance-metadata lookups that cannot succeed.
    let creds = static_creds.or_else(|| {
        (!queue.is_aws() && std::env::var_os("AWS_ACCESS_KEY_ID").is_none())
            .then(|| Credentials::new("test", "test", None, None, "sqs_ingest local endpoint"))
    });
    let timeout = gucs::request_timeout_ms();
    let cache_key = format!(
        "{}|{}|{}|{}",
        queue.endpoint.as_deref().unwrap_or("aws"),
        region,
        timeout,
        creds
            .as_ref()
            .map(|c| format!("{:x}", credentials_fingerprint(c.access_key_id(), c.secret_access_key())))
            .unwrap_or_default()
    );
    if let Some(made) = CLIENTS.with(|m| m.borrow().get(&cache_key).cloned()) {
        return Ok(made);
    }
    let endpoint = queue.endpoint.clone();
    let region_name = region.clone();
    let made = block_on_uninterruptible(async move {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(Region::new(region))
            .http_client(http_client())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_millis(timeout.min(5_000)))
                    .operation_attempt_timeout(Duration::from_millis(timeout + 20_000))
                    .build(),
            )
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3));
        if let Some(c) = creds {
            loader = loader.credentials_provider(c);
        }
        if let Some(ep) = endpoint {
            loader = loader.endpoint_url(ep);
        }
        let config = loader.load().await;
        // The direct client posts to the same endpoint the SDK would: the configured one (queue URL host,
        // AWS_ENDPOINT_URL) or the region's public SQS endpoint.
        let direct_endpoint = config.endpoint_url().map(str::to_string).unwrap_or_else(|| {
            let suffix = if region_name.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
            format!("https://sqs.{region_name}.{suffix}")
        });
        let direct = config.credentials_provider().map(|provider| {
            Direct::new(&direct_endpoint, &region_name, provider, Duration::from_millis(timeout)).map(Arc::new)
        });
        (aws_sdk_sqs::Client::new(&config), direct)
    });
    let made = Client { sdk: made.0, direct: made.1.transpose()? };
    CLIENTS.with(|m| m.borrow_mut().insert(cache_key, made.clone()));
    Ok(made)
}

/// Distinguishes cached clients by credentials without keeping the secret in the cache key.
fn credentials_fingerprint(a: &str, b: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.hash(&mut h);
    b.hash(&mut h);
    h.finish()
}

/// Turns an SDK failure into an [`Error`] a DBA can act on.
pub fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    operation: &str,
    err: SdkError<E, HttpResponse>,
) -> Error {
    let raw = err.raw_response();
    let content_type = raw.and_then(|r| r.headers().get("content-type")).map(str::to_string);
    let body = raw.and_then(|r| r.body().bytes()).map(|b| b[..b.len().min(256)].to_vec());
    let status = raw.map(|r| r.status().as_u16());
    let no_response = matches!(err, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_));
    let code = err.code().map(str::to_string);
    let seen = Observed {
        error_code: code.as_deref(),
        http_status: status,
        content_type: content_type.as_deref(),
        body_start: body.as_deref(),
        no_response,
    };
    let what = match (&err, code.as_deref()) {
        (SdkError::ServiceError(_), Some(code)) => format!("{code}: {}", err.message().unwrap_or("no message")),
        _ => crate::error::error_chain(&err),
    };
    crate::error::sqs_failure(operation, &seen, what)
}

/// Reads depth and retention; doubles as the connectivity and existence check before any side effect.
pub async fn queue_info(client: &Client, url: &str) -> Result<QueueInfo> {
    let out = client
        .sdk
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::MessageRetentionPeriod)
        .send()
        .await
        .map_err(|e| classify("GetQueueAttributes", e))?;
    let attrs = out.attributes();
    let num = |name: QueueAttributeName| attrs.and_then(|a| a.get(&name)).and_then(|v| v.parse().ok());
    Ok(QueueInfo {
        approximate_depth: num(QueueAttributeName::ApproximateNumberOfMessages),
        retention_s: num(QueueAttributeName::MessageRetentionPeriod),
    })
}

/// One ReceiveMessage call.
pub async fn receive(client: Client, url: String, max: i32, wait_s: i32, visibility_s: i32) -> Result<Vec<Received>> {
    if let Some(direct) = &client.direct {
        return direct.receive(&url, max, wait_s, visibility_s).await;
    }
    let out = client
        .sdk
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(max.clamp(1, 10))
        .wait_time_seconds(wait_s)
        .visibility_timeout(visibility_s)
        .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .send()
        .await
        .map_err(|e| classify("ReceiveMessage", e))?;
    Ok(out
        .messages
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            let attr = |n: MessageSystemAttributeName| m.attributes.as_ref().and_then(|a| a.get(&n)).cloned();
            Received {
                sent_timestamp_ms: attr(MessageSystemAttributeName::SentTimestamp).and_then(|v| v.parse().ok()),
                receive_count: attr(MessageSystemAttributeName::ApproximateReceiveCount).and_then(|v| v.parse().ok()),
                message_id: m.message_id.unwrap_or_default(),
                receipt_handle: m.receipt_handle.unwrap_or_default(),
                body: m.body.unwrap_or_default(),
            }
        })
        .collect())
}

/// Deletes messages in batches of 10 (positional ids), several batches in flight; counts per-entry failures.
pub async fn delete(client: &Client, url: &str, receipts: &[String], concurrency: usize) -> BatchOutcome {
    if let Some(direct) = &client.direct {
        return per_ten_receipts(receipts, concurrency, |chunk| direct.delete_batch(url, chunk)).await;
    }
    per_ten_receipts(receipts, concurrency, |chunk| {
        let entries = chunk
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(r).build().ok()
            })
            .collect();
        let req = client.sdk.delete_message_batch().queue_url(url).set_entries(Some(entries));
        async move { req.send().await.ok().map(|out| (out.successful().len(), out.failed().len())) }
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
    if let Some(direct) = &client.direct {
        let call = |chunk| direct.change_visibility_batch(url, chunk, visibility_s);
        return per_ten_receipts(receipts, concurrency, call).await;
    }
    per_ten_receipts(receipts, concurrency, |chunk| {
        let entries = chunk
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .visibility_timeout(visibility_s)
                    .build()
                    .ok()
            })
            .collect();
        let req = client.sdk.change_message_visibility_batch().queue_url(url).set_entries(Some(entries));
        async move { req.send().await.ok().map(|out| (out.successful().len(), out.failed().len())) }
    })
    .await
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

/// Sends bodies in batches of 10; returns how many SQS accepted.
pub async fn send(client: &Client, url: &str, bodies: &[String], concurrency: usize) -> Result<u64> {
    let mut calls = Vec::new();
    for chunk in bodies.chunks(10) {
        let mut entries = Vec::with_capacity(chunk.len());
        for (i, b) in chunk.iter().enumerate() {
            if let Ok(e) = SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(b).build() {
                entries.push(e);
            }
        }
        let req = client.sdk.send_message_batch().queue_url(url).set_entries(Some(entries));
        calls.push(async move {
            req.send().await.map(|out| out.successful().len() as u64).map_err(|e| classify("SendMessageBatch", e))
        });
    }
    let mut sent = 0;
    let mut pending = stream::iter(calls).buffer_unordered(concurrency.max(1));
    while let Some(r) = pending.next().await {
        sent += r?;
    }
    Ok(sent)
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

/// Receive + delete with `concurrency` pollers and no database work: the benchmark's baseline.
pub async fn raw_drain(
    client: Client,
    url: String,
    max: i64,
    concurrency: usize,
    visibility_s: i32,
) -> Result<(i64, i64)> {
    use std::sync::atomic::{AtomicI64, Ordering};
    let budget = Arc::new(AtomicI64::new(max));
    let pollers = (0..concurrency.max(1)).map(|_| {
        let (client, url, budget) = (client.clone(), url.clone(), budget.clone());
        async move {
            let (mut received, mut deleted) = (0i64, 0i64);
            loop {
                let want = budget.fetch_sub(10, Ordering::SeqCst);
                if want <= 0 {
                    break;
                }
                let want = want.min(10);
                let got = receive(client.clone(), url.clone(), want as i32, 0, visibility_s).await?;
                budget.fetch_add(want - got.len() as i64, Ordering::SeqCst);
                if got.is_empty() {
                    break;
                }
                received += got.len() as i64;
                let receipts: Vec<String> = got.into_iter().map(|m| m.receipt_handle).collect();
                deleted += delete(&client, &url, &receipts, 1).await.succeeded as i64;
            }
            Ok::<_, Error>((received, deleted))
        }
    });
    let results = futures_util::future::join_all(pollers).await;
    let mut total = (0, 0);
    for r in results {
        let (r, d) = r?;
        total.0 += r;
        total.1 += d;
    }
    Ok(total)
}
