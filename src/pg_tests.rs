// In-database tests (`cargo pgrx test`): no SQS endpoint needed. Live-queue tests are in pgrx-tests/.
use pgrx::prelude::*;

fn text(sql: &str) -> Option<String> {
    Spi::get_one::<String>(sql).unwrap()
}

/// Makes the first masking key (mask() never does: only ingest and rotate_key()).
fn with_key() {
    Spi::run("SELECT sqs_ingest.rotate_key()").unwrap();
}

#[pg_test(error = "no masking key exists in this database yet; mask() does not create one")]
fn mask_without_a_key_is_an_error() {
    // That it makes no key either is checked end to end (pgrx-tests/tests/citus.rs), after the ERROR.
    text("SELECT sqs_ingest.mask('203.0.113.77')");
}

#[pg_test]
fn app_version_text_prints_packed_codes() {
    assert_eq!(text("SELECT sqs_ingest.app_version_text(20300)").as_deref(), Some("2.3.0"));
    assert_eq!(text("SELECT sqs_ingest.app_version_text(9600)").as_deref(), Some("0.96.0"));
    assert_eq!(text("SELECT sqs_ingest.app_version_text(-1)"), None);
}

#[pg_test]
fn mask_is_deterministic_and_unmask_reverses_it() {
    with_key();
    let a = text("SELECT sqs_ingest.mask('203.0.113.77')").unwrap();
    let b = text("SELECT sqs_ingest.mask('203.0.113.77')").unwrap();
    assert_eq!(a, b);
    assert!(a.starts_with("enc:"), "{a}");
    assert_ne!(a, text("SELECT sqs_ingest.mask('203.0.113.78')").unwrap());
    let back = Spi::get_one_with_args::<String>("SELECT sqs_ingest.unmask($1)", &[a.clone().into()]).unwrap();
    assert_eq!(back.as_deref(), Some("203.0.113.77"));
    let h = text("SELECT sqs_ingest.mask('318-52-7046', 'hmac')").unwrap();
    assert!(h.starts_with("hmac:"), "{h}");
    assert_eq!(h.split(':').nth(1), a.split(':').nth(1), "both methods use the active key");
    assert_eq!(text("SELECT sqs_ingest.mask(NULL)"), None);
    let audited = Spi::get_one::<i64>("SELECT count(*) FROM sqs_ingest.unmask_audit WHERE succeeded").unwrap();
    assert_eq!(audited, Some(1));
}

#[pg_test]
fn the_method_setting_chooses_the_default() {
    with_key();
    Spi::run("SET LOCAL sqs_ingest.masking_method = 'hmac'").unwrap();
    assert!(text("SELECT sqs_ingest.mask('x')").unwrap().starts_with("hmac:"));
    assert!(text("SELECT sqs_ingest.mask('x', 'encrypt')").unwrap().starts_with("enc:"));
}

#[pg_test(error = "invalid value for parameter \"sqs_ingest.masking_method\": \"rot13\"")]
fn an_unknown_method_setting_is_refused_when_set() {
    with_key();
    // An enum setting: Postgres itself refuses the value (22023), before any mask() runs.
    Spi::run("SET LOCAL sqs_ingest.masking_method = 'HMAC'").unwrap();
    assert!(text("SELECT sqs_ingest.mask('x')").unwrap().starts_with("hmac:"), "case-insensitive");
    Spi::run("SET LOCAL sqs_ingest.masking_method = 'rot13'").unwrap();
}

#[pg_test(error = "token was masked with method hmac, which is irreversible")]
fn hmac_tokens_cannot_be_unmasked() {
    with_key();
    let h = text("SELECT sqs_ingest.mask('x', 'hmac')").unwrap();
    Spi::get_one_with_args::<String>("SELECT sqs_ingest.unmask($1)", &[h.into()]).unwrap();
}

#[pg_test(error = "unknown masking method \"sha256\"")]
fn unkeyed_hashing_is_not_a_method() {
    text("SELECT sqs_ingest.mask('x', 'sha256')");
}

#[pg_test]
fn rotation_makes_a_new_active_key_and_old_tokens_still_unmask() {
    with_key();
    let old = text("SELECT sqs_ingest.mask('10.0.0.1')").unwrap();
    let old_id: i32 = old.split(':').nth(1).unwrap().parse().unwrap();
    let new_id = Spi::get_one::<i32>("SELECT sqs_ingest.rotate_key()").unwrap().unwrap();
    assert!(new_id > old_id);
    let new = text("SELECT sqs_ingest.mask('10.0.0.1')").unwrap();
    assert!(new.starts_with(&format!("enc:{new_id}:")), "{new}");
    assert_ne!(old, new);
    for t in [old, new] {
        let v = Spi::get_one_with_args::<String>("SELECT sqs_ingest.unmask($1)", &[t.into()]).unwrap();
        assert_eq!(v.as_deref(), Some("10.0.0.1"));
    }
    let events = Spi::get_one::<i64>("SELECT count(*) FROM sqs_ingest.key_events").unwrap();
    assert_eq!(events, Some(5), "generated+activated, retired, generated+activated");
}

