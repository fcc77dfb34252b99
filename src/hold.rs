//! Messages held by the current transaction.
//!
//! Received messages stay invisible on the queue while their transaction runs: a background task extends their
//! visibility before it expires. When the transaction commits, they are deleted (DeleteMessageBatch, positional
//! ids, per-entry failures counted). When it aborts, or the subtransaction that received them rolls back, they
//! are released (visibility 0) so another consumer can take them at once — unless the transaction failed for a
//! transient reason (a serialization failure, deadlock, lock timeout, lack of disk or memory: see
//! [`back_off_on_abort`]), when each message comes back after a backoff that grows with its
//! `ApproximateReceiveCount` (2, 4, 8, ... seconds, at most 256), so a database in trouble is not hammered.
//! Before any delete, the commit is made durable as `sqs_ingest.delete_after` requires (see
//! [`crate::replication`]): flushed locally, and flushed by the standbys the setting names; a commit they do not
//! confirm in time leaves its messages in the queue (deferred: they come back and are recognised as duplicates).
//! Nothing here may raise after commit: failures become WARNINGs and counters.

use crate::sqs::{self, BatchOutcome};
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Entry {
    queue: usize,
    receipt: String,
    subxact: pg_sys::SubTransactionId,
    /// SQS ApproximateReceiveCount when received (1 if unknown).
    receive_count: i32,
    /// Released (visible again after this many seconds) when the transaction commits, instead of deleted.
    release_after: Option<i32>,
}

/// Visibility timeout (seconds) of a message released after a transient failure: 2^receive_count, at most 256.
pub fn backoff_s(receive_count: i32) -> i32 {
    1i32 << receive_count.clamp(1, 8) // 2, 4, ..., 256
}

#[derive(Default)]
struct Shared {
    queues: Vec<(sqs::Client, String)>,
    entries: Vec<Entry>,
}

struct Hold {
    shared: Arc<Mutex<Shared>>,
    heartbeat: tokio::task::JoinHandle<()>,
}

/// Delete outcomes of this backend's commits, waiting to be added to `sqs_ingest.stats` by its next ingest.
#[derive(Debug, Clone, Default)]
pub struct PostCommit {
    pub queue_url: String,
    pub outcome: BatchOutcome,
}

/// Messages of a commit whose standbys did not confirm it: left in the queue (see [`crate::replication`]).
#[derive(Debug, Clone, Default)]
pub struct Deferred {
    pub queue_url: String,
    /// The worker label and pipeline of the call that committed them (see [`label`]).
    pub worker: String,
    pub pipeline: String,
    pub messages: u64,
    /// The end of the commit's WAL that was not confirmed.
    pub lsn: u64,
    /// When the commit happened (ms since the Unix epoch).
    pub at_ms: i64,
}

/// What one queue's delete task of a commit did.
#[derive(Debug, Clone, Copy, Default)]
struct Done {
    outcome: BatchOutcome,
    /// Messages not deleted because the commit was not confirmed by its standbys.
    deferred: u64,
}

thread_local! {
    static HOLD: RefCell<Option<Hold>> = const { RefCell::new(None) };
    static LAST_COMMIT: Cell<BatchOutcome> = const { Cell::new(BatchOutcome { succeeded: 0, failed: 0 }) };
    static UNREPORTED: RefCell<Vec<PostCommit>> = const { RefCell::new(Vec::new()) };
    /// The current transaction is failing for a transient reason: its messages are released with a backoff.
    static BACK_OFF: Cell<bool> = const { Cell::new(false) };
    /// The next commit may leave its deletes running while the caller goes on (see [`overlap_next_commit`]).
    static OVERLAP_NEXT: Cell<bool> = const { Cell::new(false) };
    /// Deletes a commit left running, finished (or stopped) by [`finish_pending`].
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
    /// While `sqs_ingest_drain` runs (see [`drain_deletes`]): the delete outcomes of its commits so far.
    static DRAIN: Cell<Option<BatchOutcome>> = const { Cell::new(None) };
    /// `XactLastCommitEnd` before this transaction's COMMIT (see [`crate::replication::commit_lsn`]).
    static COMMIT_END_BEFORE: Cell<u64> = const { Cell::new(0) };
    /// Deferred deletes not yet saved for `sqs_ingest.stats` (taken by [`take_deferred`]).
    static DEFERRED: RefCell<Vec<Deferred>> = const { RefCell::new(Vec::new()) };
    /// The worker label and pipeline of the current call (see [`label`]).
    static LABEL: RefCell<(String, String)> = const { RefCell::new((String::new(), String::new())) };
}

