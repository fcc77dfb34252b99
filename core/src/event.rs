//! Parsing and validation of one SQS message body into a login row.
//!
//! A body that can't become a row is never an error for the batch: it is a [`Rejection`] with a precise reason,
//! which the extension stores as a dead letter while the rest of the batch is inserted.

use crate::version::{self, VersionError};
use serde_json::{Map, Value};
use std::fmt;

/// Bodies larger than this are dead-lettered without parsing: a login event is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Of a body over [`MAX_BODY_BYTES`] (which can never be redriven), a dead letter keeps only this many leading
/// bytes (encrypted), with the body's size and a keyed digest: SQS allows bodies up to 256 KiB, and storing them
/// whole would let any producer fill the dead-letter table with data nobody can use.
pub const KEPT_BODY_PREFIX_BYTES: usize = 4 * 1024;

/// Longest `ip` / `device_id` (in bytes) that masking accepts; its token always fits `varchar(256)`.
pub const MAX_MASK_INPUT_BYTES: usize = crate::mask::MAX_PLAINTEXT_BYTES;

/// A message body that parsed into the expected shape. Borrowed fields keep the hot path allocation-free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginEvent {
    pub user_id: String,
    pub device_type: String,
    pub ip: String,
    pub locale: Option<String>,
    pub device_id: String,
    pub app_version: String,
}

/// Character limits of the target table's columns (`None` = unbounded, e.g. `text`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ColumnLimits {
    pub user_id: Option<usize>,
    pub device_type: Option<usize>,
    pub locale: Option<usize>,
    pub masked_ip: Option<usize>,
    pub masked_device_id: Option<usize>,
    pub app_version: AppVersionColumn,
}

/// How `app_version` is stored: packed into an integer column, or verbatim into a text column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppVersionColumn {
    #[default]
    Integer,
    Text {
        max_chars: Option<usize>,
    },
}

/// The value that goes into the `app_version` column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppVersionValue {
    Packed(i32),
    Verbatim(String),
}

/// Why a message can't be stored. `code()` is a stable slug for queries; `Display` is the precise reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    BodyTooLarge {
        bytes: usize,
    },
    NotJson {
        detail: String,
    },
    NotObject {
        found: &'static str,
    },
    MissingField {
        field: &'static str,
    },
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    NulByte {
        field: &'static str,
    },
    TooLong {
        field: &'static str,
        chars: usize,
        limit: usize,
    },
    MaskInputTooLong {
        field: &'static str,
        bytes: usize,
    },
    InvalidVersion(VersionError),
    /// The target table refused the row (a constraint, a trigger, a type's input check): the SQLSTATE and the
    /// names Postgres' message gives, never the message itself (some quote the value).
    RefusedByTable {
        sqlstate: String,
        constraint: Option<String>,
        column: Option<String>,
    },
    /// SQS delivered the message more than `sqs_ingest.max_receive_count` times without it being stored (each
    /// earlier attempt failed, e.g. for a transient reason that keeps coming back).
    TooManyReceives {
        receive_count: i32,
        limit: i32,
    },
    /// SQS delivered the message without a MessageId (it cannot be recognised when redelivered) or without a
    /// receipt handle (it cannot be deleted); it is kept under a digest of its body.
    NoMessageId,
    NoReceiptHandle,
    /// A pipeline's filter did not match the message and its `filter_fate` is `dead_letter`.
    Filtered,
    /// A pipeline's filter raised an error on the message (e.g. a date/time comparison it cannot make): kept, never
    /// taken for a match or a miss.
    FilterFailed {
        sqlstate: String,
    },
    /// A pipeline column's value cannot be stored: the column, where its value comes from, and why — never the
    /// value.
    Column {
        column: String,
        source: String,
        problem: Problem,
    },
}

impl Rejection {
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::BodyTooLarge { .. } => "body_too_large",
            Rejection::NotJson { .. } => "not_json",
            Rejection::NotObject { .. } => "not_object",
            Rejection::MissingField { .. } => "missing_field",
            Rejection::WrongType { .. } => "wrong_type",
            Rejection::NulByte { .. } => "nul_byte",
            Rejection::TooLong { .. } | Rejection::MaskInputTooLong { .. } => "value_too_long",
            Rejection::InvalidVersion(_) => "invalid_app_version",
            Rejection::RefusedByTable { .. } => "refused_by_table",
            Rejection::TooManyReceives { .. } => "too_many_receives",
            Rejection::NoMessageId => "no_message_id",
            Rejection::NoReceiptHandle => "no_receipt_handle",
            Rejection::Column { problem, .. } => problem.code(),
            Rejection::Filtered => "filtered",
            Rejection::FilterFailed { .. } => "filter_error",
        }
    }
}

