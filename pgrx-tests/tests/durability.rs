//! Durable before deleted: a message is deleted from SQS only once the commit that stored it is flushed locally
//! (whatever `synchronous_commit` was at COMMIT) and, per `sqs_ingest.delete_after`, flushed by the standbys the
//! primary knows. Every test runs clusters of its own: a crash right after COMMIT, a stopped, frozen or
//! disconnecting standby, a promotion, a synchronous standby as the control, and `local` losing what the README
//! says it may lose.

use postgres::Client;
use sqs_ingest_e2e::*;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A queue name of this run's own (a killed backend's open poll may hide messages from a later run).
fn queue_name(test: &str) -> String {
    format!("e2e-{test}-{}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis())
}

/// A cluster with the library preloaded (no static workers unless `conf` says so), database `d` with the
/// extension and `user_logins`. Messages held by a call come back 5 s after it stops extending them.
fn cluster(name: &str, conf: &str) -> (PrivateCluster, Client) {
    let cluster = PrivateCluster::start(
        name,
        &format!("shared_preload_libraries = 'sqs_ingest'\nsqs_ingest.visibility_timeout = 5\n{conf}"),
    );
    cluster.connect("postgres", "postgres").batch_execute("CREATE DATABASE d").unwrap();
    let mut c = cluster.connect("d", "postgres");
    c.batch_execute("CREATE EXTENSION sqs_ingest").unwrap();
    create_user_logins(&mut c);
    (cluster, c)
}

/// Waits until `standby` has received everything `primary` has flushed.
fn caught_up(primary: &mut Client, standby: &PrivateCluster) {
    let lsn: String = primary.query_one("SELECT pg_current_wal_flush_lsn()::text", &[]).unwrap().get(0);
    let mut s = standby.connect("postgres", "postgres");
    eventually("the standby has received the primary's WAL", Duration::from_secs(60), || {
        s.query_one("SELECT pg_last_wal_receive_lsn() >= $1::text::pg_lsn", &[&lsn]).unwrap().get::<_, Option<bool>>(0)
            == Some(true)
    });
}

/// (deletes_deferred, whether an unconfirmed deferral is shown) summed over the stats of every queue.
fn deferred(c: &mut Client) -> (i64, bool) {
    let r = c
        .query_one(
            "SELECT COALESCE(sum(deletes_deferred), 0)::bigint, bool_or(unconfirmed_since IS NOT NULL)
               FROM sqs_ingest.stats",
            &[],
        )
        .unwrap();
    (r.get(0), r.get::<_, Option<bool>>(1).unwrap_or(false))
}

/// Ingests until the table holds `n` rows and the queue is empty (held messages come back after their visibility
/// timeout), then checks every message is there exactly once.
fn finish_exactly_once(c: &mut Client, url: &str, n: i64) {
    eventually("every message stored and the queue empty", Duration::from_secs(90), || {
        ingest(c, url);
        count(c, "SELECT count(*) FROM user_logins") == n && depth(c, url) == (0, 0)
    });
    assert_eq!(count(c, "SELECT count(*) FROM user_logins"), n);
    assert_eq!(count(c, "SELECT count(DISTINCT user_id) FROM user_logins"), n);
}

/// A session as `postgres` in database `d` of the cluster whose socket is in `dir` (for another thread).
fn session(dir: &str, port: u16) -> Client {
    postgres::Config::new().host_path(dir).port(port).user("postgres").dbname("d").connect(postgres::NoTls).unwrap()
}

fn logins(n: usize) -> Vec<String> {
    (0..n).map(login).collect()
}

fn signal(pid: i32, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid}");
}

