//! Pipelines: how the messages of a queue become the rows of any table, declared column by column.
//!
//! A [`Mapping`] says, for each target column, where its value comes from ([`Source`]: a JSON path into the
//! body, the whole body, a message attribute, an SQS system attribute, a path into the envelope) and what is done
//! to it ([`Transform`]: masking, version packing), whether it is required and its default. [`Mapping::extract`]
//! turns one message into one text value per column (already masked), or a [`Rejection`] naming the column and the
//! reason, never the value. Postgres converts each text to the column's type with the type's own input function
//! (uuid, inet, numeric, timestamptz, jsonb, arrays, domains) when the row is inserted.
//!
//! Declarations are JSON (what `sqs_ingest.pipeline_create()` takes as `jsonb`); [`ColumnSpec::parse`] checks one
//! and reports what is wrong with it before anything is stored.

use crate::event::{json_error, kind, Problem, Rejection, MAX_BODY_BYTES};
use crate::mask::{KeyMaterial, MaskError, Method, MAX_PLAINTEXT_BYTES};
use crate::version;
use serde_json::{Map, Value};
use std::fmt;

/// One step of a [`JsonPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// A path into a JSON document, in the subset of SQL/JSON path syntax that names one value:
/// `$`, `.key`, `."any key"`, `["any key"]`, `[index]` — e.g. `$.order.lines[0]."unit price"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, String> {
        let bad =
            |why: &str| Err(format!("invalid JSON path \"{}\": {why}", text.chars().take(64).collect::<String>()));
        let chars: Vec<char> = text.chars().collect();
        if chars.first() != Some(&'$') {
            return bad("it must start with $");
        }
        let mut steps = Vec::new();
        let mut i = 1;
        let quoted = |i: &mut usize| -> Option<String> {
            // At an opening double quote: JSON string escapes \" and \\ are accepted.
            let mut s = String::new();
            *i += 1;
            while *i < chars.len() {
                match chars[*i] {
                    '"' => {
                        *i += 1;
                        return Some(s);
                    }
                    '\\' if *i + 1 < chars.len() => {
                        s.push(chars[*i + 1]);
                        *i += 2;
                    }
                    c => {
                        s.push(c);
                        *i += 1;
                    }
                }
            }
            None
        };
        while i < chars.len() {
            match chars[i] {
                '.' => {
                    i += 1;
                    if i < chars.len() && chars[i] == '"' {
                        match quoted(&mut i) {
                            Some(k) => steps.push(Step::Key(k)),
                            None => return bad("unterminated quoted key"),
                        }
                    } else {
                        let start = i;
                        while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$') {
                            i += 1;
                        }
                        if start == i {
                            return bad("a key must follow '.' (quote keys with other characters: .\"my-key\")");
                        }
                        steps.push(Step::Key(chars[start..i].iter().collect()));
                    }
                }
                '[' => {
                    i += 1;
                    if i < chars.len() && chars[i] == '"' {
                        let Some(k) = quoted(&mut i) else { return bad("unterminated quoted key") };
                        steps.push(Step::Key(k));
                    } else {
                        let start = i;
                        while i < chars.len() && chars[i].is_ascii_digit() {
                            i += 1;
                        }
                        let digits: String = chars[start..i].iter().collect();
                        match digits.parse::<usize>() {
                            Ok(n) => steps.push(Step::Index(n)),
                            Err(_) => return bad("'[' must hold an array index or a quoted key"),
                        }
                    }
                    if i >= chars.len() || chars[i] != ']' {
                        return bad("missing ']'");
                    }
                    i += 1;
                }
                ' ' => i += 1,
                _ => return bad("expected '.' or '[' (filters, wildcards and functions are not supported here)"),
            }
        }
        Ok(JsonPath { text: text.to_string(), steps })
    }

    /// The value at this path, if there is one.
    pub fn find<'v>(&self, mut v: &'v Value) -> Option<&'v Value> {
        for step in &self.steps {
            v = match (step, v) {
                (Step::Key(k), Value::Object(m)) => m.get(k)?,
                (Step::Index(n), Value::Array(a)) => a.get(*n)?,
                _ => return None,
            };
        }
        Some(v)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// SQS system attributes a column may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemAttribute {
    MessageId,
    SentTimestamp,
    ApproximateReceiveCount,
    MessageGroupId,
    SequenceNumber,
}

