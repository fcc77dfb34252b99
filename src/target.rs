//! The table login rows go to: resolved with the caller's search_path (naming it is the caller's choice; every
//! other statement runs with a pinned path), created on first ingest if missing (owned by the caller, never an
//! extension member, so DROP EXTENSION keeps the data), and inspected for the column limits that validation
//! checks against and for its owner (see [`crate::privilege::writer_for`]).

use crate::error::{Error, Result};
use crate::privilege::{as_owner, extension_owner, pinned};
use pgrx::prelude::*;
use sqs_ingest_core::event::{AppVersionColumn, ColumnLimits};
use sqs_ingest_core::pipeline::ColumnKind;

/// A target table that passed inspection, locked (ROW EXCLUSIVE) for the rest of the transaction: it cannot be
/// dropped, re-owned or given new constraints or triggers meanwhile. `name` is its schema-qualified name at
/// inspection, for messages; statements name it by [`Target::current_name`], so a table swapped in under the
/// same name (a schema rename) is never the one written.
#[derive(Debug, Clone)]
pub struct Target {
    pub oid: pg_sys::Oid,
    pub name: String,
    pub owner: pg_sys::Oid,
    pub limits: ColumnLimits,
    /// Whether the table can refuse a row that passed validation (constraints, unique indexes, NOT NULL, domain
    /// columns, triggers, rules, partitioning): only then is each batch stored in a subtransaction.
    pub can_refuse_rows: bool,
    /// For a table with deferrable constraints: `SET CONSTRAINTS … IMMEDIATE` naming them (run before each insert
    /// in its subtransaction, so their checks fire at the end of the insert: a violation is that row's, not the
    /// COMMIT's, and nothing is deferred out of a security-restricted operation), and the `SET CONSTRAINTS …
    /// DEFERRED` that puts the initially deferred ones back afterwards.
    pub deferred_checks: Option<(String, Option<String>)>,
    /// A Citus distributed or reference table: its inserts run with sequential multi-shard modification.
    pub distributed: bool,
}

impl Target {
    /// The table's schema-qualified, quoted name now, from the system caches (by OID, not by name).
    pub fn current_name(&self) -> Result<String> {
        // SAFETY: syscache lookups by OID on the main thread inside a transaction; results are copied at once.
        unsafe {
            let rel = pg_sys::get_rel_name(self.oid);
            let namespace = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(self.oid));
            if rel.is_null() || namespace.is_null() {
                return Err(Error::Target(format!("table {} no longer exists", self.name)));
            }
            let quoted = pg_sys::quote_qualified_identifier(namespace, rel);
            Ok(std::ffi::CStr::from_ptr(quoted).to_string_lossy().into_owned())
        }
    }
}

/// Locks a table found by name against DROP, owner and schema changes for the rest of the transaction, then
/// checks the name still names it (as RangeVarGetRelidExtended does).
fn lookup_locked(name: &str) -> Result<Option<pg_sys::Oid>> {
    for _ in 0..3 {
        let Some(oid) = lookup(name)? else { return Ok(None) };
        // Only a role that may write the table may lock it (as LOCK TABLE's own check): otherwise a role could
        // hold a lock on any table by naming it in sqs_ingest.target_table.
        require(oid, pg_sys::ACL_INSERT as pg_sys::AclMode)?;
        // SAFETY: a heavyweight lock on a relation OID, released at transaction end.
        unsafe { pg_sys::LockRelationOid(oid, pg_sys::RowExclusiveLock as i32) };
        if lookup(name)? == Some(oid) {
            return Ok(Some(oid));
        }
        // SAFETY: releases the lock taken just above on a table that no longer has this name.
        unsafe { pg_sys::UnlockRelationOid(oid, pg_sys::RowExclusiveLock as i32) };
    }
    Err(Error::Target(format!("table \"{name}\" keeps changing; try again")))
}