/// A process stopped with SIGSTOP until this is dropped (also when the test fails, so its cluster can stop).
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        signal(pid, "-STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

fn wal_receiver_pid(standby: &PrivateCluster) -> i32 {
    let mut s = standby.connect("postgres", "postgres");
    let mut pid = None;
    eventually("the standby streams", Duration::from_secs(30), || {
        pid = s
            .query_opt("SELECT pid FROM pg_stat_wal_receiver WHERE status = 'streaming'", &[])
            .unwrap()
            .map(|r| r.get(0));
        pid.is_some()
    });
    pid.unwrap()
}

#[test]
fn a_commit_made_asynchronous_after_the_call_survives_a_crash_right_after_commit() {
    let h = harness();
    // The WAL writer flushes at most every 10 s and never because of volume: an asynchronous commit stays in WAL
    // buffers until something flushes it, and an immediate stop then loses it.
    let (cluster, mut c) = cluster(
        "durable_async",
        "wal_writer_delay = 10000\nwal_writer_flush_after = '1GB'\nsqs_ingest.worker_count = 0",
    );
    let url = h.fresh_queue(&mut c, &queue_name("async-commit"), 5);
    h.send(&mut c, &url, &logins(500));

    // 1. synchronous_commit turned off after the call, in its transaction: the value at COMMIT is what counts.
    c.batch_execute("BEGIN").unwrap();
    assert_eq!(c.query_one("SELECT received FROM sqs_ingest($1)", &[&url]).unwrap().get::<_, i64>(0), 500);
    c.batch_execute("SET LOCAL synchronous_commit = off; COMMIT").unwrap();
    assert!(cluster.stop("immediate", 60));
    cluster.start_again();
    let mut c = cluster.connect("d", "postgres");
    // Every message is a row, or still in the queue; a second call stores the rest exactly once.
    let rows = count(&mut c, "SELECT count(*) FROM user_logins");
    let (visible, in_flight) = depth(&mut c, &url);
    assert!(rows + visible + in_flight >= 500, "rows {rows}, queue {visible} + {in_flight}");
    assert_eq!(rows, 500, "the committed rows were flushed before their messages were deleted");
    finish_exactly_once(&mut c, &url, 500);

    // 2. A database's setting, as a background worker sees it: its commits are asynchronous.
    c.batch_execute("ALTER DATABASE d SET synchronous_commit = off").unwrap();
    let url2 = h.fresh_queue(&mut c, &queue_name("async-worker"), 5);
    c.batch_execute("CREATE TABLE worker_logins (LIKE user_logins)").unwrap();
    c.batch_execute("ALTER DATABASE d SET sqs_ingest.target_table = 'worker_logins'").unwrap();
    h.send(&mut c, &url2, &logins(300));
    c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url2]).unwrap();
    eventually("the worker stored everything and emptied the queue", Duration::from_secs(60), || {
        count(&mut c, "SELECT count(*) FROM worker_logins") == 300 && depth(&mut c, &url2) == (0, 0)
    });
    assert!(cluster.stop("immediate", 60));
    cluster.start_again();
    let mut c = cluster.connect("d", "postgres");
    assert_eq!(count(&mut c, "SELECT count(DISTINCT user_id) FROM worker_logins"), 300);
    c.execute("SELECT sqs_ingest.worker_stop($1)", &[&url2]).unwrap();
}

#[test]
fn a_stopped_standby_keeps_the_messages_until_it_has_the_commit() {
    let h = harness();
    let (primary, mut c) = cluster("durable_stopped_primary", "sqs_ingest.worker_count = 0");
    let url = h.fresh_queue(&mut c, &queue_name("stopped-standby"), 5);
    let standby = PrivateCluster::standby_of(&primary, "durable_stopped_standby", Some("standby1"), "");
    caught_up(&mut c, &standby);
    // The standby goes down (its slot stays): the default, all_standbys, cannot have it confirm anything.
    assert!(standby.stop("fast", 60));
    h.send(&mut c, &url, &logins(2000));
    let r = ingest(&mut c, &url);
    assert_eq!((r.received, r.inserted), (2000, 2000), "{r:?}");
    // Stored, but not deleted: the messages stay in the queue, and the stats say so.
    let (visible, in_flight) = depth(&mut c, &url);
    assert_eq!(visible + in_flight, 2000);
    eventually("the deferral is in the stats", Duration::from_secs(30), || deferred(&mut c) == (2000, true));
    let confirmed_behind: bool =
        c.query_one("SELECT sqs_ingest.confirmed_lsn() < pg_current_wal_flush_lsn()", &[]).unwrap().get(0);
    assert!(confirmed_behind);

    // The primary crashes; the standby, which never received the batch, is promoted.
    assert!(primary.stop("immediate", 60));
    standby.start_again();
    standby.promote();
    let mut c = standby.connect("d", "postgres");
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 0, "the standby never had the batch");
    finish_exactly_once(&mut c, &url, 2000);
}

