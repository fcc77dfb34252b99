//! The audit trails: one `sqs_ingest.unmask_audit` row per `unmask` call that reached the function, and one
//! `sqs_ingest.mask_audit` row per role and transaction that called `mask()` (how many calls, first and last).
//!
//! A call that reveals a value writes its row in the caller's transaction through a plan prepared once per
//! backend (a bulk `unmask` over a million rows must not parse a million INSERTs). Everything else is kept in
//! backend memory until the transaction ends, where it must survive whatever the caller does:
//! * refused `unmask` calls (their ERROR rolls back at least the caller's statement or savepoint),
//! * revealing calls whose own rows a rolled-back savepoint took away (the value was still shown),
//! * `mask()` call counts (aggregated: a bulk mask of a million values is one row).
//!
//! When the transaction commits (or is prepared), they are written in it, just before the commit. When it
//! aborts, they are written to a file under the data directory (`sqs_ingest_audit/`, readable by the server's
//! OS user only) and one short-lived background worker per aborted transaction, connected as the extension
//! owner with a pinned `search_path`, moves every waiting file of the database into the tables. If no worker
//! slot is free, the file waits: this backend tries again at its next transaction end, and every audit worker
//! sweeps all waiting files of its database, so nothing is lost for want of a slot. Every call also gets a
//! server-log line.

use crate::error::{Error, Result};
use crate::privilege::{as_owner, extension_owner, last_known_owner};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder};
use pgrx::prelude::*;
use sqs_ingest_core::mask::MaskError;
use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};

const INSERT: &str = "INSERT INTO sqs_ingest.unmask_audit (session_role, effective_role, key_id, succeeded, failure)
                      VALUES ($1::text, $2::text, $3::int4, true, NULL)";

/// Records a call that revealed a value, in the caller's transaction.
pub fn record_success(session: &str, current: &str, key_id: Option<i32>) -> Result<()> {
    as_owner(extension_owner(), || {
        crate::plans::run(INSERT, &[session.into(), current.into(), key_id.into()], |_| ())
            .map_err(|e| Error::Internal(format!("cannot write the unmask audit trail: {e}")))
    })?;
    crate::xact::ensure_registered();
    let (session, current) = roles();
    // SAFETY: plain reads of backend-local state on the main thread.
    let g = unsafe {
        Group {
            subxact: pg_sys::GetCurrentSubTransactionId(),
            session,
            current,
            key_id,
            count: 1,
            first_at: pg_sys::GetCurrentTimestamp(),
        }
    };
    WRITTEN.with(|w| {
        let mut w = w.borrow_mut();
        match w.last_mut() {
            Some(last) if last.same_caller(&g) => last.count += 1,
            _ => w.push(g),
        }
    });
    Ok(())
}

/// Records a refused call; it is written when the transaction ends, whatever the caller does. Never raises.
pub fn record_refusal(key_id: Option<i32>, refusal: Refusal) {
    crate::xact::ensure_registered();
    let (session, current) = roles();
    // SAFETY: a plain read of the clock on the main thread.
    let at = unsafe { pg_sys::GetCurrentTimestamp() };
    PENDING.with(|p| {
        p.borrow_mut().push(Record {
            kind: Kind::Refused(refusal),
            session,
            current,
            key_id,
            count: 1,
            first_at: at,
            last_at: at,
        })
    });
}

fn refuse(code: pgrx::PgSqlErrorCode, message: &str, hint: &str) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(code, message.to_string(), "sqs_ingest")
        .set_hint(hint.to_string())
        .report(pgrx::PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) does not return")
}

/// Refuses audited functions where their audit row could not be written in the calling transaction's end: in a
/// parallel worker (its memory and transaction hooks are not the leader's; a PARALLEL SAFE wrapper can put
/// `mask()` there).
pub fn refuse_in_parallel_worker(function: &str) {
    // SAFETY: a plain read of a backend-local global.
    if unsafe { pg_sys::ParallelWorkerNumber } >= 0 {
        refuse(
            pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            &format!("sqs_ingest.{function}() cannot run in a parallel worker"),
            "Its calls are audited by the session that makes them; call it outside parallel query (it is PARALLEL RESTRICTED).",
        );
    }
}