fn require(oid: pg_sys::Oid, mode: pg_sys::AclMode) -> Result<()> {
    // SAFETY: a catalog privilege check on the main thread inside a transaction.
    let ok = unsafe { pg_sys::pg_class_aclcheck(oid, pg_sys::GetUserId(), mode) } == pg_sys::AclResult::ACLCHECK_OK;
    if ok {
        Ok(())
    } else {
        Err(Error::Permission(format!("permission denied for the target table (oid {})", oid.to_u32())))
    }
}

/// Locks and inspects the table with this OID (for `rekey(regclass)`: any table that holds tokens, so only what
/// every target has is inspected).
pub fn resolve_oid(oid: pg_sys::Oid) -> Result<Target> {
    require(oid, pg_sys::ACL_UPDATE as pg_sys::AclMode)?;
    // SAFETY: as in lookup_locked.
    unsafe { pg_sys::LockRelationOid(oid, pg_sys::RowExclusiveLock as i32) };
    pinned(|| inspect_any(oid))
}

/// Resolves a pipeline's target by name (never created: a pipeline names a table its DBA made), locked and
/// inspected for what any table needs (owner, whether it can refuse rows, deferrable constraints).
pub fn resolve_existing(name: &str) -> Result<Target> {
    let oid = lookup_locked(name)?.ok_or_else(|| Error::Pipeline {
        code: pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
        message: format!("target table \"{name}\" does not exist"),
    })?;
    pinned(|| inspect_any(oid))
}

/// A column name as an SQL identifier, always double-quoted (so no name is read as a keyword).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One insertable column of a table, as pipelines map it.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// The column's type without its modifier (`format_type(atttypid, -1)`, which spells `bpchar` and `"bit"`
    /// rather than `character` and `bit`, i.e. length 1; qualified unless in pg_catalog): values are cast to it,
    /// and the assignment to the column applies the modifier (and its length check).
    pub type_sql: String,
    /// The type with its modifier (`numeric(10,2)`): what a single value is checked against to name the column
    /// the table refused.
    pub type_full: String,
    pub kind: ColumnKind,
    /// NOT NULL without a default: a declaration must map it.
    pub needs_value: bool,
    /// Generated, or an identity GENERATED ALWAYS: not insertable.
    pub generated: bool,
}

/// The columns of a table (by OID), in attribute order; runs with the pinned search_path so type names are
/// qualified unless they live in pg_catalog.
pub fn columns(oid: pg_sys::Oid) -> Result<Vec<Column>> {
    pinned(|| {
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT a.attname::pg_catalog.text, pg_catalog.format_type(a.atttypid, -1),
                        b.oid::pg_catalog.int8,
                        CASE WHEN t.typtype OPERATOR(pg_catalog.=) 'd' THEN t.typtypmod ELSE a.atttypmod END,
                        b.typcategory::pg_catalog.text,
                        a.attnotnull AND NOT a.atthasdef AND a.attidentity OPERATOR(pg_catalog.=) '',
                        a.attgenerated OPERATOR(pg_catalog.<>) '' OR a.attidentity OPERATOR(pg_catalog.=) 'a',
                        pg_catalog.format_type(a.atttypid, a.atttypmod)
                   FROM pg_catalog.pg_attribute a
                   JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) a.atttypid
                   JOIN pg_catalog.pg_type b ON b.oid OPERATOR(pg_catalog.=)
                        CASE WHEN t.typtype OPERATOR(pg_catalog.=) 'd' THEN t.typbasetype ELSE t.oid END
                  WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attnum OPERATOR(pg_catalog.>) 0
                    AND NOT a.attisdropped
                  ORDER BY a.attnum",
                None,
                &[oid.into()],
            )?;
            let mut out = Vec::new();
            for r in rows {
                let base = r.get::<i64>(3)?.unwrap_or_default() as u32;
                let typmod = r.get::<i32>(4)?.unwrap_or(-1);
                let category = r.get::<String>(5)?.unwrap_or_default();
                out.push(Column {
                    name: r.get::<String>(1)?.unwrap_or_default(),
                    type_sql: r.get::<String>(2)?.unwrap_or_default(),
                    kind: kind_of(base, typmod, &category),
                    needs_value: r.get::<bool>(6)?.unwrap_or(false),
                    generated: r.get::<bool>(7)?.unwrap_or(false),
                    type_full: r.get::<String>(8)?.unwrap_or_default(),
                });
            }
            Ok::<_, pgrx::spi::SpiError>(out)
        })
    })
    .map_err(|e| Error::Target(format!("cannot read the columns of the target table: {e}")))
}

