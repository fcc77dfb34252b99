//! Pipelines declared in SQL: `sqs_ingest.pipeline_create()` checks a declaration against its target table and
//! stores it in `sqs_ingest.pipelines` (a configuration table: `pg_dump` keeps it); ingest loads it by name
//! ([`load`]) and lays it out against the table as it is now ([`layout`]): the [`Mapping`] that turns a message
//! into column texts, and the INSERT that converts each text with its column type's input function.
//!
//! The extraction rules live in `sqs_ingest_core::pipeline`; this module is the catalog side.

use crate::error::{Error, Result};
use crate::privilege::{as_owner, extension_owner, pinned};
use crate::rows::TextLayout;
use crate::subxact::in_subtransaction;
use crate::target::{self, Column, Target};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use serde_json::Value;
use sqs_ingest_core::pipeline::{ColumnKind, ColumnSpec, Envelope, Mapping};
use std::rc::Rc;

/// What happens to a message a pipeline's filter does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterFate {
    /// Deleted after COMMIT like a stored message, recorded in the ledger as `filtered`.
    Delete,
    /// Left in the queue: its visibility is reset when the transaction ends, for another consumer.
    Release,
    /// Kept as a dead letter (reason `filtered`), redrivable.
    DeadLetter,
}

impl FilterFate {
    fn parse(text: &str) -> Result<FilterFate> {
        match text {
            "delete" => Ok(FilterFate::Delete),
            "release" => Ok(FilterFate::Release),
            "dead_letter" => Ok(FilterFate::DeadLetter),
            other => Err(invalid(format!(
                "unknown filter_fate \"{}\"; expected delete, release or dead_letter",
                other.chars().take(32).collect::<String>()
            ))),
        }
    }
}

/// A declared pipeline, as stored.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub queue_url: String,
    /// The target table's name, schema-qualified at declaration.
    pub target: String,
    /// The role that owned the target at declaration.
    pub target_owner: String,
    /// The role that declared it (runs and workers are its, its members' or a superuser's).
    pub owner: String,
    /// This declaration of the name (see `sqs_ingest.pipelines.id`).
    pub id: i64,
    pub specs: Vec<ColumnSpec>,
    pub envelope: Envelope,
    /// An SQL/JSON path predicate over `{"body": …, "attributes": {…}, "sqs": {…}}`.
    pub filter: Option<String>,
    pub filter_fate: FilterFate,
}

/// The pipeline laid out against its target as the table is now: how a message becomes column texts, and the
/// `INSERT INTO <target> (<columns>) SELECT <each text cast to its column type> FROM ROWS FROM (unnest($1::text[]),
/// …)` with
/// the type each text is converted to (None for character types, whose length is checked before).
#[derive(Debug, Clone)]
pub struct Layout {
    pub mapping: Mapping,
    pub rows: Rc<TextLayout>,
    /// The filter (an SQL/JSON path predicate over [`Mapping::filter_document`]) and what happens to a message it
    /// does not match.
    pub filter: Option<(String, FilterFate)>,
}

fn invalid(message: String) -> Error {
    Error::Pipeline { code: PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message }
}

/// Whether a `sqs_ingest()` argument names a pipeline (lower-case letters, digits, `_` and `-`, starting with a
/// letter); anything else is taken for a queue URL (and refused as one if it is not).
pub fn is_name(arg: &str) -> bool {
    check_name(arg).is_ok()
}

fn check_name(name: &str) -> Result<()> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid pipeline name \"{}\": 1 to 63 characters, lower-case letters, digits, _ and -, starting with a letter",
            name.chars().take(64).collect::<String>()
        )))
    }
}

/// Checks every column declaration against the table's columns: each exists, is insertable and suits its
/// transform. Returns them with their kinds, in the table's column order.
fn match_columns(specs: &[ColumnSpec], table: &str, columns: &[Column]) -> Result<Vec<(ColumnSpec, Column)>> {
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let column = columns.iter().find(|c| c.name == spec.column).ok_or_else(|| Error::Pipeline {
            code: PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            message: format!("column \"{}\" of table {table} does not exist", spec.column),
        })?;
        if column.generated {
            return Err(invalid(format!(
                "column \"{}\" of table {table} is generated (or an identity GENERATED ALWAYS) and cannot be written",
                spec.column
            )));
        }
        spec.check_kind(column.kind).map_err(invalid)?;
        out.push((spec.clone(), column.clone()));
    }
    out.sort_by_key(|(_, c)| columns.iter().position(|k| k.name == c.name));
    Ok(out)
}

