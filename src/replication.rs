//! How durable a commit is before its messages are deleted from SQS (ground floor; the rule is
//! `sqs_ingest_core::durability`, the setting `sqs_ingest.delete_after`).
//!
//! In the commit hook, before any DeleteMessageBatch: the commit's WAL is flushed locally ([`flush_locally`]),
//! whatever `synchronous_commit` was at COMMIT (SET LOCAL after the call, a function, a role's setting), and a
//! [`Gate`] says whether the standbys the rule names have flushed it too. A gate that must wait is settled by the
//! main thread ([`poll`]: it reads the WAL senders' and replication slots' positions from shared memory, as
//! `pg_stat_replication` and `pg_replication_slots` do), from every wait on the network ([`crate::runtime`]), so a
//! worker's or a drain's deletes wait off the main thread while it stores the next batch. The delete tasks on the
//! network thread only read the gate's outcome; they never touch Postgres.

use pgrx::pg_sys;
use sqs_ingest_core::durability::{self, DeleteAfter, Standby, Verdict};
use std::cell::RefCell;
use std::time::Instant;
use tokio::sync::watch;

/// The end of a committed transaction's commit record: what its deletes depend on. `None` when this COMMIT wrote
/// none (`XactLastCommitEnd` did not move since `commit_end_before`, read before COMMIT); the commit hook never
/// lets that happen for a transaction holding messages (see [`crate::hold`], which assigns it a transaction id
/// before COMMIT), and defers the deletes if it does. A transaction's commit record comes after every commit its
/// statements saw, so it also covers the commits that stored the messages it recognised as duplicates.
pub fn commit_lsn(commit_end_before: u64) -> Option<u64> {
    // SAFETY: a backend-local global, on the main thread.
    let end = unsafe { pg_sys::XactLastCommitEnd };
    (end != commit_end_before && end != 0).then_some(end)
}

/// `XactLastCommitEnd` now (read before COMMIT, for [`commit_lsn`]).
pub fn last_commit_end() -> u64 {
    // SAFETY: a backend-local global, on the main thread.
    unsafe { pg_sys::XactLastCommitEnd }
}

/// Makes sure the current transaction has a transaction id, so its COMMIT writes a commit record (called before
/// COMMIT by a transaction that holds messages; one that stored or recognised any already has one).
pub fn assign_transaction_id() {
    // SAFETY: inside a transaction on the main thread, before COMMIT; a primary (a standby holds no messages).
    unsafe {
        pg_sys::GetTopTransactionId();
    }
}

/// Flushes the local WAL up to `lsn` (returns at once when it is already flushed: the usual case with
/// `synchronous_commit` on). A failure to write WAL is a PANIC in Postgres itself.
pub fn flush_locally(lsn: u64) {
    // SAFETY: XLogFlush may be called outside a transaction (Postgres' own commit path and checkpointer do); `lsn`
    // is the end of a commit record already inserted.
    unsafe { pg_sys::XLogFlush(lsn) }
}

/// Whether a slot was invalidated (it can never serve its standby again).
///
/// # Safety
/// `slot` points to a copy of a replication slot's persistent data.
unsafe fn invalidated(slot: &pg_sys::ReplicationSlotPersistentData) -> bool {
    #[cfg(feature = "pg15")]
    {
        slot.invalidated_at != 0
    }
    #[cfg(not(feature = "pg15"))]
    {
        slot.invalidated != pg_sys::ReplicationSlotInvalidationCause::RS_INVAL_NONE
    }
}