/// What is wrong with one column's value in one message (never the value itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Missing,
    WrongType {
        found: &'static str,
    },
    NulByte,
    TooLong {
        chars: usize,
        limit: usize,
    },
    MaskInputTooLong {
        bytes: usize,
    },
    InvalidVersion(VersionError),
    /// The column's type refused the text (its input function, a domain's check): SQLSTATE and type name.
    NotConvertible {
        sqlstate: String,
        type_name: String,
    },
}

impl Problem {
    pub fn code(&self) -> &'static str {
        match self {
            Problem::Missing => "missing_field",
            Problem::WrongType { .. } => "wrong_type",
            Problem::NulByte => "nul_byte",
            Problem::TooLong { .. } | Problem::MaskInputTooLong { .. } => "value_too_long",
            Problem::InvalidVersion(_) => "invalid_app_version",
            Problem::NotConvertible { .. } => "invalid_value",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing => f.write_str("required value is missing or null"),
            Problem::WrongType { found } => write!(f, "value is a JSON {found}, expected a string"),
            Problem::NulByte => f.write_str("value contains a NUL character (\\u0000)"),
            Problem::TooLong { chars, limit } => write!(f, "value is {chars} characters; the column allows {limit}"),
            Problem::MaskInputTooLong { bytes } => {
                write!(f, "value is {bytes} bytes; masking accepts at most {MAX_MASK_INPUT_BYTES}")
            }
            Problem::InvalidVersion(e) => write!(f, "{e}"),
            Problem::NotConvertible { sqlstate, type_name } => {
                write!(f, "value is not a valid {type_name} (SQLSTATE {sqlstate})")
            }
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::BodyTooLarge { bytes } => {
                write!(f, "body is {bytes} bytes; a login event may be at most {MAX_BODY_BYTES} bytes")
            }
            Rejection::NotJson { detail } => write!(f, "body is not valid JSON: {detail}"),
            Rejection::NotObject { found } => write!(f, "body is a JSON {found}, expected an object"),
            Rejection::MissingField { field } => write!(f, "required field \"{field}\" is missing"),
            Rejection::WrongType { field, expected, found } => {
                write!(f, "field \"{field}\" is a JSON {found}, expected {expected}")
            }
            Rejection::NulByte { field } => write!(f, "field \"{field}\" contains a NUL character (\\u0000)"),
            Rejection::TooLong { field, chars, limit } => {
                write!(f, "field \"{field}\" is {chars} characters; its column allows {limit}")
            }
            Rejection::MaskInputTooLong { field, bytes } => {
                write!(f, "field \"{field}\" is {bytes} bytes; masking accepts at most {MAX_MASK_INPUT_BYTES}")
            }
            Rejection::InvalidVersion(e) => write!(f, "{e}"),
            Rejection::TooManyReceives { receive_count, limit } => write!(
                f,
                "received {receive_count} times without being stored (sqs_ingest.max_receive_count is {limit}); see stats.last_error for why earlier attempts failed"
            ),
            Rejection::NoMessageId => f.write_str("SQS delivered the message without a MessageId"),
            Rejection::NoReceiptHandle => {
                f.write_str("SQS delivered the message without a receipt handle (it cannot be deleted)")
            }
            Rejection::Filtered => f.write_str("the pipeline's filter does not match the message (filter_fate is dead_letter)"),
            Rejection::FilterFailed { sqlstate } => {
                write!(f, "the pipeline's filter failed on the message (SQLSTATE {sqlstate})")
            }
            Rejection::Column { column, source, problem } => write!(f, "column \"{column}\" (from {source}): {problem}"),
            Rejection::RefusedByTable { sqlstate, constraint, column } => {
                write!(f, "the target table refused the row: SQLSTATE {sqlstate}")?;
                if let Some(c) = constraint {
                    write!(f, ", constraint \"{c}\"")?;
                }
                if let Some(c) = column {
                    write!(f, ", column \"{c}\"")?;
                }
                Ok(())
            }
        }
    }
}