impl SystemAttribute {
    const ALL: [(&'static str, SystemAttribute); 5] = [
        ("MessageId", SystemAttribute::MessageId),
        ("SentTimestamp", SystemAttribute::SentTimestamp),
        ("ApproximateReceiveCount", SystemAttribute::ApproximateReceiveCount),
        ("MessageGroupId", SystemAttribute::MessageGroupId),
        ("SequenceNumber", SystemAttribute::SequenceNumber),
    ];
}

/// Where a column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `$.path`: a value in the body (after the envelope is unwrapped).
    Path(JsonPath),
    /// `body`: the whole body (after the envelope is unwrapped), as text, or as JSON for a json/jsonb column.
    Body,
    /// `attribute:<name>`: a message attribute (SQS's own, or the SNS envelope's without raw delivery).
    Attribute(String),
    /// `sqs:<name>`: an SQS system attribute.
    System(SystemAttribute),
    /// `envelope:$.path`: a value in the SNS or EventBridge envelope (e.g. `envelope:$.TopicArn`,
    /// `envelope:$."detail-type"`).
    Envelope(JsonPath),
}

impl Source {
    pub fn parse(text: &str) -> Result<Source, String> {
        let t = text.trim();
        if t.starts_with('$') {
            return JsonPath::parse(t).map(Source::Path);
        }
        if t == "body" {
            return Ok(Source::Body);
        }
        if let Some(name) = t.strip_prefix("attribute:") {
            let ok = !name.is_empty()
                && name.len() <= 256
                && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            return if ok {
                Ok(Source::Attribute(name.to_string()))
            } else {
                Err(format!("invalid message attribute name in \"{}\"", t.chars().take(64).collect::<String>()))
            };
        }
        if let Some(name) = t.strip_prefix("sqs:") {
            return SystemAttribute::ALL.iter().find(|(n, _)| *n == name).map(|(_, a)| Source::System(*a)).ok_or_else(
                || {
                    let names: Vec<&str> = SystemAttribute::ALL.iter().map(|(n, _)| *n).collect();
                    format!(
                        "unknown SQS system attribute \"{}\"; expected one of {}",
                        name.chars().take(64).collect::<String>(),
                        names.join(", ")
                    )
                },
            );
        }
        if let Some(path) = t.strip_prefix("envelope:") {
            return JsonPath::parse(path).map(Source::Envelope);
        }
        Err(format!(
            "unknown source \"{}\"; expected a JSON path ($.field), body, attribute:<name>, sqs:<attribute> or envelope:$.path",
            t.chars().take(64).collect::<String>()
        ))
    }

    /// Whether reading this source needs the body parsed as JSON.
    fn needs_json(&self) -> bool {
        matches!(self, Source::Path(_) | Source::Envelope(_))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Path(p) => f.write_str(p.as_str()),
            Source::Body => f.write_str("body"),
            Source::Attribute(n) => write!(f, "attribute:{n}"),
            Source::System(a) => {
                write!(f, "sqs:{}", SystemAttribute::ALL.iter().find(|(_, s)| s == a).map_or("?", |(n, _)| *n))
            }
            Source::Envelope(p) => write!(f, "envelope:{}", p.as_str()),
        }
    }
}

/// What is done to a value before it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    None,
    /// Masked with the active key: `encrypt` (reversible with `unmask()`) or `hmac` (irreversible).
    Mask(Method),
    /// A dotted version `M.m.p` packed into `M*10000 + m*100 + p` for an integer column (verbatim into text).
    AppVersion,
}

/// How the target column takes text, as far as extraction must know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// text, varchar(n), char(n): limit in characters, if any.
    Text { max_chars: Option<usize> },
    /// json, jsonb: values are stored as JSON (a string keeps its quotes).
    Json,
    /// An array type: a JSON array becomes an array literal.
    Array,
    /// date, time, timestamp(tz): `sqs:SentTimestamp` is given as an ISO 8601 UTC timestamp.
    DateTime,
    /// smallint, integer, bigint (app_version packing needs one).
    Integer,
    /// Anything else (numeric, uuid, inet, boolean, domains over them, …).
    Other,
}

/// One column of a declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnSpec {
    pub column: String,
    pub source: Source,
    pub transform: Transform,
    /// A message without a value (missing or JSON null) is a dead letter; otherwise the column gets `default`.
    pub required: bool,
    /// Text converted by the column's type when no value is there (checked at declaration).
    pub default: Option<String>,
    /// The JSON value must be a string (not a number, object, …) — the login preset's strictness.
    pub json_string: bool,
}

/// Keys a column's declaration object may hold.
pub const COLUMN_KEYS: [&str; 6] = ["from", "mask", "transform", "required", "default", "json_type"];