/// The standbys this primary knows, and how many of them are known only while they are connected (slot-less
/// standbys and standbys streaming through a temporary slot, `wal_receiver_create_temp_slot`).
///
/// * Each physical replication slot that holds WAL for a standby: its `restart_lsn` is the position its standby
///   last reported flushed; connected while a WAL sender holds it. With `sqs_ingest.standby_slots` set, only the
///   slots it names. Not standbys: logical slots, slots never reserved or invalidated (no standby can stream
///   from them), `pg_basebackup`'s temporary slots.
/// * Unless `sqs_ingest.standby_slots` is set, each WAL sender streaming to a physical standby without a slot,
///   but not one that reports writes and never a flush (`pg_receivewal` without `--synchronous`).
/// * A slot `sqs_ingest.standby_slots` names that is missing or cannot serve a standby counts as a standby that is
///   down (it holds every commit back, as PostgreSQL's `synchronized_standby_slots` does): a typo never turns the
///   protection off.
pub fn standbys() -> (Vec<Standby>, usize) {
    let named = crate::gucs::standby_slots();
    let mut found = vec![false; named.len()];
    let (mut out, mut ephemeral) = (Vec::new(), 0);
    let mut slot_holders = Vec::new();
    // SAFETY: the shared arrays Postgres sizes by max_replication_slots and max_wal_senders, read on the main thread
    // with each entry's spinlock held, as pg_get_replication_slots() and pg_stat_get_wal_senders() do.
    unsafe {
        let slots = pg_sys::ReplicationSlotCtl;
        if !slots.is_null() {
            let base = (*slots).replication_slots.as_mut_ptr();
            for i in 0..pg_sys::max_replication_slots.max(0) as usize {
                let slot = base.add(i);
                if !(*slot).in_use {
                    continue;
                }
                pg_sys::SpinLockAcquire(&mut (*slot).mutex);
                let (in_use, holder, data) = ((*slot).in_use, (*slot).active_pid, (*slot).data);
                pg_sys::SpinLockRelease(&mut (*slot).mutex);
                if !in_use {
                    continue;
                }
                if holder != 0 {
                    slot_holders.push(holder);
                }
                let name = std::ffi::CStr::from_ptr(data.name.data.as_ptr()).to_string_lossy();
                let temporary = data.persistency == pg_sys::ReplicationSlotPersistency::RS_TEMPORARY;
                let persistent = data.persistency == pg_sys::ReplicationSlotPersistency::RS_PERSISTENT;
                let physical = data.database == pg_sys::InvalidOid;
                if !physical
                    || data.restart_lsn == 0
                    || invalidated(&data)
                    || !(persistent || temporary)
                    || (temporary && name.starts_with("pg_basebackup_"))
                {
                    continue;
                }
                if !named.is_empty() {
                    match named.iter().position(|n| *n == name) {
                        Some(i) if persistent => found[i] = true,
                        _ => continue,
                    }
                }
                ephemeral += usize::from(temporary);
                out.push(Standby { flush: data.restart_lsn, connected: holder != 0 });
            }
        }
        let senders = pg_sys::WalSndCtl;
        if !senders.is_null() && named.is_empty() {
            let base = (*senders).walsnds.as_mut_ptr();
            for i in 0..pg_sys::max_wal_senders.max(0) as usize {
                let sender = base.add(i);
                pg_sys::SpinLockAcquire(&mut (*sender).mutex);
                let (pid, state, write, flush) = ((*sender).pid, (*sender).state, (*sender).write, (*sender).flush);
                pg_sys::SpinLockRelease(&mut (*sender).mutex);
                use pg_sys::WalSndState::{WALSNDSTATE_CATCHUP, WALSNDSTATE_STREAMING};
                let streaming = state == WALSNDSTATE_STREAMING || state == WALSNDSTATE_CATCHUP;
                // A sender holding a slot is counted by its slot (a logical one is no standby); a receiver that
                // reports writes but no flush keeps no WAL a standby could be promoted with.
                let never_flushes = write != 0 && flush == 0;
                if pid != 0 && streaming && !never_flushes && !slot_holders.contains(&pid) {
                    ephemeral += 1;
                    out.push(Standby { flush, connected: true });
                }
            }
        }
    }
    out.extend(found.iter().filter(|f| !**f).map(|_| Standby { flush: 0, connected: false }));
    (out, ephemeral)
}

/// The WAL position up to which every commit is durable as `sqs_ingest.delete_after` requires now; `None` on a
/// standby (it cannot know what its primary's standbys have).
pub fn confirmed_lsn() -> Option<u64> {
    // SAFETY: plain reads of shared state (spinlock-protected inside); on the main thread.
    unsafe {
        if pg_sys::RecoveryInProgress() {
            return None;
        }
        let local = pg_sys::GetFlushRecPtr(std::ptr::null_mut());
        Some(durability::confirmed(local, crate::gucs::delete_after(), &standbys().0))
    }
}