/// `sqs_ingest.drain_deletes(start)`, called by `sqs_ingest_drain` before its first batch (`start`) and after its
/// last (0.8.0). Starting collects the delete outcomes of the procedure's commits from now on (and lets its batches
/// overlap their deletes with the next batch, [`draining`]); ending waits for the deletes still running and
/// returns the total, and stops collecting. An abort stops the collection too.
pub fn drain_deletes(start: bool) -> BatchOutcome {
    // An abort must be able to stop the collection (the hooks may not be registered yet in a fresh backend).
    crate::xact::ensure_registered();
    finish_pending(); // adds what finishes to a running collection
    if start {
        DRAIN.set(Some(BatchOutcome::default()));
        return BatchOutcome::default();
    }
    DRAIN.take().unwrap_or_default()
}

/// Whether `sqs_ingest_drain` is collecting delete outcomes (its batches may overlap their deletes).
pub fn draining() -> bool {
    DRAIN.get().is_some()
}

fn add_to_drain(outcome: BatchOutcome) {
    if let Some(mut total) = DRAIN.get() {
        total.succeeded += outcome.succeeded;
        total.failed += outcome.failed;
        DRAIN.set(Some(total));
    }
}

/// Deletes of a committed transaction still running on the network thread.
struct Pending {
    url: String,
    n: u64,
    task: tokio::task::JoinHandle<Done>,
    /// Its commit's `sqs_ingest.post_commit_timeout`.
    deadline: std::time::Instant,
    /// The end of its commit's WAL, when it committed (ms since the Unix epoch), and the call's label.
    lsn: u64,
    at_ms: i64,
    label: (String, String),
}

/// Lets the next commit of this backend leave its deletes running on the network thread while the caller receives
/// and stores its next batch (a background worker with a full batch: more is likely waiting). The deletes still
/// start only after the commit; they are waited for — within their own `sqs_ingest.post_commit_timeout` — by the
/// next commit (so at most one batch's deletes run on), by [`finish_pending`], or at the worker's exit. Their
/// outcome reaches the counters then. An abort clears it.
pub fn overlap_next_commit() {
    crate::xact::ensure_registered();
    OVERLAP_NEXT.set(true);
}

/// Waits for the deletes an earlier commit left running (each until its own deadline, or until the backend is
/// told to terminate); their outcomes are recorded for the counters.
pub fn finish_pending() {
    finish_pending_with(true)
}

/// [`finish_pending`] for a background worker that is stopping: its deletes get their deadline although the
/// worker was asked to stop (they are bounded by it, and otherwise come back as duplicates).
pub fn finish_pending_at_exit() {
    finish_pending_with(false)
}

fn finish_pending_with(honour_terminate: bool) {
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    wait_all(pending, honour_terminate);
}

