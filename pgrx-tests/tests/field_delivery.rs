//! The delivery guarantee with the inputs and setups of real deployments: one queue under any spelling of its
//! URL, FIFO queues, transient failures, idle workers, partitioned targets, and answers SQS should never give.

use sqs_ingest_e2e::*;
use std::time::Duration;

fn ls_port(h: &Harness) -> u16 {
    h.endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

/// The sequence number of a `login(i)` body, from its user_id.
fn login_index(user_id: &str) -> usize {
    user_id.rsplit('-').next().unwrap().parse().unwrap()
}

#[test]
fn one_queue_under_two_spellings_stores_a_redelivered_message_once() {
    let h = harness();
    let mut c = h.fresh_db("e2e_spellings");
    let url = h.fresh_queue(&mut c, "e2e-spellings", 30);
    let port = ls_port(&h);
    let proxy = FreezingProxy::start(port);
    let via_proxy = format!("http://127.0.0.1:{}/000000000000/e2e-spellings", proxy.port);
    let path_form = format!("http://localhost:{port}/queue/us-east-1/000000000000/e2e-spellings");
    create_user_logins(&mut c);
    h.send(&mut c, &url, &(0..5).map(login).collect::<Vec<_>>());
    for spelling in [&url, &via_proxy, &path_form] {
        let arn: String = c.query_one("SELECT sqs_ingest.queue_arn($1)", &[spelling]).unwrap().get(0);
        assert_eq!(arn, "arn:aws:sqs:us-east-1:000000000000:e2e-spellings", "{spelling}");
    }

    // Session A receives under one spelling and, with its heartbeats stalled, loses the messages to session B
    // while its transaction is still open; B names the queue another way and must wait for A's ledger rows.
    c.batch_execute("SET sqs_ingest.visibility_timeout = 2; SET sqs_ingest.post_commit_timeout = '1s'; BEGIN").unwrap();
    let got: i64 = c.query_one("SELECT received FROM sqs_ingest($1)", &[&via_proxy]).unwrap().get(0);
    assert_eq!(got, 5);
    proxy.freeze();
    let mut watcher = h.connect("e2e_spellings");
    eventually("the messages are visible again", Duration::from_secs(30), || depth(&mut watcher, &url).0 == 5);
    let mut b = h.connect("e2e_spellings");
    let b_pid: i32 = b.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let spelled = path_form.clone();
    let other = std::thread::spawn(move || {
        let r = b.query_one("SELECT received, inserted, duplicates FROM sqs_ingest($1)", &[&spelled]).unwrap();
        (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2))
    });
    eventually("B waits for A's ledger rows", Duration::from_secs(30), || {
        count(
            &mut watcher,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {b_pid} AND wait_event_type = 'Lock'"),
        ) == 1
    });
    c.batch_execute("COMMIT").unwrap();
    assert_eq!(other.join().unwrap(), (5, 0, 5), "B recognised every message as a duplicate");
    proxy.thaw();
    assert_eq!(count(&mut watcher, "SELECT count(*) FROM user_logins"), 5);
    eventually("queue empty", Duration::from_secs(30), || depth(&mut watcher, &url) == (0, 0));

    // Stats add both spellings up under the queue's ARN.
    let rows = watcher
        .query("SELECT queue_arn, received, inserted, duplicates FROM sqs_ingest.stats WHERE worker = ''", &[])
        .unwrap();
    assert_eq!(rows.len(), 1, "one stats row for one queue");
    assert_eq!(rows[0].get::<_, String>(0), "arn:aws:sqs:us-east-1:000000000000:e2e-spellings");
    assert_eq!((rows[0].get::<_, i64>(1), rows[0].get::<_, i64>(2), rows[0].get::<_, i64>(3)), (10, 5, 5));
}

