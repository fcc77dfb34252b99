//! Prometheus metrics end to end: Debian's prometheus-postgres-exporter, started here with the shipped query file
//! (`prometheus/sqs_ingest_queries.yaml`) and connected as a role granted only `sqs_ingest_monitor`, scraped with
//! curl after ingesting; every number is compared with `sqs_ingest.stats`, and no label or value carries PII.

use sqs_ingest_e2e::*;
use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::time::Duration;

struct Exporter(Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn parse(exposition: &str) -> Vec<Sample> {
    exposition
        .lines()
        .filter(|l| l.starts_with("sqs_ingest_"))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once("=\"").unwrap();
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            (name.to_string(), labels, value.parse().unwrap_or(f64::NAN))
        })
        .collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0]
}

#[test]
fn the_exporter_serves_the_stats_numbers_without_pii() {
    let h = harness();
    let mut c = h.fresh_db("e2e_metrics");
    h.login_role(&mut c, "e2e_metrics_operator", &["sqs_ingest_operator"]);
    h.login_role(&mut c, "e2e_metrics_unmasker", &["sqs_ingest_unmasker"]);
    h.login_role(&mut c, "e2e_metrics_monitor", &["sqs_ingest_monitor"]);
    c.batch_execute("GRANT CREATE ON SCHEMA public TO e2e_metrics_operator").unwrap();
    let url = h.fresh_queue(&mut c, "e2e-metrics", 30);
    let bodies: Vec<String> = vec![login(1), login(2), login(3), "{\"user_id\": ".to_string()];
    h.send(&mut c, &url, &bodies);
    let mut op = h.connect_as("e2e_metrics", "e2e_metrics_operator");
    assert_eq!(ingest(&mut op, &url).inserted, 3);
    h.send(&mut c, &url, &[login(4)]);
    assert_eq!(ingest(&mut op, &url).inserted, 1);
    op.batch_execute("SELECT sqs_ingest.flush_stats(); GRANT SELECT ON public.user_logins TO e2e_metrics_unmasker")
        .unwrap();
    let mut um = h.connect_as("e2e_metrics", "e2e_metrics_unmasker");
    let token: String = um.query_one("SELECT masked_ip FROM public.user_logins LIMIT 1", &[]).unwrap().get(0);
    um.query_one("SELECT sqs_ingest.unmask($1)", &[&token]).unwrap();
    assert!(um.query_one("SELECT sqs_ingest.unmask('enc:1:AAAA')", &[]).is_err());
    // A refused call is audited after its transaction aborts, by a short-lived worker.
    eventually("both unmask calls audited", Duration::from_secs(20), || {
        count(&mut c, "SELECT count(*) FROM sqs_ingest.unmask_audit") == 2
    });

    // The monitor role reads the metrics views and nothing else.
    let mut monitor = h.connect_as("e2e_metrics", "e2e_metrics_monitor");
    for table in ["sqs_ingest.stats", "sqs_ingest.keys", "sqs_ingest.unmask_audit", "sqs_ingest.ledger"] {
        let e = monitor.query(&format!("SELECT * FROM {table}"), &[]).unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "{table}: {e:?}");
    }

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let queries = format!("{}/prometheus/sqs_ingest_queries.yaml", std::env::var("SQS_INGEST_REPO").unwrap());
    let _exporter = Exporter(
        Command::new("prometheus-postgres-exporter")
            .args([
                format!("--web.listen-address=127.0.0.1:{port}"),
                format!("--extend.query-path={queries}"),
                "--disable-default-metrics".into(),
                "--disable-settings-metrics".into(),
            ])
            .env(
                "DATA_SOURCE_NAME",
                format!("host={} port={} user=e2e_metrics_monitor dbname=e2e_metrics sslmode=disable", h.host, h.port),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus-postgres-exporter (make setup installs it)"),
    );
    let mut exposition = String::new();
    eventually("the exporter serves sqs_ingest metrics", Duration::from_secs(30), || {
        let out = Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{port}/metrics")]).output().unwrap();
        exposition = String::from_utf8_lossy(&out.stdout).into_owned();
        exposition.contains("sqs_ingest_keys_stored")
    });
    let samples = parse(&exposition);

    let stats = c
        .query_one(
            "SELECT queue_arn, received, inserted, duplicates, dead_lettered, filtered, deleted, delete_failures,
                    batches, approximate_depth, extract(epoch FROM last_success_at)::float8
               FROM sqs_ingest.stats WHERE queue_url = $1",
            &[&url],
        )
        .unwrap();
    let arn: String = stats.get(0);
    let q = [("queue", arn.as_str()), ("pipeline", "")];
    let with = |outcome: &'static str| [q[0], q[1], ("outcome", outcome)];
    assert_eq!(value(&samples, "sqs_ingest_messages_total", &with("inserted")), stats.get::<_, i64>(2) as f64);
    assert_eq!(value(&samples, "sqs_ingest_messages_total", &with("inserted")), 4.0);
    assert_eq!(value(&samples, "sqs_ingest_messages_total", &with("duplicate")), stats.get::<_, i64>(3) as f64);
    assert_eq!(value(&samples, "sqs_ingest_messages_total", &with("dead_lettered")), stats.get::<_, i64>(4) as f64);
    assert_eq!(value(&samples, "sqs_ingest_messages_total", &with("dead_lettered")), 1.0);
    assert_eq!(value(&samples, "sqs_ingest_messages_total", &with("filtered")), stats.get::<_, i64>(5) as f64);
    assert_eq!(value(&samples, "sqs_ingest_queue_received_total", &q), stats.get::<_, i64>(1) as f64);
    assert_eq!(value(&samples, "sqs_ingest_queue_deleted_total", &q), stats.get::<_, i64>(6) as f64);
    assert_eq!(value(&samples, "sqs_ingest_queue_delete_failures_total", &q), stats.get::<_, i64>(7) as f64);
    assert_eq!(value(&samples, "sqs_ingest_queue_batches_total", &q), stats.get::<_, i64>(8) as f64);
    // No standby is attached: nothing deferred (tests/durability.rs defers with one and checks the stats).
    assert_eq!(value(&samples, "sqs_ingest_queue_deletes_deferred_total", &q), 0.0);
    assert_eq!(value(&samples, "sqs_ingest_queue_batches_total", &q), 2.0, "two calls received messages");
    assert!(value(&samples, "sqs_ingest_queue_batch_seconds_total", &q) > 0.0);
    assert_eq!(value(&samples, "sqs_ingest_queue_depth", &q), stats.get::<_, Option<i64>>(9).unwrap() as f64);
    let last_success = value(&samples, "sqs_ingest_queue_last_success_timestamp_seconds", &q);
    assert!((last_success - stats.get::<_, f64>(10)).abs() < 0.001, "{last_success}");
    let lag = value(&samples, "sqs_ingest_queue_lag_seconds", &q);
    assert!((0.0..600.0).contains(&lag), "lag {lag}");
    assert_eq!(value(&samples, "sqs_ingest_unmask_calls_total", &[("result", "succeeded")]), 1.0);
    assert_eq!(value(&samples, "sqs_ingest_unmask_calls_total", &[("result", "refused")]), 1.0);
    assert_eq!(value(&samples, "sqs_ingest_keys_stored", &[]), 1.0);
    assert_eq!(value(&samples, "sqs_ingest_keys_wrapped", &[]), 0.0);
    let age = value(&samples, "sqs_ingest_keys_active_age_seconds", &[]);
    assert!((0.0..600.0).contains(&age), "key age {age}");

    // No message content in any label or value: no user id, IP, device id or token.
    for i in 1..=4 {
        let sent: serde_json::Value = serde_json::from_str(&login(i)).unwrap();
        for field in ["user_id", "ip", "device_id"] {
            let clear = sent[field].as_str().unwrap();
            assert!(!exposition.contains(clear), "{field} of message {i} in the metrics");
        }
    }
    assert!(!exposition.contains(&token) && !exposition.contains("enc:"), "no token in the metrics");
}