impl Rejection {
    /// The rejection for a row the table refused with `sqlstate` and Postgres' `message`, keeping only the
    /// constraint and column names the message quotes (`constraint "x"`, `column "y"`): identifiers, never values.
    pub fn refused_by_table(sqlstate: &str, message: &str) -> Rejection {
        let quoted_after = |marker: &str| -> Option<String> {
            let start = message.find(marker)? + marker.len();
            let end = message[start..].find('"')?;
            Some(message[start..start + end].chars().take(64).collect())
        };
        // Only integrity violations (class 23) have messages Postgres writes with these names; an exception a
        // trigger raises (class P0) has whatever text its author chose, which may hold values.
        let integrity = sqlstate.starts_with("23");
        Rejection::RefusedByTable {
            sqlstate: sqlstate.chars().take(5).collect(),
            constraint: quoted_after("constraint \"").filter(|_| integrity),
            column: quoted_after("column \"").filter(|_| integrity),
        }
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn take_string(obj: &mut Map<String, Value>, field: &'static str) -> Result<String, Rejection> {
    match obj.remove(field) {
        None => Err(Rejection::MissingField { field }),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Rejection::WrongType { field, expected: "a string", found: kind(&other) }),
    }
}

fn take_optional_string(obj: &mut Map<String, Value>, field: &'static str) -> Result<Option<String>, Rejection> {
    match obj.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Rejection::WrongType { field, expected: "a string or null", found: kind(&other) }),
    }
}

/// Parses a body into a [`LoginEvent`]. Unknown extra fields are ignored (producers may add fields);
/// `locale` may be null or absent; every other field is a required string.
/// What went wrong in a body that is not JSON, by category and position only: serde_json's own texts are
/// value-free today, but the reason is stored where operators read it, so it is built here from parts that cannot
/// carry a value.
pub(crate) fn json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "read error",
        Category::Syntax => "syntax error",
        Category::Data => "invalid data",
        Category::Eof => "unexpected end of input",
    };
    format!("{what} at line {}, column {}", e.line(), e.column())
}

pub fn parse(body: &str) -> Result<LoginEvent, Rejection> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Rejection::BodyTooLarge { bytes: body.len() });
    }
    let value: Value = serde_json::from_str(body).map_err(|e| Rejection::NotJson { detail: json_error(&e) })?;
    let mut obj = match value {
        Value::Object(map) => map,
        other => return Err(Rejection::NotObject { found: kind(&other) }),
    };
    let event = LoginEvent {
        user_id: take_string(&mut obj, "user_id")?,
        device_type: take_string(&mut obj, "device_type")?,
        ip: take_string(&mut obj, "ip")?,
        locale: take_optional_string(&mut obj, "locale")?,
        device_id: take_string(&mut obj, "device_id")?,
        app_version: take_string(&mut obj, "app_version")?,
    };
    Ok(event)
}

fn check_text(field: &'static str, value: &str, limit: Option<usize>) -> Result<(), Rejection> {
    if value.contains('\0') {
        return Err(Rejection::NulByte { field });
    }
    if let Some(limit) = limit {
        // Byte length bounds char length from above: only count chars when it could matter.
        if value.len() > limit {
            let chars = value.chars().count();
            if chars > limit {
                return Err(Rejection::TooLong { field, chars, limit });
            }
        }
    }
    Ok(())
}

fn check_mask_input(field: &'static str, value: &str) -> Result<(), Rejection> {
    if value.contains('\0') {
        return Err(Rejection::NulByte { field });
    }
    if value.len() > MAX_MASK_INPUT_BYTES {
        return Err(Rejection::MaskInputTooLong { field, bytes: value.len() });
    }
    Ok(())
}