/// Counts one `mask()` call of the current transaction (the per-row path: no allocation, no SQL).
#[inline]
pub fn count_mask() {
    refuse_in_parallel_worker("mask");
    let (session, current) = roles();
    let count = MASKS.get();
    if count.calls > 0 && (count.session, count.current) == (session, current) {
        MASKS.set(MaskCount { calls: count.calls + 1, ..count });
        return;
    }
    crate::xact::ensure_registered();
    // SAFETY: a read of shared recovery state on the main thread.
    if unsafe { pg_sys::RecoveryInProgress() } {
        // A standby cannot write the audit row; the primary never hears of these calls.
        refuse(
            pgrx::PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "sqs_ingest.mask() cannot run during recovery (on a standby)",
            "Its calls are audited in sqs_ingest.mask_audit, which a standby cannot write; call it on the primary.",
        );
    }
    take_mask_count();
    // SAFETY: a plain read of the clock on the main thread.
    let at = unsafe { pg_sys::GetCurrentTimestamp() };
    MASKS.set(MaskCount { calls: 1, session, current, first_at: at });
}

fn roles() -> (u32, u32) {
    // SAFETY: plain reads of the backend's session and current user ids.
    unsafe { (pg_sys::GetSessionUserId().to_u32(), pg_sys::GetUserId().to_u32()) }
}

/// Revealing calls whose audit rows were written in the current transaction, grouped by caller and savepoint.
struct Group {
    subxact: pg_sys::SubTransactionId,
    session: u32,
    current: u32,
    key_id: Option<i32>,
    count: u32,
    first_at: i64,
}

impl Group {
    fn same_caller(&self, o: &Group) -> bool {
        (self.subxact, self.session, self.current, self.key_id) == (o.subxact, o.session, o.current, o.key_id)
    }

