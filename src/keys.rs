//! Master keys: generated on first need by ingest or an explicit key call (never by `mask()`), persisted in
//! `sqs_ingest.keys` (in the clear, or wrapped by AWS KMS when `sqs_ingest.kms_key_id` is set), cached per
//! transaction.
//!
//! Cache invalidation: the keyring is cached for one transaction (keyed by the local transaction id, so the next
//! transaction reads the table again and sees keys other sessions rotated in), dropped by [`rotate`], and dropped
//! when a subtransaction rolls back or the transaction aborts ([`xact_hooks`]): a key created or activated inside
//! a rolled-back savepoint no longer exists, and no token may be minted with it. A key unwrapped by KMS is kept
//! in the backend's memory (never in a GUC, shared memory or a table) for `sqs_ingest.kms_key_cache_lifetime`,
//! by key id and wrapped bytes: after that, or when the row changes, KMS is asked again.
//!
//! The table is readable only by the extension owner; every read goes through [`crate::privilege::as_owner`].
//! `sqs_ingest.key_events` remembers that keys were ever generated, so an emptied key table is an ERROR, never a silent new
//! key that would orphan every stored token. On a Citus worker node no key is ever read or made
//! ([`crate::citus::require_key_home`]).

use crate::error::{Error, Result};
use crate::privilege::{as_owner, extension_owner, local_xid};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use sqs_ingest_core::mask::{generate_key, KeyMaterial, Keyring};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

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
    crate::citus::require_key_home()?;
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

