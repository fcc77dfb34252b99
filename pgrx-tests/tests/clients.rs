//! The hot path's two SQS clients (`sqs_ingest.sqs_client`): the built-in direct client (default) and the AWS
//! SDK. Both must receive, delete after commit, release on rollback and classify failures the same way.

use sqs_ingest_e2e::*;
use std::time::Duration;

const CLIENTS: [&str; 2] = ["direct", "sdk"];

#[test]
fn both_clients_ingest_delete_and_release_alike() {
    let h = harness();
    for client in CLIENTS {
        let mut c = h.fresh_db(&format!("e2e_client_{client}"));
        c.batch_execute(&format!("SET sqs_ingest.sqs_client = {client}")).unwrap();
        let url = h.fresh_queue(&mut c, &format!("e2e-client-{client}"), 30);
        let mut bodies: Vec<String> = (0..25).map(login).collect();
        bodies.push("{not json".into());
        h.send(&mut c, &url, &bodies);

        // Rolled back: nothing stored, and the messages are released at once (visibility set back to 0).
        c.batch_execute("BEGIN").unwrap();
        let rolled = ingest(&mut c, &url);
        assert_eq!(rolled.received, 26, "{client}");
        c.batch_execute("ROLLBACK").unwrap();
        eventually(&format!("{client}: messages released after ROLLBACK"), Duration::from_secs(10), || {
            depth(&mut c, &url) == (26, 0)
        });

        let done = ingest(&mut c, &url);
        assert_eq!(
            (done.received, done.inserted, done.dead_lettered, done.deleted, done.duplicates),
            (26, 25, 1, 26, 0),
            "{client}"
        );
        assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins"), 25, "{client}");
        assert_eq!(count(&mut c, "SELECT count(*) FROM sqs_ingest.dead_letters"), 1, "{client}");
        // SentTimestamp and the receive count made it through: dates are set, the dead letter saw 2 receives.
        assert_eq!(count(&mut c, "SELECT count(*) FROM user_logins WHERE create_date IS NULL"), 0, "{client}");
        assert_eq!(count(&mut c, "SELECT max(receive_count)::int8 FROM sqs_ingest.dead_letters"), 2, "{client}");
        eventually(&format!("{client}: queue empty after commit"), Duration::from_secs(10), || {
            depth(&mut c, &url) == (0, 0)
        });
    }
}

#[test]
fn both_clients_classify_failures_alike() {
    let h = harness();
    let mut c = h.fresh_db("e2e_client_errors");
    let legacy = FixedEndpoint::legacy_xml();
    let cases = [
        (format!("{}/000000000000/e2e-client-missing", h.endpoint), "42704", "does not exist"),
        ("http://127.0.0.1:1/000000000000/q".to_string(), "08001", "unreachable"),
        (format!("http://127.0.0.1:{}/000000000000/q", legacy.port), "0A000", "legacy"),
    ];
    for client in CLIENTS {
        c.batch_execute(&format!("SET sqs_ingest.sqs_client = {client}")).unwrap();
        for (url, state, words) in cases.iter() {
            let (state, words) = (*state, *words);
            // bench_raw_drain calls ReceiveMessage directly, without the SDK's pre-flight probe.
            let e = c.query("SELECT * FROM sqs_ingest.bench_raw_drain($1, 10)", &[url]).unwrap_err();
            let db = e.as_db_error().unwrap_or_else(|| panic!("{client} {url}: {e}"));
            assert_eq!(db.code().code(), state, "{client} {url}: {}", db.message());
            assert!(db.message().contains(words), "{client} {url}: {}", db.message());
            assert!(db.hint().is_some(), "{client} {url}");
        }
    }
}

#[test]
fn direct_client_sends_signed_json_protocol_requests() {
    let h = harness();
    let mut c = h.fresh_db("e2e_client_wire");
    c.batch_execute("SET sqs_ingest.receive_concurrency = 1").unwrap();
    let endpoint = FixedEndpoint::start("200 OK", "application/x-amz-json-1.0", "{}");
    let url = format!("http://127.0.0.1:{}/000000000000/wire", endpoint.port);
    for client in CLIENTS {
        c.batch_execute(&format!("SET sqs_ingest.sqs_client = {client}")).unwrap();
        let r = c.query_one("SELECT received FROM sqs_ingest.bench_raw_drain($1, 10)", &[&url]).unwrap();
        assert_eq!(r.get::<_, i64>(0), 0, "{client}");
    }
    let requests = endpoint.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "one ReceiveMessage per client: {requests:?}");
    let header = |r: &Vec<String>, name: &str| {
        r.iter().find_map(|l| l.strip_prefix(&format!("{name}:")).map(|v| v.trim().to_string()))
    };
    for (r, client) in requests.iter().zip(CLIENTS) {
        assert!(r[0].starts_with("POST / HTTP/1.1"), "{client}: {}", r[0]);
        assert_eq!(header(r, "x-amz-target").as_deref(), Some("AmazonSQS.ReceiveMessage"), "{client}");
        assert_eq!(header(r, "content-type").as_deref(), Some("application/x-amz-json-1.0"), "{client}");
        assert!(header(r, "x-amz-date").is_some(), "{client}");
        let auth = header(r, "authorization").unwrap_or_default();
        // Same scheme and scope as the SDK: LocalStack's placeholder key, the region GUC, service sqs.
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=test/"), "{client}: {auth}");
        assert!(auth.contains("/us-east-1/sqs/aws4_request"), "{client}: {auth}");
        assert!(auth.contains("SignedHeaders=") && auth.contains("x-amz-target"), "{client}: {auth}");
        assert!(auth.contains("Signature="), "{client}: {auth}");
    }
    eprintln!("{requests:#?}");
    // Only the SDK's pipeline adds its invocation id: proves the GUC switched the client.
    assert!(header(&requests[0], "amz-sdk-invocation-id").is_none(), "direct: {:?}", requests[0]);
    assert!(header(&requests[1], "amz-sdk-invocation-id").is_some(), "sdk: {:?}", requests[1]);
}

#[test]
fn both_clients_retry_server_errors_and_not_client_errors() {
    let h = harness();
    let mut c = h.fresh_db("e2e_client_retry");
    c.batch_execute("SET sqs_ingest.receive_concurrency = 1").unwrap();
    let failing = FixedEndpoint::start(
        "500 Internal Server Error",
        "application/x-amz-json-1.0",
        r#"{"__type":"com.amazonaws.sqs#InternalError","message":"try again"}"#,
    );
    let refusing = FixedEndpoint::start(
        "400 Bad Request",
        "application/x-amz-json-1.0",
        r#"{"__type":"com.amazonaws.sqs#QueueDoesNotExist","message":"The specified queue does not exist."}"#,
    );
    for client in CLIENTS {
        c.batch_execute(&format!("SET sqs_ingest.sqs_client = {client}")).unwrap();
        for (endpoint, state, attempts) in [(&failing, "58000", 3), (&refusing, "42704", 1)] {
            let before = endpoint.requests.lock().unwrap().len();
            let url = format!("http://127.0.0.1:{}/000000000000/q", endpoint.port);
            let e = c.query("SELECT * FROM sqs_ingest.bench_raw_drain($1, 10)", &[&url]).unwrap_err();
            assert_eq!(sqlstate(&e), state, "{client}: {e}");
            let sent = endpoint.requests.lock().unwrap().len() - before;
            assert_eq!(sent, attempts, "{client}: one ReceiveMessage, {attempts} attempt(s) for HTTP {state}");
        }
    }
}
