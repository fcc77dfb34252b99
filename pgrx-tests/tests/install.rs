//! Installing a new build on a running server (issue "production platform", point 4): `scripts/install.sh` writes
//! every file beside its destination and renames it into place, so a cluster that has the library loaded — with a
//! background worker ingesting — keeps running, and new backends load the new file. In its own test binary: it
//! replaces the library the shared cluster runs.

use sqs_ingest_e2e::*;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

#[test]
fn installing_on_a_running_cluster_keeps_it_running_and_ingesting() {
    let h = harness();
    let mut c = h.fresh_db("e2e_install");
    create_user_logins(&mut c);
    let url = h.fresh_queue(&mut c, "e2e-install", 30);
    let id: i32 = c.query_one("SELECT sqs_ingest.worker_start($1)", &[&url]).unwrap().get(0);
    h.send(&mut c, &url, &(0..20).map(login).collect::<Vec<_>>());
    eventually("the worker stored the first messages", Duration::from_secs(30), || {
        count(&mut c, "SELECT count(*) FROM user_logins") == 20
    });
    let postmaster_start: String = c.query_one("SELECT pg_postmaster_start_time()::text", &[]).unwrap().get(0);
    let worker_pid = |c: &mut postgres::Client| -> Option<i32> {
        c.query_one(
            "SELECT max(pid) FROM pg_stat_activity WHERE backend_type = 'sqs_ingest worker'
                AND application_name = $1 AND datname = current_database()",
            &[&format!("dynamic worker {id}")],
        )
        .unwrap()
        .get(0)
    };
    let pid_before = worker_pid(&mut c).expect("the worker runs");
    // The installation the shared cluster runs (scripts/test.sh passes its pg_config).
    let pg_config = std::env::var("SQS_INGEST_PG_CONFIG").unwrap_or_else(|_| "/usr/bin/pg_config".into());
    let out = std::process::Command::new(&pg_config).arg("--pkglibdir").output().unwrap();
    let libdir = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let lib = format!("{libdir}/sqs_ingest.so");
    let inode_before = std::fs::metadata(&lib).unwrap().ino();

    let repo = std::env::var("SQS_INGEST_REPO").expect("SQS_INGEST_REPO");
    let out = std::process::Command::new("bash")
        .arg(format!("{repo}/scripts/install.sh"))
        .args(["--pg-config", &pg_config, "--no-build"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Replaced by a rename: a new inode, no temporary file left, and nothing that had the old one mapped noticed.
    assert_ne!(std::fs::metadata(&lib).unwrap().ino(), inode_before, "installed by rename, not rewritten in place");
    let leftovers = std::fs::read_dir(&libdir)
        .unwrap()
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().contains(".new.")))
        .count();
    assert_eq!(leftovers, 0);
    let mut fresh = h.connect("e2e_install");
    let still: String = fresh.query_one("SELECT pg_postmaster_start_time()::text", &[]).unwrap().get(0);
    assert_eq!(still, postmaster_start, "the cluster did not restart (no backend crashed)");
    assert_eq!(worker_pid(&mut fresh), Some(pid_before), "the worker kept running on the library it loaded");
    h.send(&mut fresh, &url, &(20..40).map(login).collect::<Vec<_>>());
    eventually("the worker went on ingesting", Duration::from_secs(30), || {
        count(&mut fresh, "SELECT count(*) FROM user_logins") == 40
    });
    // A new backend loads the new file and ingests with it.
    let other = h.fresh_queue(&mut fresh, "e2e-install-new-backend", 30);
    h.send(&mut fresh, &other, &(40..45).map(login).collect::<Vec<_>>());
    assert_eq!(ingest(&mut fresh, &other).inserted, 5);
    let stopped: i64 = fresh.query_one("SELECT sqs_ingest.worker_stop($1)", &[&url]).unwrap().get(0);
    assert_eq!(stopped, 1);
}