impl ColumnSpec {
    /// Parses one column's declaration: a source string (`"$.order.id"`) or an object
    /// `{"from": …, "mask": "encrypt"|"hmac", "transform": "app_version", "required": bool, "default": text,
    /// "json_type": "string"}`.
    pub fn parse(column: &str, decl: &Value) -> Result<ColumnSpec, String> {
        let at = |why: String| format!("column \"{column}\": {why}");
        let obj: Map<String, Value> = match decl {
            Value::String(s) => [("from".to_string(), Value::String(s.clone()))].into_iter().collect(),
            Value::Object(o) => o.clone(),
            other => return Err(at(format!("expected a source string or an object, not a JSON {}", kind(other)))),
        };
        if let Some(k) = obj.keys().find(|k| !COLUMN_KEYS.contains(&k.as_str())) {
            return Err(at(format!(
                "unknown key \"{}\"; expected {}",
                k.chars().take(64).collect::<String>(),
                COLUMN_KEYS.join(", ")
            )));
        }
        let text = |key: &str| -> Result<Option<&str>, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(other) => Err(at(format!("\"{key}\" must be a string, not a JSON {}", kind(other)))),
            }
        };
        let source = Source::parse(text("from")?.ok_or_else(|| at("\"from\" (the value's source) is missing".into()))?)
            .map_err(at)?;
        let transform = match (text("mask")?, text("transform")?) {
            (Some(_), Some(_)) => return Err(at("give either \"mask\" or \"transform\", not both".into())),
            (Some(m), None) => match m {
                "encrypt" => Transform::Mask(Method::Encrypt),
                "hmac" => Transform::Mask(Method::Hmac),
                other => {
                    return Err(at(format!(
                        "unknown mask \"{}\"; expected encrypt or hmac",
                        other.chars().take(32).collect::<String>()
                    )))
                }
            },
            (None, Some("app_version")) => Transform::AppVersion,
            (None, Some(other)) => {
                return Err(at(format!(
                    "unknown transform \"{}\"; expected app_version (masking is \"mask\")",
                    other.chars().take(32).collect::<String>()
                )))
            }
            (None, None) => Transform::None,
        };
        let required = match obj.get("required") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => return Err(at(format!("\"required\" must be true or false, not a JSON {}", kind(other)))),
        };
        let default = text("default")?.map(str::to_string);
        if required && default.is_some() {
            return Err(at("a required column has no default (a message without the value is a dead letter)".into()));
        }
        let json_string = match text("json_type")? {
            None => false,
            Some("string") => true,
            Some(other) => {
                return Err(at(format!(
                    "unknown json_type \"{}\"; expected string",
                    other.chars().take(32).collect::<String>()
                )))
            }
        };
        if json_string && !source.needs_json() {
            return Err(at("\"json_type\" applies to JSON path sources only".into()));
        }
        Ok(ColumnSpec { column: column.to_string(), source, transform, required, default, json_string })
    }

    /// Checks the declaration against the column's kind (at declaration and at every ingest, since the table may
    /// have changed): masks need a text column long enough for every token, version packing an integer or text.
    pub fn check_kind(&self, kind: ColumnKind) -> Result<(), String> {
        let at = |why: String| format!("column \"{}\": {why}", self.column);
        match self.transform {
            Transform::Mask(_) => match kind {
                ColumnKind::Text { max_chars: Some(n) } if n < crate::mask::MAX_TOKEN_CHARS => Err(at(format!(
                    "it holds {n} characters; masking tokens need up to {} (use varchar({}) or text)",
                    crate::mask::MAX_TOKEN_CHARS,
                    crate::mask::MAX_TOKEN_CHARS
                ))),
                ColumnKind::Text { .. } => Ok(()),
                _ => Err(at("a masked column must be text or varchar (tokens are text)".into())),
            },
            Transform::AppVersion => match kind {
                ColumnKind::Integer | ColumnKind::Text { .. } => Ok(()),
                _ => Err(at("app_version packing needs an integer or text column".into())),
            },
            Transform::None => Ok(()),
        }
    }
}

/// How a message body is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// The body is the event.
    None,
    /// An SNS notification delivered without raw message delivery (`{"Type":"Notification","Message":"…",…}`) is
    /// unwrapped to its `Message`; a body that is not one (raw delivery) is taken as it is. Its
    /// `MessageAttributes` are readable as `attribute:<name>`, like SQS's own.
    Sns,
    /// An EventBridge event (`{"detail-type":…,"source":…,"detail":{…}}`) is unwrapped to its `detail`; a body
    /// that is not one is taken as it is.
    EventBridge,
}

