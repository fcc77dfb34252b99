//! Least privilege, proven as the low-privileged roles themselves: a non-superuser member of
//! `sqs_ingest_operator` runs every operator path; credentials go only to allowed endpoints; `mask()` calls are
//! audited; refused unmasks cannot exhaust worker slots; dynamic workers run as their starter, are capped and
//! stoppable; no rejection kind quotes a field value anywhere; inputs are bounded.

use sqs_ingest_e2e::*;
use std::time::Duration;

/// A fresh database where `op` (a login member of sqs_ingest_operator) may create the target table.
fn operator_db(h: &Harness, db: &str, op: &str) -> postgres::Client {
    let mut c = h.fresh_db(db);
    h.login_role(&mut c, op, &["sqs_ingest_operator"]);
    c.batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {op}")).unwrap();
    c
}

#[test]
fn an_operator_runs_ingest_drain_redrive_stats_and_workers_without_superuser() {
    let h = harness();
    let op = "e2e_lp_operator";
    let mut admin = operator_db(&h, "e2e_lp_operator", op);
    let url = h.fresh_queue(&mut admin, "e2e-lp-operator", 30);
    let mut c = h.connect_as("e2e_lp_operator", op);
    assert!(!c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[]).unwrap().get::<_, bool>(0));

    // Ingest: the first call creates user_logins, owned by the operator.
    let mut long_type = serde_json::from_str::<serde_json::Value>(&login(3)).unwrap();
    long_type["device_type"] = "x".repeat(40).into();
    h.send(&mut admin, &url, &[login(1), login(2), long_type.to_string()]);
    let counts = ingest(&mut c, &url);
    assert_eq!((counts.inserted, counts.dead_lettered), (2, 1));
    let owner: String =
        c.query_one("SELECT tableowner::text FROM pg_tables WHERE tablename = 'user_logins'", &[]).unwrap().get(0);
    assert_eq!(owner, op);

    // While an ingest's transaction is open, its target cannot be dropped or swapped (it is locked by OID).
    c.batch_execute("BEGIN").unwrap();
    ingest(&mut c, &url);
    admin.batch_execute("SET lock_timeout = '300ms'").unwrap();
    let e = admin.batch_execute("DROP TABLE public.user_logins").unwrap_err();
    assert_eq!(sqlstate(&e), "55P03", "{e:?}");
    admin.batch_execute("RESET lock_timeout").unwrap();
    c.batch_execute("COMMIT").unwrap();

    // Drain, as a procedure that commits per batch.
    h.send(&mut admin, &url, &(10..35).map(login).collect::<Vec<_>>());
    let r = c.query_one("CALL sqs_ingest_drain($1, batch_messages => 10)", &[&url]).unwrap();
    assert_eq!((r.get::<_, i64>("received"), r.get::<_, i64>("inserted")), (25, 25));

    // Stats and dead-letter metadata are readable; the encrypted body and the keys are not.
    let inserted: i64 =
        c.query_one("SELECT inserted FROM sqs_ingest.stats WHERE queue_url = $1", &[&url]).unwrap().get(0);
    assert_eq!(inserted, 27);
    let id: String = c.query_one("SELECT message_id FROM sqs_ingest.dead_letters", &[]).unwrap().get(0);
    for sql in ["SELECT body_encrypted FROM sqs_ingest.dead_letters", "SELECT * FROM sqs_ingest.keys"] {
        assert_eq!(sqlstate(&c.batch_execute(sql).unwrap_err()), "42501", "{sql}");
    }
    // Redrive after fixing the cause (the operator owns the table, so may widen it).
    c.batch_execute("ALTER TABLE user_logins ALTER COLUMN device_type TYPE varchar(64)").unwrap();
    assert!(c.query_one("SELECT sqs_ingest.redrive($1)", &[&id]).unwrap().get::<_, bool>(0));
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 28);

    // Settings that widen the operator's reach are the superuser's.
    for sql in [
        "SET sqs_ingest.allowed_endpoints = '*'",
        "SET sqs_ingest.max_dynamic_workers = 64",
        "SELECT set_config('sqs_ingest.allowed_endpoints', '*', false)",
    ] {
        assert_eq!(sqlstate(&c.batch_execute(sql).unwrap_err()), "42501", "{sql}");
    }

    // Dynamic workers: run as the operator, capped per database, stoppable by the operator at COMMIT.
    admin.batch_execute("ALTER DATABASE e2e_lp_operator SET sqs_ingest.max_dynamic_workers = 1").unwrap();
    let mut c = h.connect_as("e2e_lp_operator", op);
    let wid: i32 = c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap().get(0);
    let e = c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "53400", "{e}");
    let label = format!("dynamic worker {wid}");
    let worker_user = |c: &mut postgres::Client| -> Option<String> {
        c.query_opt(
            "SELECT usename::text FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
            &[&label],
        )
        .unwrap()
        .map(|r| r.get(0))
    };
    eventually("the dynamic worker runs", Duration::from_secs(30), || worker_user(&mut admin).is_some());
    assert_eq!(worker_user(&mut admin).as_deref(), Some(op), "the worker connects as the role that started it");
    h.send(&mut admin, &url, &[login(100)]);
    eventually("the worker stored the message", Duration::from_secs(30), || {
        count(&mut c, "SELECT count(*) FROM user_logins") == 29
    });
    // A stop that rolls back stops nothing.
    c.batch_execute("BEGIN").unwrap();
    assert_eq!(c.query_one("SELECT sqs_ingest.worker_stop($1)", &[&url]).unwrap().get::<_, i64>(0), 1);
    c.batch_execute("ROLLBACK").unwrap();
    c.batch_execute("BEGIN; SAVEPOINT s; SELECT sqs_ingest.worker_stop(); ROLLBACK TO SAVEPOINT s; COMMIT").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(worker_user(&mut admin).is_some(), "a rolled-back worker_stop() stopped the worker");
    assert_eq!(c.query_one("SELECT sqs_ingest.worker_stop($1)", &[&url]).unwrap().get::<_, i64>(0), 1);
    eventually("the worker stopped", Duration::from_secs(30), || worker_user(&mut admin).is_none());
    // A role that cannot log in cannot be a worker's identity.
    c.batch_execute("SET ROLE sqs_ingest_operator").unwrap();
    let e = c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    c.batch_execute("RESET ROLE").unwrap();
    eventually("queue empty", Duration::from_secs(10), || depth(&mut admin, &url) == (0, 0));
}