    fn lost(&self) -> Record {
        Record {
            kind: Kind::RevealedThenRolledBack,
            session: self.session,
            current: self.current,
            key_id: self.key_id,
            count: self.count as u64,
            first_at: self.first_at,
            last_at: self.first_at,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct MaskCount {
    calls: u64,
    session: u32,
    current: u32,
    first_at: i64,
}

thread_local! {
    /// Audit rows written in this transaction (they vanish if it rolls back).
    static WRITTEN: RefCell<Vec<Group>> = const { RefCell::new(Vec::new()) };
    /// Records not yet written anywhere durable.
    static PENDING: RefCell<Vec<Record>> = const { RefCell::new(Vec::new()) };
    /// Records written in the transaction now committing: pending again if the commit fails after all.
    static FLUSHING: RefCell<Vec<Record>> = const { RefCell::new(Vec::new()) };
    /// Records of a committing read-only transaction, for the audit worker once it has committed.
    static AFTER_COMMIT: RefCell<Vec<Record>> = const { RefCell::new(Vec::new()) };
    /// `mask()` calls of the current transaction by the current roles.
    static MASKS: Cell<MaskCount> = const { Cell::new(MaskCount { calls: 0, session: 0, current: 0, first_at: 0 }) };
    /// A file of this backend waits for an audit worker (no slot was free, or this backend's last worker was
    /// still running, when it was written).
    static FILE_WAITING: Cell<bool> = const { Cell::new(false) };
    static EXIT_HOOK: Cell<bool> = const { Cell::new(false) };
}

fn take_mask_count() {
    let count = MASKS.replace(MaskCount::default());
    if count.calls == 0 {
        return;
    }
    // SAFETY: a plain read of the clock on the main thread.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    PENDING.with(|p| {
        p.borrow_mut().push(Record {
            kind: Kind::Masked,
            session: count.session,
            current: count.current,
            key_id: None,
            count: count.calls,
            first_at: count.first_at,
            last_at: now,
        })
    });
}

/// Transaction hook, just before PREPARE TRANSACTION: a prepared transaction can still be rolled back by anyone
/// later (`ROLLBACK PREPARED`), taking rows written in it along; refused while records wait.
/// This module's transaction hooks: records still in memory are written in the transaction before it commits or
/// is prepared (an ERROR then aborts it, and the abort hook keeps them); afterwards they belong to it.
pub fn xact_hooks() -> crate::xact::Hooks {
    crate::xact::Hooks {
        pre_commit: Some(before_commit),
        pre_prepare: Some(|| {
            before_prepare();
            before_commit();
        }),
        commit: Some(after_commit),
        prepare: Some(after_commit),
        abort: Some(after_abort),
        subxact_abort: Some(after_subxact_abort),
        subxact_commit: Some(after_subxact_commit),
    }
}

pub fn before_prepare() {
    if MASKS.get().calls > 0 || PENDING.with(|p| !p.borrow().is_empty()) {
        refuse(
            pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "a transaction that called sqs_ingest.mask() or was refused an unmask cannot be prepared for two-phase commit",
            "Their audit rows would be lost with a later ROLLBACK PREPARED; call them in an ordinary transaction.",
        );
    }
}

/// Transaction hook, just before COMMIT: writes what is pending in the committing transaction.
/// May raise (then the transaction aborts and [`after_abort`] keeps the records).
pub fn before_commit() {
    take_mask_count();
    let records = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if records.is_empty() {
        return;
    }
    // SAFETY: a plain read of a backend-local global.
    if unsafe { pg_sys::XactReadOnly } {
        // A read-only transaction cannot write them: they go to the audit worker after the commit.
        AFTER_COMMIT.with(|a| a.borrow_mut().extend(records));
        return;
    }
    FLUSHING.with(|f| f.borrow_mut().extend(records.iter().cloned()));
    // SAFETY: a plain read of the backend's pid.
    let pid = unsafe { pg_sys::MyProcPid };
    // The statement that made the calls is over: the commit hook runs with no active snapshot of its own.
    // SAFETY: pushes a snapshot for the SPI statements below and pops it after; an ERROR in between aborts the
    // transaction, which resets the snapshot stack.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let with_pid: Vec<(Record, i32)> = records.iter().map(|r| (r.clone(), pid)).collect();
    let written = as_owner(extension_owner(), || write(&with_pid, false));
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    if let Err(e) = written {
        e.raise();
    }
}

/// Transaction hook after COMMIT or PREPARE. Never raises.
pub fn after_commit() {
    WRITTEN.with(|w| w.borrow_mut().clear());
    FLUSHING.with(|f| f.borrow_mut().clear());
    let read_only = AFTER_COMMIT.with(|a| std::mem::take(&mut *a.borrow_mut()));
    if read_only.is_empty() {
        retry_waiting_file();
    } else {
        to_worker(&read_only);
    }
}

/// Transaction hook after ABORT: everything not yet durable goes to a file and one audit worker. Never raises.
pub fn after_abort() {
    take_mask_count();
    let mut all = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    all.extend(FLUSHING.with(|f| std::mem::take(&mut *f.borrow_mut())));
    all.extend(WRITTEN.with(|w| std::mem::take(&mut *w.borrow_mut())).iter().map(Group::lost));
    all.extend(AFTER_COMMIT.with(|a| std::mem::take(&mut *a.borrow_mut())));
    if all.is_empty() {
        retry_waiting_file();
        return;
    }
    to_worker(&all);
}

/// Errors of ingest calls whose transaction rolled back (queue URL, worker label, scrubbed text): written to
/// `sqs_ingest.stats.last_error` by the audit worker, so they are on record even if the session ends right after
/// (as pg_cron's do). Never raises.
/// An error of an ingest call whose transaction rolled back, on its way to `sqs_ingest.stats`.
#[derive(Debug, Clone)]
pub struct UnreportedError {
    pub queue_url: String,
    pub worker: String,
    /// "" for the login pipeline.
    pub pipeline: String,
    pub text: String,
}

pub fn save_errors(errors: Vec<UnreportedError>) {
    use base64::Engine;
    if errors.is_empty() {
        return;
    }
    let b64 = |t: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t.as_bytes());
    // SAFETY: plain reads of backend-local globals on the main thread.
    let (database, pid) = unsafe { (pg_sys::MyDatabaseId.to_u32(), pg_sys::MyProcPid) };
    let lines = errors
        .iter()
        .map(|e| format!("e2|{}|{}|{}|{}", b64(&e.queue_url), b64(&e.worker), b64(&e.text), b64(&e.pipeline)));
    match write_lines(database, pid, lines) {
        Ok(()) => launch(database),
        Err(e) => warning!(
            "sqs_ingest: an ingest error could not be saved for sqs_ingest.stats ({e}); it is in the server log"
        ),
    }
}

