//! Ingest from a live LocalStack queue into a live Postgres, through the extension's own SQS client.

use sqs_ingest_e2e::*;
use std::collections::HashSet;
use std::time::Duration;

#[test]
fn send_receive_delete_round_trip_through_the_extension() {
    let h = harness();
    let mut c = h.fresh_db("e2e_round_trip");
    let url = h.fresh_queue(&mut c, "e2e-round-trip", 30);
    let bodies: Vec<String> = (0..25).map(login).collect();
    h.send(&mut c, &url, &bodies);
    eventually("25 visible messages", Duration::from_secs(5), || depth(&mut c, &url) == (25, 0));

    let counts = ingest(&mut c, &url);
    assert_eq!(counts, Counts { received: 25, inserted: 25, duplicates: 0, dead_lettered: 0, deleted: 25 });
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 25);
    eventually("queue empty after commit", Duration::from_secs(5), || depth(&mut c, &url) == (0, 0));
    let (deleted, failed): (i64, i64) = {
        let r = c.query_one("SELECT deleted, failed FROM sqs_ingest.last_commit_deletes()", &[]).unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((deleted, failed), (25, 0));
    // A second call finds nothing.
    assert_eq!(ingest(&mut c, &url).received, 0);
}

#[test]
fn the_real_100_messages() {
    let Some(real) = real_messages() else {
        eprintln!(
            "SKIPPED the_real_100_messages: ../shared/data/fetch_login_queue.jsonl is not present on this machine"
        );
        return;
    };
    assert_eq!(real.len(), 100);
    let h = harness();
    let mut c = h.fresh_db("e2e_real_data");
    let url = h.fresh_queue(&mut c, "e2e-real-data", 30);
    h.send(&mut c, &url, &real);

    let counts = ingest(&mut c, &url);
    assert_eq!(counts.received, 100);
    assert_eq!(counts.inserted, 99);
    assert_eq!(counts.dead_lettered, 1);
    assert_eq!(counts.duplicates, 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 99);
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins WHERE locale IS NULL"), 29);
    eventually("queue empty after commit", Duration::from_secs(5), || depth(&mut c, &url) == (0, 0));

    let dl = c.query_one("SELECT reason_code, reason FROM sqs_ingest.dead_letters", &[]).unwrap();
    assert_eq!(dl.get::<_, String>(0), "missing_field");
    assert!(dl.get::<_, String>(1).contains("user_id"));

    // Every stored row matches its source message, field by field, with ip/device_id masked reversibly.
    let mut expected = HashSet::new();
    for body in &real {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        if v.get("user_id").is_none() {
            continue;
        }
        let version = v["app_version"].as_str().unwrap();
        let parts: Vec<i32> = version.split('.').map(|p| p.parse().unwrap()).collect();
        let packed = parts[0] * 10000 + parts[1] * 100 + parts.get(2).copied().unwrap_or(0);
        expected.insert((
            v["user_id"].as_str().unwrap().to_string(),
            v["device_type"].as_str().unwrap().to_string(),
            v["ip"].as_str().unwrap().to_string(),
            v["device_id"].as_str().unwrap().to_string(),
            v["locale"].as_str().map(str::to_string),
            packed,
        ));
    }
    let rows = c
        .query(
            "SELECT user_id, device_type, sqs_ingest.unmask(masked_ip), sqs_ingest.unmask(masked_device_id), locale,
                    app_version, masked_ip, create_date = (now() AT TIME ZONE 'UTC')::date
               FROM user_logins",
            &[],
        )
        .unwrap();
    let mut actual = HashSet::new();
    for r in &rows {
        let token: String = r.get(6);
        assert!(token.starts_with("enc:"), "{token}");
        assert!(token.len() <= 256);
        assert!(r.get::<_, bool>(7), "create_date is the UTC date of SentTimestamp (sent just now)");
        actual.insert((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)));
    }
    assert_eq!(actual, expected);
    // Clear values never reach the table.
    let leaked = count(
        &mut c,
        "SELECT count(*) FROM user_logins WHERE masked_ip ~ '^[0-9.]+$' OR masked_device_id ~ '^[0-9-]+$'",
    );
    assert_eq!(leaked, 0);
}

#[test]
fn equal_values_give_equal_tokens_and_versions_pack() {
    let h = harness();
    let mut c = h.fresh_db("e2e_determinism");
    let url = h.fresh_queue(&mut c, "e2e-determinism", 30);
    let same = |v: &str| {
        serde_json::json!({"user_id": "u", "app_version": v, "device_type": "ios", "ip": "1.2.3.4",
                           "locale": null, "device_id": "111-22-3333"})
        .to_string()
    };
    h.send(&mut c, &url, &[same("2.3.0"), same("0.96"), same("1.4")]);
    assert_eq!(ingest(&mut c, &url).inserted, 3);
    assert_eq!(count(&mut c, "SELECT count(DISTINCT masked_ip) FROM user_logins"), 1);
    assert_eq!(count(&mut c, "SELECT count(DISTINCT masked_device_id) FROM user_logins"), 1);
    let versions: Vec<(i32, String)> = c
        .query("SELECT app_version, sqs_ingest.app_version_text(app_version) FROM user_logins ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(versions, vec![(9600, "0.96.0".into()), (10400, "1.4.0".into()), (20300, "2.3.0".into())]);
    // The SQL mask() gives the same token ingest stored.
    let same_token = count(&mut c, "SELECT count(*) FROM user_logins WHERE masked_ip = sqs_ingest.mask('1.2.3.4')");
    assert_eq!(same_token, 3);
}

#[test]
fn text_app_version_column_stores_the_version_verbatim() {
    let h = harness();
    let mut c = h.fresh_db("e2e_text_version");
    c.batch_execute(
        "CREATE TABLE user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
           masked_device_id varchar(256), locale varchar(32), app_version text, create_date date)",
    )
    .unwrap();
    let url = h.fresh_queue(&mut c, "e2e-text-version", 30);
    h.send(&mut c, &url, &[login(7)]);
    assert_eq!(ingest(&mut c, &url).inserted, 1);
    let v: String = c.query_one("SELECT app_version FROM user_logins", &[]).unwrap().get(0);
    assert_eq!(v, "7.7.0");
}