/// The active key alone, cached per transaction (mask() calls this once per row). With `create` (ingest), the
/// first key is generated if there is none; without it (mask()), no key is an ERROR.
pub fn active_material(create: bool) -> Result<Rc<KeyMaterial>> {
    let lxid = local_xid();
    if let Some(k) = ACTIVE.with(|a| a.borrow().as_ref().filter(|(x, _)| *x == lxid).map(|(_, k)| k.clone())) {
        return Ok(k);
    }
    let (ring, id) = if create { active_key()? } else { existing_active_key()? };
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

/// The active key; none is an ERROR (55000): `mask()` never makes a key, since a token of a key made for a lookup
/// matches nothing ever stored.
fn existing_active_key() -> Result<(Rc<Keyring>, i32)> {
    let ring = keyring(false)?;
    if ring.active().is_none() && as_owner(extension_owner(), ever_generated)? {
        return Err(deleted_keys());
    }
    let id = ring.active().map(|k| k.id()).ok_or_else(|| Error::Unavailable {
        code: PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        message: "no masking key exists in this database yet; mask() does not create one".into(),
        hint: "Keys are made by the first ingest or by sqs_ingest.rotate_key() (as the extension owner). A token \
               of a new key would match nothing stored; on Citus, mask on the coordinator."
            .into(),
    })?;
    Ok((ring, id))
}

/// A key this backend unwrapped with KMS: the wrapped bytes it came from, when, and the key.
struct Unwrapped {
    blob: Vec<u8>,
    at: Instant,
    key: KeyMaterial,
}

thread_local! {
    /// Keys this backend unwrapped with KMS, by key id.
    static UNWRAPPED: RefCell<HashMap<i32, Unwrapped>> = RefCell::new(HashMap::new());
}

/// One row of `sqs_ingest.keys`.
struct KeyRow {
    id: i32,
    clear: Option<Vec<u8>>,
    active: bool,
    wrapped: Option<Vec<u8>>,
    kms_key_arn: Option<String>,
}

/// A key unwrapped earlier in this backend, if it is still the row's and younger than the cache lifetime.
fn unwrapped(id: i32, blob: &[u8]) -> Option<KeyMaterial> {
    let lifetime = crate::gucs::kms_key_cache_lifetime();
    UNWRAPPED
        .with(|u| u.borrow().get(&id).filter(|u| u.blob == blob && u.at.elapsed() < lifetime).map(|u| u.key.clone()))
}

fn remember_unwrapped(id: i32, blob: Vec<u8>, plaintext: &[u8]) -> Result<KeyMaterial> {
    let key = KeyMaterial::new(id, plaintext).map_err(|_| Error::Keys(format!("masking key {id} is damaged")))?;
    UNWRAPPED.with(|u| u.borrow_mut().insert(id, Unwrapped { blob, at: Instant::now(), key: key.clone() }));
    Ok(key)
}

fn load() -> Result<Keyring> {
    let wrapping = crate::bookkeeping::Schema::detect()?.keys_wrapped;
    let sql = if wrapping {
        "SELECT key_id, key_bytes, active, wrapped, kms_key_arn FROM sqs_ingest.keys ORDER BY key_id"
    } else {
        "SELECT key_id, key_bytes, active, NULL::bytea, NULL::text FROM sqs_ingest.keys ORDER BY key_id"
    };
    let rows: Vec<KeyRow> = Spi::connect(|client| {
        let rows =
            client.select(sql, None, &[]).map_err(|e| Error::Keys(format!("cannot read sqs_ingest.keys: {e}")))?;
        Ok::<_, Error>(
            rows.map(|row| KeyRow {
                id: row.get(1).ok().flatten().unwrap_or_default(),
                clear: row.get(2).ok().flatten(),
                active: row.get(3).ok().flatten().unwrap_or(false),
                wrapped: row.get(4).ok().flatten(),
                kms_key_arn: row.get(5).ok().flatten(),
            })
            .collect(),
        )
    })?;
    let mut ring = Keyring::new();
    for KeyRow { id, clear, active, wrapped, kms_key_arn: arn } in rows {
        let key = match (clear, wrapped, arn) {
            (Some(bytes), _, _) => {
                KeyMaterial::new(id, &bytes).map_err(|_| Error::Keys(format!("masking key {id} is damaged")))?
            }
            (None, Some(blob), Some(kms_key_arn)) => match unwrapped(id, &blob) {
                Some(key) => key,
                None => {
                    let wrapped = crate::kms::Wrapped { blob, kms_key_arn };
                    let plaintext = crate::kms::unwrap(id, &wrapped)?;
                    remember_unwrapped(id, wrapped.blob, &plaintext)?
                }
            },
            _ => return Err(Error::Keys(format!("masking key {id} has neither key bytes nor a wrapped key"))),
        };
        ring.add(key, active);
    }
    Ok(ring)
}

/// Stores a new master key with `sql_clear` (`$1` the key bytes) or, when `sqs_ingest.kms_key_id` is set, a key
/// KMS generated with `sql_wrapped` (`$1` its id, `$2` the wrapped key, `$3` the KMS key's ARN); each returns the
/// id stored. None when the statement stored nothing (a concurrent first key won).
fn store_new_key(sql_clear: &str, sql_wrapped: &str) -> Result<Option<i32>> {
    let insert = |sql: &str, args: &[pgrx::datum::DatumWithOid]| -> Result<Option<i32>> {
        Spi::connect_mut(|client| {
            let rows =
                client.update(sql, None, args).map_err(|e| Error::Keys(format!("cannot store a new key: {e}")))?;
            Ok(rows.into_iter().next().and_then(|r| r.get::<i32>(1).ok().flatten()))
        })
    };
    let schema = crate::bookkeeping::Schema::detect()?;
    match crate::gucs::kms_key_id() {
        None => {
            // Fail closed: a database whose keys are wrapped never gets a key in the clear because one session (or
            // a server a dump was restored on) lacks the setting.
            let wrapped = schema.keys_wrapped
                && Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM sqs_ingest.keys WHERE wrapped IS NOT NULL)")
                    .map_err(|e| Error::Keys(e.to_string()))?
                    .unwrap_or(false);
            if wrapped {
                return Err(Error::Unavailable {
                    code: PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    message:
                        "this database's masking keys are wrapped by AWS KMS, but sqs_ingest.kms_key_id is not set \
                              here: refusing to make a key in the clear"
                            .into(),
                    hint: "Set sqs_ingest.kms_key_id for every session (ALTER SYSTEM, or ALTER DATABASE ... SET as a \
                           superuser), then retry."
                        .into(),
                });
            }
            insert(sql_clear, &[generate_key().to_vec().into()])
        }
        Some(kms_key) => {
            if !schema.keys_wrapped {
                return Err(schema_predates_kms());
            }
            let id = Spi::get_one::<i64>("SELECT pg_catalog.nextval('sqs_ingest.key_id_seq')")
                .map_err(|e| Error::Keys(e.to_string()))?
                .unwrap_or_default() as i32;
            let (plaintext, wrapped) = crate::kms::generate(&kms_key, id)?;
            let stored =
                insert(sql_wrapped, &[id.into(), wrapped.blob.clone().into(), wrapped.kms_key_arn.clone().into()])?;
            if stored == Some(id) {
                remember_unwrapped(id, wrapped.blob, &plaintext)?;
            }
            Ok(stored)
        }
    }
}

/// Whether keys were ever generated in this database (run as the owner).
fn ever_generated() -> Result<bool> {
    Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM sqs_ingest.key_events)")
        .map_err(|e| Error::Keys(e.to_string()))
        .map(|b| b.unwrap_or(false))
}

fn deleted_keys() -> Error {
    Error::Keys("the masking keys in sqs_ingest.keys were deleted; refusing to generate a new key silently".into())
}

/// The ERROR for a database whose schema predates KMS-wrapped keys (the library was installed, the extension not
/// yet updated).
fn schema_predates_kms() -> Error {
    Error::Unavailable {
        code: PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        message: "this database's sqs_ingest schema predates masking keys under AWS KMS".into(),
        hint: "Run ALTER EXTENSION sqs_ingest UPDATE in this database first.".into(),
    }
}