#[pg_test(error = "sqs_ingest background workers need the library preloaded (shared_preload_libraries does not include sqs_ingest)")]
fn worker_start_explains_a_missing_preload() {
    Spi::run("SELECT sqs_ingest.worker_start('http://localhost:4566/000000000000/login-queue')").unwrap();
}

#[pg_test(error = "invalid queue URL \"localhost:4566/q\": queue URL must start with http:// or https://")]
fn malformed_queue_url_is_refused_before_any_side_effect() {
    Spi::run("SELECT * FROM sqs_ingest('localhost:4566/q')").unwrap();
}

#[pg_test]
fn audit_records_survive_their_encoding() {
    use crate::audit::{Kind, Record, Refusal};
    for (key_id, kind, count) in [
        (Some(7), Kind::Refused(Refusal::UnknownKey), 1),
        (None, Kind::Refused(Refusal::Malformed), 1),
        (Some(2_147_483_647), Kind::RevealedThenRolledBack, 4_000_000_000),
        (None, Kind::Masked, u64::MAX),
    ] {
        let r = Record {
            session: 4_294_967_295,
            current: 10,
            key_id,
            kind,
            count,
            first_at: 848_000_000_123_456,
            last_at: 848_000_000_123_999,
        };
        let s = r.encode(4_194_304);
        assert_eq!(Record::decode(&s), Some((r, 4_194_304)));
    }
    assert_eq!(Record::decode("v1|tampered|1|2|-|1|3|4|5"), None);
    assert_eq!(Record::decode("v2|tampered|1|2|-|0|3|4|5"), None, "a count of zero is not a record");
}

/// A token longer than any valid one is refused before it is decoded (22023), and the refusal is audited.
#[pg_test(error = "token is 4000006 characters; no valid token is longer than 223")]
fn overlong_tokens_are_refused_before_decoding() {
    Spi::run("SELECT sqs_ingest.unmask('enc:1:' || repeat('A', 4000000))").unwrap();
}

#[pg_test(error = "value is 129 bytes; masking accepts at most 128")]
fn mask_refuses_values_whose_token_would_not_fit() {
    with_key();
    text("SELECT sqs_ingest.mask(repeat('x', 129))");
}

#[pg_test]
fn mask_takes_its_method_from_the_argument_or_the_setting() {
    with_key();
    let by_arg = text("SELECT sqs_ingest.mask('192.0.2.7', 'hmac')").unwrap();
    Spi::run("SET LOCAL sqs_ingest.masking_method = 'hmac'").unwrap();
    assert_eq!(text("SELECT sqs_ingest.mask('192.0.2.7')").unwrap(), by_arg);
    assert!(text("SELECT sqs_ingest.mask('192.0.2.7', 'encrypt')").unwrap().starts_with("enc:"));
    assert_eq!(text("SELECT sqs_ingest.mask(NULL, 'hmac')"), None);
}

/// The ledger's queue key is a persisted format: changing it would make every MessageId already in a ledger look
/// new. Pinned to the first 64 bits (big-endian, signed) of SHA-256, computed outside Postgres (Python hashlib),
/// including a value with the sign bit set.
#[pg_test]
fn queue_key_is_the_first_64_bits_of_the_urls_sha256() {
    let key = |url: &str| {
        Spi::get_one_with_args::<i64>("SELECT sqs_ingest.queue_key($1)", &[url.into()]).unwrap().unwrap()
    };
    assert_eq!(key("http://localhost:4566/000000000000/login-queue"), 3_372_887_132_628_947_437);
    assert_eq!(key("https://sqs.eu-west-1.amazonaws.com/123456789012/logins"), -6_200_339_497_826_981_772);
    // Ingest computes the key in Rust: the same function.
    for text in ["arn:aws:sqs:us-east-1:000000000000:login-queue", "", "ü"] {
        assert_eq!(key(text), sqs_ingest_core::queue_url::queue_key(text), "{text}");
    }
}

#[pg_test]
fn sqs_failure_classes_raise_the_sqlstates_core_names() {
    use sqs_ingest_core::sqs_error::FailureClass::*;
    for class in [Unreachable, NoSuchQueue, BadCredentials, AccessDenied, LegacyProtocol, Throttled, Service] {
        let code = crate::error::sqlstate_code(class.sqlstate());
        assert_eq!(crate::error::sqlstate_text(code), class.sqlstate(), "{class:?}");
    }
    assert_eq!(crate::error::sqlstate_code("08001"), pgrx::PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION);
    assert_eq!(crate::error::sqlstate_code("42704"), pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT);
}