/// How a (base) type takes text: character types with their length, JSON, arrays, date/time, integers, other.
fn kind_of(base: u32, typmod: i32, category: &str) -> ColumnKind {
    const TEXT: u32 = 25;
    const BPCHAR: u32 = 1042;
    const VARCHAR: u32 = 1043;
    match base {
        TEXT => ColumnKind::Text { max_chars: None },
        BPCHAR | VARCHAR => ColumnKind::Text { max_chars: (typmod > 4).then(|| (typmod - 4) as usize) },
        114 | 3802 => ColumnKind::Json,
        1082 | 1083 | 1114 | 1184 | 1266 => ColumnKind::DateTime,
        20 | 21 | 23 => ColumnKind::Integer,
        _ if category == "A" => ColumnKind::Array,
        _ => ColumnKind::Other,
    }
}

const COLUMNS: [&str; 7] =
    ["user_id", "device_type", "masked_ip", "masked_device_id", "locale", "app_version", "create_date"];

/// Resolves `name` to a table, creating it with the standard schema if it does not exist.
pub fn resolve_or_create(name: &str) -> Result<Target> {
    let oid = lookup_locked(name)?;
    let oid = match oid {
        Some(oid) => oid,
        None => {
            // Concurrent first ingests: one creates, the others wait for it and then find the table. The lock is on
            // an extension table only its owner may lock (an advisory lock key could be taken by any role), and one
            // nothing else locks beyond row inserts.
            as_owner(extension_owner(), || {
                Spi::run("LOCK TABLE sqs_ingest.key_events IN SHARE UPDATE EXCLUSIVE MODE")
                    .map_err(|e| Error::Target(e.to_string()))
            })?;
            if let Some(oid) = lookup_locked(name)? {
                return inspect(oid);
            }
            create(name)?;
            lookup_locked(name)?
                .ok_or_else(|| Error::Target(format!("table \"{name}\" was created but cannot be found")))?
        }
    };
    inspect(oid)
}

fn lookup(name: &str) -> Result<Option<pg_sys::Oid>> {
    Spi::get_one_with_args::<pg_sys::Oid>("SELECT pg_catalog.to_regclass($1)::pg_catalog.oid", &[name.into()])
        .map_err(|e| Error::Target(format!("invalid target table name \"{name}\": {e}")))
}

fn create(name: &str) -> Result<()> {
    // The identifier goes through parse_ident/quote_ident before it is spliced into DDL.
    let quoted = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.string_agg(pg_catalog.quote_ident(p), '.') FROM pg_catalog.unnest(pg_catalog.parse_ident($1)) AS p",
        &[name.into()],
    )
    .map_err(|e| Error::Target(format!("invalid target table name \"{name}\": {e}")))?
    .ok_or_else(|| Error::Target(format!("invalid target table name \"{name}\"")))?;
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {quoted} (
            user_id varchar(128),
            device_type varchar(32),
            masked_ip varchar(256),
            masked_device_id varchar(256),
            locale varchar(32),
            app_version integer,
            create_date pg_catalog.date
        );
        COMMENT ON TABLE {quoted} IS 'User logins ingested from SQS by sqs_ingest; ip and device_id are masked';
        COMMENT ON COLUMN {quoted}.masked_ip IS 'ip masked by sqs_ingest (enc: tokens are reversible with sqs_ingest.unmask)';
        COMMENT ON COLUMN {quoted}.masked_device_id IS 'device_id masked by sqs_ingest (enc: tokens are reversible with sqs_ingest.unmask)';
        COMMENT ON COLUMN {quoted}.app_version IS 'M.m.p packed as M*10000+m*100+p; print with sqs_ingest.app_version_text()';
        COMMENT ON COLUMN {quoted}.create_date IS 'UTC date of the message SentTimestamp'"
    );
    Spi::run(&ddl).map_err(|e| Error::Target(format!("cannot create target table {quoted}: {e}")))
}