#[test]
fn fifo_queues_drain_completely_and_keep_group_order() {
    let h = harness();
    let mut c = h.fresh_db("e2e_fifo");
    let url = fresh_fifo_queue(&h.endpoint, "e2e-fifo.fifo", 30);
    create_user_logins(&mut c);
    c.batch_execute("ALTER TABLE user_logins ADD COLUMN seq bigserial").unwrap();
    let group_of = |i: usize| format!("g{}", i % 3);

    // 1. One transaction: SQS delivers no later message of a group before the first ones are deleted. The call
    //    says what remains, and stats do not claim an empty queue.
    send_fifo(&h.endpoint, &url, &(0..25).map(|i| ("g0".to_string(), login(i))).collect::<Vec<_>>());
    let (mut n, notices) = h.connect_collecting_notices("e2e_fifo", "postgres");
    let got: i64 = n.query_one("SELECT received FROM sqs_ingest($1)", &[&url]).unwrap().get(0);
    assert_eq!(got, 10);
    let said = notices.lock().unwrap().join("\n");
    assert!(said.contains("remain in FIFO queue e2e-fifo.fifo"), "{said}");
    let left: Option<i64> = c
        .query_one("SELECT approximate_depth FROM sqs_ingest.stats WHERE queue_arn LIKE '%:e2e-fifo.fifo'", &[])
        .unwrap()
        .get(0);
    assert!(left.is_some_and(|d| d > 0), "stats claim an empty FIFO queue: {left:?}");

    // 2. The drain procedure commits batch by batch, so each COMMIT lets the group go on: it drains completely.
    let row = c.query_one("CALL sqs_ingest_drain($1, batch_messages => 7)", &[&url]).unwrap();
    assert_eq!(row.get::<_, i64>("received"), 15);
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 25);
    eventually("queue empty", Duration::from_secs(30), || depth(&mut c, &url) == (0, 0));

    // 3. Two workers and three groups: every group is stored in the order it was sent.
    send_fifo(&h.endpoint, &url, &(100..190).map(|i| (group_of(i), login(i))).collect::<Vec<_>>());
    for _ in 0..2 {
        c.execute("SELECT sqs_ingest.worker_start($1, 5)", &[&url]).unwrap();
    }
    eventually("the workers store every message", Duration::from_secs(120), || {
        count(&mut c, "SELECT count(*) FROM user_logins") == 115
    });
    // Workers are named by any spelling of their queue's URL.
    let other_spelling = url.replace("localhost", "127.0.0.1");
    let stopped: i64 = c.query_one("SELECT sqs_ingest.worker_stop($1)", &[&other_spelling]).unwrap().get(0);
    assert_eq!(stopped, 2);
    let order: Vec<usize> = c
        .query("SELECT user_id FROM user_logins ORDER BY seq", &[])
        .unwrap()
        .iter()
        .map(|r| login_index(r.get(0)))
        .collect();
    for g in 0..3 {
        let group: Vec<usize> = order.iter().copied().filter(|i| *i >= 100 && i % 3 == g).collect();
        let mut sorted = group.clone();
        sorted.sort();
        assert_eq!(group.len(), 30);
        assert_eq!(group, sorted, "group g{g} stored out of order");
    }
    let first: Vec<usize> = order.iter().copied().filter(|i| *i < 100).collect();
    assert_eq!(first, (0..25).collect::<Vec<_>>(), "the single group in order");
}

