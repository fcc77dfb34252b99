//! Privileges around keys and unmask, proven with real roles: who may unmask, that it is audited, and that
//! no key material or secret reaches an ordinary role through any catalog, view, setting or error.

use sqs_ingest_e2e::*;
use std::time::Duration;

fn roles(c: &mut postgres::Client, suffix: &str) -> (String, String) {
    let (plain, granted) = (format!("e2e_plain_{suffix}"), format!("e2e_unmasker_{suffix}"));
    for r in [&plain, &granted] {
        c.batch_execute(&format!("DROP ROLE IF EXISTS {r}; CREATE ROLE {r} LOGIN")).unwrap();
    }
    c.batch_execute(&format!("GRANT sqs_ingest_unmasker TO {granted}")).unwrap();
    c.batch_execute(&format!("GRANT USAGE ON SCHEMA public TO {plain}, {granted}")).unwrap();
    (plain, granted)
}

#[test]
fn only_granted_roles_unmask_and_every_call_is_audited() {
    let h = harness();
    let mut c = h.fresh_db("e2e_security");
    let (plain, granted) = roles(&mut c, "a");
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    let token: String = c.query_one("SELECT sqs_ingest.mask('203.0.113.9')", &[]).unwrap().get(0);

    // An ordinary role: 42501 on unmask, on mask (an equality oracle), on the keys, on the audit trail.
    c.batch_execute(&format!("SET ROLE {plain}")).unwrap();
    for sql in [
        format!("SELECT sqs_ingest.unmask('{token}')"),
        "SELECT sqs_ingest.mask('x')".to_string(),
        "SELECT * FROM sqs_ingest.keys".to_string(),
        "SELECT * FROM sqs_ingest.unmask_audit".to_string(),
        "SELECT sqs_ingest.rotate_key()".to_string(),
        "SELECT * FROM sqs_ingest('http://localhost:1/0/q')".to_string(),
        "SHOW sqs_ingest.aws_secret_access_key".to_string(),
    ] {
        let e = c.batch_execute(&sql).expect_err(&sql);
        assert_eq!(sqlstate(&e), "42501", "{sql}: {e}");
    }
    c.batch_execute("RESET ROLE").unwrap();

    // A role granted sqs_ingest_unmasker: succeeds, and the call is audited with both role names.
    c.batch_execute(&format!("SET ROLE {granted}")).unwrap();
    let clear: String = c.query_one("SELECT sqs_ingest.unmask($1)", &[&token]).unwrap().get(0);
    assert_eq!(clear, "203.0.113.9");
    for sql in [
        "UPDATE sqs_ingest.unmask_audit SET succeeded = false",
        "DELETE FROM sqs_ingest.unmask_audit",
        "TRUNCATE sqs_ingest.unmask_audit",
    ] {
        let e = c.batch_execute(sql).expect_err(sql);
        assert_eq!(sqlstate(&e), "42501", "{sql}");
    }
    // A tampered token: a clear 22023 error, no garbage, and the refusal is audited too.
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    // Refused inside a transaction that then rolls back: its row is written by a worker of its own and stays.
    let mut tx = c.transaction().unwrap();
    let e = tx.query_one("SELECT sqs_ingest.unmask($1)", &[&tampered]).unwrap_err();
    assert_eq!(sqlstate(&e), "22023");
    let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(msg.contains("verification"), "{msg}");
    tx.rollback().unwrap();
    // And one refused for a reason other than tampering, in autocommit.
    let e =
        c.query_one("SELECT sqs_ingest.unmask('hmac:1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA')", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "22023");
    let again: String = c.query_one("SELECT sqs_ingest.unmask($1)", &[&token]).unwrap().get(0);
    assert_eq!(again, clear);
    c.batch_execute("RESET ROLE").unwrap();
    let query = "SELECT session_role, effective_role, succeeded, coalesce(failure, '') FROM sqs_ingest.unmask_audit ORDER BY id";
    let read = |c: &mut postgres::Client| -> Vec<(String, String, bool, String)> {
        c.query(query, &[]).unwrap().iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect()
    };
    eventually("both refusals in the audit trail", Duration::from_secs(30), || read(&mut c).len() >= 4);
    let audit = read(&mut c);
    assert_eq!(audit.len(), 4, "{audit:?}");
    assert!(audit.iter().all(|(s, e, _, _)| s == "postgres" && *e == granted), "{audit:?}");
    assert_eq!(audit.iter().filter(|a| a.2).count(), 2);
    let failures: Vec<&str> = audit.iter().filter(|a| !a.2).map(|a| a.3.as_str()).collect();
    assert!(failures.iter().any(|f| f.contains("verification")), "{failures:?}");
    assert!(failures.iter().any(|f| f.contains("irreversible")), "{failures:?}");
}