/// Waits for each queue's delete task (see [`wait_for_deletes`]), records each outcome for the counters and adds
/// it to a running drain's total. Returns the total.
fn wait_all(pending: Vec<Pending>, honour_terminate: bool) -> BatchOutcome {
    let mut total = BatchOutcome::default();
    for Pending { url, n, task, deadline, lsn, at_ms, label } in pending {
        let Done { outcome, deferred } = wait_for_deletes(task, n, &url, deadline, honour_terminate);
        total.succeeded += outcome.succeeded;
        total.failed += outcome.failed;
        if deferred > 0 {
            pgrx::warning!(
                "sqs_ingest: {deferred} messages stored by the committed transaction were left in {url}: its standbys did not confirm the commit in time (sqs_ingest.delete_after); they will be redelivered and recognised as duplicates"
            );
            let (worker, pipeline) = label;
            let d = Deferred { queue_url: url.clone(), worker, pipeline, messages: deferred, lsn, at_ms };
            DEFERRED.with(|all| all.borrow_mut().push(d));
        }
        UNREPORTED.with(|u| u.borrow_mut().push(PostCommit { queue_url: url, outcome }));
    }
    add_to_drain(total);
    total
}

/// Waits for one queue's delete task until `deadline` (or, with `honour_terminate`, until the backend is told to
/// terminate); warns (never raises) about what was not deleted.
fn wait_for_deletes(
    task: tokio::task::JoinHandle<Done>,
    n: u64,
    url: &str,
    deadline: std::time::Instant,
    honour_terminate: bool,
) -> Done {
    let abort = task.abort_handle();
    let waited = crate::runtime::block_on_until(task, deadline, honour_terminate);
    let done = match waited {
        Some(Ok(done)) => done,
        Some(Err(_)) => Done { outcome: BatchOutcome { succeeded: 0, failed: n }, deferred: 0 },
        None => {
            abort.abort();
            pgrx::warning!(
                "sqs_ingest: deletes after COMMIT stopped (sqs_ingest.post_commit_timeout passed, or the backend is terminating); {n} messages from {url} may be redelivered and will be recognised as duplicates"
            );
            Done { outcome: BatchOutcome { succeeded: 0, failed: n }, deferred: 0 }
        }
    };
    let outcome = done.outcome;
    if outcome.failed > 0 {
        pgrx::warning!(
            "sqs_ingest: {} of {} messages stored by the committed transaction could not be deleted from {url}; they will be redelivered and recognised as duplicates",
            outcome.failed,
            n
        );
    }
    done
}

/// Marks the current transaction as failing for a transient reason (the caller is about to raise): when it aborts,
/// its messages are released with [`backoff_s`] instead of at once.
pub fn back_off_on_abort() {
    BACK_OFF.set(true);
}

/// Takes ownership of received messages for the current (sub)transaction.
pub fn hold(client: &sqs::Client, queue_url: &str, receipts: Vec<(String, i32)>, visibility_s: i32) {
    if receipts.is_empty() {
        return;
    }
    crate::xact::ensure_registered();
    // SAFETY: reading the current subtransaction id inside a transaction on the main thread.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    HOLD.with(|h| {
        let mut h = h.borrow_mut();
        let hold = h.get_or_insert_with(|| start(visibility_s));
        let mut shared = hold.shared.lock().expect("hold lock");
        let queue = match shared.queues.iter().position(|(_, u)| u == queue_url) {
            Some(i) => i,
            None => {
                shared.queues.push((client.clone(), queue_url.to_string()));
                shared.queues.len() - 1
            }
        };
        shared.entries.extend(receipts.into_iter().map(|(receipt, receive_count)| Entry {
            queue,
            receipt,
            subxact,
            receive_count,
            release_after: None,
        }));
    });
}

/// Marks held messages to be released when the transaction commits, visible again after `delay_s` seconds,
/// instead of deleted: a pipeline's filter left them in the queue for another consumer. (An abort releases them
/// like every held message.) The delay keeps this consumer from taking them straight back.
pub fn release_at_end(queue_url: &str, receipts: &std::collections::HashSet<String>, delay_s: i32) {
    if receipts.is_empty() {
        return;
    }
    HOLD.with(|h| {
        if let Some(hold) = h.borrow().as_ref() {
            if let Ok(mut s) = hold.shared.lock() {
                let Some(queue) = s.queues.iter().position(|(_, u)| u == queue_url) else { return };
                s.entries
                    .iter_mut()
                    .filter(|e| e.queue == queue && receipts.contains(&e.receipt))
                    .for_each(|e| e.release_after = Some(delay_s));
            }
        }
    });
}

