//! The ingest loop shared by `sqs_ingest()`, `sqs_ingest_drain()` and the background workers.
//!
//! Receives stay in flight on the runtime's worker thread while the main thread stores the previous batch, so
//! the queue endpoint is never idle waiting on the database. Each batch is stored with one ledger insert, one
//! multi-row insert into the target and one dead-letter insert; its messages are held by the transaction and
//! deleted only after it commits (see [`crate::hold`]).

use crate::bookkeeping::{self, Counters, DeadLetters, LedgerQueue};
use crate::error::{Error, Result};
use crate::pipeline::{self, Layout, Pipeline};
use crate::privilege::{as_owner, extension_owner, pinned};
use crate::rows::{self, Rows, TextRows};
use crate::sqs::{self, Received};
use crate::subxact::catch_error;
use crate::target::{self, Target};
use crate::{gucs, hold, keys};
use pgrx::prelude::*;
use sqs_ingest_core::concurrency::ReceiveConcurrency;
use sqs_ingest_core::event::{self, Rejection};
use sqs_ingest_core::mask::{KeyMaterial, Method};
use sqs_ingest_core::pipeline::{self as pipeline_core, MessageView};
use sqs_ingest_core::queue_url::QueueUrl;
use sqs_ingest_core::sqs_error::FailureClass;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// What a call ingests into: the built-in login pipeline (into `sqs_ingest.target_table`, masked with the call's
/// method), or a declared pipeline (its table, its columns, its masks).
#[derive(Debug, Clone)]
pub enum Shape {
    Login,
    Pipeline(Rc<Pipeline>),
}

/// What a message that passed validation becomes.
enum Verdict {
    Login(event::LoginEvent, event::AppVersionValue),
    /// A pipeline's column texts.
    Values(Vec<Option<String>>),
    /// A pipeline's filter did not match: deleted after COMMIT, recorded in the ledger as `filtered`.
    Filtered,
}

/// A received message as a pipeline reads it.
fn view(m: &Received) -> MessageView<'_> {
    MessageView {
        body: &m.body,
        message_id: &m.message_id,
        sent_timestamp_ms: m.sent_timestamp_ms,
        receive_count: m.receive_count,
        group_id: m.group_id.as_deref(),
        sequence_number: m.sequence_number.as_deref(),
        attributes: &m.attributes,
    }
}

/// What a pipeline's filter said about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FilterVerdict {
    Match,
    NoMatch,
    /// It raised an error (its SQLSTATE).
    Failed(String),
}

/// Evaluates a pipeline's filter on every message of a batch: one statement (`jsonb_path_match_tz` over the
/// messages' filter documents); if it raises (a message the path cannot evaluate, e.g. a date/time comparison),
/// each message alone, in a subtransaction, so the error is that message's.
fn filter_batch(mapping: &pipeline_core::Mapping, filter: &str, batch: &[Received]) -> Result<Vec<FilterVerdict>> {
    const ONE: &str = "SELECT pg_catalog.jsonb_path_match_tz($1::pg_catalog.jsonb, $2::pg_catalog.jsonpath,
                              '{}'::pg_catalog.jsonb, true) IS TRUE";
    let docs: Vec<String> = batch.iter().map(|m| mapping.filter_document(&view(m))).collect();
    let n = docs.len();
    let all = crate::subxact::in_subtransaction(|| {
        crate::plans::run(
            "SELECT pg_catalog.array_agg(pg_catalog.jsonb_path_match_tz(d::pg_catalog.jsonb, $2::pg_catalog.jsonpath,
                        '{}'::pg_catalog.jsonb, true) IS TRUE ORDER BY i)
               FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS u(d, i)",
            &[docs.into(), filter.into()],
            |rows| rows.first().get_one::<Vec<bool>>().ok().flatten(),
        )
    });
    if let Ok(Ok(Some(matched))) = &all {
        if matched.len() == n {
            let verdict = |m: &bool| if *m { FilterVerdict::Match } else { FilterVerdict::NoMatch };
            return Ok(matched.iter().map(verdict).collect());
        }
    }
    // An error of the whole statement (a cancel, a timeout, a serialization failure, …) is the call's, never a
    // message's: raised (transient ones come back after a backoff, as everywhere in a call).
    let statement_error = |report: &pgrx::pg_sys::panic::ErrorReportWithLevel| {
        if crate::error::transient(report.sql_error_code()) {
            hold::back_off_on_abort();
        }
        Error::Postgres {
            code: report.sql_error_code(),
            message: format!("filter evaluation failed: {}", report.message()),
            hint: None,
        }
    };
    match &all {
        Err(report) if crate::error::batch_level(report.sql_error_code()) => return Err(statement_error(report)),
        Ok(Err(e)) => return Err(Error::Internal(format!("filter evaluation failed: {e}"))),
        _ => {}
    }
    // Rare (a message the batch statement could not evaluate): the documents are made again, one at a time.
    let mut out = Vec::with_capacity(n);
    for doc in batch.iter().map(|m| mapping.filter_document(&view(m))) {
        let one = crate::subxact::in_subtransaction(|| {
            crate::plans::run(ONE, &[doc.into(), filter.into()], |rows| rows.first().get_one::<bool>().ok().flatten())
        });
        out.push(match one {
            Ok(Ok(Some(true))) => FilterVerdict::Match,
            Ok(Ok(_)) => FilterVerdict::NoMatch,
            Ok(Err(e)) => return Err(Error::Internal(format!("filter evaluation failed: {e}"))),
            Err(report) if crate::error::batch_level(report.sql_error_code()) => return Err(statement_error(&report)),
            Err(report) => FilterVerdict::Failed(crate::error::sqlstate_text(report.sql_error_code())),
        });
    }
    Ok(out)
}