impl Envelope {
    pub fn parse(text: &str) -> Result<Envelope, String> {
        match text {
            "none" => Ok(Envelope::None),
            "sns" => Ok(Envelope::Sns),
            "eventbridge" => Ok(Envelope::EventBridge),
            other => Err(format!(
                "unknown envelope \"{}\"; expected none, sns or eventbridge",
                other.chars().take(32).collect::<String>()
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Envelope::None => "none",
            Envelope::Sns => "sns",
            Envelope::EventBridge => "eventbridge",
        }
    }
}

/// One received message, as extraction reads it.
#[derive(Debug, Clone, Copy)]
pub struct MessageView<'a> {
    pub body: &'a str,
    pub message_id: &'a str,
    pub sent_timestamp_ms: Option<i64>,
    pub receive_count: Option<i32>,
    pub group_id: Option<&'a str>,
    pub sequence_number: Option<&'a str>,
    /// Message attributes (name, string value; binary values base64).
    pub attributes: &'a [(String, String)],
}

/// The columns of a pipeline with the kinds of their target columns, in insert order.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub envelope: Envelope,
    pub columns: Vec<(ColumnSpec, ColumnKind)>,
}

/// Days from 0000-03-01 to 1970-01-01 in the proleptic Gregorian calendar (civil-from-days, H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Epoch milliseconds as ISO 8601 UTC (`2026-11-30T02:14:09.123Z`), which every date/time input accepts.
pub fn iso8601_utc(ms: i64) -> String {
    let (days, rest) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, milli) = (rest / 3_600_000, rest / 60_000 % 60, rest / 1000 % 60, rest % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// A JSON array as a Postgres array literal (`{"a","b"}`, `{1,2}`, nested arrays as nested braces).
fn array_literal(items: &[Value], out: &mut String) {
    out.push('{');
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match v {
            Value::Null => out.push_str("NULL"),
            Value::Array(inner) => array_literal(inner, out),
            Value::String(s) => quote_element(s, out),
            other => quote_element(&other.to_string(), out),
        }
    }
    out.push('}');
}

