//! pg_cron (Debian's postgresql-15-cron, preloaded by scripts/test.sh) schedules sqs_ingest() end to end.
//! In its own test binary: the worker scenarios restart the server, which would cut this test's connections.

use sqs_ingest_e2e::*;
use std::time::Duration;

#[test]
fn pg_cron_schedules_ingest() {
    if !server_has("pg_cron") {
        eprintln!("SKIPPED pg_cron_schedules_ingest: pg_cron is not packaged for Postgres {}", server_major());
        return;
    }
    let h = harness();
    let mut c = h.fresh_db("e2e_cron");
    let url = h.fresh_queue(&mut c, "e2e-cron", 30);
    let mut postgres_db = h.connect("postgres");
    postgres_db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_cron").unwrap();
    postgres_db
        .execute(
            "SELECT cron.schedule_in_database('e2e-ingest', '* * * * *', format('SELECT * FROM sqs_ingest(%L)', $1::text), 'e2e_cron')",
            &[&url],
        )
        .unwrap();
    h.send(&mut c, &url, &(0..40).map(login).collect::<Vec<_>>());
    // A pipeline by name, on the same tick.
    let events_url = h.fresh_queue(&mut c, "e2e-cron-events", 30);
    c.batch_execute("CREATE TABLE cron_events (id int, kind text)").unwrap();
    c.execute(
        "SELECT sqs_ingest.pipeline_create('cron-events', $1, 'cron_events', '{\"id\": \"$.id\", \"kind\": \"$.kind\"}')",
        &[&events_url],
    )
    .unwrap();
    postgres_db
        .batch_execute(
            "SELECT cron.schedule_in_database('e2e-events', '* * * * *', 'SELECT * FROM sqs_ingest(''cron-events'')', 'e2e_cron')",
        )
        .unwrap();
    let events: Vec<String> = (0..15).map(|i| format!(r#"{{"id": {i}, "kind": "k{i}"}}"#)).collect();
    h.send(&mut c, &events_url, &events);
    // Debian 12's pg_cron is 1.4: minute granularity (the seconds syntax needs 1.5), so wait for a minute tick.
    eventually("pg_cron ingested the queue", Duration::from_secs(150), || {
        count(&mut c, "SELECT count(*) FROM pg_class WHERE relname = 'user_logins'") == 1
            && count(&mut c, "SELECT count(*) FROM user_logins") == 40
    });
    // pg_cron marks a run succeeded after its transaction committed, a moment after the rows are visible.
    eventually("pg_cron recorded the run as succeeded", Duration::from_secs(20), || {
        count(
            &mut postgres_db,
            "SELECT count(*) FROM cron.job_run_details d JOIN cron.job j USING (jobid) WHERE j.jobname = 'e2e-ingest' AND d.status = 'succeeded'",
        ) >= 1
    });
    eventually("pg_cron ran the pipeline", Duration::from_secs(90), || {
        count(&mut c, "SELECT count(*) FROM cron_events") == 15
    });
    postgres_db.batch_execute("SELECT cron.unschedule('e2e-events')").unwrap();
    postgres_db.batch_execute("SELECT cron.unschedule('e2e-ingest')").unwrap();
    eventually("queue empty", Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));
}
