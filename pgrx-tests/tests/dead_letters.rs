//! Messages that can't be stored become dead letters with a precise reason and an encrypted body; the rest of
//! the batch is stored, and a fixed cause can be re-driven.

use sqs_ingest_e2e::*;
use std::time::Duration;

fn body_with(field: &str, value: serde_json::Value) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&login(1)).unwrap();
    v[field] = value;
    v.to_string()
}

#[test]
fn bad_messages_become_dead_letters_and_the_rest_is_stored() {
    let h = harness();
    let mut c = h.fresh_db("e2e_dead_letters");
    let url = h.fresh_queue(&mut c, "e2e-dead-letters", 30);
    let mut without_ip: serde_json::Value = serde_json::from_str(&login(2)).unwrap();
    without_ip.as_object_mut().unwrap().remove("ip");
    let cases: Vec<(&str, String)> = vec![
        ("not_json", "{\"user_id\": ".to_string()),
        ("not_object", "[1, 2, 3]".to_string()),
        ("missing_field", without_ip.to_string()),
        ("wrong_type", body_with("app_version", serde_json::json!(2.3))),
        ("value_too_long", body_with("user_id", "u".repeat(129).into())),
        ("nul_byte", body_with("device_type", "and\u{0}roid".into())),
        ("invalid_app_version", body_with("app_version", "2.x.1".into())),
    ];
    let mut bodies: Vec<String> = cases.iter().map(|(_, b)| b.clone()).collect();
    bodies.extend((100..110).map(login));
    h.send(&mut c, &url, &bodies);
    // A 1 MiB body (the SQS maximum) goes alone: a SendMessageBatch may carry at most 1 MiB in all.
    let huge = body_with("locale", "x".repeat(1_048_000).into());
    assert!(huge.len() > 1_040_000 && huge.len() <= 1_048_576);
    h.send(&mut c, &url, std::slice::from_ref(&huge));
    let mut cases = cases;
    cases.push(("body_too_large", huge));

    let counts = ingest(&mut c, &url);
    assert_eq!(counts.received, 18);
    assert_eq!(counts.inserted, 10, "the good messages of the same batches are stored");
    assert_eq!(counts.dead_lettered, cases.len() as i64);
    let mut codes: Vec<String> =
        c.query("SELECT reason_code FROM sqs_ingest.dead_letters", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    codes.sort();
    let mut expected: Vec<String> = cases.iter().map(|(code, _)| code.to_string()).collect();
    expected.sort();
    assert_eq!(codes, expected);
    // Reasons name the field; bodies are encrypted (no clear IP or user id inside).
    let reason: String =
        c.query_one("SELECT reason FROM sqs_ingest.dead_letters WHERE reason_code = 'nul_byte'", &[]).unwrap().get(0);
    assert!(reason.contains("device_type"), "{reason}");
    let clear = count(
        &mut c,
        "SELECT count(*) FROM sqs_ingest.dead_letters WHERE position('\\x3130'::bytea IN body_encrypted) > 0 AND position(convert_to('00000000-0000-4000', 'UTF8') IN body_encrypted) > 0",
    );
    assert_eq!(clear, 0);
    // AES-GCM: nonce + ciphertext + tag; a body too large ever to be stored keeps its first 4 KiB and a digest.
    let sizes_match = count(
        &mut c,
        "SELECT count(*) FROM sqs_ingest.dead_letters
          WHERE (body_bytes <= 65536 AND length(body_encrypted) = body_bytes + 28 AND body_digest IS NULL)
             OR (body_bytes > 65536 AND length(body_encrypted) = 4096 + 28 AND length(body_digest) = 32)",
    );
    assert_eq!(sizes_match, cases.len() as i64, "AES-GCM body: nonce + ciphertext + tag");
    eventually("queue empty after commit", Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));
    // A dead-lettered message is also in the ledger: redelivered, it is a duplicate, not a second dead letter.
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM sqs_ingest.ledger WHERE outcome = 'dead_letter'"),
        cases.len() as i64
    );
}

#[test]
fn redrive_stores_a_dead_letter_once_its_cause_is_fixed() {
    let h = harness();
    let mut c = h.fresh_db("e2e_redrive");
    let url = h.fresh_queue(&mut c, "e2e-redrive", 30);
    h.send(&mut c, &url, &[body_with("user_id", "u".repeat(129).into()), login(5)]);
    assert_eq!(ingest(&mut c, &url).dead_lettered, 1);
    let id: String = c.query_one("SELECT message_id FROM sqs_ingest.dead_letters", &[]).unwrap().get(0);
    // Still too long: stays a dead letter.
    assert!(!c.query_one("SELECT sqs_ingest.redrive($1)", &[&id]).unwrap().get::<_, bool>(0));
    c.batch_execute("ALTER TABLE user_logins ALTER COLUMN user_id TYPE varchar(256)").unwrap();
    // Two concurrent redrives of one dead letter: the second waits for the first and stores nothing.
    let mut other = h.connect("e2e_redrive");
    c.batch_execute("BEGIN").unwrap();
    assert!(c.query_one("SELECT sqs_ingest.redrive($1)", &[&id]).unwrap().get::<_, bool>(0));
    let second = {
        let id = id.clone();
        std::thread::spawn(move || other.query_one("SELECT sqs_ingest.redrive($1)", &[&id]).unwrap().get::<_, bool>(0))
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    c.batch_execute("COMMIT").unwrap();
    assert!(!second.join().unwrap(), "a concurrent redrive stored the dead letter a second time");
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins WHERE length(user_id) = 129"), 1);
    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.dead_letters WHERE redriven_at IS NOT NULL"), 1);
    // Redriving twice stores nothing more.
    assert!(!c.query_one("SELECT sqs_ingest.redrive($1)", &[&id]).unwrap().get::<_, bool>(0));
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 2);
    let e = c.query_one("SELECT sqs_ingest.redrive('no-such-id')", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "22023");
}