/// A WAL position, as SQL's `pg_lsn` (a pass-by-value 64-bit integer).
pub struct Lsn(pub u64);

// SAFETY: returns the value as the by-value Datum `pg_lsn` is (LSNGetDatum is Int64GetDatum).
unsafe impl pgrx::callconv::BoxRet for Lsn {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut pgrx::callconv::FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        // SAFETY: the Datum is returned to the function's caller, as the trait requires.
        unsafe { fcinfo.return_raw_datum(pg_sys::Datum::from(self.0)) }
    }
}

pgrx::impl_sql_translatable!(Lsn, "pg_lsn");

/// A gate the main thread settles: `Some(true)` durable, `Some(false)` deferred.
struct Open {
    lsn: u64,
    rule: DeleteAfter,
    /// Standbys known only while connected when the gate opened: one that disconnects cannot confirm any more.
    ephemeral: usize,
    deadline: Instant,
    settle: watch::Sender<Option<bool>>,
}

thread_local! {
    static OPEN: RefCell<Vec<Open>> = const { RefCell::new(Vec::new()) };
}

/// What a commit's deletes wait for.
pub enum Gate {
    /// Durable as required: delete now.
    Passed,
    /// Cannot be confirmed: leave the messages in the queue.
    Deferred,
    /// Settled later by [`poll`] on the main thread (by the deadline at the latest).
    Waiting(watch::Receiver<Option<bool>>),
}

impl Gate {
    /// Whether the deletes may run (awaited on the network thread).
    pub async fn passed(self) -> bool {
        match self {
            Gate::Passed => true,
            Gate::Deferred => false,
            Gate::Waiting(mut rx) => match rx.wait_for(Option::is_some).await {
                Ok(settled) => settled.unwrap_or(false),
                // The main thread dropped the gate without settling it: the backend is going away.
                Err(_) => false,
            },
        }
    }
}

/// The gate of a commit whose WAL ends at `lsn` (already flushed locally), under the current
/// `sqs_ingest.delete_after`, waiting at most until `deadline`.
pub fn gate(lsn: u64, deadline: Instant) -> Gate {
    let rule = crate::gucs::delete_after();
    let (standbys, ephemeral) = standbys();
    match durability::judge(lsn, rule, &standbys) {
        Verdict::Durable => Gate::Passed,
        Verdict::Defer => Gate::Deferred,
        Verdict::Wait if Instant::now() >= deadline => Gate::Deferred,
        Verdict::Wait => {
            let (settle, rx) = watch::channel(None);
            OPEN.with(|o| o.borrow_mut().push(Open { lsn, rule, ephemeral, deadline, settle }));
            Gate::Waiting(rx)
        }
    }
}

/// Whether a gate waits to be settled (the waits on the network then [`poll`] every few milliseconds).
pub fn waiting() -> bool {
    OPEN.with(|o| !o.borrow().is_empty())
}

/// Settles the gates whose standbys confirmed, could no longer confirm, or whose deadline passed (or all of them,
/// deferred, when the backend is told to terminate). Main thread only; never raises.
pub fn poll() {
    if !waiting() {
        return;
    }
    let (standbys, ephemeral) = standbys();
    let now = Instant::now();
    // SAFETY: a sig_atomic_t flag set by the signal handler; read on the main thread.
    let terminating = unsafe { pg_sys::ProcDiePending != 0 };
    OPEN.with(|o| {
        o.borrow_mut().retain(|g| {
            // A standby known only while connected went away while the gate waited: it had not confirmed (the gate
            // would be settled), and it may be the one promoted. Not judged on the standbys that are left.
            let vanished = ephemeral < g.ephemeral;
            let verdict = match durability::judge(g.lsn, g.rule, &standbys) {
                Verdict::Durable if vanished && (g.rule == DeleteAfter::AllStandbys || standbys.is_empty()) => {
                    Verdict::Defer
                }
                Verdict::Wait if terminating || now >= g.deadline => Verdict::Defer,
                v => v,
            };
            match verdict {
                Verdict::Durable => g.settle.send_replace(Some(true)),
                Verdict::Defer => g.settle.send_replace(Some(false)),
                Verdict::Wait => return true,
            };
            false
        })
    });
}