/// Deferred deletes of one queue, on their way to `sqs_ingest.stats.deletes_deferred` (see
/// [`crate::bookkeeping::add_deferred`]).
struct DeferredLine {
    queue_url: String,
    worker: String,
    pipeline: String,
    messages: i64,
    lsn: u64,
    at_ms: i64,
}

/// Deletes a commit's standbys did not confirm (messages left in the queue): written to `sqs_ingest.stats` by the
/// audit worker at once, like the errors of calls that rolled back. Called after COMMIT; never raises.
pub fn save_deferred(deferred: Vec<crate::hold::Deferred>) {
    use base64::Engine;
    if deferred.is_empty() {
        return;
    }
    let b64 = |t: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t.as_bytes());
    // SAFETY: plain reads of backend-local globals on the main thread.
    let (database, pid) = unsafe { (pg_sys::MyDatabaseId.to_u32(), pg_sys::MyProcPid) };
    let lines = deferred.iter().map(|d| {
        let (url, worker, pipeline) = (b64(&d.queue_url), b64(&d.worker), b64(&d.pipeline));
        format!("d1|{url}|{worker}|{pipeline}|{}|{}|{}", d.messages, d.lsn, d.at_ms)
    });
    match write_lines(database, pid, lines) {
        Ok(()) => launch(database),
        Err(e) => warning!("sqs_ingest: deferred deletes could not be saved for sqs_ingest.stats ({e})"),
    }
}

/// A field of a spool line: base64 (URL-safe, unpadded) of UTF-8 text.
fn text(field: &str) -> Option<String> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(field).ok().and_then(|b| String::from_utf8(b).ok())
}

fn decode_deferred(line: &str) -> Option<DeferredLine> {
    match line.split('|').collect::<Vec<_>>().as_slice() {
        ["d1", url, worker, pipeline, messages, lsn, at_ms] => Some(DeferredLine {
            queue_url: text(url)?,
            worker: text(worker)?,
            pipeline: text(pipeline)?,
            messages: messages.parse().ok()?,
            lsn: lsn.parse().ok()?,
            at_ms: at_ms.parse().ok()?,
        }),
        _ => None,
    }
}

fn decode_error(line: &str) -> Option<UnreportedError> {
    let f: Vec<&str> = line.split('|').collect();
    match f.as_slice() {
        // e1: written by 0.5.0 (no pipeline); e2: since 0.6.0.
        ["e1", url, worker, message] => Some(UnreportedError {
            queue_url: text(url)?,
            worker: text(worker)?,
            pipeline: String::new(),
            text: text(message)?,
        }),
        ["e2", url, worker, message, pipeline] => Some(UnreportedError {
            queue_url: text(url)?,
            worker: text(worker)?,
            pipeline: text(pipeline)?,
            text: text(message)?,
        }),
        _ => None,
    }
}

/// Saves records to a file and has the audit worker write them. Never raises.
fn to_worker(records: &[Record]) {
    // SAFETY: plain reads of backend-local globals on the main thread.
    let (database, pid) = unsafe { (pg_sys::MyDatabaseId.to_u32(), pg_sys::MyProcPid) };
    match write_file(database, pid, records) {
        Ok(()) => launch(database),
        Err(e) => warning!(
            "sqs_ingest: {} audit record(s) could not be saved for the audit worker ({e}); they are in the server log",
            records.len()
        ),
    }
}

