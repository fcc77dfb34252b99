//! `sqs_ingest.bench_raw_drain()`: the benchmark's baseline, a receive-and-delete drain with the same client and
//! concurrency as ingest and no database work (superuser only; it discards messages).

use crate::error::{Error, Result};
use crate::{gucs, ingest, runtime, sqs};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::sync::Arc;

/// Benchmark baseline: receives and deletes (discards!) up to `max_messages` with the same client and
/// concurrency as ingest, touching no table. Superuser only.
#[pg_extern(volatile, parallel_unsafe, schema = "sqs_ingest")]
fn bench_raw_drain(
    queue_url: &str,
    max_messages: i64,
) -> std::result::Result<
    TableIterator<'static, (name!(received, i64), name!(deleted, i64), name!(elapsed_ms, f64))>,
    ErrorReport,
> {
    let (queue, _, _, _) = ingest::parse_args(queue_url, Some(max_messages), None)?;
    let client = sqs::client(&queue)?;
    let started = std::time::Instant::now();
    let (received, deleted) = runtime::block_on(raw_drain(
        client,
        queue.url.clone(),
        max_messages,
        gucs::receive_concurrency(),
        gucs::visibility_timeout_s(),
    ))??;
    Ok(TableIterator::once((received, deleted, started.elapsed().as_secs_f64() * 1000.0)))
}

/// Receive + delete with `concurrency` pollers and no database work: the benchmark's baseline.
async fn raw_drain(
    client: sqs::Client,
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
                let got = sqs::receive(client.clone(), url.clone(), want as i32, 0, visibility_s).await?;
                budget.fetch_add(want - got.len() as i64, Ordering::SeqCst);
                if got.is_empty() {
                    break;
                }
                received += got.len() as i64;
                let receipts: Vec<String> = got.into_iter().map(|m| m.receipt_handle).collect();
                deleted += sqs::delete(&client, &url, &receipts, 1).await.succeeded as i64;
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
