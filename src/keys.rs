//! Master keys: generated on first need, persisted in `sqs_ingest.keys`, cached per transaction.
//!
//! Cache invalidation: the keyring is cached for one transaction (keyed by the local transaction id, so the next
//! transaction reads the table again and sees keys other sessions rotated in), dropped by [`rotate`], and dropped
//! when a subtransaction rolls back or the transaction aborts ([`xact_hooks`]): a key created or activated inside
//! a rolled-back savepoint no longer exists, and no token may be minted with it.
//!
//! The table is readable only by the extension owner; every read goes through [`crate::privilege::as_owner`].
//! `sqs_ingest.key_events` remembers that keys were ever generated, so an emptied key table is an ERROR, never a silent new
//! key that would orphan every stored token.

use crate::error::{Error, Result};
use crate::privilege::{as_owner, extension_owner, local_xid};
use pgrx::prelude::*;
use sqs_ingest_core::mask::{generate_key, KeyMaterial, Keyring};
use std::cell::RefCell;
use std::rc::Rc;

struct Cached {
    lxid: u32,
    ring: Rc<Keyring>,
}

thread_local! {
    static CACHE: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

/// Drops the cached keyring (after rotation, or when a transaction may have changed the keys).
pub fn invalidate() {
    CACHE.with(|c| *c.borrow_mut() = None);
    ACTIVE.with(|a| *a.borrow_mut() = None);
}

/// This module's transaction hooks: forget the cached keys when a subtransaction rolls back or the transaction
/// aborts.
pub fn xact_hooks() -> crate::xact::Hooks {
    crate::xact::Hooks { abort: Some(invalidate), subxact_abort: Some(|_| invalidate()), ..Default::default() }
}

/// The keyring for this transaction, loaded once per transaction. With `create`, generates the first key.
pub fn keyring(create: bool) -> Result<Rc<Keyring>> {
    let lxid = local_xid();
    if let Some(ring) = CACHE.with(|c| c.borrow().as_ref().filter(|c| c.lxid == lxid).map(|c| c.ring.clone())) {
        if ring.active().is_some() || !create {
            return Ok(ring);
        }
    }
    let owner = extension_owner();
    let ring = as_owner(owner, || -> Result<Keyring> {
        let mut ring = load()?;
        if ring.active().is_none() && create {
            create_first_key()?;
            ring = load()?;
        }
        Ok(ring)
    })?;
    let ring = Rc::new(ring);
    crate::xact::ensure_registered();
    CACHE.with(|c| *c.borrow_mut() = Some(Cached { lxid, ring: ring.clone() }));
    Ok(ring)
}

thread_local! {
    /// The active key of the current transaction, for the per-row hot path of mask().
    static ACTIVE: RefCell<Option<(u32, Rc<KeyMaterial>)>> = const { RefCell::new(None) };
}

/// The active key alone, cached per transaction (mask() calls this once per row).
pub fn active_material() -> Result<Rc<KeyMaterial>> {
    let lxid = local_xid();
    if let Some(k) = ACTIVE.with(|a| a.borrow().as_ref().filter(|(x, _)| *x == lxid).map(|(_, k)| k.clone())) {
        return Ok(k);
    }
    let (ring, id) = active_key()?;
    let key = Rc::new(ring.get(id).expect("active key is in the ring").clone());
    ACTIVE.with(|a| *a.borrow_mut() = Some((lxid, key.clone())));
    Ok(key)
}

/// The active key, generating the first one if none exists.
pub fn active_key() -> Result<(Rc<Keyring>, i32)> {
    let ring = keyring(true)?;
    let id = ring.active().map(|k| k.id()).ok_or_else(|| Error::Keys("no active masking key".into()))?;
    Ok((ring, id))
}

fn load() -> Result<Keyring> {
    Spi::connect(|client| {
        let rows = client
            .select("SELECT key_id, key_bytes, active FROM sqs_ingest.keys ORDER BY key_id", None, &[])
            .map_err(|e| Error::Keys(format!("cannot read sqs_ingest.keys: {e}")))?;
        let mut ring = Keyring::new();
        for row in rows {
            let id: i32 = row.get(1).ok().flatten().unwrap_or_default();
            let bytes: Vec<u8> = row.get(2).ok().flatten().unwrap_or_default();
            let active: bool = row.get(3).ok().flatten().unwrap_or(false);
            let key = KeyMaterial::new(id, &bytes).map_err(|_| Error::Keys(format!("masking key {id} is damaged")))?;
            ring.add(key, active);
        }
        Ok(ring)
    })
}

fn create_first_key() -> Result<()> {
    let ever_generated = Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM sqs_ingest.key_events)")
        .map_err(|e| Error::Keys(e.to_string()))?
        .unwrap_or(false);
    if ever_generated {
        return Err(Error::Keys(
            "the masking keys in sqs_ingest.keys were deleted; refusing to generate a new key silently".into(),
        ));
    }
    let key = generate_key();
    // The partial unique index on the active key makes concurrent first uses agree on one key.
    Spi::run_with_args(
        "WITH k AS (INSERT INTO sqs_ingest.keys (key_bytes, active) VALUES ($1, true)
                    ON CONFLICT (active) WHERE active DO NOTHING RETURNING key_id)
         INSERT INTO sqs_ingest.key_events (key_id, event) SELECT key_id, e FROM k, (VALUES ('generated'), ('activated')) AS v(e)",
        &[key.to_vec().into()],
    )
    .map_err(|e| Error::Keys(format!("cannot store a new key: {e}")))?;
    Ok(())
}

/// Makes a new key the active one; returns its id.
pub fn rotate() -> Result<i32> {
    let owner = extension_owner();
    let id = as_owner(owner, || -> Result<i32> {
        // Generate the first key if there is none, so rotation always leaves an older key behind to read.
        if load()?.active().is_none() {
            create_first_key()?;
        }
        let key = generate_key();
        Spi::get_one_with_args::<i32>(
            "WITH old AS (UPDATE sqs_ingest.keys SET active = false WHERE active RETURNING key_id),
                  new AS (INSERT INTO sqs_ingest.keys (key_bytes, active)
                          SELECT $1, true FROM (SELECT count(*) FROM old) AS wait_for_old RETURNING key_id),
                  log AS (INSERT INTO sqs_ingest.key_events (key_id, event)
                          SELECT key_id, 'retired' FROM old
                          UNION ALL SELECT key_id, e FROM new, (VALUES ('generated'), ('activated')) AS v(e))
             SELECT key_id FROM new",
            &[key.to_vec().into()],
        )
        .map_err(|e| Error::Keys(e.to_string()))?
        .ok_or_else(|| Error::Keys("key insert returned nothing".into()))
    })?;
    invalidate();
    Ok(id)
}