impl Shape {
    /// The declared pipeline's name, "" for the login pipeline (as `counters.pipeline` keeps it).
    pub fn pipeline_name(&self) -> &str {
        match self {
            Shape::Pipeline(p) => &p.name,
            Shape::Login => "",
        }
    }
}

/// How one ingest call behaves.
#[derive(Debug, Clone)]
pub struct Options {
    pub max_messages: Option<i64>,
    pub method: Method,
    pub shape: Shape,
    /// Label in `sqs_ingest.stats` (empty for SQL sessions, `worker N` for background workers).
    pub worker: String,
    /// Long-poll wait of the receive that confirms the queue is empty (0: trust one empty short poll).
    pub confirm_wait_s: i32,
    /// Return as soon as the confirming long poll delivered messages (workers commit promptly).
    pub return_after_wake: bool,
    pub progress_notices: bool,
    /// Reuse a queue probe (connectivity check, depth, retention) younger than this; zero probes every call.
    pub reuse_probe_for: Duration,
}

/// Counts of one call, as returned by `sqs_ingest()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub received: i64,
    pub inserted: i64,
    pub duplicates: i64,
    pub dead_lettered: i64,
    /// Messages a pipeline's filter did not match (deleted, released or dead-lettered as the pipeline says).
    pub filtered: i64,
    /// Messages this call hands to the commit hook for deletion (every message it processed).
    pub deleted: i64,
    pub elapsed_ms: f64,
    /// The oldest SentTimestamp (ms since the epoch) among the messages received, for the lag metric.
    pub oldest_sent_ms: Option<i64>,
    /// Whether the queue may hold more for this caller (it was not confirmed empty; for a FIFO queue, this call
    /// received messages, whose groups go on only after its COMMIT deletes them).
    pub more: bool,
    /// For a FIFO queue this call received from: the messages SQS reports still available after it (the later
    /// messages of the groups it holds, which SQS delivers only after its COMMIT deletes the earlier ones).
    pub fifo_remaining: Option<i64>,
}

thread_local! {
    /// Errors of calls whose transaction rolled back, written to the counters by this backend's next call.
    static UNREPORTED_ERRORS: RefCell<Vec<crate::audit::UnreportedError>> = const { RefCell::new(Vec::new()) };
    /// The last GetQueueAttributes answer per queue, for `Options::reuse_probe_for`.
    static LAST_PROBE: RefCell<HashMap<String, (Instant, sqs::QueueInfo)>> = RefCell::new(HashMap::new());
    /// When this backend last pruned each queue's ledger.
    static LAST_PRUNE: RefCell<HashMap<String, Instant>> = RefCell::new(HashMap::new());
    /// Receives in flight per queue as this backend last adapted them (see core::concurrency): a drain's or a
    /// worker's next batch starts where the last one ended.
    static RECEIVE_LIMIT: RefCell<HashMap<String, ReceiveConcurrency>> = RefCell::new(HashMap::new());
}

/// The receive-concurrency controller for a queue: where this backend left it (its number, its last measured
/// rate and probing state), but never below `sqs_ingest.receive_concurrency` (a drained queue halved it; new
/// traffic starts from the setting again) nor above the cap, [`gucs::receive_cap`].
fn receive_controller(url: &str, now_s: f64) -> ReceiveConcurrency {
    let (start, cap) = (gucs::receive_concurrency(), gucs::receive_cap());
    match RECEIVE_LIMIT.with(|m| m.borrow_mut().remove(url)) {
        Some(last) => last.resume(start, cap, now_s),
        None => ReceiveConcurrency::new(start, cap, now_s),
    }
}