#[test]
fn a_transient_failure_backs_off_and_ends_as_a_dead_letter_after_max_receive_count() {
    let h = harness();
    let mut c = h.fresh_db("e2e_transient");
    let url = h.fresh_queue(&mut c, "e2e-transient", 30);
    create_user_logins(&mut c);
    c.batch_execute("ALTER TABLE user_logins ADD UNIQUE (user_id)").unwrap();
    let messages: Vec<String> = (0..5).map(login).collect();
    let held: String =
        serde_json::from_str::<serde_json::Value>(&messages[1]).unwrap()["user_id"].as_str().unwrap().into();
    // Another session holds the row one message's user_id would collide with: the insert waits for its lock.
    let mut blocker = h.connect("e2e_transient");
    blocker.batch_execute("BEGIN").unwrap();
    blocker.execute("INSERT INTO user_logins (user_id) VALUES ($1)", &[&held]).unwrap();
    h.send(&mut c, &url, &messages);
    c.batch_execute("SET lock_timeout = '300ms'; SET sqs_ingest.max_receive_count = 2").unwrap();

    // 1. A lock timeout is transient: the call fails with it, and the batch's messages come back after a backoff
    //    (2 s at the first receive), not at once.
    let e = c.query("SELECT * FROM sqs_ingest($1)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "55P03", "{e:?}");
    assert_eq!(depth(&mut c, &url), (0, 5), "released with a backoff, not at once");

    // 2. After max_receive_count receives they are dead letters (redrivable), and the queue moves on.
    eventually("the messages become dead letters", Duration::from_secs(60), || {
        let _ = c.query("SELECT * FROM sqs_ingest($1)", &[&url]);
        count(&mut c, "SELECT count(*) FROM sqs_ingest.dead_letters WHERE reason_code = 'too_many_receives'") == 5
    });
    eventually("queue empty", Duration::from_secs(30), || depth(&mut c, &url) == (0, 0));
    let reason: String = c.query_one("SELECT reason FROM sqs_ingest.dead_letters LIMIT 1", &[]).unwrap().get(0);
    assert!(reason.contains("max_receive_count is 2"), "{reason}");
    let last_error: String = c
        .query_one("SELECT last_error FROM sqs_ingest.stats WHERE queue_url = $1 AND worker = ''", &[&url])
        .unwrap()
        .get(0);
    assert!(last_error.contains("lock"), "{last_error}");

    // 3. Once the cause is gone, redrive stores them.
    blocker.batch_execute("ROLLBACK").unwrap();
    let ids: Vec<String> =
        c.query("SELECT message_id FROM sqs_ingest.dead_letters", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    for id in &ids {
        assert!(c.query_one("SELECT sqs_ingest.redrive($1)", &[id]).unwrap().get::<_, bool>(0));
    }
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 5);
}

#[test]
fn an_idle_worker_holds_no_transaction() {
    let h = harness();
    let mut c = h.fresh_db("e2e_idle");
    let url = h.fresh_queue(&mut c, "e2e-idle", 30);
    create_user_logins(&mut c);
    let id: i32 = c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap().get(0);
    let label = format!("dynamic worker {id}");
    let pid_of = |c: &mut postgres::Client| -> Option<i32> {
        c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
            &[&label],
        )
        .unwrap()
        .map(|r| r.get(0))
    };
    eventually("the worker runs", Duration::from_secs(30), || pid_of(&mut c).is_some());
    let pid = pid_of(&mut c).unwrap();
    // It long-polls the empty queue (20 s per wait) without a transaction id or a snapshot.
    std::thread::sleep(Duration::from_secs(1));
    c.batch_execute("CREATE TABLE churn AS SELECT g AS i FROM generate_series(1, 20000) g").unwrap();
    c.batch_execute("DELETE FROM churn").unwrap();
    for _ in 0..10 {
        let r = c
            .query_one("SELECT backend_xid::text, backend_xmin::text FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .unwrap();
        assert_eq!(
            (r.get::<_, Option<String>>(0), r.get::<_, Option<String>>(1)),
            (None, None),
            "the idle worker holds a transaction"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // So VACUUM removes the rows deleted meanwhile (and truncates the emptied table).
    c.batch_execute("VACUUM churn").unwrap();
    assert_eq!(count(&mut c, "SELECT pg_relation_size('churn')"), 0, "VACUUM was held back");
    // And it still ingests at once when messages come.
    h.send(&mut c, &url, &(0..3).map(login).collect::<Vec<_>>());
    eventually("the worker stores the messages", Duration::from_secs(60), || {
        count(&mut c, "SELECT count(*) FROM user_logins") == 3
    });
    assert_eq!(c.query_one("SELECT sqs_ingest.worker_stop($1)", &[&url]).unwrap().get::<_, i64>(0), 1);
}

#[test]
fn rekey_rewrites_each_token_in_its_own_row_of_a_partitioned_target() {
    let h = harness();
    let mut c = h.fresh_db("e2e_rekey_parts");
    let url = h.fresh_queue(&mut c, "e2e-rekey-parts", 30);
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    // Partitioned as the README recommends; two partitions, so row positions (ctids) repeat across them.
    c.batch_execute(
        "CREATE TABLE user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
           masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date)
           PARTITION BY LIST (device_type);
         CREATE TABLE user_logins_android PARTITION OF user_logins FOR VALUES IN ('android');
         CREATE TABLE user_logins_ios PARTITION OF user_logins FOR VALUES IN ('ios');",
    )
    .unwrap();
    h.send(&mut c, &url, &(0..300).map(login).collect::<Vec<_>>());
    assert_eq!(ingest(&mut c, &url).inserted, 300);
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    let rewritten: i64 = c.query_one("SELECT sqs_ingest.rekey('user_logins')", &[]).unwrap().get(0);
    assert_eq!(rewritten, 600);
    let rows = c
        .query(
            "SELECT user_id, sqs_ingest.unmask(masked_ip), sqs_ingest.unmask(masked_device_id) FROM user_logins",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 300);
    for r in rows {
        let i = login_index(r.get(0));
        let body: serde_json::Value = serde_json::from_str(&login(i)).unwrap();
        assert_eq!(r.get::<_, String>(1), body["ip"].as_str().unwrap(), "row {i} holds another row's token");
        assert_eq!(r.get::<_, String>(2), body["device_id"].as_str().unwrap(), "row {i} holds another row's token");
    }
}

#[test]
fn a_message_without_message_id_or_receipt_handle_is_a_dead_letter() {
    let h = harness();
    let mut c = h.fresh_db("e2e_no_ids");
    let url = h.fresh_queue(&mut c, "e2e-no-ids", 2);
    create_user_logins(&mut c);
    let port = ls_port(&h);
    // A real endpoint whose answers lose a field (the proxy renames the JSON key, keeping lengths).
    let no_id = FreezingProxy::start_rewriting(port, Some(("\"MessageId\"", "\"MessageIx\"")));
    let no_receipt = FreezingProxy::start_rewriting(port, Some(("\"ReceiptHandle\"", "\"ReceiptHandlX\"")));
    let spelled = |p: &FreezingProxy| format!("http://127.0.0.1:{}/000000000000/e2e-no-ids", p.port);

    h.send(&mut c, &url, &(0..3).map(login).collect::<Vec<_>>());
    let r = ingest(&mut c, &spelled(&no_id));
    assert_eq!((r.received, r.inserted, r.dead_lettered), (3, 0, 3));
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM sqs_ingest.dead_letters WHERE reason_code = 'no_message_id' AND message_id LIKE 'no-message-id:%'"
        ),
        3
    );
    eventually("deleted after commit", Duration::from_secs(30), || depth(&mut c, &url) == (0, 0));

    h.send(&mut c, &url, &(3..5).map(login).collect::<Vec<_>>());
    let r = ingest(&mut c, &spelled(&no_receipt));
    assert_eq!((r.received, r.dead_lettered), (2, 2));
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM sqs_ingest.dead_letters WHERE reason_code = 'no_receipt_handle'"),
        2
    );
    // They could not be deleted, so they come back; the ledger knows them: duplicates, then deleted.
    eventually("the redelivered messages are duplicates", Duration::from_secs(60), || {
        let _ = c.query("SELECT * FROM sqs_ingest($1)", &[&url]);
        depth(&mut c, &url) == (0, 0)
    });
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.dead_letters"), 5);
}

