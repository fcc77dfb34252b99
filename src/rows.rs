//! The rows of one batch, as column arrays, and how they are stored: one multi-row INSERT, and row by row (each
//! in a subtransaction) when the table refuses the batch for what is in it ([`insert_isolated`]). Two shapes:
//! the login preset's typed columns ([`Rows`]) and a pipeline's texts, converted by each column's type
//! ([`TextRows`]).

use crate::error::{Error, Result};
use crate::privilege::{as_role, writer_for};
use crate::subxact::{catch_error, in_subtransaction};
use crate::target::Target;
use pgrx::datum::Date;
use pgrx::pg_sys::panic::ErrorReportWithLevel;
use pgrx::prelude::*;
use sqs_ingest_core::event::Problem;
use sqs_ingest_core::event::{self, AppVersionColumn, AppVersionValue, Rejection};
use sqs_ingest_core::mask::{KeyMaterial, Method};
use std::rc::Rc;

/// A batch of rows that can be stored at once or one by one.
pub trait Batch: Sized + Clone {
    fn is_empty(&self) -> bool;
    /// One multi-row INSERT (as the writer; see [`writer_for`]).
    fn insert(self, target: &Target) -> Result<()>;
    /// One batch per row, in order.
    fn into_single_rows(self) -> Vec<Self>;
    /// Whether an error of the multi-row INSERT may be one row's fault, so the rows are tried one by one: data
    /// exceptions (22), integrity violations (23) and PL/pgSQL exceptions (P0) by default.
    fn row_by_row(&self, code: pgrx::PgSqlErrorCode) -> bool {
        refused_by_data(code)
    }
    /// This single row's fault, when it can be told (called inside the transaction, after the row's subtransaction
    /// rolled back); None: the error is taken for what Postgres says. An error raised while telling (a cancel,
    /// say) is the statement's.
    fn explain(&self, _target: &Target) -> std::result::Result<Option<Rejection>, Box<ErrorReportWithLevel>> {
        Ok(None)
    }
}

/// Stores the rows and returns those the table refused (by position), with why. One multi-row INSERT in a
/// subtransaction; when the table refuses it for a data reason (SQLSTATE class 22 or 23, or an exception a
/// trigger raised, class P0), the batch is stored again row by row, each row in a subtransaction of its own,
/// so one bad row never blocks the rest. Any other error (a serialization failure, a deadlock, a lock
/// timeout, out of memory or disk) fails the call: its messages are released and received again later.
pub fn insert_isolated<B: Batch>(rows: B, target: &Target) -> Result<Vec<(usize, Rejection)>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    if !target.can_refuse_rows {
        // Nothing in the table can refuse a row that passed validation: no subtransaction (each would take a
        // subtransaction id, and more than 64 in one transaction slow every snapshot of the server).
        return match catch_error(|| rows.insert(target)) {
            Ok(stored) => stored.map(|_| Vec::new()),
            Err(report) => raise_without_detail(&report, target),
        };
    }
    let copy = rows.clone();
    match in_subtransaction(|| rows.insert(target)) {
        Ok(stored) => return stored.map(|_| Vec::new()),
        Err(report) if !copy.row_by_row(report.sql_error_code()) => raise_without_detail(&report, target),
        Err(_) => {}
    }
    let mut refused = Vec::new();
    for (i, row) in copy.into_single_rows().into_iter().enumerate() {
        let kept = row.clone();
        match in_subtransaction(|| row.insert(target)) {
            Ok(stored) => stored?,
            Err(report) => {
                let code = report.sql_error_code();
                match kept.explain(target) {
                    Ok(Some(rejection)) => refused.push((i, rejection)),
                    Ok(None) if refused_by_data(code) => refused
                        .push((i, Rejection::refused_by_table(&crate::error::sqlstate_text(code), report.message()))),
                    Ok(None) => raise_without_detail(&report, target),
                    Err(report) => raise_without_detail(&report, target),
                }
            }
        }
    }
    Ok(refused)
}

/// Column arrays of the rows of one batch.
#[derive(Default, Clone)]
pub struct Rows {
    user_id: Vec<String>,
    device_type: Vec<String>,
    masked_ip: Vec<String>,
    masked_device_id: Vec<String>,
    locale: Vec<Option<String>>,
    version_int: Vec<i32>,
    version_text: Vec<String>,
    create_date: Vec<Date>,
}

