//! In-place upgrade: install the previous release, ingest, ALTER EXTENSION ... UPDATE, and prove that data,
//! keys, ledger and dead letters survive, ingest still works, and the upgraded schema equals a fresh install.

use sqs_ingest_e2e::*;
use std::time::Duration;

/// The first column of every row of `sql`, sorted.
fn sorted(c: &mut postgres::Client, sql: &str) -> Vec<String> {
    let mut v: Vec<String> = c.query(sql, &[]).unwrap().iter().map(|r| r.get(0)).collect();
    v.sort();
    v
}

/// Every object that belongs to the extension, described.
fn members(c: &mut postgres::Client) -> Vec<String> {
    sorted(
        c,
        "SELECT pg_describe_object(classid, objid, objsubid) FROM pg_depend
          WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
            AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'sqs_ingest')",
    )
}

/// Function signatures with their settings, ACLs and comments, and table and index columns with their types and
/// collations: what users rely on.
fn surface(c: &mut postgres::Client) -> Vec<String> {
    sorted(
        c,
        "SELECT format('%s %s %s %s %s %s %s', p.oid::regprocedure, p.proconfig, p.proacl,
                       obj_description(p.oid, 'pg_proc'), p.proisstrict, p.provolatile, p.proparallel)
           FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
            AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'sqs_ingest')
         UNION ALL
         SELECT format('%s.%s %s %s%s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                       a.attcollation::regcollation, CASE WHEN a.attnotnull THEN ' not null' END)
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          WHERE c.relnamespace = 'sqs_ingest'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
         UNION ALL
         -- Postgres 18 catalogs NOT NULL constraints under generated names that keep a renamed column's old
         -- name (ledger.queue_url became queue_key in 0.5.0): compared by their definition, not their name.
         SELECT format('%s %s %s', k.conrelid::regclass, CASE WHEN k.contype = 'n' THEN '-' ELSE k.conname END,
                       pg_get_constraintdef(k.oid))
           FROM pg_constraint k WHERE k.connamespace = 'sqs_ingest'::regnamespace
         UNION ALL
         SELECT format('%s %s', c.oid::regclass, pg_get_viewdef(c.oid))
           FROM pg_class c WHERE c.relnamespace = 'sqs_ingest'::regnamespace AND c.relkind = 'v'",
    )
}

/// The extension's configuration tables and sequences (what pg_dump carries).
fn dumped(c: &mut postgres::Client) -> Vec<String> {
    sorted(c, "SELECT t::regclass::text FROM pg_extension, unnest(extconfig) AS t WHERE extname = 'sqs_ingest'")
}

#[test]
fn upgrade_from_the_previous_release_keeps_everything() {
    let h = harness();
    let mut admin = h.connect("postgres");
    for db in ["e2e_upgrade", "e2e_fresh"] {
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    }
    let mut c = h.connect("e2e_upgrade");
    c.batch_execute("CREATE EXTENSION sqs_ingest VERSION '0.1.0'").unwrap();
    let url = h.fresh_queue(&mut c, "e2e-upgrade", 30);
    h.send(&mut c, &url, &[login(1), login(2), "not json".to_string()]);
    assert_eq!(ingest(&mut c, &url).inserted, 2);
    // One more message under another spelling of the queue's URL, which the database then forgets it saw (its
    // counters gone): the upgrade cannot know that spelling, so the first ingest that uses it must.
    let other_spelling = url.replace("localhost", "127.0.0.1");
    h.send(&mut c, &url, &[login(9)]);
    assert_eq!(ingest(&mut c, &other_spelling).inserted, 1);
    c.execute("DELETE FROM sqs_ingest.counters WHERE queue_url = $1", &[&other_spelling]).unwrap();
    let token: String = c.query_one("SELECT masked_ip FROM user_logins ORDER BY user_id LIMIT 1", &[]).unwrap().get(0);
    let key_before: Vec<u8> = c.query_one("SELECT key_bytes FROM sqs_ingest.keys", &[]).unwrap().get(0);

    c.batch_execute("ALTER EXTENSION sqs_ingest UPDATE").unwrap();
    let version: String =
        c.query_one("SELECT extversion FROM pg_extension WHERE extname = 'sqs_ingest'", &[]).unwrap().get(0);
    let default: String = c
        .query_one("SELECT default_version FROM pg_available_extensions WHERE name = 'sqs_ingest'", &[])
        .unwrap()
        .get(0);
    assert_ne!(version, "0.1.0");
    assert_eq!(version, default, "updated to the version being built");

    // Data, keys, ledger and dead letters survived.
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 3);
    let key_after: Vec<u8> = c.query_one("SELECT key_bytes FROM sqs_ingest.keys", &[]).unwrap().get(0);
    assert_eq!(key_before, key_after);
    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.ledger"), 4);
    // 0.5.0 keys the ledger by the queue's ARN, whatever the spelling: the upgrade moved the rows of every spelling
    // the database knew, so MessageIds ingested before the upgrade are still duplicates after it under any URL.
    let keyed =
        "SELECT count(*) FROM sqs_ingest.ledger WHERE queue_key = sqs_ingest.queue_key(sqs_ingest.queue_arn($1))";
    let by_spelling = "SELECT count(*) FROM sqs_ingest.ledger WHERE queue_key = sqs_ingest.queue_key($1)";
    assert_eq!(c.query_one(keyed, &[&url]).unwrap().get::<_, i64>(0), 3);
    assert_eq!(c.query_one(by_spelling, &[&url]).unwrap().get::<_, i64>(0), 0);
    assert_eq!(c.query_one(by_spelling, &[&other_spelling]).unwrap().get::<_, i64>(0), 1, "an unknown spelling");
    // The first ingest under the unknown spelling moves its rows too.
    assert_eq!(ingest(&mut c, &other_spelling).received, 0);
    assert_eq!(c.query_one(by_spelling, &[&other_spelling]).unwrap().get::<_, i64>(0), 0);
    assert_eq!(c.query_one(keyed, &[&url]).unwrap().get::<_, i64>(0), 4);
    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.dead_letters"), 1);
    let clear: String = c.query_one("SELECT sqs_ingest.unmask($1)", &[&token]).unwrap().get(0);
    assert!(clear.starts_with("10."), "{clear}");
    // Ingest still works, and the new release's function is there.
    h.send(&mut c, &url, &[login(3)]);
    assert_eq!(ingest(&mut c, &url).inserted, 1);
    assert_eq!(c.query_one(keyed, &[&url]).unwrap().get::<_, i64>(0), 5);
    assert_eq!(
        c.query_one("SELECT sqs_ingest.purge_dead_letters('0 seconds', true)", &[]).unwrap().get::<_, i64>(0),
        1
    );
    eventually("queue empty", Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));

    // The upgraded database has exactly the objects, signatures, settings, ACLs and comments of a fresh install.
    let mut fresh = h.connect("e2e_fresh");
    fresh.batch_execute("CREATE EXTENSION sqs_ingest").unwrap();
    assert_eq!(members(&mut c), members(&mut fresh));
    assert_eq!(surface(&mut c), surface(&mut fresh));
    assert_eq!(dumped(&mut c), dumped(&mut fresh), "pg_dump carries the same tables and sequences");
}