/// How many messages the current transaction holds.
pub fn held_count() -> usize {
    HOLD.with(|h| h.borrow().as_ref().map_or(0, |hold| hold.shared.lock().map_or(0, |s| s.entries.len())))
}

fn start(visibility_s: i32) -> Hold {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let for_task = shared.clone();
    // Extend at a third of the timeout, so two extensions can fail before a message becomes visible again.
    let period = Duration::from_millis((visibility_s.max(1) as u64 * 1000) / 3);
    let enabled = crate::gucs::visibility_heartbeat();
    let heartbeat = crate::runtime::runtime().spawn(async move {
        if !enabled {
            return;
        }
        loop {
            tokio::time::sleep(period).await;
            let groups = snapshot(&for_task);
            for (client, url, receipts) in groups {
                sqs::change_visibility(&client, &url, &receipts, visibility_s, 4).await;
            }
        }
    });
    Hold { shared, heartbeat }
}

type Group = (sqs::Client, String, Vec<String>);

fn snapshot(shared: &Mutex<Shared>) -> Vec<Group> {
    let Ok(s) = shared.lock() else { return Vec::new() };
    group(&s.queues, s.entries.iter().map(|e| (e.queue, e.receipt.clone())))
}

/// Receipt handles per queue, from `(queue index, receipt)` pairs.
fn group(queues: &[(sqs::Client, String)], entries: impl Iterator<Item = (usize, String)>) -> Vec<Group> {
    let mut groups: Vec<Group> = queues.iter().map(|(c, u)| (c.clone(), u.clone(), Vec::new())).collect();
    for (queue, receipt) in entries {
        groups[queue].2.push(receipt);
    }
    groups.retain(|g| !g.2.is_empty());
    groups
}

/// The queues a hold knows, its entries, and its heartbeat task.
type Taken = (Vec<(sqs::Client, String)>, Vec<Entry>, tokio::task::JoinHandle<()>);

fn take_entries() -> Option<Taken> {
    let hold = HOLD.with(|h| h.borrow_mut().take())?;
    let (queues, entries) =
        hold.shared.lock().map(|mut s| (s.queues.clone(), std::mem::take(&mut s.entries))).unwrap_or_default();
    Some((queues, entries, hold.heartbeat))
}

/// The committed transaction's messages to delete, those to release (each group with its delay), and the
/// heartbeat task.
#[allow(clippy::type_complexity)]
fn take() -> Option<(Vec<Group>, Vec<(Group, i32)>, tokio::task::JoinHandle<()>)> {
    let (queues, entries, heartbeat) = take_entries()?;
    let (release, delete): (Vec<Entry>, Vec<Entry>) = entries.into_iter().partition(|e| e.release_after.is_some());
    let mut by_delay: std::collections::BTreeMap<i32, Vec<Entry>> = std::collections::BTreeMap::new();
    for e in release {
        by_delay.entry(e.release_after.unwrap_or(0)).or_default().push(e);
    }
    let released = by_delay
        .into_iter()
        .flat_map(|(delay, entries)| {
            group(&queues, entries.into_iter().map(|e| (e.queue, e.receipt))).into_iter().map(move |g| (g, delay))
        })
        .collect();
    Some((group(&queues, delete.into_iter().map(|e| (e.queue, e.receipt))), released, heartbeat))
}

