//! Deletes after COMMIT are bounded and interruptible: the committing transaction still holds its locks while
//! they run. With the SQS endpoint stalled (a proxy in front of LocalStack that stops forwarding) right before a
//! large COMMIT, the COMMIT returns once `sqs_ingest.post_commit_timeout` has passed, other sessions get their
//! locks, and a terminated backend ends at once; what was not deleted is redelivered and counted as a duplicate,
//! nothing is stored twice.

use sqs_ingest_e2e::*;
use std::time::{Duration, Instant};

#[test]
fn a_stalled_endpoint_after_commit_is_bounded_and_interruptible() {
    let h = harness();
    let mut c = h.fresh_db("e2e_post_commit");
    let url = h.fresh_queue(&mut c, "e2e-post-commit", 30);
    let ls_port: u16 = h.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = FreezingProxy::start(ls_port);
    let via_proxy = format!("http://127.0.0.1:{}/000000000000/e2e-post-commit", proxy.port);
    create_user_logins(&mut c);
    h.send(&mut c, &url, &(0..1000).map(login).collect::<Vec<_>>());

    // 1. A deadline: COMMIT returns after about post_commit_timeout although no delete can get through.
    c.batch_execute("SET sqs_ingest.post_commit_timeout = '2s'; SET sqs_ingest.visibility_timeout = 3").unwrap();
    c.batch_execute("BEGIN").unwrap();
    let n: i64 = c.query_one("SELECT received FROM sqs_ingest($1)", &[&via_proxy]).unwrap().get(0);
    assert_eq!(n, 1000);
    proxy.freeze();
    let mut reader = h.connect("e2e_post_commit");
    let started = Instant::now();
    let commit = std::thread::spawn(move || {
        c.batch_execute("COMMIT").unwrap();
        c
    });
    // Meanwhile another session waits for the table's lock no longer than the deadline allows.
    reader.batch_execute("SET lock_timeout = '20s'").unwrap();
    reader.batch_execute("BEGIN; LOCK TABLE user_logins IN ACCESS EXCLUSIVE MODE; COMMIT").unwrap();
    let mut c = commit.join().unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "COMMIT held its locks for {took:?} with a stalled endpoint");
    assert_eq!(count(&mut reader, "SELECT count(*) FROM user_logins"), 1000);
    proxy.thaw();
    // What was not deleted comes back after its visibility timeout and is a duplicate, never a second row (read
    // under the same queue URL: the ledger keys a queue by its URL's spelling, see the field-delivery issue).
    eventually("every message accounted for", Duration::from_secs(60), || {
        let _ = c.query("SELECT * FROM sqs_ingest($1)", &[&via_proxy]);
        depth(&mut reader, &url) == (0, 0)
    });
    assert_eq!(count(&mut reader, "SELECT count(*) FROM user_logins"), 1000);
    assert_eq!(count(&mut reader, "SELECT count(DISTINCT user_id) FROM user_logins"), 1000);

    // 2. Terminate: with a long deadline, pg_terminate_backend ends the delete phase at once.
    h.send(&mut reader, &url, &(1000..1500).map(login).collect::<Vec<_>>());
    c.batch_execute("SET sqs_ingest.post_commit_timeout = '10min'").unwrap();
    c.batch_execute("BEGIN").unwrap();
    let n: i64 = c.query_one("SELECT received FROM sqs_ingest($1)", &[&via_proxy]).unwrap().get(0);
    assert_eq!(n, 500);
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    proxy.freeze();
    let commit = std::thread::spawn(move || {
        let _ = c.batch_execute("COMMIT");
    });
    std::thread::sleep(Duration::from_millis(500));
    let terminated_at = Instant::now();
    assert!(reader.query_one("SELECT pg_terminate_backend($1)", &[&pid]).unwrap().get::<_, bool>(0));
    eventually("the terminated backend is gone", Duration::from_secs(15), || {
        count(&mut reader, &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")) == 0
    });
    assert!(terminated_at.elapsed() < Duration::from_secs(15));
    commit.join().unwrap();
    proxy.thaw();
    assert_eq!(count(&mut reader, "SELECT count(*) FROM user_logins"), 1500, "the committed rows stay");
    let mut c = h.connect("e2e_post_commit");
    c.batch_execute("SET sqs_ingest.visibility_timeout = 3").unwrap();
    eventually("redelivered messages are duplicates", Duration::from_secs(60), || {
        let _ = c.query("SELECT * FROM sqs_ingest($1)", &[&via_proxy]);
        depth(&mut reader, &url) == (0, 0)
    });
    assert_eq!(count(&mut reader, "SELECT count(DISTINCT user_id) FROM user_logins"), 1500);
    assert_eq!(count(&mut reader, "SELECT count(*) FROM user_logins"), 1500);
}