/// Parses the arguments every entry point shares; raises before any side effect. The first names a queue (its
/// URL: the login pipeline) or a declared pipeline (its name: read from `sqs_ingest.pipelines`, so this needs a
/// transaction).
pub fn parse_args(
    queue_or_pipeline: &str,
    max_messages: Option<i64>,
    method: Option<&str>,
) -> Result<(QueueUrl, Option<i64>, Method, Shape)> {
    let (queue, shape) = if pipeline::is_name(queue_or_pipeline) {
        if method.is_some() {
            return Err(Error::InvalidArgument(
                "a pipeline's masking is declared per column; call it without a method".into(),
            ));
        }
        let p = pipeline::load(queue_or_pipeline)?;
        pipeline::may_run(&p)?;
        (sqs::parse_queue_url(&p.queue_url)?, Shape::Pipeline(Rc::new(p)))
    } else {
        (sqs::parse_queue_url(queue_or_pipeline)?, Shape::Login)
    };
    if let Some(n) = max_messages {
        if n < 1 {
            return Err(Error::InvalidArgument(format!(
                "max_messages must be at least 1 (or NULL for no limit), not {n}"
            )));
        }
    }
    let method = gucs::masking_method_or(method)?;
    Ok((queue, max_messages, method, shape))
}

/// Runs `f`, turning an ERROR Postgres raises inside it into an [`Error::Postgres`], so that a failing call's error
/// reaches `stats.last_error` and a worker records it and carries on instead of exiting. The transaction is left
/// failed: the caller re-raises the error or aborts the transaction at once, and runs no SQL before that.
pub fn catching<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    match catch_error(f) {
        Ok(result) => result,
        Err(report) => Err({
            if crate::error::transient(report.sql_error_code()) {
                // Wherever it was raised (the target, the ledger, a commit): the batch comes back after a backoff.
                hold::back_off_on_abort();
            }
            Error::Postgres {
                code: report.sql_error_code(),
                message: report.message().to_string(),
                hint: report.hint().map(str::to_string),
            }
        }),
    }
}

/// Remembers the error of a failing call (of `pipeline`, "" for the login pipeline) so that it reaches the counters.
pub fn remember_error(queue_url: &str, worker: &str, pipeline: &str, error: &Error) {
    UNREPORTED_ERRORS.with(|e| {
        e.borrow_mut().push(crate::audit::UnreportedError {
            queue_url: queue_url.to_string(),
            worker: worker.to_string(),
            pipeline: pipeline.to_string(),
            text: error.scrubbed(),
        })
    });
}

/// Transaction hook after ABORT: the errors of the calls that rolled back go to the audit worker, which writes
/// them to `sqs_ingest.stats` at once (the session may end before it calls again). Never raises.
pub fn after_abort() {
    let errors = UNREPORTED_ERRORS.with(|e| std::mem::take(&mut *e.borrow_mut()));
    crate::audit::save_errors(errors);
}

/// Transaction hook after COMMIT (it runs after [`hold`]'s, which deletes or defers): deletes the standbys did not
/// confirm go to the audit worker, which counts them in `sqs_ingest.stats` at once. Never raises.
pub fn after_commit() {
    save_deferred();
}

/// Saves this backend's deferred deletes for `sqs_ingest.stats` (through the audit worker: no transaction is
/// needed, and the session may end right after). Never raises.
pub fn save_deferred() {
    let deferred = hold::take_deferred();
    if deferred.is_empty() {
        return;
    }
    crate::audit::save_deferred(deferred);
}

/// This module's transaction hooks.
pub fn xact_hooks() -> crate::xact::Hooks {
    crate::xact::Hooks { abort: Some(after_abort), commit: Some(after_commit), ..Default::default() }
}

/// Writes what earlier transactions of this backend could not: post-commit delete outcomes and errors.
pub fn flush_unreported(worker: &str) -> Result<()> {
    let deletes = hold::take_unreported();
    let errors = UNREPORTED_ERRORS.with(|e| std::mem::take(&mut *e.borrow_mut()));
    for d in deletes {
        let c = Counters { delete_failures: d.outcome.failed as i64, ..Default::default() };
        if c.delete_failures > 0 {
            bookkeeping::add_counters(&d.queue_url, worker, "", c, None, None)?;
        }
    }
    for e in errors {
        bookkeeping::add_counters(&e.queue_url, &e.worker, &e.pipeline, Counters::default(), None, Some(&e.text))?;
    }
    Ok(())
}

/// Ingests from one queue until it is empty or `max_messages` were received.
pub fn ingest(queue: &QueueUrl, opts: &Options) -> Result<Summary> {
    ingest_from(queue, opts, None)
}

/// [`ingest`], starting with messages a worker waited for outside the transaction ([`wait_for_messages`]).
pub fn ingest_waited(queue: &QueueUrl, opts: &Options, waited: Waited) -> Result<Summary> {
    ingest_from(queue, opts, Some(waited))
}

