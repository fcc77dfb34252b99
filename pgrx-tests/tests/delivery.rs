//! The delivery guarantee: rows and MessageIds commit together; messages are deleted only after COMMIT;
//! redeliveries, crashes, concurrency and long transactions never lose or duplicate a message.

use sqs_ingest_e2e::*;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn rollback_stores_and_deletes_nothing() {
    let h = harness();
    let mut c = h.fresh_db("e2e_rollback");
    let url = h.fresh_queue(&mut c, "e2e-rollback", 30);
    let bodies: Vec<String> = (0..30).map(login).collect();
    h.send(&mut c, &url, &bodies);

    let mut tx = c.transaction().unwrap();
    let r = tx.query_one("SELECT received, inserted FROM sqs_ingest($1)", &[&url]).unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (30, 30));
    tx.rollback().unwrap();

    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.ledger"), 0);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pg_class WHERE relname = 'user_logins'"),
        0,
        "table creation rolled back too"
    );
    // Nothing was deleted: the messages are back on the queue (released at once on abort).
    eventually("30 messages visible again", Duration::from_secs(10), || depth(&mut c, &url).0 == 30);
    let counts = ingest(&mut c, &url);
    assert_eq!((counts.received, counts.inserted, counts.duplicates), (30, 30, 0));
    eventually("queue empty", Duration::from_secs(5), || depth(&mut c, &url) == (0, 0));
}

#[test]
fn rolled_back_savepoint_does_not_delete_its_messages() {
    let h = harness();
    let mut c = h.fresh_db("e2e_savepoint");
    let url = h.fresh_queue(&mut c, "e2e-savepoint", 30);
    h.send(&mut c, &url, &(0..10).map(login).collect::<Vec<_>>());
    c.batch_execute("CREATE TABLE marker (x int)").unwrap();
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("INSERT INTO marker VALUES (1); SAVEPOINT s").unwrap();
    tx.query("SELECT * FROM sqs_ingest($1)", &[&url]).unwrap();
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    tx.commit().unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM marker"), 1);
    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.ledger"), 0);
    eventually("10 messages visible again", Duration::from_secs(10), || depth(&mut c, &url).0 == 10);
}

#[test]
fn a_redelivered_message_is_a_duplicate_stored_once() {
    let h = harness();
    let mut a = h.fresh_db("e2e_redelivery");
    let url = h.fresh_queue(&mut a, "e2e-redelivery", 30);
    create_user_logins(&mut a);
    h.send(&mut a, &url, &[login(1), login(2), login(3)]);

    // Consumer A holds the messages past a 1 s visibility timeout without extending it, so SQS redelivers
    // them to consumer B while A's rows are not yet committed.
    a.batch_execute(
        "BEGIN; SET LOCAL sqs_ingest.visibility_timeout = 1; SET LOCAL sqs_ingest.visibility_heartbeat = off",
    )
    .unwrap();
    let first = a.query_one("SELECT received, inserted FROM sqs_ingest($1)", &[&url]).unwrap();
    assert_eq!(first.get::<_, i64>(1), 3);
    thread::sleep(Duration::from_millis(2500));
    let b_url = url.clone();
    let b = thread::spawn(move || {
        let mut b = harness().connect("e2e_redelivery");
        b.batch_execute("SET sqs_ingest.wait_time = 0").unwrap();
        ingest(&mut b, &b_url) // waits on A's ledger rows, then finds them committed
    });
    thread::sleep(Duration::from_millis(1500));
    a.batch_execute("COMMIT").unwrap();
    let second = b.join().unwrap();
    assert_eq!(second.received, 3, "SQS redelivered all three");
    assert_eq!(second.duplicates, 3);
    assert_eq!(second.inserted, 0);
    assert_eq!(count(&mut a, "SELECT count(*) FROM user_logins"), 3);
    eventually("queue empty", Duration::from_secs(10), || depth(&mut a, &url) == (0, 0));
}