fn inspect(oid: pg_sys::Oid) -> Result<Target> {
    pinned(|| {
        let mut target = inspect_pinned(oid)?;
        target.distributed = crate::citus::is_distributed(oid);
        Ok(target)
    })
}

/// What every target needs, without the login columns: a pipeline's rows are converted by each column's type,
/// so any such table can refuse a row (every batch goes into a subtransaction).
fn inspect_any(oid: pg_sys::Oid) -> Result<Target> {
    let (name, owner, deferred_checks) = Spi::connect(|client| {
        let (name, relkind, owner): (Option<String>, Option<String>, Option<pg_sys::Oid>) = client
            .select(
                "SELECT c.oid::pg_catalog.regclass::pg_catalog.text, c.relkind::pg_catalog.text, c.relowner
                   FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $1",
                None,
                &[oid.into()],
            )
            .and_then(|t| t.first().get_three())
            .unwrap_or((None, None, None));
        let name = name.unwrap_or_default();
        if !matches!(relkind.as_deref(), Some("r") | Some("p")) {
            return Err(Error::Target(format!("\"{name}\" is not a table")));
        }
        Ok((name, owner, deferred_checks(client, oid)?))
    })?;
    Ok(Target {
        oid,
        name,
        owner: owner.unwrap_or(pg_sys::Oid::INVALID),
        limits: ColumnLimits::default(),
        can_refuse_rows: true,
        deferred_checks,
        distributed: crate::citus::is_distributed(oid),
    })
}

/// `SET CONSTRAINTS … IMMEDIATE` naming the table's deferrable constraints, and the `… DEFERRED` that restores the
/// initially deferred ones (see [`Target::deferred_checks`]).
#[allow(clippy::type_complexity)]
fn deferred_checks(client: &pgrx::spi::SpiClient<'_>, oid: pg_sys::Oid) -> Result<Option<(String, Option<String>)>> {
    // Only constraints whose name is unique in their schema: SET CONSTRAINTS names a constraint by schema and
    // name, so a same-named constraint of another table (which anyone with CREATE on the schema could add)
    // would be switched too, or make the statement fail. Those stay checked at COMMIT.
    let deferrable: Vec<(String, bool)> = client
        .select(
            "SELECT pg_catalog.format('%I.%I', n.nspname, k.conname), k.condeferred
               FROM pg_catalog.pg_constraint k JOIN pg_catalog.pg_namespace n ON n.oid = k.connamespace
              WHERE k.conrelid = $1 AND k.condeferrable
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint o
                                 WHERE o.connamespace = k.connamespace AND o.conname = k.conname
                                   AND o.oid <> k.oid)
              ORDER BY 1",
            None,
            &[oid.into()],
        )
        .map_err(|e| Error::Target(e.to_string()))?
        .map(|r| {
            (r.get::<String>(1).ok().flatten().unwrap_or_default(), r.get::<bool>(2).ok().flatten().unwrap_or(false))
        })
        .collect();
    Ok((!deferrable.is_empty()).then(|| {
        let all: Vec<&str> = deferrable.iter().map(|(n, _)| n.as_str()).collect();
        let initially: Vec<&str> = deferrable.iter().filter(|(_, d)| *d).map(|(n, _)| n.as_str()).collect();
        (
            format!("SET CONSTRAINTS {} IMMEDIATE", all.join(", ")),
            (!initially.is_empty()).then(|| format!("SET CONSTRAINTS {} DEFERRED", initially.join(", "))),
        )
    }))
}