/// Lays a pipeline out against its (locked, inspected) target as the table is now: a column dropped or changed
/// since the declaration, or a table of that name owned by another role than at declaration (one swapped in under
/// the name, e.g. by renaming schemas), is an ERROR before any message is taken.
pub fn layout(p: &Pipeline, t: &Target) -> Result<Layout> {
    let owner = crate::privilege::role_name(t.owner);
    if owner != p.target_owner {
        return Err(Error::Pipeline {
            code: PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            message: format!(
                "the target of pipeline \"{}\", {}, is owned by role \"{owner}\", not by \"{}\" as when it was declared",
                p.name, t.name, p.target_owner
            ),
        });
    }
    let columns = target::columns(t.oid)?;
    let matched = match_columns(&p.specs, &t.name, &columns)?;
    let mut names = Vec::new();
    let mut selects = Vec::new();
    let mut arrays = Vec::new();
    let mut types = Vec::new();
    for (i, (_, c)) in matched.iter().enumerate() {
        names.push(target::quote_ident(&c.name));
        let value = format!("u.x{i}");
        match c.kind {
            // Character types: the assignment applies the length (checked before, per column, for a precise
            // dead letter); an explicit cast would truncate silently.
            ColumnKind::Text { .. } => {
                selects.push(value);
                types.push(None);
            }
            _ => {
                selects.push(format!("CAST({value} AS {})", c.type_sql));
                types.push(Some(c.type_full.clone()));
            }
        }
        arrays.push(format!("pg_catalog.unnest(${}::pg_catalog.text[])", i + 1));
    }
    let aliases: Vec<String> = (0..matched.len()).map(|i| format!("x{i}")).collect();
    let insert_sql = format!(
        "INSERT INTO {} ({}) SELECT {} FROM ROWS FROM ({}) AS u({})",
        t.current_name()?,
        names.join(", "),
        selects.join(", "),
        arrays.join(", "),
        aliases.join(", ")
    );
    let columns = matched.iter().map(|(_, c)| c.name.clone()).collect();
    let mapping = Mapping { envelope: p.envelope, columns: matched.into_iter().map(|(s, c)| (s, c.kind)).collect() };
    let filter = p.filter.clone().map(|f| (f, p.filter_fate));
    Ok(Layout { mapping, rows: Rc::new(TextLayout { insert_sql, columns, types }), filter })
}

/// Loads a declared pipeline (42704 when there is none by that name).
pub fn load(name: &str) -> Result<Pipeline> {
    let row = as_owner(extension_owner(), || {
        Spi::connect(|c| {
            let rows = c.select(
                "SELECT queue_url, target, columns::pg_catalog.text, envelope, filter::pg_catalog.text, filter_fate,
                        target_owner, owner, id
                   FROM sqs_ingest.pipelines WHERE name OPERATOR(pg_catalog.=) $1",
                None,
                &[name.into()],
            )?;
            Ok::<_, pgrx::spi::SpiError>(rows.into_iter().next().map(|r| {
                (
                    r.get::<String>(1).ok().flatten().unwrap_or_default(),
                    r.get::<String>(2).ok().flatten().unwrap_or_default(),
                    r.get::<String>(3).ok().flatten().unwrap_or_default(),
                    r.get::<String>(4).ok().flatten().unwrap_or_default(),
                    r.get::<String>(5).ok().flatten(),
                    r.get::<String>(6).ok().flatten().unwrap_or_default(),
                    r.get::<String>(7).ok().flatten().unwrap_or_default(),
                    r.get::<String>(8).ok().flatten().unwrap_or_default(),
                    r.get::<i64>(9).ok().flatten().unwrap_or_default(),
                )
            }))
        })
    })
    .map_err(|e| Error::Internal(format!("cannot read sqs_ingest.pipelines: {e}")))?;
    let Some((queue_url, target, columns, envelope, filter, fate, target_owner, owner, id)) = row else {
        return Err(Error::Pipeline {
            code: PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            message: format!("pipeline \"{}\" does not exist", name.chars().take(64).collect::<String>()),
        });
    };
    let columns: Value = serde_json::from_str(&columns).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Pipeline {
        name: name.to_string(),
        queue_url,
        target,
        target_owner,
        owner,
        id,
        specs: parse_columns(&columns)?,
        envelope: Envelope::parse(&envelope).map_err(invalid)?,
        filter,
        filter_fate: FilterFate::parse(&fate)?,
    })
}

fn parse_columns(columns: &Value) -> Result<Vec<ColumnSpec>> {
    let Value::Object(map) = columns else {
        return Err(invalid("columns must be a JSON object: {\"<column>\": <source or declaration>, …}".into()));
    };
    if map.is_empty() {
        return Err(invalid("a pipeline maps at least one column".into()));
    }
    map.iter().map(|(column, decl)| ColumnSpec::parse(column, decl).map_err(invalid)).collect()
}