#[test]
fn a_long_transaction_keeps_its_messages() {
    let h = harness();
    let mut a = h.fresh_db("e2e_long_tx");
    let url = h.fresh_queue(&mut a, "e2e-long-tx", 30);
    create_user_logins(&mut a);
    h.send(&mut a, &url, &(0..20).map(login).collect::<Vec<_>>());
    a.batch_execute("BEGIN; SET LOCAL sqs_ingest.visibility_timeout = 3").unwrap();
    assert_eq!(a.query_one("SELECT inserted FROM sqs_ingest($1)", &[&url]).unwrap().get::<_, i64>(0), 20);
    // Three visibility timeouts later another consumer still finds nothing: the heartbeat extended them.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut b = h.connect("e2e_long_tx");
    b.batch_execute("SET sqs_ingest.wait_time = 0").unwrap();
    while Instant::now() < deadline {
        assert_eq!(ingest(&mut b, &url).received, 0, "another consumer got a held message");
        thread::sleep(Duration::from_millis(500));
    }
    a.batch_execute("COMMIT").unwrap();
    let r = a.query_one("SELECT deleted, failed FROM sqs_ingest.last_commit_deletes()", &[]).unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (20, 0), "deleted after commit");
    assert_eq!(count(&mut a, "SELECT count(*) FROM user_logins"), 20);
    eventually("queue empty", Duration::from_secs(10), || depth(&mut a, &url) == (0, 0));
}

#[test]
fn four_concurrent_sessions_store_every_message_once() {
    let h = harness();
    let mut c = h.fresh_db("e2e_concurrent");
    let url = h.fresh_queue(&mut c, "e2e-concurrent", 30);
    let n = 2000;
    h.send(&mut c, &url, &(0..n).map(login).collect::<Vec<_>>());
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            thread::spawn(move || {
                let mut s = harness().connect("e2e_concurrent");
                ingest(&mut s, &url)
            })
        })
        .collect();
    let total: i64 = workers.into_iter().map(|w| w.join().unwrap().inserted).sum();
    assert_eq!(total, n as i64);
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), n as i64);
    assert_eq!(count(&mut c, "SELECT count(DISTINCT user_id) FROM user_logins"), n as i64);
    eventually("queue empty", Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));
}

fn terminate_when(c: &mut postgres::Client, pid: i32, ready: impl Fn(&mut postgres::Client) -> bool) {
    eventually("ingest under way", Duration::from_secs(60), || ready(c));
    let ok: bool = c.query_one("SELECT pg_terminate_backend($1)", &[&pid]).unwrap().get(0);
    assert!(ok);
}

#[test]
fn terminated_backend_loses_and_duplicates_nothing() {
    let h = harness();
    let mut c = h.fresh_db("e2e_terminate");
    let url = h.fresh_queue(&mut c, "e2e-terminate", 30);
    create_user_logins(&mut c);
    let n = 3000;
    h.send(&mut c, &url, &(0..n).map(login).collect::<Vec<_>>());

    // 1. The per-batch procedure, killed after some batches committed.
    let mut victim = h.connect("e2e_terminate");
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    victim.batch_execute("SET sqs_ingest.visibility_timeout = 3").unwrap();
    let proc_url = url.clone();
    let running = thread::spawn(move || {
        victim.batch_execute(&format!("CALL sqs_ingest_drain('{proc_url}', batch_messages => 100)"))
    });
    terminate_when(&mut c, pid, |c| count(c, "SELECT count(*) FROM user_logins") >= 300);
    assert!(running.join().unwrap().is_err(), "the procedure was terminated");
    let stored_before = count(&mut c, "SELECT count(*) FROM user_logins");
    assert!(stored_before < n as i64, "terminated before the end");

    // 2. The single-transaction function, killed mid-way: it stores nothing.
    let mut victim = h.connect("e2e_terminate");
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    victim.batch_execute("SET sqs_ingest.visibility_timeout = 3").unwrap();
    let fn_url = url.clone();
    let running = thread::spawn(move || victim.query("SELECT * FROM sqs_ingest($1)", &[&fn_url]));
    terminate_when(&mut c, pid, |c| {
        let in_flight = depth(c, &url).1;
        in_flight >= 200
    });
    assert!(running.join().unwrap().is_err());
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM user_logins"),
        stored_before,
        "an uncommitted ingest stored nothing"
    );

    // After the visibility timeout everything comes back; a re-run completes the set exactly once.
    thread::sleep(Duration::from_secs(4));
    let mut again = h.connect("e2e_terminate");
    let r = ingest(&mut again, &url);
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), n as i64, "{r:?}");
    assert_eq!(count(&mut c, "SELECT count(DISTINCT user_id) FROM user_logins"), n as i64);
    eventually("queue empty", Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));
}