fn quote_element(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// A JSON value as the text the column's input function reads.
fn render(v: &Value, kind: ColumnKind) -> String {
    match (v, kind) {
        (_, ColumnKind::Json) => v.to_string(),
        (Value::Array(items), ColumnKind::Array) => {
            let mut s = String::new();
            array_literal(items, &mut s);
            s
        }
        (Value::String(s), _) => s.clone(),
        (other, _) => other.to_string(),
    }
}

/// The body after unwrapping, and the envelope's attributes.
struct Unwrapped {
    /// The event's JSON, when the body (or the SNS message) parsed as JSON.
    json: Option<Value>,
    /// The event's text (the SNS Message, the body itself, or the serialized EventBridge detail).
    text: String,
    /// The envelope, when there was one.
    envelope: Option<Value>,
    /// Why the event's text is not JSON (for sources that need it).
    not_json: Option<String>,
}

impl Mapping {
    /// Whether any column needs the body parsed as JSON (or an envelope must be looked for).
    fn needs_json(&self) -> bool {
        self.envelope != Envelope::None
            || self
                .columns
                .iter()
                .any(|(c, k)| c.source.needs_json() || (c.source == Source::Body && *k == ColumnKind::Json))
    }

    /// Whether ReceiveMessage must ask for message attributes.
    pub fn needs_message_attributes(&self) -> bool {
        self.columns.iter().any(|(c, _)| matches!(c.source, Source::Attribute(_)))
    }

    /// Whether ReceiveMessage must ask for the FIFO system attributes.
    pub fn needs_fifo_attributes(&self) -> bool {
        self.columns.iter().any(|(c, _)| {
            matches!(c.source, Source::System(SystemAttribute::MessageGroupId | SystemAttribute::SequenceNumber))
        })
    }

    fn unwrap(&self, body: &str, force_json: bool) -> Unwrapped {
        if !force_json && !self.needs_json() {
            return Unwrapped { json: None, text: body.to_string(), envelope: None, not_json: None };
        }
        let parsed = serde_json::from_str::<Value>(body);
        let outer = match parsed {
            Ok(v) => v,
            Err(e) => {
                return Unwrapped { json: None, text: body.to_string(), envelope: None, not_json: Some(json_error(&e)) }
            }
        };
        match self.envelope {
            Envelope::Sns
                if outer.get("Type").and_then(Value::as_str) == Some("Notification")
                    && outer.get("Message").is_some_and(Value::is_string)
                    && outer.get("TopicArn").is_some() =>
            {
                let text = outer["Message"].as_str().unwrap_or_default().to_string();
                let (json, not_json) = match serde_json::from_str::<Value>(&text) {
                    Ok(v) => (Some(v), None),
                    Err(e) => (None, Some(json_error(&e))),
                };
                Unwrapped { json, text, envelope: Some(outer), not_json }
            }
            Envelope::EventBridge if outer.get("detail-type").is_some() && outer.get("detail").is_some() => {
                let detail = outer["detail"].clone();
                Unwrapped { text: detail.to_string(), json: Some(detail), envelope: Some(outer), not_json: None }
            }
            _ => Unwrapped { text: body.to_string(), json: Some(outer), envelope: None, not_json: None },
        }
    }

    /// One text per column (`None` = NULL), masked and ready for the column's input function; or why the message
    /// cannot become a row. `key` masks (required when a column masks).
    pub fn extract(
        &self,
        m: &MessageView<'_>,
        key: Option<&KeyMaterial>,
        out: &mut Vec<Option<String>>,
    ) -> Result<(), Rejection> {
        out.clear();
        if m.body.len() > MAX_BODY_BYTES {
            return Err(Rejection::BodyTooLarge { bytes: m.body.len() });
        }
        let event = self.unwrap(m.body, false);
        for (spec, kind) in &self.columns {
            let problem = |problem: Problem| Rejection::Column {
                column: spec.column.clone(),
                source: spec.source.to_string(),
                problem,
            };
            let value: Option<String> = match &spec.source {
                Source::Path(p) | Source::Envelope(p) => {
                    let doc = match (&spec.source, &event.envelope) {
                        (Source::Envelope(_), Some(env)) => Some(env),
                        (Source::Envelope(_), None) => None,
                        _ => match &event.json {
                            Some(v) => Some(v),
                            None => {
                                return Err(Rejection::NotJson {
                                    detail: event.not_json.clone().unwrap_or_else(|| "no JSON".into()),
                                })
                            }
                        },
                    };
                    match doc.and_then(|d| p.find(d)) {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) => Some(if *kind == ColumnKind::Json {
                            Value::String(s.clone()).to_string()
                        } else {
                            s.clone()
                        }),
                        Some(other) if spec.json_string => {
                            return Err(problem(Problem::WrongType { found: self::kind(other) }))
                        }
                        Some(other) => Some(render(other, *kind)),
                    }
                }
                Source::Body => match (&event.json, kind) {
                    (Some(v), ColumnKind::Json) => Some(v.to_string()),
                    (None, ColumnKind::Json) => {
                        return Err(Rejection::NotJson {
                            detail: event.not_json.clone().unwrap_or_else(|| "no JSON".into()),
                        })
                    }
                    _ => Some(event.text.clone()),
                },
                Source::Attribute(name) => m
                    .attributes
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .or_else(|| sns_attribute(event.envelope.as_ref(), name)),
                Source::System(a) => match a {
                    SystemAttribute::MessageId => Some(m.message_id.to_string()),
                    SystemAttribute::SentTimestamp => m.sent_timestamp_ms.map(|ms| {
                        if *kind == ColumnKind::DateTime {
                            iso8601_utc(ms)
                        } else {
                            ms.to_string()
                        }
                    }),
                    SystemAttribute::ApproximateReceiveCount => m.receive_count.map(|n| n.to_string()),
                    SystemAttribute::MessageGroupId => m.group_id.map(str::to_string),
                    SystemAttribute::SequenceNumber => m.sequence_number.map(str::to_string),
                },
            };
            let Some(value) = value else {
                if spec.required {
                    return Err(problem(Problem::Missing));
                }
                out.push(spec.default.clone());
                continue;
            };
            if value.contains('\0') {
                return Err(problem(Problem::NulByte));
            }
            let stored = match spec.transform {
                Transform::None => value,
                Transform::Mask(method) => {
                    if value.len() > MAX_PLAINTEXT_BYTES {
                        return Err(problem(Problem::MaskInputTooLong { bytes: value.len() }));
                    }
                    let key = key.expect("a mapping that masks is extracted with a key");
                    key.mask(method, value.as_bytes()).map_err(|e| match e {
                        MaskError::PlaintextTooLong(bytes) => problem(Problem::MaskInputTooLong { bytes }),
                        _ => problem(Problem::Missing),
                    })?
                }
                Transform::AppVersion => match kind {
                    ColumnKind::Integer => {
                        version::pack(&value).map_err(|e| problem(Problem::InvalidVersion(e)))?.to_string()
                    }
                    _ => value,
                },
            };
            if let ColumnKind::Text { max_chars: Some(limit) } = kind {
                if stored.len() > *limit {
                    let chars = stored.chars().count();
                    if chars > *limit {
                        return Err(problem(Problem::TooLong { chars, limit: *limit }));
                    }
                }
            }
            out.push(Some(stored));
        }
        Ok(())
    }
}