/// Checks an event against the target columns and computes the `app_version` value to store.
pub fn validate(event: &LoginEvent, limits: &ColumnLimits) -> Result<AppVersionValue, Rejection> {
    check_text("user_id", &event.user_id, limits.user_id)?;
    check_text("device_type", &event.device_type, limits.device_type)?;
    if let Some(locale) = &event.locale {
        check_text("locale", locale, limits.locale)?;
    }
    check_mask_input("ip", &event.ip)?;
    check_mask_input("device_id", &event.device_id)?;
    if event.app_version.contains('\0') {
        return Err(Rejection::NulByte { field: "app_version" });
    }
    match limits.app_version {
        AppVersionColumn::Integer => {
            version::pack(&event.app_version).map(AppVersionValue::Packed).map_err(Rejection::InvalidVersion)
        }
        AppVersionColumn::Text { max_chars } => {
            check_text("app_version", &event.app_version, max_chars)?;
            Ok(AppVersionValue::Verbatim(event.app_version.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"user_id": "0f8e2b6a-5d1c-4e7a-9b3f-2c4d6e8a1b05", "app_version": "2.3.0", "device_type": "android", "ip": "203.0.113.77", "locale": "RU", "device_id": "318-52-7046"}"#;

    fn table_limits() -> ColumnLimits {
        ColumnLimits {
            user_id: Some(128),
            device_type: Some(32),
            locale: Some(32),
            masked_ip: Some(256),
            masked_device_id: Some(256),
            app_version: AppVersionColumn::Integer,
        }
    }

    fn with(field: &str, value: Value) -> String {
        let mut v: Value = serde_json::from_str(GOOD).unwrap();
        v.as_object_mut().unwrap().insert(field.into(), value);
        v.to_string()
    }

    fn without(field: &str) -> String {
        let mut v: Value = serde_json::from_str(GOOD).unwrap();
        v.as_object_mut().unwrap().remove(field);
        v.to_string()
    }

    #[test]
    fn parses_a_well_formed_message() {
        let e = parse(GOOD).unwrap();
        assert_eq!(e.user_id, "0f8e2b6a-5d1c-4e7a-9b3f-2c4d6e8a1b05");
        assert_eq!(e.device_type, "android");
        assert_eq!(e.ip, "203.0.113.77");
        assert_eq!(e.locale.as_deref(), Some("RU"));
        assert_eq!(e.device_id, "318-52-7046");
        assert_eq!(validate(&e, &table_limits()), Ok(AppVersionValue::Packed(20300)));
    }

    #[test]
    fn null_or_absent_locale_is_none() {
        assert_eq!(parse(&with("locale", Value::Null)).unwrap().locale, None);
        assert_eq!(parse(&without("locale")).unwrap().locale, None);
    }

    #[test]
    fn extra_fields_are_ignored() {
        assert!(parse(&with("os_build", "17G".into())).is_ok());
    }

    #[test]
    fn malformed_bodies_are_rejected_precisely() {
        assert_eq!(parse("{not json").unwrap_err().code(), "not_json");
        assert_eq!(parse("").unwrap_err().code(), "not_json");
        assert_eq!(parse("[1,2]").unwrap_err(), Rejection::NotObject { found: "array" });
        assert_eq!(parse("\"s\"").unwrap_err(), Rejection::NotObject { found: "string" });
        assert_eq!(parse(r#"{"foo": "oops", "bar": "x"}"#).unwrap_err(), Rejection::MissingField { field: "user_id" });
        for field in ["user_id", "device_type", "ip", "device_id", "app_version"] {
            assert_eq!(parse(&without(field)).unwrap_err(), Rejection::MissingField { field: leak(field) });
            assert_eq!(
                parse(&with(field, Value::from(7))).unwrap_err(),
                Rejection::WrongType { field: leak(field), expected: "a string", found: "number" }
            );
            assert_eq!(parse(&with(field, Value::Null)).unwrap_err().code(), "wrong_type");
        }
        assert_eq!(parse(&with("locale", Value::from(true))).unwrap_err().code(), "wrong_type");
    }

    fn leak(s: &str) -> &'static str {
        ["user_id", "device_type", "ip", "device_id", "app_version"].into_iter().find(|f| *f == s).unwrap()
    }

    #[test]
    fn huge_bodies_are_rejected_without_parsing() {
        let body = format!("{{\"user_id\": \"{}\"}}", "x".repeat(1 << 20));
        assert_eq!(parse(&body).unwrap_err().code(), "body_too_large");
    }

    #[test]
    fn nul_bytes_are_rejected_in_every_field() {
        for field in ["user_id", "device_type", "ip", "device_id", "app_version", "locale"] {
            let e = parse(&with(field, "a\u{0}b".into())).unwrap();
            let r = validate(&e, &table_limits()).unwrap_err();
            assert_eq!(r.code(), "nul_byte", "{field}");
            assert!(r.to_string().contains(field));
        }
    }

    #[test]
    fn lengths_are_checked_in_characters_against_the_columns() {
        let limits = table_limits();
        let e = parse(&with("device_type", "é".repeat(32).into())).unwrap();
        assert!(validate(&e, &limits).is_ok(), "32 two-byte chars fit varchar(32)");
        let e = parse(&with("device_type", "é".repeat(33).into())).unwrap();
        assert_eq!(
            validate(&e, &limits).unwrap_err(),
            Rejection::TooLong { field: "device_type", chars: 33, limit: 32 }
        );
        let e = parse(&with("user_id", "u".repeat(129).into())).unwrap();
        assert_eq!(validate(&e, &limits).unwrap_err().code(), "value_too_long");
        let e = parse(&with("locale", "l".repeat(33).into())).unwrap();
        assert_eq!(validate(&e, &limits).unwrap_err().code(), "value_too_long");
        let e = parse(&with("ip", "1".repeat(MAX_MASK_INPUT_BYTES + 1).into())).unwrap();
        assert!(matches!(validate(&e, &limits).unwrap_err(), Rejection::MaskInputTooLong { field: "ip", .. }));
        let unbounded = ColumnLimits { user_id: None, ..limits };
        let e = parse(&with("user_id", "u".repeat(5000).into())).unwrap();
        assert!(validate(&e, &unbounded).is_ok());
    }

    #[test]
    fn version_goes_verbatim_into_a_text_column() {
        let limits = ColumnLimits { app_version: AppVersionColumn::Text { max_chars: Some(8) }, ..table_limits() };
        let e = parse(&with("app_version", "weird-1".into())).unwrap();
        assert_eq!(validate(&e, &limits), Ok(AppVersionValue::Verbatim("weird-1".into())));
        let e = parse(&with("app_version", "123456789".into())).unwrap();
        assert_eq!(validate(&e, &limits).unwrap_err().code(), "value_too_long");
    }

    #[test]
    fn invalid_version_is_a_rejection() {
        let e = parse(&with("app_version", "2.xq7".into())).unwrap();
        let r = validate(&e, &table_limits()).unwrap_err();
        assert_eq!(r.code(), "invalid_app_version");
        // The reason names the part, never the value (producers put device ids and IPs in the wrong fields).
        assert!(r.to_string().contains("part 2"), "{r}");
        assert!(!r.to_string().contains("xq7"), "{r}");
    }

    #[test]
    fn refused_rows_keep_names_never_values() {
        let cases = [
            (
                "23505",
                "duplicate key value violates unique constraint \"logins_user_key\"",
                Some("logins_user_key"),
                None,
            ),
            (
                "23514",
                "new row for relation \"user_logins\" violates check constraint \"no_test\"",
                Some("no_test"),
                None,
            ),
            (
                "23502",
                "null value in column \"locale\" of relation \"user_logins\" violates not-null constraint",
                None,
                Some("locale"),
            ),
            ("22P02", "invalid input syntax for type integer: \"203.0.113.77\"", None, None),
            ("P0001", "user 203.0.113.77 is blocked", None, None),
            ("P0001", "constraint \"203.0.113.77\" says no", None, None),
        ];
        for (state, message, constraint, column) in cases {
            let r = Rejection::refused_by_table(state, message);
            assert_eq!(r.code(), "refused_by_table");
            let text = r.to_string();
            assert!(text.contains(state), "{text}");
            assert!(!text.contains("203.0.113.77"), "{text}");
            if let Some(c) = constraint {
                assert!(text.contains(&format!("constraint \"{c}\"")), "{text}");
            }
            if let Some(c) = column {
                assert!(text.contains(&format!("column \"{c}\"")), "{text}");
            }
        }
    }

    #[test]
    fn not_json_reasons_give_the_position_not_the_text() {
        let r = parse("{\"ip\": \"203.0.113.77\", \"device_id\": tru").unwrap_err();
        assert_eq!(r.code(), "not_json");
        assert!(r.to_string().contains("line 1, column"), "{r}");
        assert!(!r.to_string().contains("203.0.113.77") && !r.to_string().contains("tru"), "{r}");
    }
}
