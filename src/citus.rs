//! Citus awareness: where the masking keys live, which tables must stay local, and how ingest writes to a
//! distributed target. Citus is not a dependency: every check reads Citus's catalogs only when they exist
//! (`pg_catalog.pg_dist_local_group`, `pg_catalog.pg_dist_partition`), so on a plain server each costs one
//! `to_regclass`. Every lookup runs under the pinned `search_path` ([`crate::privilege::pinned`]), as every
//! statement of the extension does.
//!
//! The rules, from Citus's documented behaviour: the coordinator is group 0 of `pg_dist_local_group`, every worker
//! node another group; Citus runs a function call inside a query on the worker nodes that hold the shards
//! (pushdown), where the extension exists (Citus propagates `CREATE EXTENSION`) but the keys do not; a reference
//! or distributed table's writes go through the distributed executor, which the ledger's per-message
//! `INSERT … ON CONFLICT` inside the caller's transaction cannot rely on.

use crate::error::{Error, Result};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

fn catalog_exists(name: &str) -> bool {
    Spi::get_one_with_args::<bool>("SELECT pg_catalog.to_regclass($1) IS NOT NULL", &[name.into()])
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// This node's Citus group: Some(0) on a coordinator, another number on a worker node, None without Citus.
fn local_group() -> Option<i32> {
    if !catalog_exists("pg_catalog.pg_dist_local_group") {
        return None;
    }
    Spi::get_one::<i32>("SELECT groupid FROM pg_catalog.pg_dist_local_group LIMIT 1").ok().flatten()
}

/// ERROR (55000) unless the masking keys can be here: on a Citus worker node they cannot (they live with the
/// coordinator's `sqs_ingest.keys`), and a key made there would be unrelated to every stored token.
pub fn require_key_home() -> Result<()> {
    match crate::privilege::pinned(local_group) {
        Some(group) if group != 0 => Err(Error::Unavailable {
            code: PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            message: format!(
                "sqs_ingest masking keys live on the Citus coordinator; this is a worker node (group {group})"
            ),
            hint: "Mask, unmask and ingest on the coordinator. To find rows by a token, compute the token there \
                   first (SELECT sqs_ingest.mask('...') in its own statement, or a MATERIALIZED CTE) and compare \
                   the column with that value: a mask() inside a distributed query runs on the worker nodes."
                .into(),
        }),
        _ => Ok(()),
    }
}

/// Whether `table` is a Citus distributed or reference table (false without Citus).
pub fn is_distributed(table: pg_sys::Oid) -> bool {
    crate::privilege::pinned(|| distributed(table))
}

fn distributed(table: pg_sys::Oid) -> bool {
    catalog_exists("pg_catalog.pg_dist_partition")
        && Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition
                             WHERE logicalrelid OPERATOR(pg_catalog.=) $1::pg_catalog.regclass)",
            &[table.into()],
        )
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// ERROR (0A000) when one of the extension's own tables (ledger, keys, dead letters, counters, …) was made a
/// Citus distributed or reference table: they must stay local to the coordinator, where ingest's transaction
/// writes them.
pub fn require_local_bookkeeping() -> Result<()> {
    crate::privilege::pinned(bookkeeping_local)
}

fn bookkeeping_local() -> Result<()> {
    if !catalog_exists("pg_catalog.pg_dist_partition") {
        return Ok(());
    }
    let found = Spi::get_one::<String>(
        "SELECT p.logicalrelid::pg_catalog.text FROM pg_catalog.pg_dist_partition p
           JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) p.logicalrelid
          WHERE c.relnamespace OPERATOR(pg_catalog.=) 'sqs_ingest'::pg_catalog.regnamespace
          ORDER BY 1 LIMIT 1",
    )
    .ok()
    .flatten();
    match found {
        Some(table) => Err(Error::Unavailable {
            code: PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            message: format!("{table} is a Citus distributed or reference table; sqs_ingest's tables must stay local"),
            hint: format!(
                "Make it a local table again on the coordinator (SELECT undistribute_table('{table}')); only the \
                 target table may be distributed."
            ),
        }),
        None => Ok(()),
    }
}

/// Makes Citus run multi-shard modifications of this (sub)transaction over one connection per worker node
/// (`citus.multi_shard_modify_mode = sequential`, at the current GUC nest level, so the caller's setting comes
/// back when it pops): ingest's row-by-row isolation and its many small inserts are much faster that way than in
/// Citus's default parallel mode.
pub fn sequential_modifications() {
    // SAFETY: sets a (placeholder, if Citus is not loaded) GUC on the main thread inside a transaction; the
    // enclosing nest level (crate::privilege::as_role) restores it.
    unsafe {
        pg_sys::set_config_option(
            c"citus.multi_shard_modify_mode".as_ptr(),
            c"sequential".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
}