impl Mapping {
    /// The JSON document a pipeline's filter (an SQL/JSON path predicate) is evaluated on:
    /// `{"body": <the event, unwrapped: its JSON, or its text>, "attributes": {<name>: <value>}, "sqs": {"MessageId":
    /// …, "SentTimestamp": <ms>, "ApproximateReceiveCount": n, "MessageGroupId": …, "SequenceNumber": …},
    /// "envelope": <the SNS or EventBridge envelope, or null>}`. Message attributes include an SNS envelope's. A
    /// NUL character (which `jsonb` cannot hold) reads as U+FFFD here.
    pub fn filter_document(&self, m: &MessageView<'_>) -> String {
        let event = self.unwrap(m.body, true);
        let mut attributes = Map::new();
        if let Some(Value::Object(sns)) = event.envelope.as_ref().and_then(|e| e.get("MessageAttributes")) {
            for (name, a) in sns {
                if let Some(v) = a.get("Value").and_then(Value::as_str) {
                    attributes.insert(name.clone(), Value::String(v.to_string()));
                }
            }
        }
        for (name, value) in m.attributes {
            attributes.insert(name.clone(), Value::String(value.clone()));
        }
        let opt = |v: Option<&str>| v.map_or(Value::Null, |s| Value::String(s.to_string()));
        let doc = serde_json::json!({
            "body": event.json.unwrap_or(Value::String(event.text)),
            "attributes": attributes,
            "sqs": {
                "MessageId": m.message_id,
                "SentTimestamp": m.sent_timestamp_ms,
                "ApproximateReceiveCount": m.receive_count,
                "MessageGroupId": opt(m.group_id),
                "SequenceNumber": opt(m.sequence_number),
            },
            "envelope": event.envelope.unwrap_or(Value::Null),
        })
        .to_string();
        if doc.contains("\\u0000") {
            doc.replace("\\u0000", "\\ufffd")
        } else {
            doc
        }
    }
}