/// Days from 1970-01-01 to 2000-01-01, Postgres' date epoch.
const PG_EPOCH_UNIX_DAYS: i64 = 10_957;

impl Rows {
    pub fn push(
        &mut self,
        key: &KeyMaterial,
        method: Method,
        e: event::LoginEvent,
        version: AppVersionValue,
        sent_ms: Option<i64>,
    ) -> Result<()> {
        self.masked_ip.push(key.mask(method, e.ip.as_bytes())?);
        self.masked_device_id.push(key.mask(method, e.device_id.as_bytes())?);
        self.user_id.push(e.user_id);
        self.device_type.push(e.device_type);
        self.locale.push(e.locale);
        match version {
            AppVersionValue::Packed(v) => self.version_int.push(v),
            AppVersionValue::Verbatim(v) => self.version_text.push(v),
        }
        let ms = sent_ms.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
        });
        let days = ms.div_euclid(86_400_000) - PG_EPOCH_UNIX_DAYS;
        self.create_date.push(Date::saturating_from_raw(days as i32));
        Ok(())
    }
}

impl Batch for Rows {
    fn is_empty(&self) -> bool {
        self.user_id.is_empty()
    }

    fn into_single_rows(self) -> Vec<Rows> {
        let integer = !self.version_int.is_empty();
        let mut version_int = self.version_int.into_iter();
        let mut version_text = self.version_text.into_iter();
        let columns = self
            .user_id
            .into_iter()
            .zip(self.device_type)
            .zip(self.masked_ip)
            .zip(self.masked_device_id)
            .zip(self.locale)
            .zip(self.create_date);
        columns
            .map(|(((((user_id, device_type), masked_ip), masked_device_id), locale), create_date)| Rows {
                user_id: vec![user_id],
                device_type: vec![device_type],
                masked_ip: vec![masked_ip],
                masked_device_id: vec![masked_device_id],
                locale: vec![locale],
                version_int: if integer { version_int.next().into_iter().collect() } else { Vec::new() },
                version_text: if integer { Vec::new() } else { version_text.next().into_iter().collect() },
                create_date: vec![create_date],
            })
            .collect()
    }

    fn insert(self, target: &Target) -> Result<()> {
        let integer = matches!(target.limits.app_version, AppVersionColumn::Integer);
        let sql = format!(
            "INSERT INTO {} (user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date)
             SELECT * FROM unnest($1::pg_catalog.text[], $2::pg_catalog.text[], $3::pg_catalog.text[],
                    $4::pg_catalog.text[], $5::pg_catalog.text[], $6::pg_catalog.{}[], $7::pg_catalog.date[])",
            target.current_name()?,
            if integer { "int4" } else { "text" }
        );
        let version: pgrx::datum::DatumWithOid =
            if integer { self.version_int.into() } else { self.version_text.into() };
        let args = [
            self.user_id.into(),
            self.device_type.into(),
            self.masked_ip.into(),
            self.masked_device_id.into(),
            self.locale.into(),
            version,
            self.create_date.into(),
        ];
        as_writer(target, || crate::plans::run(&sql, &args, |_| ()))
    }
}

/// Whether the table refused a row for what is in it (so that row, not the batch, is the problem): data
/// exceptions (class 22), integrity constraint violations (23), and exceptions raised by PL/pgSQL (P0), e.g. by
/// a trigger.
fn refused_by_data(code: pgrx::PgSqlErrorCode) -> bool {
    let state = crate::error::sqlstate_text(code);
    state.starts_with("22") || state.starts_with("23") || state.starts_with("P0")
}

/// Re-raises a caught error of the target with its SQLSTATE and message but never its DETAIL ("Failing row
/// contains (...)", "Key (...)=(...)" would put field values in the client's error and the server log).
fn raise_without_detail(report: &pgrx::pg_sys::panic::ErrorReportWithLevel, target: &Target) -> ! {
    // (A transient one is retried after a backoff: `catching`, which every ingest runs under, decides that.)
    pgrx::pg_sys::panic::ErrorReport::new(
        report.sql_error_code(),
        format!("insert into {} failed: {}", target.name, report.message()),
        "sqs_ingest",
    )
    .set_hint("The batch was rolled back and its messages released; they are received again later.")
    .report(pgrx::PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) does not return")
}