fn inspect_pinned(oid: pg_sys::Oid) -> Result<Target> {
    Spi::connect(|client| {
        let name: String = client
            .select("SELECT $1::pg_catalog.regclass::pg_catalog.text", None, &[oid.into()])
            .and_then(|t| t.first().get_one())
            .ok()
            .flatten()
            .unwrap_or_default();
        let (relkind, owner, can_refuse_rows): (Option<String>, Option<pg_sys::Oid>, Option<bool>) = client
            .select(
                "SELECT c.relkind::text, c.relowner,
                        c.relkind = 'p' OR c.relispartition OR c.relhastriggers OR c.relhasrules
                        OR EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid)
                        OR EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                                      AND (i.indisunique OR i.indexprs IS NOT NULL OR i.indpred IS NOT NULL))
                        OR EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                      AND (a.attnotnull OR a.atthasdef OR a.attgenerated <> '' OR a.attidentity <> ''
                                           OR t.typtype <> 'b'
                                           OR (a.attname IN ('user_id', 'device_type', 'masked_ip', 'masked_device_id', 'locale')
                                               AND a.atttypid NOT IN ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype))
                                           OR (a.attname = 'create_date' AND a.atttypid <> 'date'::regtype)))
                   FROM pg_class c WHERE c.oid = $1",
                None,
                &[oid.into()],
            )
            .and_then(|t| t.first().get_three())
            .unwrap_or((None, None, None));
        if !matches!(relkind.as_deref(), Some("r") | Some("p")) {
            return Err(Error::Target(format!("\"{name}\" is not a table")));
        }
        let deferred_checks = deferred_checks(client, oid)?;
        let rows = client
            .select(
                "SELECT attname::text, pg_catalog.format_type(atttypid, NULL), atttypmod
                   FROM pg_catalog.pg_attribute
                  WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                None,
                &[oid.into()],
            )
            .map_err(|e| Error::Target(e.to_string()))?;
        let mut cols = std::collections::HashMap::new();
        for row in rows {
            let col: String = row.get(1).ok().flatten().unwrap_or_default();
            let ty: String = row.get(2).ok().flatten().unwrap_or_default();
            let typmod: i32 = row.get(3).ok().flatten().unwrap_or(-1);
            cols.insert(col, (ty, typmod));
        }
        for c in COLUMNS {
            if !cols.contains_key(c) {
                return Err(Error::Target(format!("table {name} has no column \"{c}\"")));
            }
        }
        let limit = |c: &str| -> Option<usize> {
            let (ty, typmod) = &cols[c];
            (matches!(ty.as_str(), "character varying" | "character") && *typmod > 4).then(|| (*typmod - 4) as usize)
        };
        let (version_type, _) = &cols["app_version"];
        let app_version = match version_type.as_str() {
            "integer" | "bigint" => AppVersionColumn::Integer,
            "text" | "character varying" => AppVersionColumn::Text { max_chars: limit("app_version") },
            other => {
                return Err(Error::Target(format!("column {name}.app_version is {other}; expected integer or text")))
            }
        };
        let limits = ColumnLimits {
            user_id: limit("user_id"),
            device_type: limit("device_type"),
            locale: limit("locale"),
            masked_ip: limit("masked_ip"),
            masked_device_id: limit("masked_device_id"),
            app_version,
        };
        for (c, l) in [("masked_ip", limits.masked_ip), ("masked_device_id", limits.masked_device_id)] {
            if l.is_some_and(|l| l < sqs_ingest_core::mask::MAX_TOKEN_CHARS) {
                return Err(Error::Target(format!(
                    "column {name}.{c} is shorter than {} characters, the longest masking token",
                    sqs_ingest_core::mask::MAX_TOKEN_CHARS
                )));
            }
        }
        Ok(Target {
            oid,
            name,
            owner: owner.unwrap_or(pg_sys::Oid::INVALID),
            limits,
            can_refuse_rows: can_refuse_rows.unwrap_or(true),
            deferred_checks,
            distributed: false,
        })
    })
}
