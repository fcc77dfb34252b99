//! Citus safety, simulated (Citus is not packaged for this machine). What Citus would show the extension is its
//! catalogs, so the tests plant them: `pg_catalog.pg_dist_local_group` with a worker's group id makes a database a
//! worker node, `pg_catalog.pg_dist_partition` rows make tables distributed. Every call is made as an ordinary
//! role (operator, masker, unmasker), never as the superuser who plants the catalogs.

use sqs_ingest_e2e::*;

/// Plants Citus's catalog tables in `pg_catalog` (as the superuser, with allow_system_table_mods).
fn plant_citus_catalogs(c: &mut postgres::Client) {
    c.batch_execute(
        "SET allow_system_table_mods = on;
         CREATE TABLE pg_catalog.pg_dist_local_group (groupid integer NOT NULL);
         CREATE TABLE pg_catalog.pg_dist_partition (logicalrelid regclass NOT NULL, partmethod \"char\" NOT NULL);
         GRANT SELECT ON pg_catalog.pg_dist_local_group, pg_catalog.pg_dist_partition TO PUBLIC;
         RESET allow_system_table_mods;",
    )
    .unwrap();
}

#[test]
fn mask_never_creates_a_key_only_ingest_or_rotate_key_does() {
    let h = harness();
    let mut c = h.fresh_db("e2e_citus_nokey");
    h.login_role(&mut c, "e2e_citus_masker", &["sqs_ingest_masker"]);
    h.login_role(&mut c, "e2e_citus_operator", &["sqs_ingest_operator"]);
    c.batch_execute("GRANT CREATE ON SCHEMA public TO e2e_citus_operator").unwrap();
    let mut masker = h.connect_as("e2e_citus_nokey", "e2e_citus_masker");
    let e = masker.query_one("SELECT sqs_ingest.mask('198.51.100.9')", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "55000", "{e:?}");
    let db = e.as_db_error().unwrap();
    assert!(db.message().contains("no masking key"), "{}", db.message());
    assert!(db.hint().unwrap_or_default().contains("first ingest"), "{:?}", db.hint());
    assert!(!format!("{e:?}").contains("198.51.100.9"), "the value never appears in the error");
    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.keys"), 0, "mask() made no key");
    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.key_events"), 0);

    // The first ingest makes the key; then mask() finds stored rows by their token.
    let url = h.fresh_queue(&mut c, "e2e-citus-nokey", 30);
    h.send(&mut c, &url, &[login(7)]);
    let mut operator = h.connect_as("e2e_citus_nokey", "e2e_citus_operator");
    assert_eq!(ingest(&mut operator, &url).inserted, 1);
    operator.batch_execute("GRANT SELECT ON public.user_logins TO e2e_citus_masker").unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.keys"), 1);
    let ip = serde_json::from_str::<serde_json::Value>(&login(7)).unwrap()["ip"].as_str().unwrap().to_string();
    let found: i64 = masker
        .query_one("SELECT count(*) FROM public.user_logins WHERE masked_ip = sqs_ingest.mask($1)", &[&ip])
        .unwrap()
        .get(0);
    assert_eq!(found, 1);
}

#[test]
fn a_citus_worker_node_refuses_to_mask_unmask_rotate_or_ingest_and_makes_no_key() {
    let h = harness();
    let mut c = h.fresh_db("e2e_citus_worker");
    let url = h.fresh_queue(&mut c, "e2e-citus-worker", 30);
    h.send(&mut c, &url, &[login(1), login(2)]);
    h.login_role(&mut c, "e2e_citus_w_operator", &["sqs_ingest_operator"]);
    h.login_role(&mut c, "e2e_citus_w_unmasker", &["sqs_ingest_unmasker"]);
    c.batch_execute("GRANT CREATE ON SCHEMA public TO e2e_citus_w_operator").unwrap();
    plant_citus_catalogs(&mut c);
    c.batch_execute("INSERT INTO pg_catalog.pg_dist_local_group VALUES (2)").unwrap();

    let mut operator = h.connect_as("e2e_citus_worker", "e2e_citus_w_operator");
    let mut unmasker = h.connect_as("e2e_citus_worker", "e2e_citus_w_unmasker");
    for (as_operator, sql) in [
        (false, "SELECT sqs_ingest.mask('198.51.100.9')"),
        (false, "SELECT sqs_ingest.unmask('enc:1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA')"),
        (true, "SELECT * FROM sqs_ingest('URL')"),
    ] {
        let who = if as_operator { &mut operator } else { &mut unmasker };
        let e = who.query(&sql.replace("URL", &url), &[]).unwrap_err();
        assert_eq!(sqlstate(&e), "55000", "{sql}: {e:?}");
        let db = e.as_db_error().unwrap();
        assert!(db.message().contains("Citus coordinator"), "{}", db.message());
        assert!(db.hint().unwrap_or_default().contains("MATERIALIZED"), "{:?}", db.hint());
    }
    let e = c.query_one("SELECT sqs_ingest.rotate_key()", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "55000", "rotate_key() on a worker node: {e:?}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.keys"), 0, "no key was invented on the worker");
    assert_eq!(depth(&mut c, &url).0, 2, "ingest refused before receiving anything");

    // The coordinator (group 0) works as a plain server does.
    c.batch_execute("UPDATE pg_catalog.pg_dist_local_group SET groupid = 0").unwrap();
    assert_eq!(ingest(&mut operator, &url).inserted, 2);
}