/// Makes the first key; its id, or None when a concurrent first call made it.
fn create_first_key() -> Result<Option<i32>> {
    if ever_generated()? {
        return Err(deleted_keys());
    }
    // The partial unique index on the active key makes concurrent first uses agree on one key: the loser's insert
    // does nothing (and returns no row, which is fine: the caller loads the winner's key).
    let log = "INSERT INTO sqs_ingest.key_events (key_id, event) SELECT key_id, e FROM k, (VALUES ('generated'), ('activated')) AS v(e)";
    store_new_key(
        &format!(
            "WITH k AS (INSERT INTO sqs_ingest.keys (key_bytes, active) VALUES ($1, true)
                        ON CONFLICT (active) WHERE active DO NOTHING RETURNING key_id),
                  log AS ({log})
             SELECT key_id FROM k"
        ),
        &format!(
            "WITH k AS (INSERT INTO sqs_ingest.keys (key_id, wrapped, kms_key_arn, active) VALUES ($1, $2, $3, true)
                        ON CONFLICT (active) WHERE active DO NOTHING RETURNING key_id),
                  log AS ({log})
             SELECT key_id FROM k"
        ),
    )
}

/// Makes a new key the active one (the first key, when there is none); returns its id.
pub fn rotate() -> Result<i32> {
    crate::citus::require_key_home()?;
    let owner = extension_owner();
    let id = as_owner(owner, || -> Result<i32> {
        // Without a key, rotating makes the first one (since 0.7.0 the way to have a key before the first ingest:
        // mask() no longer makes one).
        if load()?.active().is_none() {
            if let Some(first) = create_first_key()? {
                return Ok(first);
            }
        }
        let swap = |insert: &str| {
            format!(
                "WITH old AS (UPDATE sqs_ingest.keys SET active = false WHERE active RETURNING key_id),
                      new AS ({insert} RETURNING key_id),
                      log AS (INSERT INTO sqs_ingest.key_events (key_id, event)
                              SELECT key_id, 'retired' FROM old
                              UNION ALL SELECT key_id, e FROM new, (VALUES ('generated'), ('activated')) AS v(e))
                 SELECT key_id FROM new"
            )
        };
        store_new_key(
            &swap("INSERT INTO sqs_ingest.keys (key_bytes, active) SELECT $1, true FROM (SELECT count(*) FROM old) AS wait_for_old"),
            &swap("INSERT INTO sqs_ingest.keys (key_id, wrapped, kms_key_arn, active)
                   SELECT $1, $2, $3, true FROM (SELECT count(*) FROM old) AS wait_for_old"),
        )?
        .ok_or_else(|| Error::Keys("key insert returned nothing".into()))
    })?;
    invalidate();
    Ok(id)
}

/// Wraps every key stored in the clear with the KMS key `sqs_ingest.kms_key_id` names (`Encrypt`, bound to the
/// key id) and removes the clear bytes; returns how many were wrapped. Tokens are unchanged: the keys are the same.
pub fn wrap_all() -> Result<i64> {
    let kms_key = crate::gucs::kms_key_id().ok_or_else(|| {
        Error::InvalidArgument(
            "sqs_ingest.kms_key_id is not set: name the KMS key to wrap the masking keys with".into(),
        )
    })?;
    crate::citus::require_key_home()?;
    let owner = extension_owner();
    let n = as_owner(owner, || -> Result<i64> {
        if !crate::bookkeeping::Schema::detect()?.keys_wrapped {
            return Err(schema_predates_kms());
        }
        let clear: Vec<(i32, zeroize::Zeroizing<Vec<u8>>)> = Spi::connect(|client| {
            let rows = client
                .select(
                    "SELECT key_id, key_bytes FROM sqs_ingest.keys WHERE key_bytes IS NOT NULL ORDER BY key_id FOR UPDATE",
                    None,
                    &[],
                )
                .map_err(|e| Error::Keys(format!("cannot read sqs_ingest.keys: {e}")))?;
            Ok::<_, Error>(
                rows.map(|r| {
                    let bytes: Vec<u8> = r.get(2).ok().flatten().unwrap_or_default();
                    (r.get(1).ok().flatten().unwrap_or_default(), zeroize::Zeroizing::new(bytes))
                })
                .collect(),
            )
        })?;
        for (id, bytes) in &clear {
            let wrapped = crate::kms::wrap(&kms_key, *id, bytes)?;
            Spi::run_with_args(
                "WITH w AS (UPDATE sqs_ingest.keys SET wrapped = $2, kms_key_arn = $3, key_bytes = NULL
                             WHERE key_id = $1 RETURNING key_id)
                 INSERT INTO sqs_ingest.key_events (key_id, event) SELECT key_id, 'wrapped' FROM w",
                &[(*id).into(), wrapped.blob.clone().into(), wrapped.kms_key_arn.into()],
            )
            .map_err(|e| Error::Keys(format!("cannot store wrapped key {id}: {e}")))?;
            remember_unwrapped(*id, wrapped.blob, bytes)?;
        }
        Ok(clear.len() as i64)
    })?;
    invalidate();
    Ok(n)
}
