//! The table login rows go to: resolved with the caller's search_path (naming it is the caller's choice; every
//! other statement runs with a pinned path), created on first ingest if missing (owned by the caller, never an
//! extension member, so DROP EXTENSION keeps the data), and inspected for the column limits that validation
//! checks against and for its owner (see [`crate::privilege::writer_for`]).

use crate::error::{Error, Result};
use crate::privilege::{as_owner, extension_owner, pinned};
use pgrx::prelude::*;
use sqs_ingest_core::event::{AppVersionColumn, ColumnLimits};

/// A target table that passed inspection. `name` is the regclass text, schema-qualified and quoted.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub owner: pg_sys::Oid,
    pub limits: ColumnLimits,
}

const COLUMNS: [&str; 7] =
    ["user_id", "device_type", "masked_ip", "masked_device_id", "locale", "app_version", "create_date"];

/// Resolves `name` to a table, creating it with the standard schema if it does not exist.
pub fn resolve_or_create(name: &str) -> Result<Target> {
    let oid = lookup(name)?;
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
            if let Some(oid) = lookup(name)? {
                return inspect(oid);
            }
            create(name)?;
            lookup(name)?.ok_or_else(|| Error::Target(format!("table \"{name}\" was created but cannot be found")))?
        }
    };
    inspect(oid)
}

/// Resolves `name` to an existing table without creating it.
pub fn resolve_existing(name: &str) -> Result<Target> {
    match lookup(name)? {
        Some(oid) => inspect(oid),
        None => Err(Error::Target(format!("table \"{name}\" does not exist"))),
    }
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
    pinned(|| inspect_pinned(oid))
}

fn inspect_pinned(oid: pg_sys::Oid) -> Result<Target> {
    Spi::connect(|client| {
        let name: String = client
            .select("SELECT $1::pg_catalog.regclass::pg_catalog.text", None, &[oid.into()])
            .and_then(|t| t.first().get_one())
            .ok()
            .flatten()
            .unwrap_or_default();
        let (relkind, owner): (Option<String>, Option<pg_sys::Oid>) = client
            .select("SELECT relkind::text, relowner FROM pg_catalog.pg_class WHERE oid = $1", None, &[oid.into()])
            .and_then(|t| t.first().get_two())
            .unwrap_or((None, None));
        if !matches!(relkind.as_deref(), Some("r") | Some("p")) {
            return Err(Error::Target(format!("\"{name}\" is not a table")));
        }
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
        Ok(Target { name, owner: owner.unwrap_or(pg_sys::Oid::INVALID), limits })
    })
}