/// Deletes the committed transaction's messages. The transaction still holds its locks until this returns, so the
/// whole phase is bounded by `sqs_ingest.post_commit_timeout` whatever the batch size, and ends early when the
/// backend is told to terminate (pg_terminate_backend, fast shutdown). Messages not deleted then are redelivered
/// after their visibility timeout and recognised as duplicates by the ledger.
fn after_commit() {
    BACK_OFF.set(false);
    let overlap = OVERLAP_NEXT.replace(false);
    let Some((groups, released, heartbeat)) = take() else { return };
    heartbeat.abort();
    release_after(released);
    // Durable before deleted: flushed locally whatever synchronous_commit was at COMMIT (usually already done),
    // then confirmed by the standbys sqs_ingest.delete_after names, within standby_wait_timeout.
    let lsn = crate::replication::commit_lsn(COMMIT_END_BEFORE.get());
    if let Some(lsn) = lsn {
        crate::replication::flush_locally(lsn);
    }
    let now = std::time::Instant::now();
    let post_commit_ms = crate::gucs::post_commit_timeout_ms();
    let deadline = now + Duration::from_millis(post_commit_ms);
    // The standbys' wait leaves a quarter of the phase to the deletes, so a gate settled at its deadline is counted
    // as deferred, not as a delete stopped by post_commit_timeout.
    let confirm_by = now + Duration::from_millis(crate::gucs::standby_wait_timeout_ms().min(post_commit_ms * 3 / 4));
    let label = LABEL.with(|l| l.borrow().clone());
    let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    // DeleteMessageBatch calls in flight: twice as many as receives may be (at a real round trip the deletes of a
    // large transaction are a phase of their own, 1,000 calls per 10,000 messages, and the transaction holds its
    // locks while they run).
    let concurrency = crate::gucs::delete_concurrency();
    // This commit's deletes start first; then those an earlier commit left running are waited for (each until
    // its own, earlier, deadline), so the whole hook stays within this commit's post_commit_timeout.
    let started: Vec<Pending> = groups
        .into_iter()
        .map(|(client, url, receipts)| {
            // On the network thread, beside the connections: the main thread only waits for the total.
            let n = receipts.len() as u64;
            let task_url = url.clone();
            // No commit record to confirm (never, for a transaction holding messages): leave them in the queue.
            let gate = match lsn {
                Some(lsn) => crate::replication::gate(lsn, confirm_by),
                None => crate::replication::Gate::Deferred,
            };
            let task = crate::runtime::runtime().spawn(async move {
                if !gate.passed().await {
                    return Done { outcome: BatchOutcome::default(), deferred: n };
                }
                Done { outcome: sqs::delete(&client, &task_url, &receipts, concurrency).await, deferred: 0 }
            });
            Pending { url, n, task, deadline, lsn: lsn.unwrap_or(0), at_ms, label: label.clone() }
        })
        .collect();
    finish_pending();
    if overlap {
        PENDING.with(|p| p.borrow_mut().extend(started));
        LAST_COMMIT.set(BatchOutcome::default());
        return;
    }
    LAST_COMMIT.set(wait_all(started, true));
}

/// Sets each group's messages visible after the given number of seconds.
fn release_after(groups: Vec<(Group, i32)>) {
    for ((client, url, receipts), visibility_s) in groups {
        // Best effort: if this fails the messages reappear when their visibility timeout ends anyway.
        crate::runtime::block_on_uninterruptible(async {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                sqs::change_visibility(&client, &url, &receipts, visibility_s, 8),
            )
            .await;
        });
    }
}

fn after_abort() {
    OVERLAP_NEXT.set(false);
    DRAIN.set(None);
    let back_off = BACK_OFF.replace(false);
    let Some((queues, entries, heartbeat)) = take_entries() else { return };
    heartbeat.abort();
    release_entries(&queues, entries, back_off);
}

/// Releases entries at once, or (after a transient failure) each after its [`backoff_s`].
fn release_entries(queues: &[(sqs::Client, String)], entries: Vec<Entry>, back_off: bool) {
    if !back_off {
        let groups = group(queues, entries.into_iter().map(|e| (e.queue, e.receipt)));
        return release_after(groups.into_iter().map(|g| (g, 0)).collect());
    }
    let mut by_delay: std::collections::BTreeMap<i32, Vec<Entry>> = std::collections::BTreeMap::new();
    for e in entries {
        by_delay.entry(backoff_s(e.receive_count)).or_default().push(e);
    }
    let groups = by_delay
        .into_iter()
        .flat_map(|(delay, entries)| {
            group(queues, entries.into_iter().map(|e| (e.queue, e.receipt))).into_iter().map(move |g| (g, delay))
        })
        .collect();
    release_after(groups);
}