fn ingest_from(queue: &QueueUrl, opts: &Options, waited: Option<Waited>) -> Result<Summary> {
    let started = Instant::now();
    crate::xact::ensure_registered();
    // On Citus: only on the coordinator, and only with local bookkeeping tables (see crate::citus).
    crate::citus::require_key_home()?;
    crate::citus::require_local_bookkeeping()?;
    let client = sqs::client(queue)?;
    // Connectivity, existence and protocol are checked before anything is written.
    let info = probe(&client, queue, opts.reuse_probe_for)?;
    // Durability before the deletes is the commit hook's (crate::replication): flushed locally whatever
    // synchronous_commit is at COMMIT, and confirmed by the standbys sqs_ingest.delete_after names.
    // The target is the caller's to name, so it is resolved with the caller's search_path; every other
    // statement runs with a pinned one (see crate::privilege).
    let (target, layout) = match &opts.shape {
        Shape::Login => (target::resolve_or_create(&gucs::target_table())?, None),
        Shape::Pipeline(p) => {
            let target = target::resolve_existing(&p.target)?;
            let layout = pinned(|| pipeline::layout(p, &target))?;
            (target, Some(layout))
        }
    };
    pinned(|| ingest_into(queue, opts, &client, info, &target, layout.as_ref(), started, waited))
}

#[allow(clippy::too_many_arguments)]
fn ingest_into(
    queue: &QueueUrl,
    opts: &Options,
    client: &sqs::Client,
    info: sqs::QueueInfo,
    target: &Target,
    layout: Option<&Layout>,
    started: Instant,
    waited: Option<Waited>,
) -> Result<Summary> {
    let owner = extension_owner();
    hold::label(&opts.worker, opts.shape.pipeline_name());
    as_owner(owner, || flush_unreported(&opts.worker))?;
    let key = keys::active_material(true)?;
    let ledger_queue = as_owner(owner, || LedgerQueue::of(&queue.url))?;
    let schema = as_owner(owner, bookkeeping::Schema::detect)?;

    let mut run = Run {
        queue,
        ledger_queue: &ledger_queue,
        schema,
        client,
        opts,
        owner,
        target,
        layout,
        key: &key,
        summary: Summary::default(),
    };
    let drained = run.pipeline(started, waited)?;
    let fifo = queue.is_fifo();
    run.summary.more = !drained || (fifo && run.summary.received > 0);
    if fifo && run.summary.received > 0 {
        // Within one transaction SQS delivers no further message of a group this call holds, so "looked empty"
        // proves nothing: ask what is left (the held messages are in flight and not counted).
        // Informational: a failure (throttling, a reload signal) leaves it unknown rather than failing the batch.
        run.summary.fifo_remaining = crate::runtime::block_on(sqs::queue_info(client, &queue.url))
            .ok()
            .and_then(Result::ok)
            .and_then(|i| i.approximate_depth);
    }

    let s = run.summary;
    let counters = Counters {
        received: s.received,
        inserted: s.inserted,
        duplicates: s.duplicates,
        dead_lettered: s.dead_lettered,
        filtered: s.filtered,
        deleted: s.deleted,
        delete_failures: 0,
        batches: i64::from(s.received > 0),
        batch_seconds: if s.received > 0 { started.elapsed().as_secs_f64() } else { 0.0 },
        oldest_sent_ms: s.oldest_sent_ms,
    };
    if opts.max_messages == Some(0) {
        // A worker's dry run (see worker::batch): it checked what it could and stored nothing; no stats.
        return Ok(run.summary);
    }
    as_owner(owner, || -> Result<()> {
        // The probe saw the queue before this call took its messages: report what is left, as best known.
        let depth = if s.fifo_remaining.is_some() {
            s.fifo_remaining
        } else if drained {
            Some(0)
        } else {
            info.approximate_depth.map(|d| (d - s.received).max(0))
        };
        bookkeeping::add_counters(&queue.url, &opts.worker, opts.shape.pipeline_name(), counters, depth, None)?;
        maybe_prune(&queue.url, &ledger_queue, info.retention_s)
    })?;
    let mut summary = s;
    summary.elapsed_ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0;
    Ok(summary)
}

/// GetQueueAttributes, or the answer of one made less than `reuse_for` ago (workers call ingest per batch).
fn probe(client: &sqs::Client, queue: &QueueUrl, reuse_for: Duration) -> Result<sqs::QueueInfo> {
    let fresh = LAST_PROBE
        .with(|p| p.borrow().get(&queue.url).filter(|(at, _)| at.elapsed() < reuse_for).map(|(_, info)| *info));
    if let Some(info) = fresh {
        return Ok(info);
    }
    let info = crate::runtime::block_on(sqs::queue_info(client, &queue.url))??;
    LAST_PROBE.with(|p| p.borrow_mut().insert(queue.url.clone(), (Instant::now(), info)));
    Ok(info)
}

fn maybe_prune(url: &str, ledger_queue: &LedgerQueue, retention_s: Option<i64>) -> Result<()> {
    let due = LAST_PRUNE.with(|p| p.borrow().get(url).is_none_or(|t| t.elapsed() > Duration::from_secs(3600)));
    if due {
        // Only a retention SQS can have (60 s to 14 days) is believed: the ledger is keyed by the queue's ARN, so
        // an endpoint answering nonsense for one spelling must not prune the rows of every spelling.
        let retention = retention_s.filter(|r| (60..=1_209_600).contains(r)).unwrap_or(1_209_600);
        bookkeeping::prune_ledger(ledger_queue, retention)?;
        LAST_PRUNE.with(|p| p.borrow_mut().insert(url.to_string(), Instant::now()));
    }
    Ok(())
}