/// Arguments of `pipeline_create()`.
pub struct Declaration<'a> {
    pub name: &'a str,
    pub queue_url: &'a str,
    pub target: &'a str,
    pub columns: &'a Value,
    pub envelope: &'a str,
    pub filter: Option<&'a str>,
    pub filter_fate: &'a str,
    pub replace: bool,
}

/// Checks a declaration completely, then stores it (as the extension owner). Every problem is an ERROR before
/// anything is written: 22023 for a bad element, 42703 for a column the table lacks, 42P01 for a missing table,
/// 42501 when the caller may not INSERT into the table, 42710 when the name is taken.
pub fn declare(d: &Declaration<'_>) -> Result<()> {
    check_name(d.name)?;
    crate::sqs::parse_queue_url(d.queue_url)?;
    let envelope = Envelope::parse(d.envelope).map_err(invalid)?;
    FilterFate::parse(d.filter_fate)?;
    let specs = parse_columns(d.columns)?;
    // The table is named with the caller's search_path (their choice), then every statement runs pinned.
    let t = target::resolve_existing(d.target)?;
    pinned(|| -> Result<()> {
        // Stored by its schema-qualified name: never a temporary table (its name would resolve to another
        // session's, or a permanent, table for whoever runs the pipeline) or one in a system schema.
        let ordinary = Spi::get_one_with_args::<bool>(
            "SELECT c.relpersistence OPERATOR(pg_catalog.<>) 't' AND n.nspname OPERATOR(pg_catalog.!~) '^pg_'
                    AND n.nspname OPERATOR(pg_catalog.<>) 'information_schema'
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
              WHERE c.oid OPERATOR(pg_catalog.=) $1",
            &[t.oid.into()],
        )
        .map_err(|e| Error::Internal(e.to_string()))?
        .unwrap_or(false);
        if !ordinary {
            return Err(invalid(format!(
                "{} is a temporary table or in a system schema; a pipeline writes an ordinary table",
                t.name
            )));
        }
        let columns = target::columns(t.oid)?;
        let matched = match_columns(&specs, &t.name, &columns)?;
        for c in columns.iter().filter(|c| c.needs_value) {
            if !matched.iter().any(|(_, m)| m.name == c.name) {
                return Err(invalid(format!(
                    "column \"{}\" of table {} is NOT NULL without a default, so the pipeline must map it",
                    c.name, t.name
                )));
            }
        }
        for (spec, column) in &matched {
            if let (Some(default), ColumnKind::Text { max_chars }) = (&spec.default, column.kind) {
                if max_chars.is_some_and(|n| default.chars().count() > n) {
                    return Err(invalid(format!(
                        "column \"{}\": its default is longer than the column allows",
                        spec.column
                    )));
                }
            } else if let Some(default) = &spec.default {
                let sql = format!("SELECT CAST($1::pg_catalog.text AS {}) IS NULL", column.type_full);
                // As the table's writer (a domain's CHECK may call its owner's functions): never with more rights.
                let writer = crate::privilege::writer_for(t.owner);
                let converted = in_subtransaction(|| {
                    crate::privilege::as_role(writer, || {
                        Spi::get_one_with_args::<bool>(&sql, &[default.clone().into()])
                    })
                });
                if !matches!(converted, Ok(Ok(_))) {
                    return Err(invalid(format!(
                        "column \"{}\": its default is not a valid {}",
                        spec.column, column.type_sql
                    )));
                }
            }
        }
        if let Some(filter) = d.filter {
            // Evaluated (not silently) on an empty document: a path that does not parse, is not a predicate
            // (`$.body.type` instead of `$.body.type == "x"`: it would match nothing, and with the default fate
            // delete every message) or uses an undefined variable is refused here, not at every ingest.
            let checked = in_subtransaction(|| {
                Spi::get_one_with_args::<bool>(
                    "SELECT pg_catalog.jsonb_path_match_tz(
                            '{\"body\": {}, \"attributes\": {}, \"sqs\": {}, \"envelope\": null}'::pg_catalog.jsonb,
                            $1::pg_catalog.jsonpath, '{}'::pg_catalog.jsonb, false) IS NULL",
                    &[filter.into()],
                )
            });
            if !matches!(checked, Ok(Ok(_))) {
                return Err(invalid(
                    "filter must be an SQL/JSON path predicate without variables, e.g. $.body.type == \"created\""
                        .into(),
                ));
            }
        }
        Ok(())
    })?;
    let owner = extension_owner();
    let caller = caller();
    let target_owner = crate::privilege::role_name(t.owner);
    as_owner(owner, || -> Result<()> {
        let args = || -> Vec<pgrx::datum::DatumWithOid<'_>> {
            vec![
                d.name.into(),
                d.queue_url.into(),
                t.name.clone().into(),
                d.columns.to_string().into(),
                envelope.name().into(),
                d.filter.map(str::to_string).into(),
                d.filter_fate.into(),
                caller.0.clone().into(),
                target_owner.clone().into(),
            ]
        };
        let taken = || Error::Pipeline {
            code: PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            message: format!("pipeline \"{}\" already exists", d.name),
        };
        match declared_by(d.name)? {
            Some(declared_by) => {
                if !d.replace {
                    return Err(taken());
                }
                may_change(d.name, &declared_by, &caller)?;
                Spi::run_with_args(
                    "UPDATE sqs_ingest.pipelines SET queue_url = $2, target = $3, columns = $4::pg_catalog.jsonb,
                            envelope = $5, filter = $6::pg_catalog.jsonpath, filter_fate = $7, target_owner = $9,
                            declared_at = pg_catalog.now()
                      WHERE name OPERATOR(pg_catalog.=) $1 AND $8::pg_catalog.text IS NOT NULL",
                    &args(),
                )
                .map_err(|e| Error::Internal(format!("cannot store the pipeline: {e}")))
            }
            None => {
                // A concurrent declaration of the same name that commits first wins; this one is then 42710
                // (never an overwrite of a pipeline this caller was not allowed to replace).
                let inserted = Spi::connect_mut(|c| {
                    c.update(
                        "INSERT INTO sqs_ingest.pipelines
                                (name, queue_url, target, columns, envelope, filter, filter_fate, owner, target_owner)
                         VALUES ($1, $2, $3, $4::pg_catalog.jsonb, $5, $6::pg_catalog.jsonpath, $7, $8, $9)
                         ON CONFLICT (name) DO NOTHING RETURNING 1",
                        None,
                        &args(),
                    )
                    .map(|rows| rows.len())
                })
                .map_err(|e| Error::Internal(format!("cannot store the pipeline: {e}")))?;
                if inserted == 1 {
                    Ok(())
                } else {
                    Err(taken())
                }
            }
        }
    })
}