#[test]
fn credentials_go_only_to_allowed_endpoints() {
    let h = harness();
    let op = "e2e_lp_endpoints";
    let mut admin = operator_db(&h, "e2e_lp_endpoints", op);
    // 127.0.0.2 is loopback but not in the default list; evil.example is nowhere.
    let trap = FixedEndpoint::start_on("127.0.0.2", "200 OK", "application/x-amz-json-1.0", "{}");
    let outside = format!("http://127.0.0.2:{}/000000000000/q", trap.port);
    let mut c = h.connect_as("e2e_lp_endpoints", op);
    for sql in [
        "SELECT * FROM sqs_ingest($1)",
        "CALL sqs_ingest_drain($1)",
        "SELECT * FROM sqs_ingest.queue_depth($1)",
        "SELECT sqs_ingest.worker_start($1)",
    ] {
        for url in [outside.as_str(), "https://evil.example/000000000000/q"] {
            let e = c.query(sql, &[&url]).unwrap_err();
            assert_eq!(sqlstate(&e), "42501", "{sql} {url}: {e}");
            let hint = e.as_db_error().and_then(|d| d.hint()).unwrap_or_default().to_string();
            assert!(hint.contains("sqs_ingest.allowed_endpoints"), "{hint}");
        }
    }
    assert_eq!(trap.requests.lock().unwrap().len(), 0, "a request reached a host outside the allow-list");
    // The list is what governs: a superuser who allows the host makes the same call reach it.
    admin.batch_execute("SET sqs_ingest.allowed_endpoints = '127.0.0.2'").unwrap();
    let _ = admin.query("SELECT * FROM sqs_ingest.queue_depth($1)", &[&outside]);
    assert!(!trap.requests.lock().unwrap().is_empty(), "the allowed host was not contacted");
}