/// Messages gathered before one batch is stored (unless the pipeline runs dry first).
const STORE_AT: usize = 100;

/// One ReceiveMessage on the network thread. Its messages reach the ingest loop through a channel; if the loop is
/// gone before it takes them (an ERROR, a cancel, `statement_timeout`), the task or the dropped `InFlight` releases
/// them at once (visibility 0) instead of leaving them hidden until their visibility timeout.
struct InFlight {
    handle: tokio::task::JoinHandle<()>,
    rx: Option<tokio::sync::oneshot::Receiver<Result<Vec<Received>>>>,
    requested: i64,
    client: sqs::Client,
    url: String,
}

fn release_soon(client: sqs::Client, url: String, messages: Vec<Received>) {
    let receipts: Vec<String> = messages.into_iter().map(|m| m.receipt_handle).collect();
    if !receipts.is_empty() {
        crate::runtime::runtime().spawn(async move {
            sqs::change_visibility(&client, &url, &receipts, 0, 4).await;
        });
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Received, but never taken by the loop.
        if let Some(Ok(Ok(messages))) = self.rx.take().map(|mut rx| rx.try_recv()) {
            release_soon(self.client.clone(), std::mem::take(&mut self.url), messages);
        }
    }
}

/// Messages received and not yet stored; released when dropped unstored (the call ended early).
struct Unstored {
    client: sqs::Client,
    url: String,
    messages: Vec<Received>,
}

impl Drop for Unstored {
    fn drop(&mut self) {
        release_soon(self.client.clone(), std::mem::take(&mut self.url), std::mem::take(&mut self.messages));
    }
}

struct Run<'a> {
    queue: &'a QueueUrl,
    ledger_queue: &'a LedgerQueue,
    schema: bookkeeping::Schema,
    client: &'a sqs::Client,
    opts: &'a Options,
    owner: pg_sys::Oid,
    target: &'a Target,
    /// A declared pipeline's layout (None: the login pipeline).
    layout: Option<&'a Layout>,
    key: &'a KeyMaterial,
    summary: Summary,
}

/// Starts one ReceiveMessage on the network thread (see [`InFlight`]).
fn spawn_receive(client: &sqs::Client, url: &str, n: i64, wait_s: i32) -> InFlight {
    let (client, url) = (client.clone(), url.to_string());
    let fut = sqs::receive(client.clone(), url.clone(), n as i32, wait_s, gucs::visibility_timeout_s());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (task_client, task_url) = (client.clone(), url.clone());
    let handle = crate::runtime::runtime().spawn(async move {
        if let Err(Ok(messages)) = tx.send(fut.await) {
            // The loop is gone: nobody will store these.
            let receipts: Vec<String> = messages.into_iter().map(|m| m.receipt_handle).collect();
            if !receipts.is_empty() {
                sqs::change_visibility(&task_client, &task_url, &receipts, 0, 4).await;
            }
        }
    });
    InFlight { handle, rx: Some(rx), requested: n, client, url }
}

/// Messages a background worker waited for outside any transaction, to be stored by the next [`ingest`] call.
pub struct Waited(Unstored);

impl Waited {
    pub fn is_empty(&self) -> bool {
        self.0.messages.is_empty()
    }
}

/// Long-polls a queue for up to `wait_s` seconds *outside any transaction* (a background worker's idle wait: it
/// holds no transaction id and no snapshot, so VACUUM is never held back by an idle worker). Messages that
/// arrive are released at once if they are never stored (the worker stops, or its transaction fails to start).
pub fn wait_for_messages(queue: &QueueUrl, max: i64, wait_s: i32) -> Result<Waited> {
    let client = sqs::client(queue)?;
    let mut receive = spawn_receive(&client, &queue.url, max.clamp(1, 10), wait_s);
    let rx = receive.rx.take().expect("a fresh receive");
    let messages = match crate::runtime::block_on(rx) {
        Ok(received) => received.map_err(|e| Error::Internal(format!("receive task failed: {e}")))??,
        Err(Error::Interrupted) => Vec::new(), // asked to stop or reload: the task releases what it gets
        Err(e) => return Err(e),
    };
    Ok(Waited(Unstored { client, url: queue.url.clone(), messages }))
}