#[test]
fn with_delete_after_local_a_failover_loses_what_the_standby_had_not_received() {
    // The README's statement for `local`: a failover to a standby that had not received a commit loses its
    // messages (deleted from SQS, never on the new primary). This test sees exactly that.
    let h = harness();
    let (primary, mut c) =
        cluster("durable_local_primary", "sqs_ingest.worker_count = 0\nsqs_ingest.delete_after = local");
    let url = h.fresh_queue(&mut c, &queue_name("local"), 5);
    let standby = PrivateCluster::standby_of(&primary, "durable_local_standby", Some("standby1"), "");
    caught_up(&mut c, &standby);
    assert!(standby.stop("fast", 60));
    h.send(&mut c, &url, &logins(500));
    assert_eq!(ingest(&mut c, &url).inserted, 500);
    eventually("deleted at once", Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));
    assert_eq!(deferred(&mut c), (0, false));
    assert!(primary.stop("immediate", 60));
    standby.start_again();
    standby.promote();
    let mut c = standby.connect("d", "postgres");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(ingest(&mut c, &url).received, 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 0, "lost, as the README says");
}

#[test]
fn a_synchronous_standby_loses_nothing_even_with_delete_after_local() {
    // The control: synchronous replication makes COMMIT itself wait for the standby.
    let h = harness();
    let (primary, mut c) =
        cluster("durable_sync_primary", "sqs_ingest.worker_count = 0\nsqs_ingest.delete_after = local");
    let url = h.fresh_queue(&mut c, &queue_name("sync"), 5);
    let standby = PrivateCluster::standby_of(&primary, "durable_sync_standby", None, "");
    caught_up(&mut c, &standby);
    c.batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'durable_sync_standby'").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    eventually("the standby is synchronous", Duration::from_secs(30), || {
        count(&mut c, "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") == 1
    });
    h.send(&mut c, &url, &logins(2000));
    assert_eq!(ingest(&mut c, &url).inserted, 2000);
    eventually("deleted", Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));
    assert!(primary.stop("immediate", 60));
    standby.promote();
    let mut c = standby.connect("d", "postgres");
    assert_eq!(count(&mut c, "SELECT count(DISTINCT user_id) FROM user_logins"), 2000);
    finish_exactly_once(&mut c, &url, 2000);
}

