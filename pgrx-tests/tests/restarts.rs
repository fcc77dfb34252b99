//! Server restarts and shutdowns, in a cluster of the test's own: dynamic workers come back after a crash restart
//! (and not once stopped), no stale pid is ever reported or signalled, and a fast shutdown ends a commit's delete
//! phase stalled on a frozen endpoint without losing or doubling anything.

use sqs_ingest_e2e::*;
use std::time::Duration;

fn worker_pid(c: &mut postgres::Client, id: i32) -> Option<i32> {
    c.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'sqs_ingest worker' AND application_name = $1",
        &[&format!("dynamic worker {id}")],
    )
    .unwrap()
    .map(|r| r.get(0))
}

#[test]
fn dynamic_workers_survive_restarts_and_fast_shutdown_ends_a_stalled_delete_phase() {
    let h = harness();
    // Short long polls: a poll the killed worker left open at LocalStack would otherwise take (and hide) messages
    // sent within its 20 s wait.
    let cluster = PrivateCluster::start(
        "restarts",
        "shared_preload_libraries = 'sqs_ingest'\nsqs_ingest.worker_count = 0\nsqs_ingest.worker_wait_time = 2\nsqs_ingest.worker_restart_delay = 1",
    );
    cluster.connect("postgres", "postgres").batch_execute("CREATE DATABASE r").unwrap();
    let mut c = cluster.connect("r", "postgres");
    c.batch_execute("CREATE EXTENSION sqs_ingest").unwrap();
    // A queue of this run's own: a killed worker's open poll may hide messages into a later run of the test.
    let name = format!(
        "e2e-restarts-{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    );
    let url = h.fresh_queue(&mut c, &name, 30);
    create_user_logins(&mut c);

    // 1. A dynamic worker comes back after an immediate (crash) stop, under its id, with its new pid recorded.
    let id: i32 = c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap().get(0);
    eventually("the worker runs", Duration::from_secs(30), || worker_pid(&mut c, id).is_some());
    let before = worker_pid(&mut c, id).unwrap();
    assert!(cluster.stop("immediate", 60));
    cluster.start_again();
    let mut c = cluster.connect("r", "postgres");
    eventually("the worker is back", Duration::from_secs(30), || worker_pid(&mut c, id).is_some());
    let after = worker_pid(&mut c, id).unwrap();
    assert_ne!(before, after);
    eventually("its row names its new pid", Duration::from_secs(10), || {
        count(&mut c, &format!("SELECT count(*) FROM sqs_ingest.workers WHERE worker_id = {id} AND pid = {after}")) == 1
    });
    let status: Vec<(i32, Option<String>)> = c
        .query(
            "SELECT pid, queue_urls FROM sqs_ingest.worker_status() WHERE worker = $1",
            &[&format!("dynamic worker {id}")],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(status, vec![(after, Some(url.clone()))]);
    // A long poll the killed worker left open at LocalStack takes (and hides) what is sent before it times out.
    std::thread::sleep(Duration::from_secs(3));
    h.send(&mut c, &url, &(0..3).map(login).collect::<Vec<_>>());
    eventually("it ingests", Duration::from_secs(60), || count(&mut c, "SELECT count(*) FROM user_logins") == 3);
    // Ended by pg_terminate_backend, it still counts towards max_dynamic_workers: it comes back at the next start.
    c.batch_execute(&format!("SELECT pg_terminate_backend({after})")).unwrap();
    eventually("the worker is gone", Duration::from_secs(30), || worker_pid(&mut c, id).is_none());
    c.batch_execute("SET sqs_ingest.max_dynamic_workers = 1").unwrap();
    let e = c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "53400", "{e}");
    c.batch_execute("RESET sqs_ingest.max_dynamic_workers").unwrap();
    // Counting under a snapshot older than the lock would let concurrent starts past the cap: refused.
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
    let e = c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap_err();
    assert_eq!(sqlstate(&e), "25000", "{e}");
    c.batch_execute("ROLLBACK").unwrap();

    // 2. Stopped, it is gone for good: not back after the next restart, and nothing left to start.
    assert_eq!(c.query_one("SELECT sqs_ingest.worker_stop()", &[]).unwrap().get::<_, i64>(0), 1);
    eventually("the worker exits", Duration::from_secs(30), || worker_pid(&mut c, id).is_none());
    assert!(cluster.stop("fast", 60));
    cluster.start_again();
    let mut c = cluster.connect("r", "postgres");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(worker_pid(&mut c, id), None, "a stopped worker came back");
    assert_eq!(std::fs::read_dir(format!("{}/data/sqs_ingest_workers", cluster.dir)).unwrap().count(), 0);
    assert_eq!(c.query_one("SELECT sqs_ingest.worker_stop()", &[]).unwrap().get::<_, i64>(0), 0);

    // 3. A worker has its starter's privileges: when the role stops being an operator, the worker stops for good
    //    (and would not come back after a restart).
    c.batch_execute("CREATE ROLE etl LOGIN; GRANT sqs_ingest_operator TO etl; GRANT INSERT ON user_logins TO etl")
        .unwrap();
    let mut etl = cluster.connect("r", "etl");
    let id: i32 = etl.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap().get(0);
    eventually("etl's worker runs", Duration::from_secs(30), || worker_pid(&mut c, id).is_some());
    c.batch_execute("REVOKE sqs_ingest_operator FROM etl").unwrap();
    eventually("etl's worker stops", Duration::from_secs(30), || worker_pid(&mut c, id).is_none());
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM sqs_ingest.workers WHERE worker_id = {id} AND stopped_at IS NOT NULL")
        ),
        1
    );
    assert_eq!(std::fs::read_dir(format!("{}/data/sqs_ingest_workers", cluster.dir)).unwrap().count(), 0);

    // 4. A worker whose role can no longer log in fails to connect at every start: after a few starts in a row it
    //    gives up for good instead of being restarted forever (and after every server start).
    c.batch_execute("GRANT sqs_ingest_operator TO etl").unwrap();
    let mut etl = cluster.connect("r", "etl");
    let id: i32 = etl.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap().get(0);
    eventually("etl's worker runs", Duration::from_secs(30), || worker_pid(&mut c, id).is_some());
    drop(etl);
    c.batch_execute("ALTER ROLE etl NOLOGIN").unwrap();
    assert!(cluster.stop("immediate", 60));
    cluster.start_again();
    let mut c = cluster.connect("r", "postgres");
    eventually("the worker gives up", Duration::from_secs(60), || {
        cluster.log().contains(&format!("dynamic worker {id}: 5 starts in a row could not connect"))
    });
    assert_eq!(std::fs::read_dir(format!("{}/data/sqs_ingest_workers", cluster.dir)).unwrap().count(), 0);
    c.batch_execute(&format!("UPDATE sqs_ingest.workers SET stopped_at = now() WHERE worker_id = {id}")).unwrap();

    // 5. Fast shutdown while a COMMIT's deletes hang on a frozen endpoint (with a deadline far away): the server
    //    stops, the committed rows stay, and the undeleted messages come back as duplicates.
    let proxy = FreezingProxy::start(h.endpoint.rsplit(':').next().unwrap().parse().unwrap());
    let via_proxy = format!("http://127.0.0.1:{}/000000000000/{name}", proxy.port);
    h.send(&mut c, &url, &(100..600).map(login).collect::<Vec<_>>());
    c.batch_execute("SET sqs_ingest.post_commit_timeout = '10min'; SET sqs_ingest.visibility_timeout = 3; BEGIN")
        .unwrap();
    let n: i64 = c.query_one("SELECT received FROM sqs_ingest($1)", &[&via_proxy]).unwrap().get(0);
    assert_eq!(n, 500);
    proxy.freeze();
    let committing = std::thread::spawn(move || {
        let _ = c.batch_execute("COMMIT");
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(cluster.stop("fast", 30), "pg_ctl -m fast stop gave up while deletes hung");
    committing.join().unwrap();
    proxy.thaw();
    cluster.start_again();
    let mut c = cluster.connect("r", "postgres");
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 503, "the committed rows stay");
    eventually("the undeleted messages come back as duplicates", Duration::from_secs(60), || {
        let _ = c.query("SELECT * FROM sqs_ingest($1)", &[&url]);
        depth(&mut c, &url) == (0, 0)
    });
    let dup: Vec<String> = c
        .query("SELECT user_id || ' ' || count(*) FROM user_logins GROUP BY user_id HAVING count(*) > 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let ledger: Vec<String> = c
        .query(
            "SELECT queue_key || ' ' || outcome || ' ' || count(*) FROM sqs_ingest.ledger GROUP BY queue_key, outcome",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 503, "{dup:?} {ledger:?}");
    assert_eq!(count(&mut c, "SELECT count(DISTINCT user_id) FROM user_logins"), 503);
}