#[test]
fn asynchronous_commit_leaves_the_session_setting_alone() {
    // The commit hook flushes the WAL before it deletes (tests/durability.rs crashes a cluster to prove it), so
    // the session's synchronous_commit is never changed, inside the call's transaction or after it.
    let h = harness();
    let mut c = h.fresh_db("e2e_sync_commit");
    let url = h.fresh_queue(&mut c, "e2e-sync-commit", 30);
    h.send(&mut c, &url, &(0..5).map(login).collect::<Vec<_>>());
    c.batch_execute("SET synchronous_commit = off").unwrap();
    let mut tx = c.transaction().unwrap();
    let r = tx.query_one("SELECT received FROM sqs_ingest($1)", &[&url]).unwrap();
    assert_eq!(r.get::<_, i64>(0), 5);
    let inside: String = tx.query_one("SHOW synchronous_commit", &[]).unwrap().get(0);
    assert_eq!(inside, "off");
    tx.commit().unwrap();
    let after: String = c.query_one("SHOW synchronous_commit", &[]).unwrap().get(0);
    assert_eq!(after, "off");
    eventually("queue empty", Duration::from_secs(5), || depth(&mut c, &url) == (0, 0));
}

#[test]
fn two_phase_commit_is_refused_and_loses_nothing() {
    // A prepared transaction could commit long after this session is gone, with no one left to delete its
    // messages: PREPARE TRANSACTION is refused, the transaction rolls back, and the messages are ingested later.
    let h = harness();
    let mut c = h.fresh_db("e2e_two_phase");
    let url = h.fresh_queue(&mut c, "e2e-two-phase", 30);
    h.send(&mut c, &url, &(0..5).map(login).collect::<Vec<_>>());
    c.batch_execute("BEGIN").unwrap();
    let got: i64 = c.query_one("SELECT received FROM sqs_ingest($1)", &[&url]).unwrap().get(0);
    assert_eq!(got, 5);
    let e = c.batch_execute("PREPARE TRANSACTION 'e2e_two_phase'").unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e:?}");
    let db = e.as_db_error().expect("a server error");
    assert!(db.message().contains("two-phase commit"), "{}", db.message());
    assert!(db.hint().is_some());
    let _ = c.batch_execute("ROLLBACK");
    assert_eq!(count(&mut c, "SELECT count(*) FROM pg_prepared_xacts"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.ledger"), 0);
    eventually("5 messages visible again", Duration::from_secs(10), || depth(&mut c, &url).0 == 5);
    let counts = ingest(&mut c, &url);
    assert_eq!((counts.received, counts.inserted, counts.duplicates), (5, 5, 0));
}

/// A call cancelled mid-drain (statement_timeout) releases at once every message it received, including those of
/// receives still in flight or received and not yet stored: none stays hidden until its visibility timeout.
#[test]
fn a_cancelled_call_releases_everything_it_received() {
    let h = harness();
    let mut c = h.fresh_db("e2e_cancel_release");
    let url = h.fresh_queue(&mut c, "e2e-cancel-release", 120);
    create_user_logins(&mut c);
    h.send(&mut c, &url, &(0..8000).map(login).collect::<Vec<_>>());
    // Warm the session's SQS clients first, so the cancel lands while receives are in flight, not in set-up.
    depth(&mut c, &url);
    c.batch_execute("SET sqs_ingest.visibility_timeout = 120; SET statement_timeout = '1s'").unwrap();
    let e = c.query("SELECT * FROM sqs_ingest($1)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "57014", "{e:?}");
    c.batch_execute("RESET statement_timeout").unwrap();
    eventually("nothing left in flight", Duration::from_secs(20), || depth(&mut c, &url).1 == 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 0);
    assert_eq!(ingest(&mut c, &url).inserted, 8000);
    eventually("queue empty", Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));
}

/// A worker's full batches leave their deletes running while it receives the next batch (0.8.0): every message is
/// still stored once and deleted after its commit — nothing stays in flight until its visibility timeout (30 s
/// here) to come back as a duplicate — and no delete fails.
#[test]
fn a_worker_overlapping_its_deletes_deletes_every_message_once() {
    let h = harness();
    let mut c = h.fresh_db("e2e_overlap");
    create_user_logins(&mut c);
    let url = h.fresh_queue(&mut c, "e2e-overlap", 30);
    let id: i32 = c.query_one("SELECT sqs_ingest.worker_start($1, 10)", &[&url]).unwrap().get(0);
    h.send(&mut c, &url, &(0..50).map(login).collect::<Vec<_>>());
    eventually("the worker stored every message", Duration::from_secs(60), || {
        count(&mut c, "SELECT count(*) FROM user_logins") == 50
    });
    // Well inside the visibility timeout: a message whose delete never ran would still be in flight.
    eventually("every message was deleted", Duration::from_secs(15), || depth(&mut c, &url) == (0, 0));
    assert_eq!(count(&mut c, "SELECT count(DISTINCT user_id) FROM user_logins"), 50);
    let label = format!("dynamic worker {id}");
    let r = c
        .query_one(
            "SELECT sum(received)::int8, sum(duplicates)::int8, sum(delete_failures)::int8 FROM sqs_ingest.stats WHERE worker = $1",
            &[&label],
        )
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)), (50, 0, 0));
    let stopped: i64 = c.query_one("SELECT sqs_ingest.worker_stop($1)", &[&url]).unwrap().get(0);
    assert_eq!(stopped, 1);
}