#[test]
fn a_worker_records_an_error_raised_inside_its_batch_and_carries_on() {
    let h = harness();
    let mut c = h.fresh_db("e2e_worker_errors");
    let url = h.fresh_queue(&mut c, "e2e-worker-errors", 30);
    create_user_logins(&mut c);
    // Every insert fails with a serialization failure (transient: the batch rolls back and backs off).
    c.batch_execute(
        "CREATE FUNCTION conflict() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'simulated conflict' USING ERRCODE = 'serialization_failure'; END $$;
         CREATE TRIGGER conflict BEFORE INSERT ON user_logins FOR EACH ROW EXECUTE FUNCTION conflict();",
    )
    .unwrap();
    let id: i32 = c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap().get(0);
    let label = format!("dynamic worker {id}");
    h.send(&mut c, &url, &(0..5).map(login).collect::<Vec<_>>());
    eventually("the error reaches stats", Duration::from_secs(60), || {
        c.query_opt(
            "SELECT 1 FROM sqs_ingest.stats WHERE worker = $1 AND last_error LIKE '40001: %simulated conflict%'",
            &[&label],
        )
        .unwrap()
        .is_some()
    });
    let pid_of = |c: &mut postgres::Client| -> Option<i32> {
        c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
            &[&label],
        )
        .unwrap()
        .map(|r| r.get(0))
    };
    let pid = pid_of(&mut c).expect("the worker is still running");
    c.batch_execute("DROP TRIGGER conflict ON user_logins").unwrap();
    eventually("the worker stores the messages once the cause is gone", Duration::from_secs(90), || {
        count(&mut c, "SELECT count(*) FROM user_logins") == 5
    });
    assert_eq!(pid_of(&mut c), Some(pid), "the worker exited on an error of its batch");
    assert_eq!(c.query_one("SELECT sqs_ingest.worker_stop($1)", &[&url]).unwrap().get::<_, i64>(0), 1);
}

#[test]
fn a_worker_that_cannot_store_does_not_take_messages() {
    let h = harness();
    let op = "e2e_no_insert_op";
    let mut admin = h.fresh_db("e2e_no_insert");
    h.login_role(&mut admin, op, &["sqs_ingest_operator"]);
    let url = h.fresh_queue(&mut admin, "e2e-no-insert", 30);
    create_user_logins(&mut admin);
    // Any receive before the worker can store would count: the message would then be a dead letter.
    admin.batch_execute("ALTER DATABASE e2e_no_insert SET sqs_ingest.max_receive_count = 1").unwrap();
    h.send(&mut admin, &url, &[login(1)]);
    let mut c = h.connect_as("e2e_no_insert", op);
    let id: i32 = c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap().get(0);
    let label = format!("dynamic worker {id}");
    eventually("the worker reports that it may not insert", Duration::from_secs(30), || {
        admin
            .query_opt("SELECT 1 FROM sqs_ingest.stats WHERE worker = $1 AND last_error LIKE '42501:%'", &[&label])
            .unwrap()
            .is_some()
    });
    std::thread::sleep(Duration::from_secs(3));
    admin.batch_execute(&format!("GRANT INSERT ON user_logins TO {op}")).unwrap();
    eventually("stored once the worker may insert", Duration::from_secs(90), || {
        count(&mut admin, "SELECT count(*) FROM user_logins") == 1
    });
    assert_eq!(
        count(&mut admin, "SELECT count(*) FROM sqs_ingest.dead_letters"),
        0,
        "the message was received while the worker could not store it"
    );
    assert_eq!(c.query_one("SELECT sqs_ingest.worker_stop()", &[]).unwrap().get::<_, i64>(0), 1);
}