#[test]
fn drop_extension_keeps_ingested_data() {
    let h = harness();
    let mut c = h.fresh_db("e2e_drop_keeps");
    let url = h.fresh_queue(&mut c, "e2e-drop-keeps", 30);
    h.send(&mut c, &url, &[login(1), login(2)]);
    assert_eq!(ingest(&mut c, &url).inserted, 2);
    c.batch_execute("DROP EXTENSION sqs_ingest").unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 2);
}

#[test]
fn stats_view_counts_per_queue() {
    let h = harness();
    let mut c = h.fresh_db("e2e_stats");
    let url = h.fresh_queue(&mut c, "e2e-stats", 30);
    let mut bodies: Vec<String> = (0..12).map(login).collect();
    bodies.push("not json".into());
    h.send(&mut c, &url, &bodies);
    ingest(&mut c, &url);
    let r = c
        .query_one(
            "SELECT received, inserted, duplicates, dead_lettered, deleted, last_success_at IS NOT NULL, last_error
               FROM sqs_ingest.stats WHERE queue_url = $1",
            &[&url],
        )
        .unwrap();
    assert_eq!(
        (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2), r.get::<_, i64>(3), r.get::<_, i64>(4)),
        (13, 12, 0, 1, 13)
    );
    assert!(r.get::<_, bool>(5));
    assert_eq!(r.get::<_, Option<String>>(6), None);

    // approximate_depth is what is left after the call: 0 after a drain, the remainder after a partial run.
    let depth = |c: &mut postgres::Client| -> Option<i64> {
        c.query_one("SELECT approximate_depth FROM sqs_ingest.stats WHERE queue_url = $1", &[&url]).unwrap().get(0)
    };
    assert_eq!(depth(&mut c), Some(0));
    h.send(&mut c, &url, &(100..130).map(login).collect::<Vec<_>>());
    let got: i64 = c.query_one("SELECT received FROM sqs_ingest($1, 10)", &[&url]).unwrap().get(0);
    assert_eq!(got, 10);
    assert_eq!(depth(&mut c), Some(20));
    ingest(&mut c, &url);
    assert_eq!(depth(&mut c), Some(0));

    // A failed call rolls back, but its (scrubbed) error reaches the stats with the session's next call.
    let bad = format!("{}/000000000000/e2e-no-such-queue", h.endpoint);
    assert!(c.query("SELECT * FROM sqs_ingest($1)", &[&bad]).is_err());
    c.query("SELECT * FROM sqs_ingest($1)", &[&url]).unwrap();
    let err: Option<String> =
        c.query_one("SELECT last_error FROM sqs_ingest.stats WHERE queue_url = $1", &[&bad]).unwrap().get(0);
    assert!(err.as_deref().is_some_and(|e| e.contains("42704")), "{err:?}");
}

#[test]
fn long_runs_report_progress_at_the_configured_rate() {
    let h = harness();
    h.fresh_db("e2e_progress");
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = notices.clone();
    let mut c = postgres::Config::new()
        .host_path(&h.host)
        .port(h.port)
        .user("postgres")
        .dbname("e2e_progress")
        .notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()))
        .connect(postgres::NoTls)
        .unwrap();
    let url = h.fresh_queue(&mut c, "e2e-progress", 30);
    h.send(&mut c, &url, &(0..8000).map(login).collect::<Vec<_>>());
    c.batch_execute("SET sqs_ingest.progress_interval = 1").unwrap();
    let started = std::time::Instant::now();
    let r = c.query_one("SELECT inserted, elapsed_ms FROM sqs_ingest($1)", &[&url]).unwrap();
    assert_eq!(r.get::<_, i64>(0), 8000);
    let in_function_s = r.get::<_, f64>(1) / 1000.0;
    let secs = started.elapsed().as_secs_f64();
    let progress: Vec<String> = notices.lock().unwrap().iter().filter(|n| n.contains("received")).cloned().collect();
    assert!(!progress.is_empty() || in_function_s < 1.5, "no progress NOTICE in {in_function_s:.1} s");
    assert!(progress.len() as f64 <= secs + 1.0, "{} NOTICEs in {secs:.1} s: more than one a second", progress.len());
    c.batch_execute("SET sqs_ingest.progress_interval = 0").unwrap();
    notices.lock().unwrap().clear();
    h.send(&mut c, &url, &(0..500).map(login).collect::<Vec<_>>());
    ingest(&mut c, &url);
    assert!(notices.lock().unwrap().iter().all(|n| !n.contains("received")), "progress_interval = 0 silences them");
}

/// The URL LocalStack itself returns (its path strategy: /queue/<region>/<account>/<name>) is accepted.
#[test]
fn localstacks_own_queue_url_form_is_accepted() {
    let h = harness();
    let mut c = h.fresh_db("e2e_path_form");
    let url = h.fresh_queue(&mut c, "e2e-path-form", 30);
    let returned: String = c.query_one("SELECT sqs_ingest.queue_create($1)", &[&url]).unwrap().get(0);
    assert!(returned.contains("/queue/us-east-1/000000000000/e2e-path-form"), "{returned}");
    h.send(&mut c, &returned, &[login(1), login(2), login(3)]);
    assert_eq!(ingest(&mut c, &returned).inserted, 3);
    eventually("queue empty", std::time::Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));
}
