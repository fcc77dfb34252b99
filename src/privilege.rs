//! Who a statement runs as, and with which `search_path`.
//!
//! Keys, the ledger, dead letters, the audit trail and the counters are readable and writable only by the
//! extension owner. The functions ordinary (granted) roles call run as the caller, so the target table's normal
//! privileges apply, and switch to the owner only around the statements that touch those internal tables —
//! exactly what a SECURITY DEFINER function with `SET search_path` does, scoped to a closure ([`as_owner`]).
//!
//! Every statement the extension runs does so under a pinned `search_path` (`pg_catalog, pg_temp`: no schema a
//! caller or database owner can plant operators, functions or types in; [`pinned`]); only the name of the target
//! table is resolved with the caller's path, because naming it is the caller's choice. A privileged caller
//! (a superuser, or a worker connected as one) never writes into a table a non-superuser owns as itself: such
//! statements run as the table's owner in a security-restricted context ([`writer_for`]), as Postgres' own
//! maintenance commands do, so the owner's triggers cannot borrow the caller's privileges.

use pgrx::pg_sys;

/// The `search_path` internal statements run under: nothing a caller can plant objects in.
const SAFE_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, pg_temp";

struct OwnerContext {
    saved_user: pg_sys::Oid,
    saved_context: i32,
    guc_nest_level: i32,
}

impl Drop for OwnerContext {
    fn drop(&mut self) {
        // SAFETY: restores exactly what `enter` saved, on the main thread, inside the same transaction. On an
        // ERROR the transaction abort also resets both, so a double restore is harmless.
        unsafe {
            // isCommit = false, as Postgres' own restricted operations do: a setting changed inside (by a trigger of
            // the table written as its owner, say) must not survive into the caller's session.
            pg_sys::AtEOXact_GUC(false, self.guc_nest_level);
            pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context);
        }
    }
}

thread_local! {
    /// The extension owner, looked up once per transaction.
    static OWNER: std::cell::Cell<Option<(u32, pg_sys::Oid)>> = const { std::cell::Cell::new(None) };
}

/// The extension owner as last looked up in this backend (for transaction-end hooks, which cannot run SQL).
pub fn last_known_owner() -> Option<pg_sys::Oid> {
    OWNER.get().map(|(_, owner)| owner)
}

/// This backend's local transaction id: per-transaction caches compare against it.
pub fn local_xid() -> u32 {
    // SAFETY: MyProc is set for every backend and worker before any SQL function can run; read on the main thread.
    // From 17 the id sits in the PGPROC's virtual transaction id (storage/proc.h).
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        return (*pg_sys::MyProc).lxid;
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        return (*pg_sys::MyProc).vxid.lxid;
    }
}

/// The OID of the role that owns the extension (cached for the current transaction).
pub fn extension_owner() -> pg_sys::Oid {
    let lxid = local_xid();
    if let Some((x, owner)) = OWNER.get() {
        if x == lxid {
            return owner;
        }
    }
    let owner =
        // Runs under the caller's search_path (it names whom to switch to): every name and operator is qualified.
        pgrx::Spi::get_one::<pg_sys::Oid>(
            "SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'sqs_ingest'::pg_catalog.name",
        )
            .ok()
            .flatten()
            // SAFETY: reading the current user id has no preconditions inside a transaction.
            .unwrap_or_else(|| unsafe { pg_sys::GetUserId() });
    OWNER.set(Some((lxid, owner)));
    owner
}

/// Runs `f` as the extension owner with a pinned search_path, restoring the caller's identity afterwards.
pub fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    as_role(owner, f)
}

/// Runs `f` with the search_path pinned to `pg_catalog, pg_temp`, as the current role.
pub fn pinned<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: a plain read of the current role on the main thread.
    as_role(unsafe { pg_sys::GetUserId() }, f)
}

/// Runs `f` as `role` (in a security-restricted context when that is not the current role) with the
/// search_path pinned, restoring identity and path afterwards.
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut saved_user = pg_sys::Oid::INVALID;
    let mut saved_context = 0;
    // SAFETY: plain reads and writes of backend-local state on the main thread inside a transaction; the
    // guard below restores it on every exit path, including an unwinding ERROR.
    let _guard = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        if role != saved_user {
            pg_sys::SetUserIdAndSecContext(
                role,
                saved_context
                    | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                    | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
            );
        }
        let guc_nest_level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            SAFE_SEARCH_PATH.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        OwnerContext { saved_user, saved_context, guc_nest_level }
    };
    f()
}

fn is_superuser(role: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup on the main thread inside a transaction.
    unsafe { pg_sys::superuser_arg(role) }
}

/// The role statements on a table owned by `table_owner` run as: the current role, unless it is a superuser
/// and the owner is not — then the owner (whose triggers and defaults then run with the owner's rights only).
pub fn writer_for(table_owner: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: a plain read of the current role on the main thread.
    let me = unsafe { pg_sys::GetUserId() };
    if me != table_owner && is_superuser(me) && !is_superuser(table_owner) {
        table_owner
    } else {
        me
    }
}

/// Whether `role` may log in (Postgres 15 refuses a background worker connection as a NOLOGIN role).
pub fn can_login(role: pg_sys::Oid) -> bool {
    pgrx::Spi::get_one_with_args::<bool>(
        "SELECT rolcanlogin FROM pg_catalog.pg_roles WHERE oid OPERATOR(pg_catalog.=) $1",
        &[role.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

pub fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: with noerr = true a missing role gives NULL instead of an ERROR; a non-NULL result is a
    // palloc'd C string we copy at once.
    unsafe {
        let name = pg_sys::GetUserNameFromId(role, true);
        if name.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

/// The current (effective) and session role names, for the audit trail.
pub fn role_names() -> (String, String) {
    // SAFETY: plain reads of the backend's current and session user ids.
    let (current, session) = unsafe { (pg_sys::GetUserId(), pg_sys::GetSessionUserId()) };
    (role_name(current), role_name(session))
}