/// The role that declared a pipeline, if there is one by that name (its row locked for the transaction).
fn declared_by(name: &str) -> Result<Option<String>> {
    Spi::connect_mut(|c| {
        let rows = c.update(
            "SELECT owner FROM sqs_ingest.pipelines WHERE name OPERATOR(pg_catalog.=) $1 FOR UPDATE",
            None,
            &[name.into()],
        )?;
        Ok::<_, pgrx::spi::SpiError>(rows.into_iter().next().and_then(|r| r.get::<String>(1).ok().flatten()))
    })
    .map_err(|e| Error::Internal(e.to_string()))
}

/// The calling role's name and whether it is a superuser (taken before switching to the extension owner).
fn caller() -> (String, bool) {
    // SAFETY: a catalog lookup of the current user on the main thread inside a transaction.
    (crate::privilege::role_names().0, unsafe { pg_sys::superuser() })
}

/// Only the role that declared a pipeline, or a superuser, may replace or drop it.
fn may_change(name: &str, declared_by: &str, (caller, superuser): &(String, bool)) -> Result<()> {
    if *superuser || declared_by == caller {
        Ok(())
    } else {
        Err(Error::Pipeline {
            code: PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            message: format!("pipeline \"{name}\" was declared by another role"),
        })
    }
}

/// Whether the calling role may run a pipeline (ingest, drain, start a worker): its declaring role, a member of
/// it, or a superuser — so that a replace by its declarer never changes what another role's runs write.
pub fn may_run(p: &Pipeline) -> Result<()> {
    let allowed = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.pg_has_role(pg_catalog.current_user(), r.oid, 'MEMBER')
           FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) $1",
        &[p.owner.clone().into()],
    )
    .map_err(|e| Error::Internal(e.to_string()))?
    .unwrap_or(false);
    // SAFETY: a catalog lookup of the current user on the main thread inside a transaction.
    if allowed || unsafe { pg_sys::superuser() } {
        Ok(())
    } else {
        Err(Error::Pipeline {
            code: PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            message: format!(
                "pipeline \"{}\" was declared by role \"{}\"; only it, its members and superusers run it",
                p.name, p.owner
            ),
        })
    }
}

/// Drops a pipeline; false if there was none by that name.
pub fn drop(name: &str) -> Result<bool> {
    let caller = caller();
    as_owner(extension_owner(), || -> Result<bool> {
        let existing = declared_by(name)?;
        let Some(declared_by) = existing else { return Ok(false) };
        may_change(name, &declared_by, &caller)?;
        Spi::run_with_args("DELETE FROM sqs_ingest.pipelines WHERE name OPERATOR(pg_catalog.=) $1", &[name.into()])
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(true)
    })
}
