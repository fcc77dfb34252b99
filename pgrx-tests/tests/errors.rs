//! Bad arguments and unusable endpoints: a clear ERROR with SQLSTATE and hint, before any side effect.

use sqs_ingest_e2e::*;
use std::time::{Duration, Instant};

fn error_of(c: &mut postgres::Client, sql: &str, url: &str) -> postgres::error::DbError {
    let e = c.query(sql, &[&url]).expect_err("expected an error");
    e.as_db_error().cloned().unwrap_or_else(|| panic!("not a database error: {e}"))
}

fn assert_no_side_effects(c: &mut postgres::Client) {
    assert_eq!(count(c, "SELECT count(*) FROM pg_class WHERE relname = 'user_logins'"), 0);
    assert_eq!(count(c, "SELECT count(*) FROM sqs_ingest.keys"), 0);
}

#[test]
fn bad_arguments_and_endpoints_raise_before_side_effects() {
    let h = harness();
    let mut c = h.fresh_db("e2e_errors");
    let q = "SELECT * FROM sqs_ingest($1)";

    let e = error_of(&mut c, q, "localhost:4566/000000000000/login-queue");
    assert_eq!(e.code().code(), "22023");
    assert!(e.hint().is_some());

    let e = error_of(&mut c, q, "http://127.0.0.1:1/000000000000/login-queue");
    assert_eq!(e.code().code(), "08001", "{}", e.message());
    assert!(e.hint().unwrap().contains("reachable"));

    let missing = format!("{}/000000000000/e2e-does-not-exist", h.endpoint);
    let e = error_of(&mut c, q, &missing);
    assert_eq!(e.code().code(), "42704", "{}", e.message());

    let e = c.query("SELECT * FROM sqs_ingest($1, 0)", &[&missing]).unwrap_err();
    assert_eq!(sqlstate(&e), "22023");
    let e = c.query("SELECT * FROM sqs_ingest($1, NULL, 'sha256')", &[&missing]).unwrap_err();
    assert_eq!(sqlstate(&e), "22023");

    // Static credentials cannot be set in a session at all (55P02); half-configured ones set in postgresql.conf
    // are refused with 22023 (audit_slots.rs, in a cluster of its own).
    let e = c.batch_execute("SET sqs_ingest.aws_access_key_id = 'AKIAIOSFODNN7EXAMPLE'").unwrap_err();
    assert_eq!(sqlstate(&e), "55P02");
    assert!(!e.as_db_error().unwrap().message().contains("AKIAIOSFODNN7EXAMPLE"));
    assert_no_side_effects(&mut c);
}

#[test]
fn legacy_xml_only_endpoint_is_named_as_such() {
    let h = harness();
    let mut c = h.fresh_db("e2e_legacy");
    let legacy = FixedEndpoint::legacy_xml();
    let url = format!("http://127.0.0.1:{}/000000000000/login-queue", legacy.port);
    let e = error_of(&mut c, "SELECT * FROM sqs_ingest($1)", &url);
    assert_eq!(e.code().code(), "0A000", "{}", e.message());
    assert!(e.message().contains("legacy"), "{}", e.message());
    assert!(e.hint().unwrap().contains("LocalStack 3"));
    assert_no_side_effects(&mut c);
}

#[test]
fn cancel_and_statement_timeout_interrupt_a_long_poll() {
    let h = harness();
    let mut c = h.fresh_db("e2e_cancel");
    let url = h.fresh_queue(&mut c, "e2e-cancel", 30);
    c.batch_execute("SET sqs_ingest.wait_time = 20; SET statement_timeout = '500ms'").unwrap();
    let started = Instant::now();
    let e = c.query("SELECT * FROM sqs_ingest($1)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "57014");
    assert!(started.elapsed() < Duration::from_millis(1500), "took {:?}", started.elapsed());

    c.batch_execute("SET statement_timeout = 0").unwrap();
    let cancel = c.cancel_token();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        cancel.cancel_query(postgres::NoTls).unwrap();
    });
    let started = Instant::now();
    let e = c.query("SELECT * FROM sqs_ingest($1)", &[&url]).unwrap_err();
    t.join().unwrap();
    assert_eq!(sqlstate(&e), "57014");
    assert!(started.elapsed() < Duration::from_millis(1500), "took {:?}", started.elapsed());
}

/// A failing call's error reaches sqs_ingest.stats even when its session ends right after (as pg_cron's do).
#[test]
fn a_failed_calls_error_reaches_stats_after_its_session_ends() {
    let h = harness();
    let mut c = h.fresh_db("e2e_error_stats");
    let missing = format!("{}/000000000000/e2e-no-such-queue-for-stats", h.endpoint);
    {
        let mut short_lived = h.connect("e2e_error_stats");
        let e = short_lived.query("SELECT * FROM sqs_ingest($1)", &[&missing]).unwrap_err();
        assert_eq!(sqlstate(&e), "42704");
    } // the session ends here, without another call
    eventually("the error is in stats", std::time::Duration::from_secs(30), || {
        let r = c
            .query_opt(
                "SELECT last_error FROM sqs_ingest.stats WHERE queue_url = $1 AND last_error IS NOT NULL",
                &[&missing],
            )
            .unwrap();
        r.is_some_and(|r| r.get::<_, String>(0).starts_with("42704"))
    });
}