pub fn after_subxact_abort(my: pg_sys::SubTransactionId) {
    let gone: Vec<Group> = WRITTEN.with(|w| {
        let mut w = w.borrow_mut();
        let (gone, kept) = std::mem::take(&mut *w).into_iter().partition(|g| g.subxact >= my);
        *w = kept;
        gone
    });
    PENDING.with(|p| p.borrow_mut().extend(gone.iter().map(Group::lost)));
}

pub fn after_subxact_commit(my: pg_sys::SubTransactionId, parent: pg_sys::SubTransactionId) {
    WRITTEN.with(|w| w.borrow_mut().iter_mut().filter(|g| g.subxact >= my).for_each(|g| g.subxact = parent));
}

/// Why a call was refused, as stored in `unmask_audit.failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Malformed,
    Irreversible,
    UnknownKey,
    Tampered,
    Keys,
}

impl Refusal {
    pub fn of(e: &Error) -> Refusal {
        match e {
            Error::Mask(MaskError::Malformed) | Error::Mask(MaskError::TokenTooLong(_)) => Refusal::Malformed,
            Error::Mask(MaskError::Irreversible) => Refusal::Irreversible,
            Error::Mask(MaskError::UnknownKey(_)) => Refusal::UnknownKey,
            Error::Mask(_) => Refusal::Tampered,
            _ => Refusal::Keys,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Irreversible => "irreversible",
            Refusal::UnknownKey => "unknown_key",
            Refusal::Tampered => "tampered",
            Refusal::Keys => "keys",
        }
    }

    fn from_code(code: &str) -> Option<Refusal> {
        [Refusal::Malformed, Refusal::Irreversible, Refusal::UnknownKey, Refusal::Tampered, Refusal::Keys]
            .into_iter()
            .find(|r| r.code() == code)
    }

    fn message(self, key_id: Option<i32>) -> String {
        match self {
            Refusal::UnknownKey => MaskError::UnknownKey(key_id.unwrap_or(0)).to_string(),
            Refusal::Malformed => MaskError::Malformed.to_string(),
            Refusal::Irreversible => MaskError::Irreversible.to_string(),
            Refusal::Tampered => MaskError::Tampered.to_string(),
            Refusal::Keys => "the masking keys could not be read".to_string(),
        }
    }
}

/// What one audit record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Refused(Refusal),
    RevealedThenRolledBack,
    Masked,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Refused(r) => r.code(),
            Kind::RevealedThenRolledBack => "revealed",
            Kind::Masked => "masked",
        }
    }

    fn from_code(code: &str) -> Option<Kind> {
        match code {
            "revealed" => Some(Kind::RevealedThenRolledBack),
            "masked" => Some(Kind::Masked),
            other => Refusal::from_code(other).map(Kind::Refused),
        }
    }
}

/// One audit record: no names, no token, no value (role oids, a key id, a count, times in Postgres µs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) kind: Kind,
    pub(crate) session: u32,
    pub(crate) current: u32,
    pub(crate) key_id: Option<i32>,
    pub(crate) count: u64,
    pub(crate) first_at: i64,
    pub(crate) last_at: i64,
}

impl Record {
    pub(crate) fn encode(&self, pid: i32) -> String {
        let kid = self.key_id.map_or_else(|| "-".to_string(), |k| k.to_string());
        format!(
            "v2|{}|{}|{}|{kid}|{}|{}|{}|{pid}",
            self.kind.code(),
            self.session,
            self.current,
            self.count,
            self.first_at,
            self.last_at
        )
    }

    /// The record and the pid of the backend that made the calls.
    pub(crate) fn decode(s: &str) -> Option<(Record, i32)> {
        let f: Vec<&str> = s.split('|').collect();
        if f.len() != 9 || f[0] != "v2" {
            return None;
        }
        Some((
            Record {
                kind: Kind::from_code(f[1])?,
                session: f[2].parse().ok()?,
                current: f[3].parse().ok()?,
                key_id: if f[4] == "-" { None } else { Some(f[4].parse().ok()?) },
                count: f[5].parse().ok().filter(|n| *n > 0)?,
                first_at: f[6].parse().ok()?,
                last_at: f[7].parse().ok()?,
            },
            f[8].parse().ok()?,
        ))
    }
}