#[test]
fn a_distributed_or_reference_ledger_is_refused_and_a_distributed_target_is_written_sequentially() {
    let h = harness();
    let mut c = h.fresh_db("e2e_citus_dist");
    let url = h.fresh_queue(&mut c, "e2e-citus-dist", 30);
    h.send(&mut c, &url, &[login(1), login(2), login(3)]);
    h.login_role(&mut c, "e2e_citus_d_operator", &["sqs_ingest_operator"]);
    c.batch_execute("GRANT CREATE ON SCHEMA public TO e2e_citus_d_operator").unwrap();
    plant_citus_catalogs(&mut c);
    c.batch_execute("INSERT INTO pg_catalog.pg_dist_local_group VALUES (0)").unwrap();

    let mut operator = h.connect_as("e2e_citus_dist", "e2e_citus_d_operator");
    // A distributed ledger (hash) or a reference one (none): refused before any message is received.
    for method in ["h", "n"] {
        c.execute(
            "INSERT INTO pg_catalog.pg_dist_partition VALUES ('sqs_ingest.ledger'::regclass, $1::text::\"char\")",
            &[&method],
        )
        .unwrap();
        let e = operator.query("SELECT * FROM sqs_ingest($1)", &[&url]).unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{e:?}");
        let db = e.as_db_error().unwrap();
        assert!(db.message().contains("sqs_ingest.ledger"), "{}", db.message());
        assert!(db.hint().unwrap_or_default().contains("undistribute_table"), "{:?}", db.hint());
        assert_eq!(depth(&mut c, &url).0, 3, "nothing received");
        c.batch_execute("DELETE FROM pg_catalog.pg_dist_partition").unwrap();
    }

    // A distributed target: every insert runs with citus.multi_shard_modify_mode = sequential (seen by a trigger
    // of the table), and the caller's setting is back afterwards.
    operator
        .batch_execute(
            "CREATE TABLE public.user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
                 masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date);
             CREATE TABLE public.modes_seen (mode text);
             CREATE FUNCTION public.note_mode() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO public.modes_seen VALUES (current_setting('citus.multi_shard_modify_mode', true));
                  RETURN NEW; END $$;
             CREATE TRIGGER note_mode AFTER INSERT ON public.user_logins FOR EACH STATEMENT
               EXECUTE FUNCTION public.note_mode();",
        )
        .unwrap();
    c.batch_execute("INSERT INTO pg_catalog.pg_dist_partition VALUES ('public.user_logins'::regclass, 'h')").unwrap();
    operator.batch_execute("SET citus.multi_shard_modify_mode = 'parallel'").unwrap();
    assert_eq!(ingest(&mut operator, &url).inserted, 3);
    let modes: Vec<String> =
        operator.query("SELECT DISTINCT mode FROM public.modes_seen", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(modes, vec!["sequential".to_string()]);
    let after: String = operator.query_one("SHOW citus.multi_shard_modify_mode", &[]).unwrap().get(0);
    assert_eq!(after, "parallel", "the caller's setting is restored");
}