#[test]
fn a_frozen_standby_defers_after_the_wait_and_a_disconnecting_one_at_once() {
    let h = harness();
    let (primary, mut c) = cluster(
        "durable_frozen_primary",
        "sqs_ingest.worker_count = 0\nsqs_ingest.standby_wait_timeout = 500\nsqs_ingest.post_commit_timeout = 60000",
    );
    let url = h.fresh_queue(&mut c, &queue_name("frozen"), 5);
    let standby = PrivateCluster::standby_of(&primary, "durable_frozen_standby", Some("standby1"), "");
    caught_up(&mut c, &standby);

    // 1. Connected but never confirming (its WAL receiver stopped): deferred when standby_wait_timeout passes.
    let receiver = Stopped::new(wal_receiver_pid(&standby));
    h.send(&mut c, &url, &logins(200));
    let r = ingest(&mut c, &url);
    assert_eq!(r.inserted, 200);
    let (visible, in_flight) = depth(&mut c, &url);
    assert_eq!(visible + in_flight, 200, "not deleted");
    eventually("the deferral is in the stats", Duration::from_secs(30), || deferred(&mut c) == (200, true));

    // 2. Disconnecting mid-wait (the standby goes down; its slot stays): deferred at once, long before a 60 s
    // standby_wait_timeout. (A sender blocked on a frozen peer does not end on pg_terminate_backend: the standby
    // itself goes away.)
    c.batch_execute("ALTER SYSTEM SET sqs_ingest.standby_wait_timeout = 60000").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    let url2 = h.fresh_queue(&mut c, &queue_name("disconnecting"), 5);
    h.send(&mut c, &url2, &logins(100));
    let host = (primary.dir.clone(), primary.port, url2.clone());
    let call = std::thread::spawn(move || {
        let mut c = session(&host.0, host.1);
        c.batch_execute("SET sqs_ingest.target_table = 'user_logins_2'").unwrap();
        c.query_one("SELECT inserted FROM sqs_ingest($1)", &[&host.2]).unwrap().get::<_, i64>(0)
    });
    // The table the call creates is visible once its transaction committed: its deletes are then waiting.
    eventually("the call waits for the standby", Duration::from_secs(30), || {
        count(&mut c, "SELECT count(*) FROM pg_class WHERE relname = 'user_logins_2'") == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!call.is_finished(), "the call waits while a connected standby may still confirm");
    signal(receiver.0, "-KILL");
    assert!(standby.stop("immediate", 60));
    eventually("the call returns well before its 60 s wait", Duration::from_secs(20), || call.is_finished());
    assert_eq!(call.join().unwrap(), 100);
    eventually("both deferrals are in the stats", Duration::from_secs(30), || deferred(&mut c) == (300, true));

    // 3. The standby comes back and confirms: nothing is unconfirmed any more, and the deferred messages come
    // back as duplicates and are deleted, each stored once.
    drop(receiver);
    standby.start_again();
    eventually("the standby confirmed the deferred commits", Duration::from_secs(60), || {
        deferred(&mut c) == (300, false)
    });
    finish_exactly_once(&mut c, &url, 200);
    c.batch_execute("SET sqs_ingest.target_table = 'user_logins_2'").unwrap();
    eventually("the second queue empties", Duration::from_secs(60), || {
        ingest(&mut c, &url2);
        depth(&mut c, &url2) == (0, 0)
    });
    assert_eq!(count(&mut c, "SELECT count(DISTINCT user_id) FROM user_logins_2"), 100);
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins_2"), 100);
}

#[test]
fn workers_and_the_drain_finish_the_queue_exactly_once_across_a_promotion() {
    let h = harness();
    // The queue exists before the clusters: their static workers name it in their configuration.
    let name = queue_name("promotion-worker");
    sqs_call(&h.endpoint, "CreateQueue", serde_json::json!({"QueueName": name}));
    let url = format!("{}/000000000000/{name}", h.endpoint.trim_end_matches('/'));
    let workers = format!(
        "sqs_ingest.worker_enabled = on\nsqs_ingest.worker_count = 1\nsqs_ingest.worker_queue_urls = '{url}'\nsqs_ingest.worker_database = 'd'\n\
         sqs_ingest.worker_role = 'postgres'\nsqs_ingest.worker_wait_time = 1\nsqs_ingest.worker_restart_delay = 1\n\
         sqs_ingest.worker_batch_messages = 100\nsqs_ingest.standby_wait_timeout = 500"
    );
    let (primary, mut c) = cluster("durable_promotion_primary", &workers);
    let standby = PrivateCluster::standby_of(&primary, "durable_promotion_standby", Some("standby1"), "");
    caught_up(&mut c, &standby);

    // The static worker on the primary ingests; the drain procedure ingests another queue into another table.
    let drained = h.fresh_queue(&mut c, &queue_name("promotion-drain"), 5);
    h.send(&mut c, &drained, &logins(3000));
    h.send(&mut c, &url, &logins(3000));
    let host = (primary.dir.clone(), primary.port, drained.clone());
    let drain = std::thread::spawn(move || {
        let mut c = session(&host.0, host.1);
        c.batch_execute("SET sqs_ingest.target_table = 'drained'").unwrap();
        // Ends with an error when the primary crashes under it.
        let _ = c.execute("CALL sqs_ingest_drain($1, batch_messages => 100)", &[&host.2]);
    });
    eventually("both are under way", Duration::from_secs(60), || {
        count(&mut c, "SELECT count(*) FROM user_logins") >= 300
            && count(&mut c, "SELECT count(*) FROM pg_class WHERE relname = 'drained'") == 1
            && count(&mut c, "SELECT count(*) FROM drained") >= 300
    });
    // The standby stops receiving (its WAL receiver frozen, its slot held): from now on the primary's commits are
    // not on the standby, so their deletes are deferred, and the promoted standby must ingest them again.
    let frozen = Stopped::new(wal_receiver_pid(&standby));
    let before = count(&mut c, "SELECT count(*) FROM drained");
    eventually("more drain batches committed after the freeze", Duration::from_secs(60), || {
        count(&mut c, "SELECT count(*) FROM drained") >= before + 200
    });
    eventually("their deletes were deferred", Duration::from_secs(30), || deferred(&mut c).0 > 0);
    // Only the drain procedure writes `drained` (the worker writes user_logins), and only the test runs it.
    let on_primary = count(&mut c, "SELECT count(*) FROM drained");
    // The receiver is killed, not thawed: WAL still queued towards it never reaches the standby.
    signal(frozen.0, "-KILL");
    assert!(primary.stop("immediate", 60));
    drop(frozen);
    drain.join().unwrap();
    standby.promote();
    let mut check = standby.connect("d", "postgres");
    let on_standby = count(&mut check, "SELECT count(*) FROM drained");
    assert!(on_standby < on_primary, "the standby misses the last commits ({on_standby} of {on_primary} rows)");

    // The new primary's static worker starts once recovery has finished, and finishes the first queue.
    let mut c = standby.connect("d", "postgres");
    eventually("the new primary's worker finished the queue", Duration::from_secs(120), || {
        count(&mut c, "SELECT count(*) FROM user_logins") == 3000 && depth(&mut c, &url) == (0, 0)
    });
    assert_eq!(count(&mut c, "SELECT count(DISTINCT user_id) FROM user_logins"), 3000);
    // The drain, called again on the new primary, finishes the second.
    c.batch_execute("SET sqs_ingest.target_table = 'drained'").unwrap();
    eventually("the drain finished the queue", Duration::from_secs(90), || {
        c.execute("CALL sqs_ingest_drain($1, batch_messages => 100)", &[&drained]).unwrap();
        count(&mut c, "SELECT count(*) FROM drained") == 3000 && depth(&mut c, &drained) == (0, 0)
    });
    assert_eq!(count(&mut c, "SELECT count(DISTINCT user_id) FROM drained"), 3000);
    assert_eq!(count(&mut c, "SELECT count(*) FROM drained"), 3000);
}

#[test]
fn the_standbys_that_count_are_the_ones_that_can_be_promoted() {
    // confirmed_lsn() is the position every commit up to which may have its messages deleted. Each case commits a
    // row (synchronous_commit on: flushed locally) and asks whether that commit is confirmed.
    let (primary, mut c) = cluster("durable_which", "sqs_ingest.worker_count = 0");
    c.batch_execute("CREATE TABLE wal (i int)").unwrap();
    let commit = |c: &mut Client| -> String {
        c.batch_execute("INSERT INTO wal VALUES (1)").unwrap();
        c.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0)
    };
    let confirmed_past = |c: &mut Client, lsn: &str| -> bool {
        c.query_one("SELECT sqs_ingest.confirmed_lsn() >= $1::text::pg_lsn", &[&lsn]).unwrap().get(0)
    };
    let confirmed =
        |c: &mut Client| -> String { c.query_one("SELECT sqs_ingest.confirmed_lsn()::text", &[]).unwrap().get(0) };
    // No standby: the local flush.
    let lsn = commit(&mut c);
    assert!(confirmed_past(&mut c, &lsn));
    // A slot never reserved (no standby ever streamed from it) is no standby.
    c.batch_execute("SELECT pg_create_physical_replication_slot('never_used')").unwrap();
    let lsn = commit(&mut c);
    assert!(confirmed_past(&mut c, &lsn));
    // A slot holding WAL with no one streaming from it is a standby that is down: it holds confirmation back.
    c.batch_execute("SELECT pg_create_physical_replication_slot('archiver', true)").unwrap();
    let held: String = c
        .query_one("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'archiver'", &[])
        .unwrap()
        .get(0);
    let lsn = commit(&mut c);
    assert!(!confirmed_past(&mut c, &lsn));
    assert_eq!(confirmed(&mut c), held);
    // sqs_ingest.standby_slots names the slots that count; a named slot that does not exist holds everything back
    // (a typo never turns the protection off); `local` ignores them all.
    c.batch_execute("SET sqs_ingest.standby_slots = 'archiver'").unwrap();
    assert_eq!(confirmed(&mut c), held);
    c.batch_execute("SELECT pg_create_physical_replication_slot('other', true)").unwrap();
    c.batch_execute("SET sqs_ingest.standby_slots = 'other'").unwrap();
    let other: String = c
        .query_one("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'other'", &[])
        .unwrap()
        .get(0);
    assert_eq!(confirmed(&mut c), other, "archiver, not named, does not count");
    c.batch_execute("SELECT pg_drop_replication_slot('other')").unwrap();
    c.batch_execute("SET sqs_ingest.standby_slots = 'no_such_slot'").unwrap();
    assert_eq!(confirmed(&mut c), "0/0");
    c.batch_execute("RESET sqs_ingest.standby_slots").unwrap();
    c.batch_execute("SET sqs_ingest.delete_after = local").unwrap();
    let lsn = commit(&mut c);
    assert!(confirmed_past(&mut c, &lsn));
    c.batch_execute("RESET sqs_ingest.delete_after").unwrap();
    // An operator cannot lower the bar.
    c.batch_execute("CREATE ROLE durable_operator LOGIN; GRANT sqs_ingest_operator TO durable_operator").unwrap();
    let mut op = primary.connect("d", "durable_operator");
    for setting in
        ["sqs_ingest.delete_after = local", "sqs_ingest.standby_slots = 'x'", "sqs_ingest.standby_wait_timeout = 0"]
    {
        let e = op.batch_execute(&format!("SET {setting}")).unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "{setting}: {e}");
    }
    c.batch_execute("SELECT pg_drop_replication_slot('archiver')").unwrap();
    let lsn = commit(&mut c);
    assert!(confirmed_past(&mut c, &lsn));

    // A standby streaming through a temporary slot (wal_receiver_create_temp_slot) counts while it streams.
    let standby =
        PrivateCluster::standby_of(&primary, "durable_which_standby", None, "wal_receiver_create_temp_slot = on");
    caught_up(&mut c, &standby);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pg_replication_slots WHERE temporary AND slot_name LIKE 'pg_walreceiver_%'"
        ),
        1
    );
    let lsn = commit(&mut c);
    eventually("the streaming standby confirms a commit", Duration::from_secs(30), || confirmed_past(&mut c, &lsn));
    let frozen = Stopped::new(wal_receiver_pid(&standby));
    let lsn = commit(&mut c);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!confirmed_past(&mut c, &lsn), "the frozen standby holds confirmation back");
    // any_standby: one standby that has it is enough; the only one is frozen.
    c.batch_execute("SET sqs_ingest.delete_after = any_standby").unwrap();
    assert!(!confirmed_past(&mut c, &lsn));
    c.batch_execute("RESET sqs_ingest.delete_after").unwrap();
    drop(frozen);
    eventually("the thawed standby confirms", Duration::from_secs(30), || confirmed_past(&mut c, &lsn));
    // On a standby the position is unknown.
    let on_standby: Option<String> =
        standby.connect("d", "postgres").query_one("SELECT sqs_ingest.confirmed_lsn()::text", &[]).unwrap().get(0);
    assert_eq!(on_standby, None);
}

