//! No audit row is lost when background worker slots are short. In a cluster of its own whose only two worker
//! slots are taken (two static workers with no `sqs_ingest.worker_role`, which start, do not ingest and hold their
//! slots), refused `unmask()` calls in transactions that roll back cannot get an audit worker: their records wait
//! under the data directory, and are written as soon as a slot is free.

use sqs_ingest_e2e::*;
use std::time::Duration;

#[test]
fn refusals_wait_for_a_free_worker_slot_and_are_then_written() {
    let cluster = PrivateCluster::start(
        "audit_slots",
        "shared_preload_libraries = 'sqs_ingest'
max_worker_processes = 2
max_logical_replication_workers = 0
max_parallel_workers = 0
sqs_ingest.worker_count = 2
sqs_ingest.worker_restart_delay = 1",
    );
    let mut admin = cluster.connect("postgres", "postgres");
    eventually("both static workers hold their slots", Duration::from_secs(30), || {
        count(&mut admin, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'sqs_ingest worker'") == 2
    });
    admin.batch_execute("CREATE DATABASE slots").unwrap();
    let mut c = cluster.connect("slots", "postgres");
    c.batch_execute("CREATE EXTENSION sqs_ingest; SELECT sqs_ingest.rotate_key()").unwrap();
    let refused =
        |c: &mut postgres::Client| count(c, "SELECT count(*) FROM sqs_ingest.unmask_audit WHERE NOT succeeded");
    // Three rolled-back transactions with refusals (and a mask() count): no slot for any audit worker.
    for _ in 0..3 {
        c.batch_execute(
            "BEGIN; SELECT sqs_ingest.mask('198.51.100.7');
             DO $$ BEGIN PERFORM sqs_ingest.unmask('enc:1:AAAA'); EXCEPTION WHEN OTHERS THEN NULL; END $$;
             ROLLBACK",
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(refused(&mut c), 0, "written although no worker slot was free");
    let waiting = std::fs::read_dir(format!("{}/data/sqs_ingest_audit", cluster.dir)).unwrap().count();
    assert!(waiting >= 1, "the records were not kept");
    // Free a slot: the next transaction end of the same session starts the worker, which writes every file.
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'sqs_ingest worker' LIMIT 1",
        )
        .unwrap();
    eventually("a slot is free", Duration::from_secs(30), || {
        count(&mut admin, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'sqs_ingest worker'") < 2
    });
    c.batch_execute("SELECT 1").unwrap();
    eventually("all three refusals written", Duration::from_secs(30), || refused(&mut c) == 3);
    assert_eq!(count(&mut c, "SELECT sum(calls)::int8 FROM sqs_ingest.mask_audit WHERE rolled_back"), 3);
    eventually("no file left waiting", Duration::from_secs(10), || {
        std::fs::read_dir(format!("{}/data/sqs_ingest_audit", cluster.dir)).unwrap().count() == 0
    });

    // Half-configured static credentials (the server's configuration is the only place they can be set): 22023
    // before any request, and the key id is not quoted.
    admin.batch_execute("ALTER SYSTEM SET sqs_ingest.aws_access_key_id = 'AKIAIOSFODNN7EXAMPLE'").unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut c = cluster.connect("slots", "postgres");
    let e = c.query("SELECT * FROM sqs_ingest('http://127.0.0.1:1/000000000000/q')", &[]).unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "22023", "{}", db.message());
    assert!(!db.message().contains("AKIAIOSFODNN7EXAMPLE"));
}
