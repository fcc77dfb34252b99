//! A row the target table refuses (CHECK, UNIQUE, NOT NULL, a foreign key, a trigger that raises) becomes a dead
//! letter naming the SQLSTATE and the constraint or column, never the values; the other rows are stored and
//! every message is deleted. A transient failure (a row held locked past lock_timeout) fails the call and
//! releases every message, to be ingested later. Run as a non-superuser operator who owns the table.

use sqs_ingest_e2e::*;
use std::time::Duration;

fn with(i: usize, field: &str, value: serde_json::Value) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&login(i)).unwrap();
    v[field] = value;
    v.to_string()
}

#[test]
fn rows_the_table_refuses_become_dead_letters_and_the_rest_is_stored() {
    let h = harness();
    let op = "e2e_refused_op";
    let mut admin = h.fresh_db("e2e_refused");
    h.login_role(&mut admin, op, &["sqs_ingest_operator"]);
    admin.batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {op}")).unwrap();
    let url = h.fresh_queue(&mut admin, "e2e-refused", 30);
    let mut c = h.connect_as("e2e_refused", op);
    c.batch_execute(
        "CREATE TABLE known_users (user_id varchar(128) PRIMARY KEY);
         INSERT INTO known_users SELECT format('00000000-0000-4000-8000-%s', lpad(g::text, 12, '0')) FROM generate_series(0, 999) g;
         CREATE TABLE user_logins (user_id varchar(128) REFERENCES known_users, device_type varchar(32)
             CONSTRAINT no_legacy_devices CHECK (device_type <> 'blackberry'),
           masked_ip varchar(256), masked_device_id varchar(256), locale varchar(32) NOT NULL,
           app_version integer, create_date date);
         CREATE UNIQUE INDEX one_login_per_version ON user_logins (user_id, app_version);
         CREATE FUNCTION no_v9() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.app_version = 90000 THEN RAISE EXCEPTION 'version % of user % is banned', NEW.app_version, NEW.user_id; END IF;
           RETURN NEW; END $$;
         CREATE TRIGGER no_v9 BEFORE INSERT ON user_logins FOR EACH ROW EXECUTE FUNCTION no_v9();",
    )
    .unwrap();
    // 100 messages: every third has a null locale (NOT NULL), so give them one; then five violators.
    let mut bodies: Vec<String> = (0..100).map(|i| with(i, "locale", "DE".into())).collect();
    bodies[10] = with(10, "device_type", "blackberry".into()); // CHECK
    bodies[20] = with(20, "locale", serde_json::Value::Null); // NOT NULL
    bodies[30] = with(5_000, "locale", "DE".into()); // foreign key: unknown user
    bodies[40] = with(40, "app_version", "9.0.0".into()); // the trigger raises
    bodies[50] = with(49, "x", 1.into()); // UNIQUE: the same user and version as message 49
    h.send(&mut admin, &url, &bodies);
    let counts = ingest(&mut c, &url);
    assert_eq!((counts.received, counts.inserted, counts.dead_lettered), (100, 95, 5), "{counts:?}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 95);
    eventually("every message deleted", Duration::from_secs(10), || depth(&mut admin, &url) == (0, 0));
    let reasons: Vec<(String, String)> = c
        .query("SELECT reason_code, reason FROM sqs_ingest.dead_letters ORDER BY reason", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(reasons.iter().all(|(code, _)| code == "refused_by_table"), "{reasons:?}");
    let all: String = reasons.iter().map(|(_, r)| r.as_str()).collect::<Vec<_>>().join(" | ");
    for expected in [
        "SQLSTATE 23514, constraint \"no_legacy_devices\"",
        "SQLSTATE 23502, column \"locale\"",
        "SQLSTATE 23503, constraint \"user_logins_user_id_fkey\"",
        "SQLSTATE P0001",
        "SQLSTATE 23505, constraint \"one_login_per_version\"",
    ] {
        assert!(all.contains(expected), "{expected} not in {all}");
    }
    assert!(!all.contains("00000000-0000-4000") && !all.contains("blackberry") && !all.contains("90000"), "{all}");
    // Redelivered, the refused messages are duplicates (their dead letters are in the ledger), not retried rows.
    let dead_ids: i64 = count(&mut admin, "SELECT count(*) FROM sqs_ingest.ledger WHERE outcome = 'dead_letter'");
    assert_eq!(dead_ids, 5);
    // Once the cause is fixed, a redrive stores the row; while it is not, it says why and stores nothing.
    let check_id: String = c
        .query_one("SELECT message_id FROM sqs_ingest.dead_letters WHERE reason LIKE '%no_legacy_devices%'", &[])
        .unwrap()
        .get(0);
    assert!(!c.query_one("SELECT sqs_ingest.redrive($1)", &[&check_id]).unwrap().get::<_, bool>(0));
    c.batch_execute("ALTER TABLE user_logins DROP CONSTRAINT no_legacy_devices").unwrap();
    assert!(c.query_one("SELECT sqs_ingest.redrive($1)", &[&check_id]).unwrap().get::<_, bool>(0));
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 96);

    // A transient failure is not the row's fault: a conflicting row held by another transaction past
    // lock_timeout fails the call (55P03) and releases every message; once the lock is gone they are stored.
    h.send(&mut admin, &url, &[with(200, "locale", "DE".into()), with(201, "locale", "DE".into())]);
    let version: serde_json::Value = serde_json::from_str(&login(200)).unwrap();
    let parts: Vec<i32> = version["app_version"].as_str().unwrap().split('.').map(|p| p.parse().unwrap()).collect();
    let packed = parts[0] * 10_000 + parts[1] * 100 + parts[2];
    let mut holder = h.connect_as("e2e_refused", op);
    holder.batch_execute("BEGIN").unwrap();
    holder
        .execute(
            "INSERT INTO user_logins (user_id, locale, app_version) VALUES ('00000000-0000-4000-8000-000000000200', 'DE', $1)",
            &[&packed],
        )
        .unwrap();
    c.batch_execute("SET lock_timeout = '500ms'").unwrap();
    let e = c.query("SELECT * FROM sqs_ingest($1)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "55P03", "{e:?}");
    assert!(e.as_db_error().unwrap().detail().is_none(), "no DETAIL with values");
    holder.batch_execute("ROLLBACK").unwrap();
    eventually("both released and stored", Duration::from_secs(60), || {
        let _ = c.query("SELECT * FROM sqs_ingest($1)", &[&url]);
        count(&mut admin, "SELECT count(*) FROM user_logins") == 98
    });
}

#[test]
fn a_deferred_constraint_refuses_the_row_not_the_commit() {
    let h = harness();
    let op = "e2e_deferred_op";
    let mut admin = h.fresh_db("e2e_deferred");
    h.login_role(&mut admin, op, &["sqs_ingest_operator"]);
    admin.batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {op}")).unwrap();
    let url = h.fresh_queue(&mut admin, "e2e-deferred", 30);
    let mut c = h.connect_as("e2e_deferred", op);
    c.batch_execute(
        "CREATE TABLE user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
           masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date,
           CONSTRAINT one_login_per_user UNIQUE (user_id) DEFERRABLE INITIALLY DEFERRED);
         CREATE FUNCTION no_v9() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.app_version = 90000 THEN RAISE EXCEPTION 'version banned'; END IF; RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER no_v9 AFTER INSERT ON user_logins DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION no_v9();",
    )
    .unwrap();
    let mut bodies: Vec<String> = (0..20).map(login).collect();
    bodies[5] = with(4, "x", 1.into()); // the same user as message 4: the deferred UNIQUE
    bodies[6] = with(6, "app_version", "9.0.0".into()); // the deferred constraint trigger raises
    h.send(&mut admin, &url, &bodies);
    c.batch_execute("BEGIN").unwrap();
    let r = c.query_one("SELECT inserted, dead_lettered FROM sqs_ingest($1)", &[&url]).unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (18, 2));
    // The constraints are deferred again for the rest of the transaction: a conflicting row of the caller's own
    // is refused at its COMMIT, as it would be without sqs_ingest.
    c.batch_execute("SAVEPOINT s; INSERT INTO user_logins (user_id) SELECT user_id FROM user_logins LIMIT 1").unwrap();
    c.batch_execute("ROLLBACK TO SAVEPOINT s; COMMIT").unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 18);
    let reasons: Vec<String> = c
        .query("SELECT reason FROM sqs_ingest.dead_letters ORDER BY reason", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let all = reasons.join(" | ");
    assert!(
        all.contains("SQLSTATE 23505, constraint \"one_login_per_user\"") && all.contains("SQLSTATE P0001"),
        "{all}"
    );
    eventually("every message deleted", Duration::from_secs(10), || depth(&mut admin, &url) == (0, 0));

    // A superuser writes the operator's table as its owner, in a security-restricted context, where Postgres
    // refuses to defer a trigger: the constraints are made immediate before the insert, so that works too.
    h.send(&mut admin, &url, &[login(100), with(100, "x", 2.into()), login(101)]);
    let r = admin.query_one("SELECT inserted, dead_lettered FROM sqs_ingest($1)", &[&url]).unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (2, 1));
    // A same-named constraint on another table of the schema (anyone with CREATE there can add one) is never
    // switched: the target's constraint keeps its COMMIT-time check instead, and ingest keeps working.
    c.batch_execute("CREATE TABLE decoy (a int CONSTRAINT one_login_per_user CHECK (a > 0))").unwrap();
    h.send(&mut admin, &url, &[login(102)]);
    assert_eq!(ingest(&mut c, &url).inserted, 1);
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 21);
}