fn role_or_oid(oid: u32) -> String {
    // SAFETY: noerr lookup on the main thread inside a transaction; a non-NULL result is copied.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::Oid::from(oid), true);
        if name.is_null() {
            format!("oid {oid}")
        } else {
            std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

/// Writes records into the audit tables, in the current transaction, as the extension owner (pinned path).
/// `rolled_back`: the calls' own transaction rolled back (written by the audit worker).
fn write(records: &[(Record, i32)], rolled_back: bool) -> Result<()> {
    let has_mask_audit = Spi::get_one::<bool>("SELECT to_regclass('sqs_ingest.mask_audit') IS NOT NULL")
        .map_err(|e| Error::Internal(format!("cannot write the audit trail: {e}")))?
        .unwrap_or(false);
    for (r, pid) in records {
        let pid = *pid;
        let result = match r.kind {
            Kind::Masked if !has_mask_audit => Ok(()), // a schema not yet updated to 0.4.0: server log only
            Kind::Masked => Spi::run_with_args(
                "INSERT INTO sqs_ingest.mask_audit
                     (first_call_at, last_call_at, session_role, effective_role, backend_pid, calls, rolled_back)
                 VALUES (timestamptz '2000-01-01 00:00:00+00' + $1::int8 * interval '1 microsecond',
                         timestamptz '2000-01-01 00:00:00+00' + $2::int8 * interval '1 microsecond',
                         $3, $4, $5, $6, $7)",
                &[
                    r.first_at.into(),
                    r.last_at.into(),
                    role_or_oid(r.session).into(),
                    role_or_oid(r.current).into(),
                    pid.into(),
                    (r.count as i64).into(),
                    rolled_back.into(),
                ],
            ),
            Kind::Refused(_) | Kind::RevealedThenRolledBack => {
                let (succeeded, failure) = match r.kind {
                    Kind::Refused(refusal) => (false, refusal.message(r.key_id)),
                    _ => (
                        true,
                        "value revealed; the caller rolled back, so this row was written after the rollback"
                            .to_string(),
                    ),
                };
                Spi::run_with_args(
                    "INSERT INTO sqs_ingest.unmask_audit
                         (called_at, session_role, effective_role, backend_pid, key_id, succeeded, failure)
                     SELECT timestamptz '2000-01-01 00:00:00+00' + $1::int8 * interval '1 microsecond',
                            $2, $3, $4, $5, $6, $7
                       FROM generate_series(1::int8, $8::int8)",
                    &[
                        r.first_at.into(),
                        role_or_oid(r.session).into(),
                        role_or_oid(r.current).into(),
                        pid.into(),
                        r.key_id.into(),
                        succeeded.into(),
                        failure.into(),
                        (r.count as i64).into(),
                    ],
                )
            }
        };
        result.map_err(|e| Error::Internal(format!("cannot write the audit trail: {e}")))?;
    }
    Ok(())
}

// ---- Files and the audit worker -------------------------------------------------------------------------

/// Under the data directory (every backend's working directory): protected like the data itself.
const DIR: &str = "sqs_ingest_audit";

thread_local! {
    static FILE_SEQ: Cell<u64> = const { Cell::new(0) };
}

fn write_file(database: u32, pid: i32, records: &[Record]) -> std::io::Result<()> {
    write_lines(database, pid, records.iter().map(|r| r.encode(pid)))
}

fn write_lines(database: u32, pid: i32, lines: impl Iterator<Item = String>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(DIR)?;
    let seq = FILE_SEQ.get() + 1;
    FILE_SEQ.set(seq);
    // SAFETY: a plain read of the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let stem = format!("{database}.{pid}.{now}.{seq}");
    let tmp = Path::new(DIR).join(format!("{stem}.tmp"));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    for line in lines {
        writeln!(f, "{line}")?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, Path::new(DIR).join(format!("{stem}.pending")))
}

fn retry_waiting_file() {
    if FILE_WAITING.get() {
        // SAFETY: a plain read of a backend-local global.
        launch(unsafe { pg_sys::MyDatabaseId.to_u32() });
    }
}

/// The file an audit worker holds while it works for a database (its pid inside): at most one runs per database.
fn running_file(database: u32) -> PathBuf {
    Path::new(DIR).join(format!("{database}.running"))
}

/// Whether an audit worker holds the database's running file: it keeps an exclusive `flock` on it for its whole
/// life, which the kernel drops when it exits however it exits (a pid could be reused; a lock cannot linger).
fn worker_running(database: u32) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(f) = std::fs::File::open(running_file(database)) else { return false };
    // SAFETY: a non-blocking lock attempt on a file descriptor we own; released when `f` is dropped.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// Starts the audit worker for this database, unless one is already at work there (it sweeps again after it
/// lets go, so it also takes files written meanwhile). Never raises: with no free slot the file waits (for this
/// backend's next transaction end or exit, or any later audit worker of the database).
fn launch(database: u32) {
    register_exit_hook();
    if worker_running(database) {
        FILE_WAITING.set(false);
        return;
    }
    start_worker(database);
}

fn register_exit_hook() {
    if !EXIT_HOOK.replace(true) {
        // SAFETY: registers a static callback; called on the main thread. on_shmem_exit callbacks run after the
        // transaction abort of a backend that exits mid-transaction (a before_shmem_exit callback), whose records
        // are then already in a file.
        unsafe { pg_sys::on_shmem_exit(Some(on_exit), pg_sys::Datum::from(0usize)) };
    }
}

/// A backend that ends with a file waiting starts one more worker for it.
#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    if FILE_WAITING.get() {
        // SAFETY: a plain read of a backend-local global.
        let database = unsafe { pg_sys::MyDatabaseId.to_u32() };
        let _ = std::panic::catch_unwind(|| start_worker(database));
    }
}