#[test]
fn no_key_material_or_secret_is_visible_to_an_ordinary_role() {
    let h = harness();
    let mut c = h.fresh_db("e2e_no_leaks");
    let (plain, _) = roles(&mut c, "b");
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    let key_hex: String = c.query_one("SELECT encode(key_bytes, 'hex') FROM sqs_ingest.keys", &[]).unwrap().get(0);
    let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    // Where a login role could read it, a secret is refused (55P02, with a hint to use ALTER SYSTEM) ...
    for sql in [
        format!("ALTER DATABASE e2e_no_leaks SET sqs_ingest.aws_secret_access_key = '{secret}'"),
        format!("ALTER ROLE {plain} SET sqs_ingest.aws_secret_access_key = '{secret}'"),
        format!("ALTER ROLE {plain} IN DATABASE e2e_no_leaks SET sqs_ingest.aws_session_token = '{secret}'"),
        format!("ALTER ROLE ALL SET sqs_ingest.aws_access_key_id = '{secret}'"),
        format!("ALTER FUNCTION sqs_ingest.app_version_text(int) SET sqs_ingest.aws_secret_access_key = '{secret}'"),
        format!("SET sqs_ingest.aws_secret_access_key = '{secret}'"),
        format!("SELECT set_config('sqs_ingest.aws_secret_access_key', '{secret}', false)"),
    ] {
        let e = c.batch_execute(&sql).expect_err(&sql);
        let db = e.as_db_error().expect("a server error");
        assert_eq!(db.code().code(), "55P02", "{sql}: {e}");
        assert!(db.hint().is_some_and(|h| h.contains("ALTER SYSTEM")), "{sql}: {:?}", db.hint());
        assert!(!db.message().contains(secret), "{sql}");
    }
    // ... while the server's own configuration (ALTER SYSTEM writes postgresql.auto.conf) accepts it.
    c.batch_execute(&format!("ALTER SYSTEM SET sqs_ingest.aws_session_token = '{secret}'")).unwrap();
    c.batch_execute("ALTER SYSTEM RESET sqs_ingest.aws_session_token").unwrap();
    drop(c);
    let mut c = h.connect("e2e_no_leaks");
    c.batch_execute(&format!("SET ROLE {plain}")).unwrap();
    let settings: Vec<String> = c
        .query("SELECT name || '=' || coalesce(setting, '') FROM pg_settings WHERE name LIKE 'sqs_ingest.%'", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!settings.iter().any(|s| s.contains(secret) || s.contains("aws_secret")), "{settings:?}");
    let e = c.batch_execute("SHOW sqs_ingest.aws_secret_access_key").unwrap_err();
    assert!(!e.to_string().contains(secret));
    // Every catalog of settings a login role can read.
    for sql in [
        "SELECT coalesce(string_agg(array_to_string(setconfig, ','), ';'), '') FROM pg_db_role_setting",
        "SELECT coalesce(string_agg(array_to_string(rolconfig, ','), ';'), '') FROM pg_roles",
        "SELECT coalesce(string_agg(array_to_string(proconfig, ','), ';'), '') FROM pg_proc",
        "SELECT coalesce(string_agg(setting, ';'), '') FROM pg_settings",
    ] {
        let all: String = c.query_one(sql, &[]).unwrap().get(0);
        assert!(!all.contains(secret), "{sql}");
    }
    // Nothing readable by the role holds the key bytes: scan every column of every table and view it can read.
    let readable: Vec<String> = c
        .query(
            "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables
              WHERE table_schema NOT IN ('pg_catalog', 'information_schema')
                AND has_table_privilege(format('%I.%I', table_schema, table_name), 'SELECT')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for t in readable {
        let hits = count(&mut c, &format!("SELECT count(*) FROM {t} AS r WHERE r::text LIKE '%{key_hex}%'"));
        assert_eq!(hits, 0, "{t} shows key material");
    }
    // Errors raised with a secret configured never quote it.
    c.batch_execute("RESET ROLE").unwrap();
    let e = c.query("SELECT * FROM sqs_ingest('http://127.0.0.1:1/000000000000/q')", &[]).unwrap_err();
    let db = e.as_db_error().unwrap();
    let text = format!("{} {:?} {:?}", db.message(), db.detail(), db.hint());
    assert!(!text.contains(secret) && !text.contains(&key_hex), "{text}");
}

#[test]
fn rotation_keeps_old_tokens_and_rekey_moves_them_to_the_active_key() {
    let h = harness();
    let mut c = h.fresh_db("e2e_rotation");
    let url = h.fresh_queue(&mut c, "e2e-rotation", 30);
    h.send(&mut c, &url, &(0..5).map(login).collect::<Vec<_>>());
    ingest(&mut c, &url);
    let before: Vec<String> = c
        .query("SELECT sqs_ingest.unmask(masked_ip) FROM user_logins ORDER BY user_id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let new_key: i32 = c.query_one("SELECT sqs_ingest.rotate_key()", &[]).unwrap().get(0);
    assert_eq!(new_key, 2);
    // Old tokens still unmask; new masks use key 2.
    let still: Vec<String> = c
        .query("SELECT sqs_ingest.unmask(masked_ip) FROM user_logins ORDER BY user_id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(before, still);
    let t: String = c.query_one("SELECT sqs_ingest.mask('x')", &[]).unwrap().get(0);
    assert!(t.starts_with("enc:2:"), "{t}");
    let moved: i64 = c.query_one("SELECT sqs_ingest.rekey()", &[]).unwrap().get(0);
    assert_eq!(moved, 10, "5 ips and 5 device ids");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM user_logins WHERE masked_ip LIKE 'enc:2:%' AND masked_device_id LIKE 'enc:2:%'"
        ),
        5
    );
    let after: Vec<String> = c
        .query("SELECT sqs_ingest.unmask(masked_ip) FROM user_logins ORDER BY user_id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(before, after);
    assert_eq!(c.query_one("SELECT sqs_ingest.rekey('user_logins')", &[]).unwrap().get::<_, i64>(0), 0);
    // Deleting the keys is detected, not papered over with a new key.
    c.batch_execute("DELETE FROM sqs_ingest.keys").unwrap();
    let e = c.query("SELECT sqs_ingest.mask('x')", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "XX001", "{e}");
}

#[test]
fn a_revealed_value_stays_audited_when_the_caller_rolls_back() {
    let h = harness();
    let mut c = h.fresh_db("e2e_audit_rollback");
    let (_, granted) = roles(&mut c, "c");
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    let token: String = c.query_one("SELECT sqs_ingest.mask('198.51.100.4')", &[]).unwrap().get(0);
    c.batch_execute(&format!("SET ROLE {granted}")).unwrap();
    // Two calls in a transaction that rolls back, one in a savepoint that rolls back, one that commits.
    let mut tx = c.transaction().unwrap();
    for _ in 0..2 {
        let v: String = tx.query_one("SELECT sqs_ingest.unmask($1)", &[&token]).unwrap().get(0);
        assert_eq!(v, "198.51.100.4");
    }
    tx.rollback().unwrap();
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SAVEPOINT s").unwrap();
    tx.query_one("SELECT sqs_ingest.unmask($1)", &[&token]).unwrap();
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    tx.query_one("SELECT sqs_ingest.unmask($1)", &[&token]).unwrap();
    tx.commit().unwrap();
    c.batch_execute("RESET ROLE").unwrap();
    let read = |c: &mut postgres::Client| -> Vec<(String, bool, Option<String>)> {
        c.query("SELECT effective_role, succeeded, failure FROM sqs_ingest.unmask_audit ORDER BY called_at, id", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    eventually("4 audit rows", Duration::from_secs(30), || read(&mut c).len() >= 4);
    std::thread::sleep(Duration::from_millis(500));
    let rows = read(&mut c);
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows.iter().all(|(role, ok, _)| *role == granted && *ok), "{rows:?}");
    let rewritten = rows.iter().filter(|r| r.2.as_deref().is_some_and(|f| f.contains("rolled back"))).count();
    assert_eq!(rewritten, 3, "{rows:?}");
}

#[test]
fn an_unmask_in_a_prepared_transaction_is_audited_once() {
    let h = harness();
    let mut c = h.fresh_db("e2e_audit_2pc");
    let (_, granted) = roles(&mut c, "d");
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    let token: String = c.query_one("SELECT sqs_ingest.mask('198.51.100.9')", &[]).unwrap().get(0);
    c.batch_execute(&format!("SET ROLE {granted}")).unwrap();
    c.batch_execute("BEGIN").unwrap();
    c.query_one("SELECT sqs_ingest.unmask($1)", &[&token]).unwrap();
    c.batch_execute("PREPARE TRANSACTION 'e2e_audit_2pc'").unwrap();
    c.batch_execute("RESET ROLE").unwrap();
    c.batch_execute("COMMIT PREPARED 'e2e_audit_2pc'").unwrap();
    // A later transaction of the same session that rolls back must not rewrite the prepared one's row.
    c.batch_execute("BEGIN; SELECT 1; ROLLBACK").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let rows: Vec<(bool, Option<String>)> = c
        .query("SELECT succeeded, failure FROM sqs_ingest.unmask_audit", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, vec![(true, None)]);
}

#[test]
fn a_key_created_or_rotated_in_a_rolled_back_savepoint_never_mints_a_token() {
    let h = harness();
    let mut c = h.fresh_db("e2e_key_savepoint");
    // The first key, created inside a savepoint that rolls back: no token may be minted with it afterwards (mask()
    // never makes a key, so there is none).
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SAVEPOINT s").unwrap();
    let _: i32 = tx.query_one("SELECT sqs_ingest.rotate_key()", &[]).unwrap().get(0);
    let _: String = tx.query_one("SELECT sqs_ingest.mask('198.51.100.7')", &[]).unwrap().get(0);
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    let e = tx.query_one("SELECT sqs_ingest.mask('198.51.100.7')", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "55000", "no token from the rolled-back key: {e:?}");
    tx.rollback().unwrap();
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    let first: String = c.query_one("SELECT sqs_ingest.mask('198.51.100.7')", &[]).unwrap().get(0);
    let clear: String = c.query_one("SELECT sqs_ingest.unmask($1)", &[&first]).unwrap().get(0);
    assert_eq!(clear, "198.51.100.7");

    // A rotation rolled back to its savepoint: later tokens use the key that is still active.
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SAVEPOINT s").unwrap();
    let _: i32 = tx.query_one("SELECT sqs_ingest.rotate_key()", &[]).unwrap().get(0);
    let _: String = tx.query_one("SELECT sqs_ingest.mask('198.51.100.8')", &[]).unwrap().get(0);
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    let second: String = tx.query_one("SELECT sqs_ingest.mask('198.51.100.8')", &[]).unwrap().get(0);
    tx.commit().unwrap();
    assert_eq!(first.split(':').nth(1), second.split(':').nth(1), "minted with the key that is still active");
    let clear: String = c.query_one("SELECT sqs_ingest.unmask($1)", &[&second]).unwrap().get(0);
    assert_eq!(clear, "198.51.100.8");
    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.keys"), 1);
}