impl Run<'_> {
    /// The declared pipeline this run serves (None: the login pipeline).
    fn pipeline_name(&self) -> Option<&str> {
        Some(self.opts.shape.pipeline_name()).filter(|n| !n.is_empty())
    }

    /// The declaration this run serves (see `sqs_ingest.pipelines.id`).
    fn pipeline_id(&self) -> Option<i64> {
        match &self.opts.shape {
            Shape::Pipeline(p) => Some(p.id),
            Shape::Login => None,
        }
    }

    fn spawn(&self, n: i64, wait_s: i32) -> InFlight {
        spawn_receive(self.client, &self.queue.url, n, wait_s)
    }

    /// Keeps up to `concurrency` short polls in flight while the queue has not looked empty.
    fn top_up(&self, in_flight: &mut VecDeque<InFlight>, unrequested: &mut i64, saw_empty: bool, concurrency: usize) {
        while !saw_empty && in_flight.len() < concurrency && *unrequested > 0 {
            let n = (*unrequested).min(10);
            in_flight.push_back(self.spawn(n, 0));
            *unrequested -= n;
        }
    }

    /// Returns whether it stopped because the queue looked empty (rather than at `max_messages` or a stop).
    fn pipeline(&mut self, started: Instant, waited: Option<Waited>) -> Result<bool> {
        // One clock for the backend's whole life: a worker's next batch may continue the window in progress.
        static CLOCK: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let clock = *CLOCK.get_or_init(Instant::now);
        let now = || clock.elapsed().as_secs_f64();
        let mut control = receive_controller(&self.queue.url, now());
        let start = control.limit();
        let result = self.pipeline_with(started, waited, &mut control, &now);
        // The call (its last store included) ends here; the time until the next call is not in a carried window.
        control.pause(now());
        pgrx::debug1!(
            "sqs_ingest: receive concurrency: started at {start}, peak {}, ended at {}",
            control.peak(),
            control.limit()
        );
        RECEIVE_LIMIT.with(|m| m.borrow_mut().insert(self.queue.url.clone(), control));
        result
    }

    fn pipeline_with(
        &mut self,
        started: Instant,
        waited: Option<Waited>,
        control: &mut ReceiveConcurrency,
        now: &dyn Fn() -> f64,
    ) -> Result<bool> {
        let mut pending = Unstored { client: self.client.clone(), url: self.queue.url.clone(), messages: Vec::new() };
        if let Some(Waited(mut first)) = waited {
            pending.messages = std::mem::take(&mut first.messages);
        }
        let mut unrequested = self.opts.max_messages.unwrap_or(i64::MAX) - pending.messages.len() as i64;
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut saw_empty = false;
        let mut confirming = false;
        let mut confirmed_once = false;
        let progress_every = Duration::from_secs(gucs::progress_interval_s());
        let mut next_progress = started + progress_every;
        loop {
            self.top_up(&mut in_flight, &mut unrequested, saw_empty, control.limit());
            if in_flight.is_empty() {
                if !pending.messages.is_empty() {
                    self.store(std::mem::take(&mut pending.messages))?;
                }
                // A worker that already holds messages commits them now rather than long-polling for more inside
                // the same transaction (its rows would stay invisible, and its messages undeleted, for the wait).
                // So does any call holding messages of a FIFO queue: SQS delivers none of those groups' later
                // messages until this transaction's COMMIT deletes the earlier ones, so the wait would be idle.
                let fifo = self.queue.is_fifo();
                let holding = (self.opts.return_after_wake || fifo) && self.summary.received > 0;
                if saw_empty
                    && !confirming
                    && !confirmed_once
                    && !holding
                    && self.opts.confirm_wait_s > 0
                    && unrequested > 0
                {
                    confirming = true;
                    let n = unrequested.min(10);
                    in_flight.push_back(self.spawn(n, self.opts.confirm_wait_s));
                    unrequested -= n;
                    continue;
                }
                break;
            }
            let mut done = vec![in_flight.pop_front().expect("non-empty")];
            while in_flight.front().is_some_and(|f| f.handle.is_finished()) {
                done.push(in_flight.pop_front().expect("non-empty"));
            }
            let before = pending.messages.len();
            let mut woke = false;
            for mut f in done {
                let abort = f.handle.abort_handle();
                let rx = f.rx.take().expect("an in-flight receive is taken once");
                let wait = Instant::now();
                let answer = match crate::runtime::block_on(rx) {
                    Ok(received) => received.map_err(|e| Error::Internal(format!("receive task failed: {e}")))?,
                    Err(Error::Interrupted) => {
                        // A worker asked to stop or reload: abandon the pending polls, store what we have.
                        abort.abort();
                        in_flight.drain(..).for_each(|f| f.handle.abort());
                        unrequested = 0;
                        confirmed_once = true;
                        saw_empty = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let got = match answer {
                    Ok(got) => got,
                    // SQS throttled this receive after the client's own retries: fewer receives in flight, and the
                    // call goes on while others may still answer. Alone and throttled, the call fails (53400).
                    Err(Error::Sqs { class: FailureClass::Throttled, .. })
                        if control.limit() > 1 || !in_flight.is_empty() =>
                    {
                        control.throttled(now());
                        unrequested += f.requested;
                        // A throttled confirming poll confirmed nothing: it is tried again.
                        confirming = false;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if confirming {
                    // The long poll's wait was not receiving: the window (maybe carried into the next call)
                    // starts again when it returns.
                    control.skip_window(now());
                } else {
                    control.received(got.len(), wait.elapsed().as_secs_f64(), now());
                }
                unrequested += f.requested - got.len() as i64;
                if got.is_empty() {
                    saw_empty = true;
                } else if confirming {
                    // The queue was not empty after all: resume draining (or hand the batch to a worker's commit).
                    confirming = false;
                    saw_empty = false;
                    confirmed_once = self.opts.return_after_wake;
                    woke = true;
                }
                pending.messages.extend(got);
            }
            if confirming && saw_empty && in_flight.is_empty() {
                confirmed_once = true;
            }
            if pending.messages.len() == before {
                continue;
            }
            // Refill the pipeline before the database work, so receives overlap the inserts.
            if woke && self.opts.return_after_wake {
                unrequested = 0;
            } else {
                self.top_up(&mut in_flight, &mut unrequested, saw_empty, control.limit());
            }
            // While more receives are on their way, gather them into larger batches: fewer statements, and fewer
            // waits on the network thread, per message.
            if pending.messages.len() < STORE_AT && !in_flight.is_empty() && !woke {
                continue;
            }
            self.store(std::mem::take(&mut pending.messages))?;
            if self.opts.progress_notices && !progress_every.is_zero() && Instant::now() >= next_progress {
                let s = &self.summary;
                let secs = started.elapsed().as_secs_f64();
                notice!(
                    "sqs_ingest: {} received, {} inserted, {} duplicates, {} dead-lettered in {:.0} s ({:.0} msg/s)",
                    s.received,
                    s.inserted,
                    s.duplicates,
                    s.dead_lettered,
                    secs,
                    s.received as f64 / secs.max(0.001)
                );
                next_progress = Instant::now() + progress_every;
            }
        }
        Ok(saw_empty && unrequested > 0)
    }

    fn store(&mut self, mut batch: Vec<Received>) -> Result<()> {
        // The deletes an earlier batch left running may be waiting for its standbys: settled here too, not only
        // from the waits on the network (a batch may spend its time in the database).
        crate::replication::poll();
        let limits = self.target.limits;
        // For the lag metric; a SentTimestamp outside years 2000..9999 (a faulty endpoint) is ignored.
        let plausible = |ms: &i64| (946_684_800_000..253_402_300_799_000).contains(ms);
        if let Some(oldest) = batch.iter().filter_map(|m| m.sent_timestamp_ms).filter(plausible).min() {
            self.summary.oldest_sent_ms = Some(self.summary.oldest_sent_ms.map_or(oldest, |o| o.min(oldest)));
        }
        let mut seen = HashSet::with_capacity(batch.len());
        let mut receipts = Vec::with_capacity(batch.len());
        let mut candidates = Vec::with_capacity(batch.len());
        let (mut ids, mut outcomes) = (Vec::with_capacity(batch.len()), Vec::with_capacity(batch.len()));
        let mut no_receipt = HashSet::new();
        let filter = self.layout.and_then(|l| l.filter.as_ref().map(|(f, fate)| (&l.mapping, f, *fate)));
        // With a filter, each message's receipt is kept: those it releases are marked in the hold below.
        let mut receipt_at: Vec<Option<String>> = Vec::new();
        for (i, m) in batch.iter_mut().enumerate() {
            let receipt = std::mem::take(&mut m.receipt_handle);
            if receipt.is_empty() {
                no_receipt.insert(i);
            } else {
                if filter.is_some() {
                    receipt_at.resize(i, None);
                    receipt_at.push(Some(receipt.clone()));
                }
                receipts.push((receipt, m.receive_count.unwrap_or(1)));
            }
        }
        // Held by this transaction from now on: a COMMIT deletes them, an abort (even one that lands inside the
        // inserts below) releases them.
        let held = receipts.len() as i64;
        hold::hold(self.client, &self.queue.url, receipts, gucs::visibility_timeout_s());
        // A pipeline's filter, evaluated before the columns: a message it does not match is never a row. Those it
        // releases go back to the queue at COMMIT, visible again after the visibility timeout.
        let (verdicts, fate) = match filter {
            Some((mapping, filter, fate)) => (filter_batch(mapping, filter, &batch)?, Some(fate)),
            None => (Vec::new(), None),
        };
        let filtered = |i: usize| verdicts.get(i).cloned().unwrap_or(FilterVerdict::Match);
        let mut released = HashSet::new();
        if fate == Some(pipeline::FilterFate::Release) {
            for (i, receipt) in receipt_at.iter().enumerate() {
                if let (FilterVerdict::NoMatch, Some(r)) = (filtered(i), receipt) {
                    released.insert(r.clone());
                }
            }
            hold::release_at_end(&self.queue.url, &released, gucs::visibility_timeout_s());
        }
        self.summary.deleted += held - released.len() as i64;
        let max_receives = gucs::max_receive_count();
        for (i, mut m) in batch.into_iter().enumerate() {
            self.summary.received += 1;
            // Every message is accounted for: one SQS delivered without a MessageId (never, by its API) is kept
            // as a dead letter under a keyed digest of its body, one without a receipt handle as a dead letter
            // under its MessageId (it cannot be deleted; its redelivery is then a duplicate).
            let anomaly = if m.message_id.is_empty() {
                let digest = self.key.body_digest(m.body.as_bytes());
                m.message_id = digest[..16].iter().fold(String::from("no-message-id:"), |mut id, b| {
                    id.push_str(&format!("{b:02x}"));
                    id
                });
                Some(Rejection::NoMessageId)
            } else if no_receipt.contains(&i) {
                Some(Rejection::NoReceiptHandle)
            } else {
                None
            };
            if !seen.insert(m.message_id.clone()) {
                self.summary.duplicates += 1;
                continue;
            }
            let receive_count = m.receive_count.unwrap_or(1);
            if let (None, FilterVerdict::Failed(sqlstate)) = (&anomaly, filtered(i)) {
                // Kept as a dead letter whatever the fate: an error is neither a match nor a miss.
                ids.push(m.message_id.clone());
                outcomes.push("dead_letter".to_string());
                candidates.push((m, Err(Rejection::FilterFailed { sqlstate })));
                continue;
            }
            if anomaly.is_none() && filtered(i) == FilterVerdict::NoMatch {
                match fate {
                    // Back to the queue at the end of the transaction; not in the ledger (it may come back).
                    Some(pipeline::FilterFate::Release) => {
                        self.summary.filtered += 1;
                        continue;
                    }
                    Some(pipeline::FilterFate::DeadLetter) => {
                        ids.push(m.message_id.clone());
                        outcomes.push("dead_letter".to_string());
                        candidates.push((m, Err(Rejection::Filtered)));
                    }
                    _ => {
                        ids.push(m.message_id.clone());
                        outcomes.push("filtered".to_string());
                        candidates.push((m, Ok(Verdict::Filtered)));
                    }
                }
                continue;
            }
            let verdict = match anomaly {
                Some(reason) => Err(reason),
                None if max_receives > 0 && receive_count > max_receives => {
                    Err(Rejection::TooManyReceives { receive_count, limit: max_receives })
                }
                None => match self.layout {
                    None => {
                        event::parse(&m.body).and_then(|e| event::validate(&e, &limits).map(|v| Verdict::Login(e, v)))
                    }
                    Some(layout) => {
                        let mut values = Vec::with_capacity(layout.mapping.columns.len());
                        layout.mapping.extract(&view(&m), Some(self.key), &mut values).map(|()| Verdict::Values(values))
                    }
                },
            };
            ids.push(m.message_id.clone());
            outcomes.push(if verdict.is_ok() { "stored" } else { "dead_letter" }.to_string());
            candidates.push((m, verdict));
        }
        let fresh = as_owner(self.owner, || bookkeeping::claim(self.ledger_queue, ids, outcomes))?;

        let mut rows = Rows::default();
        let mut texts = self.layout.map(|l| TextRows::new(l.rows.clone()));
        let mut row_messages = Vec::with_capacity(candidates.len());
        let mut dead = DeadLetters::default();
        for (m, verdict) in candidates {
            if !fresh.contains(&m.message_id) {
                self.summary.duplicates += 1;
                continue;
            }
            match verdict {
                Ok(Verdict::Login(e, version)) => {
                    rows.push(self.key, self.opts.method, e, version, m.sent_timestamp_ms)?;
                    row_messages.push(m);
                }
                Ok(Verdict::Filtered) => self.summary.filtered += 1,
                Ok(Verdict::Values(values)) => {
                    texts.as_mut().expect("a pipeline's rows").push(values);
                    row_messages.push(m);
                }
                Err(reason) => dead.push(self.key, m, &reason),
            }
        }
        let refused = match texts {
            Some(texts) => rows::insert_isolated(texts, self.target)?,
            None => rows::insert_isolated(rows, self.target)?,
        };
        let inserted = (row_messages.len() - refused.len()) as i64;
        if !refused.is_empty() {
            // Rows the table refused become dead letters like any other rejection (redrivable once fixed).
            let mut messages: Vec<Option<Received>> = row_messages.into_iter().map(Some).collect();
            let mut ids = Vec::with_capacity(refused.len());
            for (i, reason) in refused {
                let m = messages[i].take().expect("each refused row once");
                ids.push(m.message_id.clone());
                dead.push(self.key, m, &reason);
            }
            as_owner(self.owner, || bookkeeping::mark_dead_letters(self.ledger_queue, ids))?;
        }
        let dead_count = dead.message_ids.len() as i64;
        as_owner(self.owner, || {
            bookkeeping::store_dead_letters(
                &self.queue.url,
                self.key.id(),
                self.schema,
                self.pipeline_name().zip(self.pipeline_id()),
                dead,
            )
        })?;
        self.summary.inserted += inserted;
        self.summary.dead_lettered += dead_count;
        Ok(())
    }
}
