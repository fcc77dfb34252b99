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

/// The end of the WAL a committed transaction's deletes depend on. Its own commit record, if it wrote one
/// (`XactLastCommitEnd` moved since `commit_end_before`, read before COMMIT); otherwise (every message a
/// duplicate, or filtered, and nothing else written) the WAL inserted so far, which covers the commits that stored
/// the messages it recognised: they committed before its statements saw them.
pub fn commit_lsn(commit_end_before: u64) -> u64 {
    // SAFETY: backend-local global and a spinlock-protected read of the insert position, on the main thread.
    unsafe {
        let end = pg_sys::XactLastCommitEnd;
        if end != commit_end_before && end != 0 {
            end
        } else {
            pg_sys::GetXLogInsertRecPtr()
        }
    }
}

/// `XactLastCommitEnd` now (read before COMMIT, for [`commit_lsn`]).
pub fn last_commit_end() -> u64 {
    // SAFETY: a backend-local global, on the main thread.
    unsafe { pg_sys::XactLastCommitEnd }
}

/// Flushes the local WAL up to `lsn` (returns at once when it is already flushed: the usual case with
/// `synchronous_commit` on). A failure to write WAL is a PANIC in Postgres itself.
pub fn flush_locally(lsn: u64) {
    // SAFETY: XLogFlush may be called outside a transaction (Postgres' own commit path and checkpointer do).
    unsafe { pg_sys::XLogFlush(lsn) }
}

/// The standbys this primary knows: each physical replication slot (its `restart_lsn` is the position its standby
/// last reported flushed; connected while a WAL sender holds it) and each WAL sender streaming to a physical standby
/// without a slot. Logical slots and their senders, temporary slots (pg_basebackup's) and base-backup senders are
/// not standbys.
pub fn standbys() -> Vec<Standby> {
    let mut out = Vec::new();
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
                let (in_use, holder, database, persistency, restart) = (
                    (*slot).in_use,
                    (*slot).active_pid,
                    (*slot).data.database,
                    (*slot).data.persistency,
                    (*slot).data.restart_lsn,
                );
                pg_sys::SpinLockRelease(&mut (*slot).mutex);
                if !in_use {
                    continue;
                }
                if holder != 0 {
                    slot_holders.push(holder);
                }
                let physical = database == pg_sys::InvalidOid;
                if physical && persistency == pg_sys::ReplicationSlotPersistency::RS_PERSISTENT {
                    out.push(Standby { flush: restart, connected: holder != 0 });
                }
            }
        }
        let senders = pg_sys::WalSndCtl;
        if !senders.is_null() {
            let base = (*senders).walsnds.as_mut_ptr();
            for i in 0..pg_sys::max_wal_senders.max(0) as usize {
                let sender = base.add(i);
                pg_sys::SpinLockAcquire(&mut (*sender).mutex);
                let (pid, state, flush) = ((*sender).pid, (*sender).state, (*sender).flush);
                pg_sys::SpinLockRelease(&mut (*sender).mutex);
                use pg_sys::WalSndState::{WALSNDSTATE_CATCHUP, WALSNDSTATE_STREAMING};
                let streaming = state == WALSNDSTATE_STREAMING || state == WALSNDSTATE_CATCHUP;
                // A sender holding a slot is counted by its slot (a logical one is no standby).
                if pid != 0 && streaming && !slot_holders.contains(&pid) {
                    out.push(Standby { flush, connected: true });
                }
            }
        }
    }
    out
}

/// The WAL position up to which every commit is durable as `sqs_ingest.delete_after` requires now.
pub fn confirmed_lsn() -> u64 {
    // SAFETY: reads the flush position (spinlock-protected inside); on the main thread.
    let local = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) };
    durability::confirmed(local, crate::gucs::delete_after(), &standbys())
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
    match durability::judge(lsn, rule, &standbys()) {
        Verdict::Durable => Gate::Passed,
        Verdict::Defer => Gate::Deferred,
        Verdict::Wait if Instant::now() >= deadline => Gate::Deferred,
        Verdict::Wait => {
            let (settle, rx) = watch::channel(None);
            OPEN.with(|o| o.borrow_mut().push(Open { lsn, rule, deadline, settle }));
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
    let standbys = standbys();
    let now = Instant::now();
    // SAFETY: a sig_atomic_t flag set by the signal handler; read on the main thread.
    let terminating = unsafe { pg_sys::ProcDiePending != 0 };
    OPEN.with(|o| {
        o.borrow_mut().retain(|g| {
            let verdict = match durability::judge(g.lsn, g.rule, &standbys) {
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
