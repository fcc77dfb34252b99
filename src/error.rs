//! The extension's errors, each with a chosen SQLSTATE and a hint, raised through [`Error::raise`].
//!
//! Texts are scrubbed of secrets here, the single exit point for anything that reaches a client or the log.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use sqs_ingest_core::mask::MaskError;
use sqs_ingest_core::queue_url::QueueUrlError;
use sqs_ingest_core::scrub::scrub;
use sqs_ingest_core::sqs_error::{FailureClass, Observed};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid queue URL \"{url}\": {source}")]
    QueueUrl { url: String, source: QueueUrlError },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("SQS endpoint host \"{0}\" is not in sqs_ingest.allowed_endpoints")]
    EndpointNotAllowed(String),
    #[error("{0}")]
    NotAllowed(String),
    #[error("{0}")]
    Limit(String),
    #[error("{0}")]
    Permission(String),
    #[error("{summary}")]
    Sqs { class: FailureClass, summary: String, detail: String },
    #[error("canceling statement due to user request")]
    Interrupted,
    #[error("{0}")]
    Mask(#[from] MaskError),
    #[error("{0}")]
    Keys(String),
    #[error("{0}")]
    Target(String),
    #[error("{0}")]
    NotPreloaded(String),
    #[error("{0}")]
    Internal(String),
    /// An ERROR Postgres raised inside an ingest (a lock timeout, a serialization failure, a table the caller
    /// cannot write), caught so that it reaches `stats.last_error` and a worker carries on; re-raised with its
    /// SQLSTATE, message and hint (never its DETAIL, which may quote values).
    #[error("{message}")]
    Postgres { code: PgSqlErrorCode, message: String, hint: Option<String> },
    /// A pipeline declaration or name that cannot be used: 22023 (a bad element), 42703 (no such column), 42704
    /// (no such pipeline), 42710 (the name is taken), 42501 (not the pipeline's owner).
    #[error("{message}")]
    Pipeline { code: PgSqlErrorCode, message: String },
    /// Something the call needs is not usable here, with its own SQLSTATE and hint: no masking key yet where
    /// only ingest may make one, a Citus worker node, a Citus-distributed bookkeeping table (55000, 0A000), or
    /// the AWS KMS key that wraps the masking keys: no access (42501), disabled (55000), unreachable (58000).
    #[error("{message}")]
    Unavailable { code: PgSqlErrorCode, message: String, hint: String },
}

/// The SQLSTATE of an SQS failure class: the one mapping, in `sqs_ingest_core::sqs_error` (its unit tests pin it).
fn sqlstate_of(class: FailureClass) -> PgSqlErrorCode {
    sqlstate_code(class.sqlstate())
}

/// A five-character SQLSTATE as Postgres' packed code (six bits a character, lowest first: `MAKE_SQLSTATE`).
pub fn sqlstate_code(state: &str) -> PgSqlErrorCode {
    let packed = state
        .bytes()
        .take(5)
        .enumerate()
        .fold(0i32, |code, (i, c)| code | ((i32::from(c.wrapping_sub(b'0')) & 0x3f) << (6 * i)));
    PgSqlErrorCode::from(packed)
}

