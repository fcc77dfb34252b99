//! The extension's transaction and subtransaction callbacks, the ground floor every module with per-transaction
//! state registers with (nothing of ours is imported here). `_PG_init` registers each module's [`Hooks`] once, in
//! the order they run; the Postgres callbacks themselves are installed the first time a module needs them
//! ([`ensure_registered`]). Postgres calls them on the backend's main thread at every transaction event.

use pgrx::pg_sys;
use std::cell::{Cell, RefCell};

/// What one module does at transaction events. Hooks after COMMIT and ABORT must not raise (a panic there is
/// caught and dropped: it would take the backend down); hooks before COMMIT or PREPARE may raise to refuse it.
#[derive(Default)]
pub struct Hooks {
    /// Before COMMIT, still inside the transaction.
    pub pre_commit: Option<fn()>,
    /// Before PREPARE TRANSACTION, still inside the transaction.
    pub pre_prepare: Option<fn()>,
    pub commit: Option<fn()>,
    /// After PREPARE TRANSACTION.
    pub prepare: Option<fn()>,
    pub abort: Option<fn()>,
    /// A subtransaction rolled back (its id).
    pub subxact_abort: Option<fn(pg_sys::SubTransactionId)>,
    /// A subtransaction was released into its parent (its id, the parent's).
    pub subxact_commit: Option<fn(pg_sys::SubTransactionId, pg_sys::SubTransactionId)>,
}

thread_local! {
    static HOOKS: RefCell<Vec<Hooks>> = const { RefCell::new(Vec::new()) };
    static INSTALLED: Cell<bool> = const { Cell::new(false) };
}

/// Adds a module's hooks (from `_PG_init`); they run after those registered before them.
pub fn register(hooks: Hooks) {
    HOOKS.with(|h| h.borrow_mut().push(hooks));
}

/// Installs the Postgres callbacks once per backend.
pub fn ensure_registered() {
    if INSTALLED.get() {
        return;
    }
    // SAFETY: registering static callbacks with Postgres; called on the main thread.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
    INSTALLED.set(true);
}

/// Runs the hook `pick` selects of every module, in order; with `catch`, a panic in one is dropped.
fn each<F: Copy>(pick: impl Fn(&Hooks) -> Option<F>, run: impl Fn(F), catch: bool) {
    let hooks: Vec<F> = HOOKS.with(|h| h.borrow().iter().filter_map(&pick).collect());
    for hook in hooks {
        if catch {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(hook)));
        } else {
            run(hook);
        }
    }
}

// SAFETY: registered with RegisterXactCallback; Postgres calls it on the backend's main thread at every
// transaction event; it only runs the registered hooks.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_PREPARE => each(|h| h.pre_prepare, |f| f(), false),
        XACT_EVENT_PRE_COMMIT => each(|h| h.pre_commit, |f| f(), false),
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => each(|h| h.commit, |f| f(), true),
        XACT_EVENT_PREPARE => each(|h| h.prepare, |f| f(), true),
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => each(|h| h.abort, |f| f(), true),
        _ => {}
    }
}

// SAFETY: registered with RegisterSubXactCallback; same thread and state as `on_xact`.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_ABORT_SUB => each(|h| h.subxact_abort, |f| f(my), true),
        SUBXACT_EVENT_COMMIT_SUB => each(|h| h.subxact_commit, |f| f(my, parent), false),
        _ => {}
    }
}