/// A string attribute of an SNS envelope (`MessageAttributes: {"name": {"Type": "String", "Value": "…"}}`).
fn sns_attribute(envelope: Option<&Value>, name: &str) -> Option<String> {
    let a = envelope?.get("MessageAttributes")?.get(name)?;
    a.get("Value").and_then(Value::as_str).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view<'a>(body: &'a str, attributes: &'a [(String, String)]) -> MessageView<'a> {
        MessageView {
            body,
            message_id: "m-1",
            sent_timestamp_ms: Some(1_764_468_849_123),
            receive_count: Some(2),
            group_id: Some("g"),
            sequence_number: None,
            attributes,
        }
    }

    fn mapping(envelope: Envelope, cols: &[(&str, Value, ColumnKind)]) -> Mapping {
        Mapping { envelope, columns: cols.iter().map(|(c, d, k)| (ColumnSpec::parse(c, d).unwrap(), *k)).collect() }
    }

    #[test]
    fn paths_parse_and_find() {
        let doc = json!({"a": {"b c": [10, {"d": "x"}]}, "e": null});
        let find = |p: &str| JsonPath::parse(p).unwrap().find(&doc).cloned();
        assert_eq!(find("$.a.\"b c\"[0]"), Some(json!(10)));
        assert_eq!(find("$[\"a\"][\"b c\"][1].d"), Some(json!("x")));
        assert_eq!(find("$"), Some(doc.clone()));
        assert_eq!(find("$.a.missing"), None);
        assert_eq!(find("$.e"), Some(Value::Null));
        for bad in ["a.b", "$.", "$.a[", "$.a[x]", "$.a.*", "$..a", "$.\"open", "$.a ? (@ > 1)"] {
            assert!(JsonPath::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn declarations_are_checked_before_anything_is_stored() {
        let ok =
            ColumnSpec::parse("email", &json!({"from": "$.customer.email", "mask": "hmac", "required": true})).unwrap();
        assert_eq!(ok.transform, Transform::Mask(Method::Hmac));
        assert!(ok.required);
        for (decl, why) in [
            (json!({"from": "$.a", "mask": "rot13"}), "unknown mask"),
            (json!({"from": "$.a", "transform": "upper"}), "unknown transform"),
            (json!({"from": "$.a", "colour": "red"}), "unknown key"),
            (json!({"from": "a.b"}), "unknown source"),
            (json!({"from": "sqs:Color"}), "unknown SQS system attribute"),
            (json!({"from": "$.a[x]"}), "invalid JSON path"),
            (json!({"mask": "hmac"}), "is missing"),
            (json!({"from": "$.a", "required": true, "default": "x"}), "has no default"),
            (json!({"from": "body", "json_type": "string"}), "JSON path sources only"),
            (json!(42), "expected a source string"),
        ] {
            let e = ColumnSpec::parse("c", &decl).unwrap_err();
            assert!(e.contains(why) && e.starts_with("column \"c\""), "{decl}: {e}");
        }
        let masked = ColumnSpec::parse("t", &json!({"from": "$.a", "mask": "encrypt"})).unwrap();
        assert!(masked.check_kind(ColumnKind::Text { max_chars: Some(64) }).unwrap_err().contains("64 characters"));
        assert!(masked.check_kind(ColumnKind::Other).is_err());
        assert!(masked.check_kind(ColumnKind::Text { max_chars: None }).is_ok());
    }

    #[test]
    fn every_source_kind_yields_its_text() {
        let key = KeyMaterial::new(1, &[7u8; 32]).unwrap();
        let attrs = vec![("channel".to_string(), "web".to_string())];
        let m = mapping(
            Envelope::None,
            &[
                ("id", json!("$.order.id"), ColumnKind::Other),
                ("total", json!("$.order.total"), ColumnKind::Other),
                ("tags", json!("$.order.tags"), ColumnKind::Array),
                ("doc", json!("$.order"), ColumnKind::Json),
                ("note", json!("$.order.note"), ColumnKind::Json),
                ("email", json!({"from": "$.email", "mask": "encrypt"}), ColumnKind::Text { max_chars: None }),
                ("channel", json!("attribute:channel"), ColumnKind::Text { max_chars: None }),
                ("region", json!({"from": "attribute:region", "default": "eu"}), ColumnKind::Text { max_chars: None }),
                ("sent", json!("sqs:SentTimestamp"), ColumnKind::DateTime),
                ("sent_ms", json!("sqs:SentTimestamp"), ColumnKind::Integer),
                ("mid", json!("sqs:MessageId"), ColumnKind::Other),
                ("group", json!("sqs:MessageGroupId"), ColumnKind::Other),
                ("raw", json!("body"), ColumnKind::Json),
            ],
        );
        let body = r#"{"order":{"id":"5b0a","total":12.50,"tags":["a","b\"c"],"note":"hi"},"email":"x@example.com"}"#;
        let mut out = Vec::new();
        m.extract(&view(body, &attrs), Some(&key), &mut out).unwrap();
        let s = |i: usize| out[i].clone();
        assert_eq!(s(0).as_deref(), Some("5b0a"));
        assert_eq!(s(1).as_deref(), Some("12.50"), "numbers keep their exact text");
        assert_eq!(s(2).as_deref(), Some(r#"{"a","b\"c"}"#));
        assert_eq!(serde_json::from_str::<Value>(&s(3).unwrap()).unwrap()["id"], "5b0a");
        assert_eq!(s(4).as_deref(), Some("\"hi\""), "a string into jsonb keeps its quotes");
        assert_eq!(s(5), Some(key.mask(Method::Encrypt, b"x@example.com").unwrap()));
        assert_eq!(s(6).as_deref(), Some("web"));
        assert_eq!(s(7).as_deref(), Some("eu"), "the default when the attribute is absent");
        assert_eq!(s(8).as_deref(), Some("2025-11-30T02:14:09.123Z"));
        assert_eq!(s(9).as_deref(), Some("1764468849123"));
        assert_eq!(s(10).as_deref(), Some("m-1"));
        assert_eq!(s(11).as_deref(), Some("g"));
        assert_eq!(serde_json::from_str::<Value>(&s(12).unwrap()).unwrap()["email"], "x@example.com");
    }

    #[test]
    fn rejections_name_the_column_and_never_the_value() {
        let key = KeyMaterial::new(1, &[7u8; 32]).unwrap();
        let m = mapping(
            Envelope::None,
            &[
                (
                    "id",
                    json!({"from": "$.id", "required": true, "json_type": "string"}),
                    ColumnKind::Text { max_chars: Some(8) },
                ),
                ("email", json!({"from": "$.email", "mask": "hmac"}), ColumnKind::Text { max_chars: None }),
                ("v", json!({"from": "$.v", "transform": "app_version"}), ColumnKind::Integer),
            ],
        );
        let mut out = Vec::new();
        let cases = [
            (r#"{"email":"secret@example.com"}"#, "missing_field", "id"),
            (r#"{"id":12345}"#, "wrong_type", "id"),
            (r#"{"id":"secret-too-long"}"#, "value_too_long", "id"),
            (r#"{"id":"a\u0000"}"#, "nul_byte", "id"),
            (r#"{"id":"a","v":"1.x.secret"}"#, "invalid_app_version", "v"),
        ];
        for (body, code, column) in cases {
            let e = m.extract(&view(body, &[]), Some(&key), &mut out).unwrap_err();
            assert_eq!(e.code(), code, "{body}");
            let text = e.to_string();
            assert!(text.contains(&format!("column \"{column}\"")), "{text}");
            assert!(!text.contains("secret"), "{text}");
        }
        let long = format!(r#"{{"id":"a","email":"{}"}}"#, "e".repeat(200));
        assert_eq!(m.extract(&view(&long, &[]), Some(&key), &mut out).unwrap_err().code(), "value_too_long");
        assert_eq!(m.extract(&view("not json", &[]), Some(&key), &mut out).unwrap_err().code(), "not_json");
        m.extract(&view(r#"{"id":"a","v":"1.2.3"}"#, &[]), Some(&key), &mut out).unwrap();
        assert_eq!(out, vec![Some("a".to_string()), None, Some("10203".to_string())]);
    }

    #[test]
    fn sns_and_eventbridge_envelopes_unwrap_to_the_same_row_as_raw_delivery() {
        let cols = [
            ("id", json!("$.id"), ColumnKind::Other),
            ("kind", json!("attribute:kind"), ColumnKind::Other),
            ("raw", json!("body"), ColumnKind::Text { max_chars: None }),
        ];
        let sns = mapping(Envelope::Sns, &cols);
        let inner = r#"{"id":"o-1"}"#;
        let wrapped = json!({
            "Type": "Notification", "MessageId": "n", "TopicArn": "arn:aws:sns:us-east-1:000000000000:t",
            "Message": inner, "MessageAttributes": {"kind": {"Type": "String", "Value": "created"}}
        })
        .to_string();
        let raw_attrs = vec![("kind".to_string(), "created".to_string())];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        sns.extract(&view(&wrapped, &[]), None, &mut a).unwrap();
        sns.extract(&view(inner, &raw_attrs), None, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0].as_deref(), Some("o-1"));
        let topic = mapping(Envelope::Sns, &[("topic", json!("envelope:$.TopicArn"), ColumnKind::Other)]);
        topic.extract(&view(&wrapped, &[]), None, &mut a).unwrap();
        assert_eq!(a[0].as_deref(), Some("arn:aws:sns:us-east-1:000000000000:t"));

        let eb = mapping(
            Envelope::EventBridge,
            &[("id", json!("$.id"), ColumnKind::Other), ("dt", json!("envelope:$.\"detail-type\""), ColumnKind::Other)],
        );
        let event = json!({"version": "0", "detail-type": "OrderCreated", "source": "shop", "detail": {"id": "o-2"}});
        eb.extract(&view(&event.to_string(), &[]), None, &mut a).unwrap();
        assert_eq!(a, vec![Some("o-2".to_string()), Some("OrderCreated".to_string())]);
    }

    #[test]
    fn the_filter_document_holds_body_attributes_and_sqs_fields() {
        let m = mapping(Envelope::Sns, &[("id", json!("$.id"), ColumnKind::Other)]);
        let wrapped = json!({"Type": "Notification", "TopicArn": "arn:t", "Message": "{\"id\":\"a\\u0000\",\"n\":2}",
            "MessageAttributes": {"kind": {"Type": "String", "Value": "created"}}})
        .to_string();
        let attrs = vec![("channel".to_string(), "web".to_string())];
        let doc: Value = serde_json::from_str(&m.filter_document(&view(&wrapped, &attrs))).unwrap();
        assert_eq!(doc["body"]["n"], 2);
        assert_eq!(doc["body"]["id"], "a\u{fffd}", "NUL reads as U+FFFD (jsonb cannot hold it)");
        assert_eq!(doc["attributes"]["kind"], "created");
        assert_eq!(doc["attributes"]["channel"], "web");
        assert_eq!(doc["sqs"]["MessageId"], "m-1");
        assert_eq!(doc["sqs"]["ApproximateReceiveCount"], 2);
        assert_eq!(doc["envelope"]["TopicArn"], "arn:t");
        let raw: Value = serde_json::from_str(&m.filter_document(&view("not json", &[]))).unwrap();
        assert_eq!(raw["body"], "not json");
    }

    #[test]
    fn numbers_keep_their_exact_text() {
        let m = mapping(
            Envelope::None,
            &[
                ("a", json!("$.amount"), ColumnKind::Other),
                ("i", json!("$.id"), ColumnKind::Other),
                ("b", json!("body"), ColumnKind::Json),
            ],
        );
        let body = r#"{"amount":12345678901234567.89,"id":123456789012345678901}"#;
        let mut out = Vec::new();
        m.extract(&view(body, &[]), None, &mut out).unwrap();
        assert_eq!(out[0].as_deref(), Some("12345678901234567.89"));
        assert_eq!(out[1].as_deref(), Some("123456789012345678901"));
        assert!(out[2].as_deref().unwrap().contains("12345678901234567.89"));
    }

    #[test]
    fn timestamps_render_as_iso_8601_utc() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601_utc(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(iso8601_utc(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
    }
}
