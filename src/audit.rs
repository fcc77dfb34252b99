//! The `unmask` audit trail: one `sqs_ingest.unmask_audit` row per call that reached the function.
//!
//! A call that reveals a value writes its row in the caller's transaction through a plan prepared once per
//! backend (a bulk `unmask` over a million rows must not parse a million INSERTs). A refused call ends in an
//! ERROR that rolls its own transaction back, so its row is written by a short-lived background worker in a
//! transaction of its own: the refusal is on record even though the caller's statement failed. A revealing call
//! whose row is rolled back with the caller's transaction or savepoint (the value was still shown) is written
//! again the same way once that rollback happens, marked as such. Every call also gets a server-log line.

use crate::error::{Error, Result};
use crate::privilege::{as_owner, extension_owner};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use sqs_ingest_core::mask::MaskError;

const INSERT: &str = "INSERT INTO sqs_ingest.unmask_audit (session_role, effective_role, key_id, succeeded, failure)
                      VALUES ($1::text, $2::text, $3::int4, true, NULL)";

/// Records a call that revealed a value, in the caller's transaction.
pub fn record_success(session: &str, current: &str, key_id: Option<i32>) -> Result<()> {
    as_owner(extension_owner(), || {
        crate::plans::run(INSERT, &[session.into(), current.into(), key_id.into()], |_| ())
            .map_err(|e| Error::Internal(format!("cannot write the unmask audit trail: {e}")))
    })?;
    crate::hold::ensure_callbacks();
    // SAFETY: plain reads of backend-local state on the main thread.
    let g = unsafe {
        Group {
            subxact: pg_sys::GetCurrentSubTransactionId(),
            session: pg_sys::GetSessionUserId().to_u32(),
            current: pg_sys::GetUserId().to_u32(),
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
}

thread_local! {
    /// Audit rows written in this transaction (they vanish if it rolls back).
    static WRITTEN: std::cell::RefCell<Vec<Group>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Audit rows a rolled-back savepoint took with it; rewritten when the transaction ends.
    static LOST: std::cell::RefCell<Vec<Group>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn rewrite(groups: Vec<Group>) {
    for g in groups {
        launch(g.first_at, g.session, g.current, g.key_id, Kind::RevealedThenRolledBack, g.count);
    }
}

/// Transaction-end hooks, called from [`crate::hold`]'s callbacks. Never raise.
pub fn after_commit() {
    WRITTEN.with(|w| w.borrow_mut().clear());
    rewrite(LOST.with(|l| std::mem::take(&mut *l.borrow_mut())));
}

pub fn after_abort() {
    let mut all = LOST.with(|l| std::mem::take(&mut *l.borrow_mut()));
    all.extend(WRITTEN.with(|w| std::mem::take(&mut *w.borrow_mut())));
    rewrite(all);
}

pub fn after_subxact_abort(my: pg_sys::SubTransactionId) {
    let gone: Vec<Group> = WRITTEN.with(|w| {
        let mut w = w.borrow_mut();
        let (gone, kept) = std::mem::take(&mut *w).into_iter().partition(|g| g.subxact >= my);
        *w = kept;
        gone
    });
    LOST.with(|l| l.borrow_mut().extend(gone));
}

pub fn after_subxact_commit(my: pg_sys::SubTransactionId, parent: pg_sys::SubTransactionId) {
    WRITTEN.with(|w| w.borrow_mut().iter_mut().filter(|g| g.subxact >= my).for_each(|g| g.subxact = parent));
}

/// Why a call was refused, as carried to the audit worker (the worker turns it back into the message).
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
            Error::Mask(MaskError::Malformed) => Refusal::Malformed,
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

/// What the audit worker writes: a refusal, or revealing calls whose own rows were rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Refused(Refusal),
    RevealedThenRolledBack,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Refused(r) => r.code(),
            Kind::RevealedThenRolledBack => "revealed",
        }
    }

    fn from_code(code: &str) -> Option<Kind> {
        if code == "revealed" {
            Some(Kind::RevealedThenRolledBack)
        } else {
            Refusal::from_code(code).map(Kind::Refused)
        }
    }

    fn failure(self, key_id: Option<i32>) -> String {
        match self {
            Kind::Refused(r) => r.message(key_id),
            Kind::RevealedThenRolledBack => {
                "value revealed; the caller rolled back, so this row was written after the rollback".to_string()
            }
        }
    }
}

/// What the audit worker needs, packed into `bgw_extra` (128 bytes): no names, no token, no value.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) database: u32,
    pub(crate) pid: i32,
    pub(crate) at_us: i64,
    pub(crate) session: u32,
    pub(crate) current: u32,
    pub(crate) key_id: Option<i32>,
    pub(crate) kind: Kind,
    pub(crate) count: u32,
}