/// Runs `insert` as the writer of the target (see [`writer_for`]), with the table's deferrable constraints made
/// immediate around it: their checks fire at the end of the insert, inside its subtransaction, so a violation is
/// this row's (a dead letter), not the COMMIT's (which would fail the whole batch every time), and no trigger is
/// deferred out of the owner's security-restricted context (which Postgres refuses).
fn as_writer(target: &Target, insert: impl FnOnce() -> pgrx::spi::SpiResult<()>) -> Result<()> {
    as_role(writer_for(target.owner), || -> pgrx::spi::SpiResult<()> {
        if target.distributed {
            crate::citus::sequential_modifications();
        }
        let deferred = target.deferred_checks.as_ref();
        if let Some((immediate, _)) = deferred {
            Spi::run(immediate)?;
        }
        insert()?;
        if let Some((_, Some(restore))) = deferred {
            Spi::run(restore)?;
        }
        Ok(())
    })
    .map_err(|e| Error::Target(format!("insert into {} failed: {e}", target.name)))
}

/// The INSERT of a pipeline and the type each column's text is converted to (see `crate::pipeline::Layout`).
#[derive(Debug)]
pub struct TextLayout {
    pub insert_sql: String,
    pub columns: Vec<String>,
    pub types: Vec<Option<String>>,
}

/// A pipeline's rows: one text array per column (NULL where a value is absent without a default).
#[derive(Clone)]
pub struct TextRows {
    layout: Rc<TextLayout>,
    columns: Vec<Vec<Option<String>>>,
}

impl TextRows {
    pub fn new(layout: Rc<TextLayout>) -> TextRows {
        let columns = vec![Vec::new(); layout.types.len()];
        TextRows { layout, columns }
    }

    /// Adds one row (one text per column, in the layout's order).
    pub fn push(&mut self, values: Vec<Option<String>>) {
        for (column, v) in self.columns.iter_mut().zip(values) {
            column.push(v);
        }
    }
}

impl Batch for TextRows {
    fn is_empty(&self) -> bool {
        self.columns.first().is_none_or(Vec::is_empty)
    }

    fn insert(self, target: &Target) -> Result<()> {
        let args: Vec<pgrx::datum::DatumWithOid> = self.columns.into_iter().map(Into::into).collect();
        let sql = &self.layout.insert_sql;
        as_writer(target, || crate::plans::run(sql, &args, |_| ()))
    }

    fn into_single_rows(self) -> Vec<TextRows> {
        let n = self.columns.first().map_or(0, Vec::len);
        let mut columns: Vec<std::vec::IntoIter<Option<String>>> =
            self.columns.into_iter().map(Vec::into_iter).collect();
        (0..n)
            .map(|_| TextRows {
                layout: self.layout.clone(),
                columns: columns.iter_mut().map(|c| vec![c.next().flatten()]).collect(),
            })
            .collect()
    }

    /// Any error but a transient one may come from a value: a type's input function raises whatever class it
    /// likes (`tsvector` 42601, arrays 54000, …).
    fn row_by_row(&self, code: pgrx::PgSqlErrorCode) -> bool {
        !crate::error::batch_level(code)
    }

    /// Names the column whose text its type refused (each converted alone, in a subtransaction, as the writer:
    /// a domain's CHECK may call its owner's functions); None when every value converts.
    fn explain(&self, target: &Target) -> std::result::Result<Option<Rejection>, Box<ErrorReportWithLevel>> {
        for (i, ty) in self.layout.types.iter().enumerate() {
            let (Some(ty), Some(Some(value))) = (ty, self.columns[i].first()) else { continue };
            let sql = format!("SELECT CAST($1::pg_catalog.text AS {ty}) IS NULL");
            let value = value.clone();
            let converted = in_subtransaction(|| {
                as_role(writer_for(target.owner), || Spi::get_one_with_args::<bool>(&sql, &[value.into()]))
            });
            if let Err(report) = converted {
                if crate::error::batch_level(report.sql_error_code()) {
                    return Err(report);
                }
                return Ok(Some(Rejection::Column {
                    column: self.layout.columns[i].clone(),
                    source: "its type".into(),
                    problem: Problem::NotConvertible {
                        sqlstate: crate::error::sqlstate_text(report.sql_error_code()),
                        type_name: ty.clone(),
                    },
                }));
            }
        }
        Ok(None)
    }
}