#[test]
fn mask_calls_are_audited_per_role_and_transaction() {
    let h = harness();
    let mut admin = h.fresh_db("e2e_lp_mask");
    let masker = "e2e_lp_masker";
    h.login_role(&mut admin, masker, &["sqs_ingest_masker"]);
    admin.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    let before = count(&mut admin, "SELECT count(*) FROM sqs_ingest.mask_audit");
    let mut c = h.connect_as("e2e_lp_mask", masker);
    // A dictionary attack: a thousand guesses in one transaction, committed.
    let n = count(
        &mut c,
        "SELECT count(sqs_ingest.mask('10.0.' || (g / 256) || '.' || (g % 256))) FROM generate_series(1, 1000) g",
    );
    assert_eq!(n, 1000);
    let rows: Vec<(String, String, i64, bool)> = admin
        .query(
            "SELECT session_role, effective_role, calls, rolled_back FROM sqs_ingest.mask_audit WHERE id > $1 ORDER BY id",
            &[&before],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(rows, vec![(masker.to_string(), masker.to_string(), 1000, false)]);
    // Guesses in a transaction that rolls back are audited too.
    c.batch_execute("BEGIN; SELECT sqs_ingest.mask('192.0.2.' || g) FROM generate_series(1, 5) g; ROLLBACK").unwrap();
    eventually("the rolled-back calls are audited", Duration::from_secs(30), || {
        count(&mut admin, "SELECT count(*) FROM sqs_ingest.mask_audit WHERE calls = 5 AND rolled_back") == 1
    });
    // The masker can neither read nor change the trail.
    for sql in [
        "SELECT * FROM sqs_ingest.mask_audit",
        "DELETE FROM sqs_ingest.mask_audit",
        "UPDATE sqs_ingest.mask_audit SET calls = 1",
        "TRUNCATE sqs_ingest.mask_audit",
    ] {
        assert_eq!(sqlstate(&c.batch_execute(sql).unwrap_err()), "42501", "{sql}");
    }
    // Ingest masks without counting as mask() calls.
    let url = h.fresh_queue(&mut admin, "e2e-lp-mask", 30);
    let audited = count(&mut admin, "SELECT count(*) FROM sqs_ingest.mask_audit");
    h.send(&mut admin, &url, &(0..20).map(login).collect::<Vec<_>>());
    assert_eq!(ingest(&mut admin, &url).inserted, 20);
    assert_eq!(count(&mut admin, "SELECT count(*) FROM sqs_ingest.mask_audit"), audited);
}

#[test]
fn refused_unmasks_in_a_loop_neither_exhaust_worker_slots_nor_lose_rows() {
    let h = harness();
    let mut admin = h.fresh_db("e2e_lp_refusals");
    let unmasker = "e2e_lp_unmasker";
    h.login_role(&mut admin, unmasker, &["sqs_ingest_unmasker"]);
    admin.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    let (mut c, notices) = h.connect_collecting_notices("e2e_lp_refusals", unmasker);
    // 200 refusals (more than max_worker_processes) caught in exception blocks, in a transaction that commits:
    // written in that transaction, no worker needed.
    let refusals = "DO $$ BEGIN FOR i IN 1..200 LOOP
                        BEGIN PERFORM sqs_ingest.unmask('enc:1:' || repeat('A', 40) || i);
                        EXCEPTION WHEN invalid_parameter_value THEN NULL; END;
                    END LOOP; END $$";
    c.batch_execute(refusals).unwrap();
    assert_eq!(count(&mut admin, "SELECT count(*) FROM sqs_ingest.unmask_audit WHERE NOT succeeded"), 200);
    // The same in a transaction that rolls back: one audit worker writes all 200.
    c.batch_execute(&format!("BEGIN; {refusals}; ROLLBACK")).unwrap();
    eventually("200 more refusals", Duration::from_secs(30), || {
        count(&mut admin, "SELECT count(*) FROM sqs_ingest.unmask_audit WHERE NOT succeeded") == 400
    });
    // An overlong token is refused before decoding (22023), and audited.
    let e = c.query_one("SELECT sqs_ingest.unmask('enc:1:' || repeat('A', 4000000))", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "22023");
    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(message.contains("no valid token is longer"), "{message}");
    eventually("the overlong token's refusal", Duration::from_secs(30), || {
        count(&mut admin, "SELECT count(*) FROM sqs_ingest.unmask_audit WHERE NOT succeeded") == 401
    });
    let warned: Vec<String> = notices.lock().unwrap().iter().filter(|n| n.contains("worker")).cloned().collect();
    assert!(warned.is_empty(), "{warned:?}");
}

/// One message per rejection kind, each carrying PII-like values; none may show anywhere but the encrypted body.
#[test]
fn no_rejection_quotes_a_field_value() {
    let h = harness();
    let op = "e2e_lp_pii";
    let mut admin = operator_db(&h, "e2e_lp_pii", op);
    let url = h.fresh_queue(&mut admin, "e2e-lp-pii", 30);
    let pii = ["203.0.113.77", "a1b2c3d4-dead-beef-pii", "ZZPIIUSER42"];
    let base = |version: &str| {
        serde_json::json!({"user_id": pii[2], "app_version": version, "device_type": "android",
                           "ip": pii[0], "locale": "DE", "device_id": pii[1]})
    };
    let mut bodies = vec![
        format!("{{\"ip\": \"{}\", \"device_id\": \"{}\"", pii[0], pii[1]), // not_json
        format!("\"{}\"", pii[0]),                                          // not_object
        serde_json::json!({"ip": pii[0], "device_id": pii[1]}).to_string(), // missing_field
        format!("{{\"ip\": \"{}\", \"device_id\": \"{}\", \"body\": {}}}", pii[0], pii[1], "x".repeat(70_000)), // body_too_large
        base("203.0.113.77").to_string(), // invalid_app_version: shape
        base("a1b2c3d4.99").to_string(),  // invalid_app_version: not numeric
        base("1.203.0").to_string(),      // invalid_app_version: part too large
        base("300000.1.1").to_string(),   // invalid_app_version: major too large
    ];
    let mut wrong = base("1.0.0");
    wrong["ip"] = 203_011_377.into();
    bodies.push(wrong.to_string()); // wrong_type
    let mut nul = base("1.0.0");
    nul["device_id"] = format!("{}\u{0}", pii[1]).into();
    bodies.push(nul.to_string()); // nul_byte
    let mut long = base("1.0.0");
    long["device_type"] = pii[2].repeat(10).into();
    bodies.push(long.to_string()); // value_too_long
    h.send(&mut admin, &url, &bodies);
    let (mut c, notices) = h.connect_collecting_notices("e2e_lp_pii", op);
    let r = c.query_one("SELECT dead_lettered FROM sqs_ingest($1)", &[&url]).unwrap();
    assert_eq!(r.get::<_, i64>(0), bodies.len() as i64);
    let codes: Vec<String> = c
        .query("SELECT DISTINCT reason_code FROM sqs_ingest.dead_letters ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        codes,
        [
            "body_too_large",
            "invalid_app_version",
            "missing_field",
            "not_json",
            "not_object",
            "nul_byte",
            "value_too_long",
            "wrong_type"
        ]
    );
    // Redriving each (none can be stored yet) says why again, in a NOTICE or an ERROR.
    let ids: Vec<String> =
        c.query("SELECT message_id FROM sqs_ingest.dead_letters", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    let mut errors = Vec::new();
    for id in &ids {
        if let Err(e) = c.query_one("SELECT sqs_ingest.redrive($1)", &[id]) {
            errors.push(format!("{e:?}"));
        }
    }
    assert_eq!(errors.len(), 1, "only the oversized body cannot be redriven at all: {errors:?}");
    let mut seen: Vec<String> = c
        .query("SELECT reason_code || ': ' || reason FROM sqs_ingest.dead_letters", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    seen.extend(notices.lock().unwrap().iter().cloned());
    seen.extend(errors);
    seen.extend(
        c.query("SELECT coalesce(last_error, '') FROM sqs_ingest.stats", &[])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0)),
    );
    seen.push(server_log());
    for text in &seen {
        for value in pii {
            assert!(!text.contains(value), "{value} shows in: {}", &text[..text.len().min(300)]);
        }
    }
    // The oversized body keeps only a bounded, encrypted prefix, its size and a keyed digest.
    let r = admin
        .query_one(
            "SELECT body_bytes, octet_length(body_encrypted), octet_length(body_digest) FROM sqs_ingest.dead_letters
              WHERE reason_code = 'body_too_large'",
            &[],
        )
        .unwrap();
    let (bytes, kept, digest): (i32, i32, i32) = (r.get(0), r.get(1), r.get(2));
    assert!(bytes > 70_000, "{bytes}");
    assert!(kept <= 4096 + 12 + 16, "{kept}");
    assert_eq!(digest, 32);
}

#[test]
fn a_role_without_privileges_cannot_block_the_first_ingest() {
    let h = harness();
    let op = "e2e_lp_lock_op";
    let mut admin = operator_db(&h, "e2e_lp_lock", op);
    h.login_role(&mut admin, "e2e_lp_stranger", &[]);
    let url = h.fresh_queue(&mut admin, "e2e-lp-lock", 30);
    h.send(&mut admin, &url, &[login(1)]);
    let mut stranger = h.connect_as("e2e_lp_lock", "e2e_lp_stranger");
    // The lock key 0.3.0 used, and the table lock that replaced it.
    stranger.batch_execute("SELECT pg_advisory_lock(hashtext('sqs_ingest target user_logins'))").unwrap();
    let e = stranger.batch_execute("BEGIN; LOCK TABLE sqs_ingest.key_events IN ACCESS SHARE MODE").unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    stranger.batch_execute("ROLLBACK").unwrap();
    let mut c = h.connect_as("e2e_lp_lock", op);
    c.batch_execute("SET statement_timeout = '20s'").unwrap();
    assert_eq!(ingest(&mut c, &url).inserted, 1, "the first ingest waited on a stranger's lock");
    // Nor can an operator lock a table it may not write by naming it as the target: refused before any lock.
    admin
        .batch_execute(
            "CREATE TABLE private_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
               masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date)",
        )
        .unwrap();
    c.batch_execute("SET sqs_ingest.target_table = 'public.private_logins'; BEGIN").unwrap();
    let e = c.query("SELECT * FROM sqs_ingest($1)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn an_operator_cannot_start_more_workers_in_one_transaction_or_bigger_batches_than_allowed() {
    // The cap counts the workers this very transaction starts (they all start at its COMMIT), and an operator's
    // batch is no bigger than the superuser's sqs_ingest.worker_batch_messages (default 100).
    let h = harness();
    let op = "e2e_lp_capper";
    let mut su = operator_db(&h, "e2e_lp_caps", op);
    let url = h.fresh_queue(&mut su, "e2e-lp-caps", 30);
    let mut c = h.connect_as("e2e_lp_caps", op);
    c.batch_execute("BEGIN").unwrap();
    let e = c.query_one("SELECT count(sqs_ingest.worker_start($1)) FROM generate_series(1, 12)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "53400", "{e}");
    c.batch_execute("ROLLBACK").unwrap();
    // One statement at a time, in one transaction: the fifth is refused too.
    c.batch_execute("BEGIN").unwrap();
    for _ in 0..4 {
        c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap();
    }
    let e = c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "53400", "{e}");
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(count(&mut su, "SELECT count(*) FROM sqs_ingest.workers"), 0, "nothing was started");
    // A batch bigger than the superuser's setting: refused to the operator before anything is written.
    let e = c.query_one("SELECT sqs_ingest.worker_start($1, 100000)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    assert!(e.as_db_error().and_then(|d| d.hint()).is_some_and(|h| h.contains("worker_batch_messages")), "{e}");
    assert_eq!(count(&mut su, "SELECT count(*) FROM sqs_ingest.workers"), 0);
    // Up to it is fine (rolled back: nothing starts).
    c.batch_execute("BEGIN").unwrap();
    c.query_one("SELECT sqs_ingest.worker_start($1, 100)", &[&url]).unwrap();
    c.batch_execute("ROLLBACK").unwrap();
}