impl Error {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            Error::QueueUrl { .. } | Error::InvalidArgument(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            Error::EndpointNotAllowed(_) | Error::NotAllowed(_) | Error::Permission(_) => {
                ERRCODE_INSUFFICIENT_PRIVILEGE
            }
            Error::Limit(_) => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            Error::Sqs { class, .. } => sqlstate_of(*class),
            Error::Interrupted => ERRCODE_QUERY_CANCELED,
            Error::Mask(MaskError::UnknownMethod(_)) => ERRCODE_INVALID_PARAMETER_VALUE,
            Error::Mask(MaskError::PlaintextTooLong(_)) => ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            Error::Mask(MaskError::UnknownKey(_)) => ERRCODE_UNDEFINED_OBJECT,
            Error::Mask(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            Error::Keys(_) => ERRCODE_DATA_CORRUPTED,
            Error::Target(_) => ERRCODE_WRONG_OBJECT_TYPE,
            Error::NotPreloaded(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Error::Internal(_) => ERRCODE_INTERNAL_ERROR,
            Error::Postgres { code, .. } => *code,
            Error::Pipeline { code, .. } => *code,
            Error::Unavailable { code, .. } => *code,
        }
    }

    pub fn hint(&self) -> Option<String> {
        let hint = match self {
            Error::Postgres { hint, .. } => return hint.clone(),
            Error::Unavailable { hint, .. } => return Some(hint.clone()),
            Error::Pipeline { code, .. } => match code {
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT => "List the pipelines with SELECT name FROM sqs_ingest.pipelines; a queue URL (with ://) runs the built-in login pipeline.",
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT => "Pass replace => true to redeclare it (as its owner), or choose another name.",
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE => "Only the role that declared a pipeline (or a superuser) may replace or drop it.",
                _ => "See docs/pipelines.md: every column maps a source (a JSON path $.x, body, attribute:<name>, sqs:<attribute>, envelope:$.x) with optional mask, transform, required, default and json_type.",
            },
            Error::QueueUrl { .. } => "Pass the queue URL as SQS returns it, e.g. http://localhost:4566/000000000000/login-queue or https://sqs.us-east-1.amazonaws.com/123456789012/login-queue.",
            Error::Sqs { class, .. } => class.hint(),
            Error::Mask(MaskError::UnknownMethod(_)) => "Use 'encrypt' or 'hmac'.",
            Error::Mask(MaskError::Irreversible) => "Only tokens of method encrypt (prefix enc:) can be unmasked.",
            Error::Mask(MaskError::UnknownKey(_)) => "Restore the key from a backup of sqs_ingest.keys (pg_dump includes it).",
            Error::Mask(MaskError::Tampered) | Error::Mask(MaskError::Malformed) => {
                "Pass a token exactly as stored in user_logins.masked_ip or masked_device_id."
            }
            Error::Keys(_) => "Restore sqs_ingest.keys from backup; without the keys, reversible tokens cannot be unmasked.",
            Error::Target(_) => "Point sqs_ingest.target_table at a table with the user_logins columns, or drop it to let ingest create it.",
            Error::NotPreloaded(_) => "Add sqs_ingest to shared_preload_libraries in postgresql.conf and restart the server.",
            Error::Mask(MaskError::PlaintextTooLong(_)) => {
                "Mask values of at most 128 bytes (IP addresses and device ids are far shorter); a token must fit varchar(256)."
            }
            Error::Interrupted => {
                "The transaction rolls back: nothing it received is stored, and its messages are released back to the queue."
            }
            Error::InvalidArgument(_) => "See the function's arguments in the README's SQL API section.",
            Error::EndpointNotAllowed(_) => {
                "Requests carry the server's AWS credentials, so they go only to hosts a superuser allowed: add the host to sqs_ingest.allowed_endpoints (ALTER SYSTEM, or ALTER DATABASE ... SET as a superuser) if it is a trusted SQS endpoint."
            }
            Error::Permission(_) => "Grant the calling role INSERT on the target table (UPDATE for rekey).",
            Error::Limit(_) => {
                "Stop a worker with sqs_ingest.worker_stop(), or have a superuser raise sqs_ingest.max_dynamic_workers."
            }
            Error::NotAllowed(_) => {
                "Dynamic workers connect as the role that starts them; start it as a role with LOGIN (not under SET ROLE to a NOLOGIN group role)."
            }
            Error::Mask(MaskError::TokenTooLong(_)) => {
                "Pass a token exactly as stored in user_logins.masked_ip or masked_device_id."
            }
            _ => return None,
        };
        Some(hint.to_string())
    }

    /// Raises this error as a Postgres ERROR (for the few places that cannot return a `Result`: the V1 `mask`
    /// entry and transaction hooks). Never returns.
    pub fn raise(self) -> ! {
        ErrorReport::from(self).report(PgLogLevel::ERROR);
        unreachable!("ereport(ERROR) does not return")
    }

    /// The text stored in `sqs_ingest.stats.last_error`: scrubbed, with the SQLSTATE.
    pub fn scrubbed(&self) -> String {
        let secrets = crate::gucs::configured_secrets();
        let known: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let mut text = format!("{}: {}", self.sqlstate_text(), self);
        if let Error::Sqs { detail, .. } = self {
            text.push_str(" — ");
            text.push_str(detail);
        }
        scrub(&text, &known)
    }

    fn sqlstate_text(&self) -> String {
        sqlstate_text(self.sqlstate())
    }
}

/// The five-character SQLSTATE of a code.
pub fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let code = code as i32;
    // Postgres packs SQLSTATE characters six bits each, lowest first.
    (0..5).map(|i| (((code >> (6 * i)) & 0x3f) as u8 + b'0') as char).collect()
}

pub type Result<T> = std::result::Result<T, Error>;

/// What a `#[pg_extern]` returns on failure: pgrx raises the report as it is — SQLSTATE, message and detail
/// scrubbed of configured secrets, and the hint.
impl From<Error> for ErrorReport {
    fn from(e: Error) -> ErrorReport {
        let secrets = crate::gucs::configured_secrets();
        let known: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let mut report = ErrorReport::new(e.sqlstate(), scrub(&e.to_string(), &known), "sqs_ingest");
        if let Error::Sqs { detail, .. } = &e {
            if !detail.is_empty() {
                report = report.set_detail(scrub(detail, &known));
            }
        }
        if let Some(hint) = e.hint() {
            report = report.set_hint(hint);
        }
        report
    }
}

/// The [`Error`] for a failed SQS call, from what was observed (shared by the SDK and the direct client).
pub fn sqs_failure(operation: &str, seen: &Observed<'_>, what: String) -> Error {
    let class = FailureClass::classify(seen);
    let detail = match (seen.http_status, class) {
        (Some(s), FailureClass::LegacyProtocol) => {
            format!("{operation}: HTTP {s} with an XML body to a JSON-protocol request")
        }
        _ => format!("{operation}: {what}"),
    };
    Error::Sqs { class, summary: class.summary().to_string(), detail }
}

/// The Display texts of an error and its sources, without the Debug dump of the SDK's internals.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// Whether an error of the target is worth retrying later rather than a fault of the batch: serialization
/// failures and deadlocks (class 40), lock timeouts (55P03), lack of disk, memory or connections (class 53), and
/// system errors such as I/O failures (class 58). A cancel or `statement_timeout` (57014) is not: its messages
/// are released at once.
pub fn transient(code: pgrx::PgSqlErrorCode) -> bool {
    let state = crate::error::sqlstate_text(code);
    state.starts_with("40") || state == "55P03" || state.starts_with("53") || state.starts_with("58")
}

/// Whether an error belongs to the whole statement, never to one row's values: transient ones, a cancel or
/// shutdown (57), internal errors (XX), connection (08) and transaction-state (25) errors.
pub fn batch_level(code: PgSqlErrorCode) -> bool {
    let state = sqlstate_text(code);
    transient(code) || ["57", "XX", "08", "25"].iter().any(|c| state.starts_with(c))
}