fn start_worker(database: u32) {
    let owner = last_known_owner().map_or(0, |o| o.to_u32());
    let started = BackgroundWorkerBuilder::new("sqs_ingest audit")
        .set_type("sqs_ingest audit")
        .set_library("sqs_ingest")
        .set_function("sqs_ingest_audit_worker_main")
        .set_extra(&format!("v2|{database}|{owner}"))
        .enable_spi_access()
        .set_restart_time(None)
        .load_dynamic();
    if started.is_ok() {
        FILE_WAITING.set(false);
    } else {
        if !FILE_WAITING.get() {
            warning!(
                "sqs_ingest: no free background worker slot to write audit records now (raise max_worker_processes); they are saved and will be written when a slot is free"
            );
        }
        FILE_WAITING.set(true);
    }
}

/// Claims every waiting file of `database` (renamed, so two workers never write one file twice).
/// Claims every waiting file of `database`: renamed to this worker and `flock`ed until this worker exits, so two
/// workers never write one file twice. A file claimed by a worker that died before finishing (its lock gone with
/// it) is taken over.
fn claim_files(database: u32) -> Vec<PathBuf> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a plain read of the worker's pid.
    let me = unsafe { pg_sys::MyProcPid };
    let prefix = format!("{database}.");
    let mine = format!(".claimed.{me}");
    let Ok(entries) = std::fs::read_dir(DIR) else { return Vec::new() };
    let mut claimed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pending = name.ends_with(".pending");
        if !name.starts_with(&prefix) || name.ends_with(&mine) || !(pending || name.contains(".claimed.")) {
            continue;
        }
        let Ok(f) = std::fs::File::open(entry.path()) else { continue };
        // SAFETY: a non-blocking lock attempt on a descriptor we own; kept (forgotten) while we hold the file.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue; // another live worker holds it
        }
        let stem = name.strip_suffix(".pending").or_else(|| name.split(".claimed.").next()).unwrap_or(&name);
        let target = Path::new(DIR).join(format!("{stem}{mine}"));
        if std::fs::rename(entry.path(), &target).is_ok() {
            std::mem::forget(f);
            claimed.push(target);
        }
    }
    claimed.sort();
    claimed
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn sqs_ingest_audit_worker_main(_arg: pg_sys::Datum) {
    crate::runtime::install_worker_signal_handlers();
    let extra: Vec<&str> = BackgroundWorker::get_extra().split('|').collect();
    let (Some(database), Some(owner)) =
        (extra.get(1).and_then(|d| d.parse::<u32>().ok()), extra.get(2).and_then(|o| o.parse::<u32>().ok()))
    else {
        log!("sqs_ingest audit worker: unreadable arguments, nothing written");
        return;
    };
    // As the extension owner: the refused caller may have no rights at all, and the rows are the extension's.
    let owner = (owner != 0).then(|| pg_sys::Oid::from(owner));
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(database)), owner);
    // Settings a database owner can impose on every connection (ALTER DATABASE ... SET) must not stop the audit.
    for (name, value) in
        [(c"default_transaction_read_only", c"off"), (c"statement_timeout", c"0"), (c"lock_timeout", c"0")]
    {
        // SAFETY: sets this worker's own session settings on its main thread, before any transaction.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            )
        };
    }
    // One worker per database at a time: a second one leaves the work to the first.
    if !hold_running_file(database) {
        return;
    }
    // Files keep arriving while earlier ones are written (backends that saw this worker running leave theirs):
    // sweep until none is left, let go of the running file, and sweep once more for files written meanwhile.
    for _ in 0..100 {
        // The one signal regime of every sqs_ingest worker (crate::runtime): a SIGHUP is acted on here.
        crate::runtime::reload_if_requested();
        let files = claim_files(database);
        if files.is_empty() {
            break;
        }
        write_files(&files);
    }
    let _ = std::fs::remove_file(running_file(database));
    let files = claim_files(database);
    if !files.is_empty() {
        write_files(&files);
    }
}