/// `sqs_ingest_drain` lets each batch's deletes run on while the next batch is received and stored (0.8.0): its
/// `deleted` still counts every message (the last batch's too, also when it stops at `max_messages` with more
/// waiting), and every message is gone from the queue well inside its visibility timeout.
#[test]
fn the_drain_procedure_overlapping_its_deletes_deletes_and_counts_every_message() {
    let h = harness();
    let mut c = h.fresh_db("e2e_drain_overlap");
    create_user_logins(&mut c);
    let url = h.fresh_queue(&mut c, "e2e-drain-overlap", 30);
    let totals = |r: &postgres::Row| {
        (
            r.get::<_, i64>("received"),
            r.get::<_, i64>("inserted"),
            r.get::<_, i64>("deleted"),
            r.get::<_, i64>("delete_failures"),
        )
    };
    h.send(&mut c, &url, &(0..35).map(login).collect::<Vec<_>>());
    let r = c.query_one("CALL sqs_ingest_drain($1, batch_messages => 10)", &[&url]).unwrap();
    assert_eq!(totals(&r), (35, 35, 35, 0));
    eventually("every message was deleted", Duration::from_secs(15), || depth(&mut c, &url) == (0, 0));
    // Stopped by max_messages with more in the queue: the last batch's deletes were still running at its COMMIT.
    h.send(&mut c, &url, &(35..60).map(login).collect::<Vec<_>>());
    let r = c.query_one("CALL sqs_ingest_drain($1, max_messages => 20, batch_messages => 10)", &[&url]).unwrap();
    assert_eq!(totals(&r), (20, 20, 20, 0));
    eventually("the 20 were deleted, 5 wait", Duration::from_secs(15), || depth(&mut c, &url) == (5, 0));
    assert_eq!(count(&mut c, "SELECT count(DISTINCT user_id) FROM user_logins"), 55);
}
