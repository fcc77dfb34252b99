//! A pg_dump / restore round trip: the keys, ledger, dead letters and audit trail travel with the dump, old tokens
//! unmask in the restored database, redelivered messages are still recognised, and new rows get fresh ids.

use sqs_ingest_e2e::*;
use std::time::Duration;

#[test]
fn dump_and_restore_keeps_keys_ledger_and_audit() {
    let h = harness();
    let mut c = h.fresh_db("e2e_backup");
    let url = h.fresh_queue(&mut c, "e2e-backup", 30);
    h.send(&mut c, &url, &[login(1), login(2), "{\"broken\": ".to_string()]);
    let counts = ingest(&mut c, &url);
    assert_eq!((counts.inserted, counts.dead_lettered), (2, 1));
    let token: String = c.query_one("SELECT masked_ip FROM user_logins ORDER BY user_id LIMIT 1", &[]).unwrap().get(0);
    let clear: String = c.query_one("SELECT sqs_ingest.unmask($1)", &[&token]).unwrap().get(0);
    let ledger_ids: Vec<String> =
        c.query("SELECT message_id FROM sqs_ingest.ledger", &[]).unwrap().iter().map(|r| r.get(0)).collect();

    let dir = std::env::temp_dir().join(format!("sqs_ingest_backup_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("e2e_backup.dump");
    let dump = dump.to_str().unwrap();
    pg_tool(&h, "pg_dump", &["-Fc", "-d", "e2e_backup", "-f", dump]);
    let mut admin = h.connect("postgres");
    admin.batch_execute("DROP DATABASE IF EXISTS e2e_restored WITH (FORCE)").unwrap();
    admin.batch_execute("CREATE DATABASE e2e_restored").unwrap();
    pg_tool(&h, "pg_restore", &["--exit-on-error", "-d", "e2e_restored", dump]);
    let _ = std::fs::remove_dir_all(&dir);

    let mut r = h.connect("e2e_restored");
    // Same key: the old token unmasks and the same value masks to the same token.
    let again: String = r.query_one("SELECT sqs_ingest.unmask($1)", &[&token]).unwrap().get(0);
    assert_eq!(again, clear);
    let remasked: String = r.query_one("SELECT sqs_ingest.mask($1)", &[&clear]).unwrap().get(0);
    assert_eq!(remasked, token);
    assert_eq!(count(&mut r, "SELECT count(*) FROM sqs_ingest.keys"), 1);
    // The audit trail came along and new audit rows get ids of their own (the identity sequence came too).
    assert_eq!(count(&mut r, "SELECT count(*) FROM sqs_ingest.unmask_audit"), 2);
    // The ledger came along: the same MessageIds are known.
    let restored_ids: i64 = r
        .query_one("SELECT count(*) FROM sqs_ingest.ledger WHERE message_id = ANY($1)", &[&ledger_ids])
        .unwrap()
        .get(0);
    assert_eq!(restored_ids, ledger_ids.len() as i64);
    // Ingest into the restored database: new rows and a new dead letter get fresh ids.
    h.send(&mut r, &url, &[login(3), "[]".to_string()]);
    let counts = ingest(&mut r, &url);
    assert_eq!((counts.inserted, counts.dead_lettered), (1, 1));
    assert_eq!(count(&mut r, "SELECT count(*) FROM sqs_ingest.dead_letters"), 2);
    assert_eq!(count(&mut r, "SELECT count(*) FROM user_logins"), 3);
    eventually("queue empty", Duration::from_secs(10), || depth(&mut r, &url) == (0, 0));
}
