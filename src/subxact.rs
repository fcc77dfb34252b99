//! Catching the ERRORs Postgres raises inside a call: without a subtransaction (the transaction is then failed
//! and the caller re-raises or aborts at once), or inside an internal subtransaction (as PL/pgSQL's exception
//! blocks do), which rolls back only what it ran. Ground floor: nothing of ours imported.

use pgrx::pg_sys;

/// Runs `f` and returns an ERROR it raises, without a subtransaction (the caller re-raises it at once: the
/// transaction is aborted).
pub fn catch_error<R>(f: impl FnOnce() -> R) -> std::result::Result<R, Box<pgrx::pg_sys::panic::ErrorReportWithLevel>> {
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f())))
        .catch_others(|e| match e {
            // Raised by Postgres (through an FFI call), or by our own code with ereport.
            pgrx::pg_sys::panic::CaughtError::PostgresError(r) | pgrx::pg_sys::panic::CaughtError::ErrorReport(r) => {
                Err(Box::new(r))
            }
            other => other.rethrow(),
        })
        .execute()
}

/// Runs `f` in an internal subtransaction (as PL/pgSQL's exception blocks do). An ERROR raised inside rolls back
/// only the subtransaction and is returned; anything else (a Rust panic) rolls it back too and propagates.
pub fn in_subtransaction<R>(
    f: impl FnOnce() -> R,
) -> std::result::Result<R, Box<pgrx::pg_sys::panic::ErrorReportWithLevel>> {
    // SAFETY: the documented sequence for internal subtransactions on the main thread inside a transaction; the
    // memory context and resource owner are restored afterwards on every path, as pl_exec.c does.
    let (context, owner) = unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        (context, owner)
    };
    let result =
        pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f()))).catch_others(|e| Err(Box::new(e))).execute();
    // SAFETY: closes the subtransaction opened above and restores the caller's context and owner.
    unsafe {
        if result.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    }
    match result {
        Ok(r) => Ok(r),
        Err(caught) => match *caught {
            pgrx::pg_sys::panic::CaughtError::PostgresError(report) => Err(Box::new(report)),
            other => other.rethrow(),
        },
    }
}