#[test]
fn a_standby_known_only_while_connected_that_leaves_mid_wait_defers_the_commit() {
    // A standby on a temporary slot is forgotten when it goes: a commit waiting for it must not then pass as if
    // there were no standby at all.
    let h = harness();
    let (primary, mut c) = cluster(
        "durable_vanish_primary",
        "sqs_ingest.worker_count = 0\nsqs_ingest.standby_wait_timeout = 60000\nsqs_ingest.post_commit_timeout = 90000",
    );
    let url = h.fresh_queue(&mut c, &queue_name("vanish"), 5);
    let standby =
        PrivateCluster::standby_of(&primary, "durable_vanish_standby", None, "wal_receiver_create_temp_slot = on");
    caught_up(&mut c, &standby);
    let receiver = Stopped::new(wal_receiver_pid(&standby));
    h.send(&mut c, &url, &logins(100));
    let host = (primary.dir.clone(), primary.port, url.clone());
    let call = std::thread::spawn(move || {
        let mut c = session(&host.0, host.1);
        c.query_one("SELECT inserted FROM sqs_ingest($1)", &[&host.2]).unwrap().get::<_, i64>(0)
    });
    eventually("the call's commit waits for the standby", Duration::from_secs(30), || {
        count(&mut c, "SELECT count(*) FROM user_logins") == 100
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!call.is_finished(), "the call waits while the standby is connected");
    signal(receiver.0, "-KILL");
    assert!(standby.stop("immediate", 60));
    eventually("the call returns well before its 60 s wait", Duration::from_secs(20), || call.is_finished());
    assert_eq!(call.join().unwrap(), 100);
    let (visible, in_flight) = depth(&mut c, &url);
    assert_eq!(visible + in_flight, 100, "deferred, not deleted");
    eventually("the deferral is in the stats", Duration::from_secs(30), || deferred(&mut c).0 == 100);
}