impl Record {
    pub(crate) fn encode(&self) -> String {
        let kid = self.key_id.map_or_else(|| "-".to_string(), |k| k.to_string());
        format!(
            "v1|{}|{}|{}|{}|{}|{}|{}|{}",
            self.database,
            self.pid,
            self.at_us,
            self.session,
            self.current,
            kid,
            self.kind.code(),
            self.count
        )
    }

    pub(crate) fn decode(s: &str) -> Option<Record> {
        let f: Vec<&str> = s.split('|').collect();
        if f.len() != 9 || f[0] != "v1" {
            return None;
        }
        Some(Record {
            database: f[1].parse().ok()?,
            pid: f[2].parse().ok()?,
            at_us: f[3].parse().ok()?,
            session: f[4].parse().ok()?,
            current: f[5].parse().ok()?,
            key_id: if f[6] == "-" { None } else { Some(f[6].parse().ok()?) },
            kind: Kind::from_code(f[7])?,
            count: f[8].parse().ok().filter(|n| *n > 0)?,
        })
    }
}

/// Records a refused call through a background worker, so the row outlives the ERROR that follows.
/// Never raises: if no worker slot is free, a WARNING says so (the server-log line is already written).
pub fn record_refusal(key_id: Option<i32>, refusal: Refusal) {
    // SAFETY: plain reads of backend-local state on the main thread.
    let (at_us, session, current) =
        unsafe { (pg_sys::GetCurrentTimestamp(), pg_sys::GetSessionUserId().to_u32(), pg_sys::GetUserId().to_u32()) };
    launch(at_us, session, current, key_id, Kind::Refused(refusal), 1);
}

/// Starts an audit worker for `count` calls of this backend's database. Never raises.
fn launch(at_us: i64, session: u32, current: u32, key_id: Option<i32>, kind: Kind, count: u32) {
    // SAFETY: plain reads of backend-local globals on the main thread.
    let (database, pid) = unsafe { (pg_sys::MyDatabaseId.to_u32(), pg_sys::MyProcPid) };
    let record = Record { database, pid, at_us, session, current, key_id, kind, count };
    let started = BackgroundWorkerBuilder::new("sqs_ingest unmask audit")
        .set_type("sqs_ingest audit")
        .set_library("sqs_ingest")
        .set_function("sqs_ingest_audit_worker_main")
        .set_extra(&record.encode())
        .enable_spi_access()
        .set_restart_time(None)
        .load_dynamic();
    if started.is_err() {
        warning!(
            "sqs_ingest: {count} unmask call(s) could not be written to sqs_ingest.unmask_audit (no free background worker slot); they are in the server log"
        );
    }
}

fn role_or_oid(oid: u32) -> String {
    // SAFETY: noerr lookup on the worker's main thread inside its transaction; a non-NULL result is copied.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::Oid::from(oid), true);
        if name.is_null() {
            format!("oid {oid}")
        } else {
            std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn sqs_ingest_audit_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    let Some(record) = Record::decode(BackgroundWorker::get_extra()) else {
        log!("sqs_ingest audit worker: unreadable record, nothing written");
        return;
    };
    // As the bootstrap superuser: the refused caller may have no rights at all, and the row is the extension's.
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(record.database)), None);
    let written = BackgroundWorker::transaction(|| -> std::result::Result<bool, pgrx::spi::SpiError> {
        let present = Spi::get_one::<bool>("SELECT pg_catalog.to_regclass('sqs_ingest.unmask_audit') IS NOT NULL")?;
        if present != Some(true) {
            return Ok(false);
        }
        Spi::run_with_args(
            "INSERT INTO sqs_ingest.unmask_audit
                 (called_at, session_role, effective_role, backend_pid, key_id, succeeded, failure)
             SELECT pg_catalog.timestamptz '2000-01-01 00:00:00+00' + $1 * pg_catalog.interval '1 microsecond',
                    $2, $3, $4, $5, $6, $7
               FROM pg_catalog.generate_series(1, $8)",
            &[
                record.at_us.into(),
                role_or_oid(record.session).into(),
                role_or_oid(record.current).into(),
                record.pid.into(),
                record.key_id.into(),
                matches!(record.kind, Kind::RevealedThenRolledBack).into(),
                record.kind.failure(record.key_id).into(),
                (record.count as i32).into(),
            ],
        )?;
        Ok(true)
    });
    match written {
        Ok(true) => {}
        Ok(false) => log!("sqs_ingest audit worker: sqs_ingest is not installed in that database; nothing written"),
        Err(e) => log!("sqs_ingest audit worker: could not write the refusal: {e}"),
    }
}