fn after_subxact_abort(my: pg_sys::SubTransactionId) {
    // A transient failure caught by the caller's exception block backs off the messages of that subtransaction.
    let back_off = BACK_OFF.replace(false);
    let taken = HOLD.with(|h| {
        let h = h.borrow();
        let hold = h.as_ref()?;
        let mut s = hold.shared.lock().ok()?;
        let (gone, kept): (Vec<Entry>, Vec<Entry>) =
            std::mem::take(&mut s.entries).into_iter().partition(|e| e.subxact >= my);
        s.entries = kept;
        Some((s.queues.clone(), gone))
    });
    if let Some((queues, gone)) = taken {
        release_entries(&queues, gone, back_off);
    }
}

fn after_subxact_commit(my: pg_sys::SubTransactionId, parent: pg_sys::SubTransactionId) {
    HOLD.with(|h| {
        if let Some(hold) = h.borrow().as_ref() {
            if let Ok(mut s) = hold.shared.lock() {
                s.entries.iter_mut().filter(|e| e.subxact >= my).for_each(|e| e.subxact = parent);
            }
        }
    });
}

/// Before COMMIT: a transaction holding messages gets a transaction id (so it writes a commit record), and where
/// the backend's last commit record ended is remembered, to find this one's end after COMMIT.
fn before_commit() {
    if held_count() > 0 {
        // Its COMMIT then writes a commit record, whose end is what the deletes wait to be durable.
        crate::replication::assign_transaction_id();
    }
    COMMIT_END_BEFORE.set(crate::replication::last_commit_end());
}

/// Refuses PREPARE TRANSACTION while the transaction holds messages: they are deleted from SQS by the session
/// that commits, and a prepared transaction is committed (or not) later, maybe by another session.
fn before_prepare() {
    // A prepared transaction is committed later, maybe by another session: nothing of this one carries over.
    OVERLAP_NEXT.set(false);
    DRAIN.set(None);
    if held_count() > 0 {
        pgrx::pg_sys::panic::ErrorReport::new(
            pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "sqs_ingest cannot be used in a transaction that is prepared for two-phase commit",
            "sqs_ingest",
        )
        .set_hint(
            "Its messages are deleted from SQS by the session that commits; call sqs_ingest() in an ordinary transaction.",
        )
        .report(pgrx::PgLogLevel::ERROR)
    }
}

/// This module's transaction hooks (registered first: a PREPARE of a transaction holding messages is refused
/// before anything else runs).
pub fn xact_hooks() -> crate::xact::Hooks {
    crate::xact::Hooks {
        pre_prepare: Some(before_prepare),
        pre_commit: Some(before_commit),
        commit: Some(after_commit),
        abort: Some(after_abort),
        subxact_abort: Some(after_subxact_abort),
        subxact_commit: Some(after_subxact_commit),
        ..Default::default()
    }
}

/// Outcome of the deletes after this backend's last commit that held messages.
pub fn last_commit() -> BatchOutcome {
    LAST_COMMIT.get()
}

/// Names the current call (its worker label and pipeline, "" for the login pipeline): deferred deletes of its
/// commits are counted under them.
pub fn label(worker: &str, pipeline: &str) {
    LABEL.with(|l| *l.borrow_mut() = (worker.to_string(), pipeline.to_string()));
}

/// Deferred deletes not yet saved for the counters (taken, so each is saved once).
pub fn take_deferred() -> Vec<Deferred> {
    DEFERRED.with(|d| std::mem::take(&mut *d.borrow_mut()))
}

/// Post-commit delete outcomes not yet written to the counters (taken, so each is written once).
pub fn take_unreported() -> Vec<PostCommit> {
    UNREPORTED.with(|u| std::mem::take(&mut *u.borrow_mut()))
}