/// Takes the database's running file and holds its `flock` for the rest of this worker's life. False if another
/// worker holds it.
fn hold_running_file(database: u32) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let Ok(f) =
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(running_file(database))
    else {
        return false;
    };
    // SAFETY: a non-blocking lock attempt on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return false;
    }
    // Kept open (and locked) until the process exits.
    std::mem::forget(f);
    true
}

fn write_files(files: &[PathBuf]) {
    let (mut records, mut errors, mut deferred) = (Vec::new(), Vec::new(), Vec::new());
    for path in files {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        records.extend(text.lines().filter_map(Record::decode));
        errors.extend(text.lines().filter_map(decode_error));
        deferred.extend(text.lines().filter_map(decode_deferred));
    }
    let written = BackgroundWorker::transaction(|| -> Result<bool> {
        let present =
            Spi::get_one::<bool>("SELECT pg_catalog.to_regclass('sqs_ingest.unmask_audit') IS NOT NULL").ok().flatten();
        if present != Some(true) {
            return Ok(false);
        }
        as_owner(extension_owner(), || {
            write(&records, true)?;
            for e in &errors {
                let none = crate::bookkeeping::Counters::default();
                crate::bookkeeping::add_counters(&e.queue_url, &e.worker, &e.pipeline, none, None, Some(&e.text))?;
            }
            for d in &deferred {
                crate::bookkeeping::add_deferred(&d.queue_url, &d.worker, &d.pipeline, d.messages, d.lsn, d.at_ms)?;
            }
            Ok(true)
        })
    });
    match written {
        Ok(true) => files.iter().for_each(|f| {
            let _ = std::fs::remove_file(f);
        }),
        Ok(false) => {
            log!("sqs_ingest audit worker: sqs_ingest is not installed in that database; nothing written");
            files.iter().for_each(|f| {
                let _ = std::fs::remove_file(f);
            });
        }
        Err(e) => log!("sqs_ingest audit worker: could not write the audit records: {}", e.scrubbed()),
    }
}
