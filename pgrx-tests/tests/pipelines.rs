//! Pipelines (0.6.0): any message shape into any table, declared in SQL, run as an ordinary operator role.

use serde_json::json;
use sqs_ingest_e2e::*;

/// A fresh database with an operator role `op` (sqs_ingest_operator) that owns `orders`, and the first key.
fn setup(h: &Harness, db: &str, op: &str) -> postgres::Client {
    let mut c = h.fresh_db(db);
    h.login_role(&mut c, op, &["sqs_ingest_operator"]);
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    c.batch_execute(&format!(
        "CREATE TABLE orders (
            order_id     uuid PRIMARY KEY,
            email        varchar(256),
            email_hash   text,
            amount       numeric(10,2) NOT NULL,
            placed_at    timestamptz,
            tags         text[],
            items        jsonb,
            channel      text,
            client_ip    inet,
            app_version  integer,
            message_id   text,
            note         varchar(16),
            receives     integer
         );
         ALTER TABLE orders OWNER TO {op};
         CREATE TABLE not_mine (id int);"
    ))
    .unwrap();
    c
}

fn columns() -> serde_json::Value {
    json!({
        "order_id": {"from": "$.order.id", "required": true},
        "email": {"from": "$.customer.email", "mask": "encrypt"},
        "email_hash": {"from": "$.customer.email", "mask": "hmac"},
        "amount": {"from": "$.order.total", "required": true},
        "placed_at": "sqs:SentTimestamp",
        "tags": "$.order.tags",
        "items": "$.order.items",
        "channel": {"from": "attribute:channel", "default": "web"},
        "client_ip": "$.ip",
        "app_version": {"from": "$.app", "transform": "app_version"},
        "message_id": "sqs:MessageId",
        "note": "$.note",
        "receives": "sqs:ApproximateReceiveCount"
    })
}

fn send_with_attributes(h: &Harness, url: &str, messages: &[(String, Option<&str>)]) {
    for chunk in messages.chunks(10) {
        let entries: Vec<serde_json::Value> = chunk
            .iter()
            .enumerate()
            .map(|(i, (body, channel))| match channel {
                Some(ch) => json!({"Id": i.to_string(), "MessageBody": body,
                    "MessageAttributes": {"channel": {"DataType": "String", "StringValue": ch}}}),
                None => json!({"Id": i.to_string(), "MessageBody": body}),
            })
            .collect();
        let out = sqs_call(&h.endpoint, "SendMessageBatch", json!({"QueueUrl": url, "Entries": entries}));
        assert_eq!(out["Successful"].as_array().map_or(0, Vec::len), chunk.len(), "{out}");
    }
}

fn order(i: usize) -> String {
    json!({
        "order": {"id": format!("00000000-0000-4000-8000-{i:012}"), "total": 10.5 + i as f64,
                  "tags": ["new", format!("t{i}")], "items": [{"sku": format!("s{i}"), "qty": i}]},
        "customer": {"email": format!("buyer{i}@example.com")},
        "ip": format!("198.51.100.{i}"),
        "app": "2.3.4",
        "extra": "ignored"
    })
    .to_string()
}

#[test]
fn a_declaration_is_checked_completely_before_it_is_stored() {
    let h = harness();
    let (db, op) = ("e2e_pipe_declare", "e2e_pipe_op1");
    let mut c = setup(&h, db, op);
    let url = format!("{}/000000000000/e2e-pipe-declare", h.endpoint);
    let mut o = h.connect_as(db, op);
    o.batch_execute("CREATE TEMP TABLE scratch (id int)").unwrap();
    let declare = |o: &mut postgres::Client, name: &str, target: &str, cols: serde_json::Value, extra: &str| {
        o.execute(
            &format!("SELECT sqs_ingest.pipeline_create($1, $2, $3, $4::text::jsonb{extra})"),
            &[&name, &url, &target, &cols.to_string()],
        )
    };
    let cases: Vec<(&str, &str, serde_json::Value, &str, &str)> = vec![
        ("missing column", "orders", json!({"order_id": "$.id", "amount": "$.t", "nope": "$.x"}), "", "42703"),
        (
            "unknown transform",
            "orders",
            json!({"order_id": {"from": "$.id", "transform": "upper"}, "amount": "$.t"}),
            "",
            "22023",
        ),
        ("bad path", "orders", json!({"order_id": "$.id[", "amount": "$.t"}), "", "22023"),
        (
            "mask too short",
            "orders",
            json!({"order_id": "$.id", "amount": "$.t", "note": {"from": "$.e", "mask": "hmac"}}),
            "",
            "22023",
        ),
        (
            "mask into uuid",
            "orders",
            json!({"order_id": {"from": "$.id", "mask": "encrypt"}, "amount": "$.t"}),
            "",
            "22023",
        ),
        ("NOT NULL unmapped", "orders", json!({"order_id": "$.id"}), "", "22023"),
        (
            "bad default",
            "orders",
            json!({"order_id": "$.id", "amount": "$.t", "client_ip": {"from": "$.ip", "default": "not-an-ip"}}),
            "",
            "22023",
        ),
        ("missing table", "no_such_table", json!({"a": "$.a"}), "", "42P01"),
        ("not writable", "not_mine", json!({"id": "$.id"}), "", "42501"),
        ("bad envelope", "orders", json!({"order_id": "$.id", "amount": "$.t"}), ", envelope => 'kafka'", "22023"),
        ("bad filter", "orders", json!({"order_id": "$.id", "amount": "$.t"}), ", filter => '$.body.type =='", "22023"),
        (
            "bad fate",
            "orders",
            json!({"order_id": "$.id", "amount": "$.t"}),
            ", filter => '$.body.x == 1', filter_fate => 'ignore'",
            "22023",
        ),
        ("empty", "orders", json!({}), "", "22023"),
        (
            "filter not a predicate",
            "orders",
            json!({"order_id": "$.id", "amount": "$.t"}),
            ", filter => '$.body.type'",
            "22023",
        ),
        (
            "filter with a variable",
            "orders",
            json!({"order_id": "$.id", "amount": "$.t"}),
            ", filter => '$.body.n > $min'",
            "22023",
        ),
        ("temporary table", "pg_temp.scratch", json!({"id": "$.id"}), "", "22023"),
        ("bad name", "orders", json!({"order_id": "$.id", "amount": "$.t"}), "", "22023"),
    ];
    for (what, target, cols, extra, code) in cases {
        let name = if what == "bad name" { "Bad Name" } else { "orders" };
        let e = declare(&mut o, name, target, cols, extra).unwrap_err();
        assert_eq!(sqlstate(&e), code, "{what}: {e:?}");
    }
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM sqs_ingest.pipelines"),
        0,
        "nothing stored by a refused declaration"
    );

    declare(&mut o, "orders", "orders", columns(), "").unwrap();
    let e = declare(&mut o, "orders", "orders", columns(), "").unwrap_err();
    assert_eq!(sqlstate(&e), "42710");
    // Another operator may neither replace nor drop it.
    h.login_role(&mut c, "e2e_pipe_other", &["sqs_ingest_operator"]);
    c.batch_execute("GRANT INSERT ON orders TO e2e_pipe_other").unwrap();
    let mut other = h.connect_as(db, "e2e_pipe_other");
    let e = declare(&mut other, "orders", "orders", columns(), ", replace => true").unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let e = other.query_one("SELECT sqs_ingest.pipeline_drop('orders')", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    // Nor run it, nor start a worker on it: a replace by its declarer must never change what another role runs.
    let e = other.query_one("SELECT * FROM sqs_ingest('orders')", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    // A role outside sqs_ingest_operator cannot declare at all.
    h.login_role(&mut c, "e2e_pipe_plain", &[]);
    let mut plain = h.connect_as(db, "e2e_pipe_plain");
    assert_eq!(sqlstate(&declare(&mut plain, "p2", "orders", columns(), "").unwrap_err()), "42501");
    let stored: String =
        c.query_one("SELECT target FROM sqs_ingest.pipelines WHERE name = 'orders'", &[]).unwrap().get(0);
    assert_eq!(stored, "public.orders", "the target is stored schema-qualified");
    let dropped: bool = o.query_one("SELECT sqs_ingest.pipeline_drop('orders')", &[]).unwrap().get(0);
    assert!(dropped);
    let e = o.query_one("SELECT * FROM sqs_ingest('orders')", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "42704", "an unknown pipeline name");
}

#[test]
fn a_pipeline_maps_converts_and_masks_any_shape_into_any_table_exactly_once() {
    let h = harness();
    let (db, op) = ("e2e_pipe_ingest", "e2e_pipe_op2");
    let mut c = setup(&h, db, op);
    let url = h.fresh_queue(&mut c, "e2e-pipe-orders", 30);
    let mut o = h.connect_as(db, op);
    o.execute(
        "SELECT sqs_ingest.pipeline_create('orders', $1, 'orders', $2::text::jsonb)",
        &[&url, &columns().to_string()],
    )
    .unwrap();

    let mut messages: Vec<(String, Option<&str>)> =
        (1..=20).map(|i| (order(i), if i % 2 == 0 { Some("mobile") } else { None })).collect();
    // Five that cannot become rows, each for one column, and one the table refuses (a duplicate primary key).
    let bad_uuid = order(21).replace("00000000-0000-4000-8000-000000000021", "secret-not-a-uuid");
    let overflow = order(22).replace("32.5", "1e12");
    let missing_total = json!({"order": {"id": "00000000-0000-4000-8000-000000000023"}}).to_string();
    let bad_ip = order(24).replace("198.51.100.24", "secret-ip");
    let too_long_note = json!({"order": {"id": "00000000-0000-4000-8000-000000000025", "total": 1},
        "note": "secret-and-far-too-long"})
    .to_string();
    let duplicate_key = order(3);
    for b in [&bad_uuid, &overflow, &missing_total, &bad_ip, &duplicate_key] {
        messages.push((b.clone(), None));
    }
    messages.push((too_long_note.clone(), Some("kiosk")));
    send_with_attributes(&h, &url, &messages);

    let r = o.query_one("SELECT received, inserted, duplicates, dead_lettered FROM sqs_ingest('orders')", &[]).unwrap();
    let (received, inserted, duplicates, dead): (i64, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
    assert_eq!((received, inserted, duplicates, dead), (26, 20, 0, 6));
    assert_eq!(count(&mut c, "SELECT count(*) FROM orders"), 20);

    // Each value converted by its column's type, defaults applied, masks as mask() makes them.
    let r = c
        .query_one(
            "SELECT amount::text, array_to_string(tags, ','), items->0->>'sku', channel, host(client_ip),
                    app_version, note IS NULL, receives, message_id IS NOT NULL,
                    placed_at BETWEEN now() - interval '10 minutes' AND now() + interval '1 minute',
                    email = sqs_ingest.mask('buyer4@example.com', 'encrypt'),
                    email_hash = sqs_ingest.mask('buyer4@example.com', 'hmac'),
                    sqs_ingest.unmask(email)
               FROM orders WHERE order_id = '00000000-0000-4000-8000-000000000004'",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "14.50");
    assert_eq!(r.get::<_, String>(1), "new,t4");
    assert_eq!(r.get::<_, String>(2), "s4");
    assert_eq!(r.get::<_, String>(3), "mobile");
    assert_eq!(r.get::<_, String>(4), "198.51.100.4");
    assert_eq!(r.get::<_, i32>(5), 20304);
    assert!(r.get::<_, bool>(6));
    assert_eq!(r.get::<_, i32>(7), 1);
    assert!(r.get::<_, bool>(8));
    assert!(r.get::<_, bool>(9), "placed_at is the message's SentTimestamp");
    assert!(r.get::<_, bool>(10) && r.get::<_, bool>(11), "tokens equal mask() of the clear value");
    assert_eq!(r.get::<_, String>(12), "buyer4@example.com");
    assert_eq!(count(&mut c, "SELECT count(*) FROM orders WHERE channel = 'web'"), 10, "the default");

    // Dead letters name the column and the reason, never the value.
    let reasons: Vec<(String, String)> = c
        .query("SELECT reason_code, reason FROM sqs_ingest.dead_letters ORDER BY reason", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(reasons.len(), 6, "{reasons:?}");
    for (code, column) in [
        ("invalid_value", "order_id"),
        ("invalid_value", "amount"),
        ("missing_field", "amount"),
        ("invalid_value", "client_ip"),
        ("value_too_long", "note"),
    ] {
        assert!(
            reasons.iter().any(|(c, r)| c == code && r.contains(&format!("column \"{column}\""))),
            "{code} {column}: {reasons:?}"
        );
    }
    assert!(reasons.iter().any(|(c, r)| c == "refused_by_table" && r.contains("23505")), "{reasons:?}");
    assert!(reasons.iter().all(|(_, r)| !r.contains("secret") && !r.contains("1e12")), "{reasons:?}");

    // Every message was deleted after COMMIT; a second call finds nothing and stores nothing twice.
    eventually("queue empty", std::time::Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));
    let again: i64 = o.query_one("SELECT received FROM sqs_ingest('orders')", &[]).unwrap().get(0);
    assert_eq!(again, 0);
    // The drain procedure runs a pipeline by name too, committing batch by batch.
    let more: Vec<(String, Option<&str>)> = (30..42).map(|i| (order(i), None)).collect();
    send_with_attributes(&h, &url, &more);
    o.batch_execute("CALL sqs_ingest_drain('orders', batch_messages => 5)").unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM orders"), 32);
    // Once its cause is fixed, a pipeline's dead letter is redriven through the pipeline, attributes included.
    c.batch_execute("ALTER TABLE orders ALTER COLUMN note TYPE varchar(64)").unwrap();
    let id: String = c
        .query_one("SELECT message_id FROM sqs_ingest.dead_letters WHERE reason LIKE '%column \"note\"%'", &[])
        .unwrap()
        .get(0);
    let redriven: bool = o.query_one("SELECT sqs_ingest.redrive($1)", &[&id]).unwrap().get(0);
    assert!(redriven);
    let r = c
        .query_one("SELECT note, channel FROM orders WHERE order_id = '00000000-0000-4000-8000-000000000025'", &[])
        .unwrap();
    assert_eq!((r.get::<_, String>(0), r.get::<_, String>(1)), ("secret-and-far-too-long".into(), "kiosk".into()));
    // One whose cause remains stays a dead letter, its reason refreshed.
    let id: String = c
        .query_one("SELECT message_id FROM sqs_ingest.dead_letters WHERE reason LIKE '%column \"client_ip\"%'", &[])
        .unwrap()
        .get(0);
    let redriven: bool = o.query_one("SELECT sqs_ingest.redrive($1)", &[&id]).unwrap().get(0);
    assert!(!redriven);
    // A pipeline dropped and declared again under its name is another declaration: it cannot redrive the old one's
    // dead letters (they could be opened into any table its declarer chose).
    o.batch_execute("SELECT sqs_ingest.pipeline_drop('orders')").unwrap();
    o.execute(
        "SELECT sqs_ingest.pipeline_create('orders', $1, 'orders', $2::text::jsonb)",
        &[&url, &columns().to_string()],
    )
    .unwrap();
    let e = o.query_one("SELECT sqs_ingest.redrive($1)", &[&id]).unwrap_err();
    assert_eq!(sqlstate(&e), "55000", "{e:?}");
    // The queue URL keeps meaning the login pipeline: a pipeline name never changes sqs_ingest(url).
    let e = o.query_one("SELECT * FROM sqs_ingest('orders', NULL, 'hmac')", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "22023", "a pipeline's masking is declared, not passed");
}

/// SNS over the Query protocol (what LocalStack and AWS speak for SNS): form-encoded parameters, XML answer.
fn sns_call(endpoint: &str, params: &[(&str, &str)]) -> String {
    use std::io::{Read, Write};
    let authority = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let payload = params.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&");
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    let request = format!(
        "POST / HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         X-Amz-Date: 20260101T000000Z\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/sns/aws4_request, SignedHeaders=host, Signature=00\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{params:?}: {raw}");
    raw
}

fn xml_value(xml: &str, tag: &str) -> String {
    let start = xml.find(&format!("<{tag}>")).unwrap_or_else(|| panic!("no <{tag}> in {xml}")) + tag.len() + 2;
    let end = xml[start..].find(&format!("</{tag}>")).unwrap() + start;
    xml[start..end].to_string()
}

#[test]
fn an_sns_envelope_is_unwrapped_and_raw_delivery_stores_identical_rows() {
    let h = harness();
    let (db, op) = ("e2e_pipe_sns", "e2e_pipe_op3");
    let mut c = h.fresh_db(db);
    h.login_role(&mut c, op, &["sqs_ingest_operator"]);
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    for t in ["events_raw", "events_wrapped"] {
        c.batch_execute(&format!(
            "CREATE TABLE {t} (event_id uuid PRIMARY KEY, kind text, email text, amount numeric, topic text);
             ALTER TABLE {t} OWNER TO {op}"
        ))
        .unwrap();
    }
    let raw_url = h.fresh_queue(&mut c, "e2e-sns-raw", 30);
    let wrapped_url = h.fresh_queue(&mut c, "e2e-sns-wrapped", 30);
    let topic = xml_value(&sns_call(&h.endpoint, &[("Action", "CreateTopic"), ("Name", "e2e-orders")]), "TopicArn");
    for (url, raw) in [(&raw_url, "true"), (&wrapped_url, "false")] {
        let queue_arn = format!("arn:aws:sqs:us-east-1:000000000000:{}", url.rsplit('/').next().unwrap());
        sns_call(
            &h.endpoint,
            &[
                ("Action", "Subscribe"),
                ("TopicArn", &topic),
                ("Protocol", "sqs"),
                ("Endpoint", &queue_arn),
                ("Attributes.entry.1.key", "RawMessageDelivery"),
                ("Attributes.entry.1.value", raw),
            ],
        );
    }
    for i in 1..=6 {
        let body = json!({"id": format!("00000000-0000-4000-8000-{i:012}"), "email": format!("e{i}@example.com"),
            "amount": i * 10})
        .to_string();
        sns_call(
            &h.endpoint,
            &[
                ("Action", "Publish"),
                ("TopicArn", &topic),
                ("Message", &body),
                ("MessageAttributes.entry.1.Name", "kind"),
                ("MessageAttributes.entry.1.Value.DataType", "String"),
                ("MessageAttributes.entry.1.Value.StringValue", if i % 2 == 0 { "refund" } else { "sale" }),
            ],
        );
    }
    let columns = json!({
        "event_id": {"from": "$.id", "required": true},
        "kind": {"from": "attribute:kind", "required": true},
        "email": {"from": "$.email", "mask": "hmac"},
        "amount": "$.amount",
    });
    let mut o = h.connect_as(db, op);
    for (name, url, table) in [("sns-raw", &raw_url, "events_raw"), ("sns-wrapped", &wrapped_url, "events_wrapped")] {
        o.execute(
            "SELECT sqs_ingest.pipeline_create($1, $2, $3, $4::text::jsonb, envelope => 'sns')",
            &[&name, url, &table, &columns.to_string()],
        )
        .unwrap();
    }
    eventually("SNS delivered to both queues", std::time::Duration::from_secs(20), || {
        depth(&mut c, &raw_url).0 == 6 && depth(&mut c, &wrapped_url).0 == 6
    });
    for name in ["sns-raw", "sns-wrapped"] {
        let inserted: i64 = o.query_one("SELECT inserted FROM sqs_ingest($1)", &[&name]).unwrap().get(0);
        assert_eq!(inserted, 6, "{name}");
    }
    let rows = |c: &mut postgres::Client, t: &str| -> Vec<String> {
        c.query(&format!("SELECT format('%s %s %s %s', event_id, kind, email, amount) FROM {t} ORDER BY 1"), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let (raw_rows, wrapped_rows) = (rows(&mut c, "events_raw"), rows(&mut c, "events_wrapped"));
    assert_eq!(raw_rows.len(), 6);
    assert_eq!(raw_rows, wrapped_rows, "the same rows whether SNS wraps the message or not");
    assert_eq!(count(&mut c, "SELECT count(*) FROM events_raw WHERE kind = 'refund'"), 3);
    let hashed: bool = c
        .query_one(
            "SELECT email = sqs_ingest.mask('e1@example.com', 'hmac') FROM events_wrapped WHERE amount = 10",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(hashed);
    // The envelope itself is addressable.
    o.execute(
        "SELECT sqs_ingest.pipeline_create('sns-topic', $1, 'events_wrapped',
            '{\"event_id\": \"$.id\", \"topic\": \"envelope:$.TopicArn\"}', envelope => 'sns')",
        &[&wrapped_url],
    )
    .unwrap();
    c.batch_execute("TRUNCATE events_wrapped").unwrap();
    sns_call(
        &h.endpoint,
        &[("Action", "Publish"), ("TopicArn", &topic), ("Message", r#"{"id":"00000000-0000-4000-8000-000000000099"}"#)],
    );
    eventually("one more", std::time::Duration::from_secs(20), || depth(&mut c, &wrapped_url).0 == 1);
    o.query_one("SELECT * FROM sqs_ingest('sns-topic')", &[]).unwrap();
    let stored: String = c.query_one("SELECT topic FROM events_wrapped", &[]).unwrap().get(0);
    assert_eq!(stored, topic);
}

#[test]
fn a_filter_deletes_releases_or_dead_letters_what_it_does_not_match_and_counts_it() {
    let h = harness();
    let (db, op) = ("e2e_pipe_filter", "e2e_pipe_op4");
    let mut c = h.fresh_db(db);
    h.login_role(&mut c, op, &["sqs_ingest_operator"]);
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    c.batch_execute(&format!("CREATE TABLE created (id text, fate text); ALTER TABLE created OWNER TO {op}")).unwrap();
    let mut o = h.connect_as(db, op);
    o.batch_execute("SET sqs_ingest.visibility_timeout = 3").unwrap();
    for fate in ["delete", "release", "dead_letter"] {
        let url = h.fresh_queue(&mut c, &format!("e2e-filter-{fate}"), 30);
        let name = format!("filter-{}", fate.replace('_', "-"));
        o.execute(
            "SELECT sqs_ingest.pipeline_create($1, $2, 'created',
                json_build_object('id', '$.id', 'fate', json_build_object('from', 'sqs:MessageId'))::jsonb,
                filter => '$.body.type == \"created\" && !($.attributes.channel == \"test\")', filter_fate => $3)",
            &[&name, &url, &fate],
        )
        .unwrap();
        // EventBridge-shaped bodies are no different to a filter without an envelope: it sees them whole.
        let bodies: Vec<String> = (0..10)
            .map(|i| {
                json!({"type": if i < 6 { "created" } else { "deleted" }, "id": format!("{fate}-{i}")}).to_string()
            })
            .collect();
        h.send(&mut c, &url, &bodies);
        let r = o.query_one("SELECT received, inserted, dead_lettered FROM sqs_ingest($1)", &[&name]).unwrap();
        let (received, inserted, dead): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
        assert_eq!((received, inserted), (10, 6), "{fate}");
        assert_eq!(count(&mut c, &format!("SELECT count(*) FROM created WHERE id LIKE '{fate}-%'")), 6);
        let filtered: i64 = c
            .query_one("SELECT COALESCE(sum(filtered), 0)::int8 FROM sqs_ingest.stats WHERE queue_url = $1", &[&url])
            .unwrap()
            .get(0);
        match fate {
            "delete" => {
                assert_eq!((dead, filtered), (0, 4));
                eventually("deleted", std::time::Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));
                assert_eq!(
                    count(&mut c, "SELECT count(*) FROM sqs_ingest.ledger WHERE outcome = 'filtered'"),
                    4,
                    "recorded, so a redelivery is a duplicate"
                );
            }
            "release" => {
                assert_eq!((dead, filtered), (0, 4));
                // Back in the queue for another consumer after the visibility timeout (3 s here), so this consumer
                // does not take them straight back: the next call finds nothing. Not in the ledger.
                let again: i64 = o.query_one("SELECT received FROM sqs_ingest($1)", &[&name]).unwrap().get(0);
                assert_eq!(again, 0, "released messages are not received again at once");
                eventually("released", std::time::Duration::from_secs(15), || depth(&mut c, &url) == (4, 0));
                let in_ledger: i64 = c
                    .query_one(
                        "SELECT count(*) FROM sqs_ingest.ledger
                          WHERE queue_key = sqs_ingest.queue_key(sqs_ingest.queue_arn($1))",
                        &[&url],
                    )
                    .unwrap()
                    .get(0);
                assert_eq!(in_ledger, 6, "only the stored messages are in the ledger, not the released ones");
            }
            _ => {
                assert_eq!((dead, filtered), (4, 0));
                assert_eq!(
                    count(&mut c, "SELECT count(*) FROM sqs_ingest.dead_letters WHERE reason_code = 'filtered' AND pipeline = 'filter-dead-letter'"),
                    4
                );
                eventually("deleted", std::time::Duration::from_secs(10), || depth(&mut c, &url) == (0, 0));
            }
        }
    }
}

/// The login pipeline spelled out as a declaration (the README's first example).
fn login_declaration() -> serde_json::Value {
    json!({
        "user_id":          {"from": "$.user_id", "required": true, "json_type": "string"},
        "device_type":      {"from": "$.device_type", "required": true, "json_type": "string"},
        "masked_ip":        {"from": "$.ip", "required": true, "json_type": "string", "mask": "encrypt"},
        "masked_device_id": {"from": "$.device_id", "required": true, "json_type": "string", "mask": "encrypt"},
        "locale":           {"from": "$.locale", "json_type": "string"},
        "app_version":      {"from": "$.app_version", "required": true, "json_type": "string", "transform": "app_version"},
        "create_date":      "sqs:SentTimestamp"
    })
}

#[test]
fn the_login_pipeline_declared_stores_what_the_built_in_one_stores() {
    let h = harness();
    let (db, op) = ("e2e_pipe_login", "e2e_pipe_op5");
    let mut c = h.fresh_db(db);
    h.login_role(&mut c, op, &["sqs_ingest_operator"]);
    c.batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {op}")).unwrap();
    let builtin_url = h.fresh_queue(&mut c, "e2e-pipe-login-builtin", 30);
    let declared_url = h.fresh_queue(&mut c, "e2e-pipe-login-declared", 30);
    let bodies: Vec<String> = match real_messages() {
        Some(real) => real,
        None => {
            let mut v: Vec<String> = (0..99).map(login).collect();
            v.push(r#"{"device_type":"ios"}"#.to_string());
            v
        }
    };
    h.send(&mut c, &builtin_url, &bodies);
    h.send(&mut c, &declared_url, &bodies);
    let mut o = h.connect_as(db, op);
    // The built-in pipeline creates user_logins; the declared one writes a copy of it.
    let builtin = ingest(&mut o, &builtin_url);
    o.batch_execute("CREATE TABLE user_logins_declared (LIKE user_logins)").unwrap();
    o.execute(
        "SELECT sqs_ingest.pipeline_create('logins', $1, 'user_logins_declared', $2::text::jsonb)",
        &[&declared_url, &login_declaration().to_string()],
    )
    .unwrap();
    let r = o.query_one("SELECT received, inserted, dead_lettered FROM sqs_ingest('logins')", &[]).unwrap();
    let declared: (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
    assert_eq!(declared, (builtin.received, builtin.inserted, builtin.dead_lettered));
    assert_eq!((builtin.received, builtin.inserted, builtin.dead_lettered), (100, 99, 1));
    let rows = |c: &mut postgres::Client, t: &str| -> Vec<String> {
        c.query(
            &format!(
                "SELECT format('%s|%s|%s|%s|%s|%s|%s', user_id, device_type, masked_ip, masked_device_id, locale,
                               app_version, create_date) FROM {t} ORDER BY 1"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(rows(&mut c, "user_logins"), rows(&mut c, "user_logins_declared"), "the same rows, tokens included");
    let reasons: Vec<String> = c
        .query("SELECT reason_code FROM sqs_ingest.dead_letters ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(reasons, vec!["missing_field", "missing_field"]);
}

#[test]
fn two_pipelines_ingest_side_by_side_under_workers_and_rekey_finds_every_masked_column() {
    let h = harness();
    let (db, op) = ("e2e_pipe_many", "e2e_pipe_op6");
    let mut c = h.fresh_db(db);
    h.login_role(&mut c, op, &["sqs_ingest_operator"]);
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    // A table partitioned by day (by pg_partman where it is packaged, Debian's postgresql-15-partman; by hand
    // elsewhere), and a plain one.
    let partitions = if server_has("pg_partman") {
        c.batch_execute("CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman").unwrap();
        "SELECT partman.create_parent('public.clicks', 'day', 'native', 'daily');"
    } else {
        // `day` is SentTimestamp's UTC date: a few days around it, whatever the session's time zone.
        "CREATE TABLE clicks_p_near PARTITION OF clicks
             FOR VALUES FROM ((now() AT TIME ZONE 'UTC')::date - 2) TO ((now() AT TIME ZONE 'UTC')::date + 3);
         CREATE TABLE clicks_default PARTITION OF clicks DEFAULT;"
    };
    c.batch_execute(&format!(
        "CREATE TABLE clicks (click_id uuid NOT NULL, email text, day date NOT NULL, page text) PARTITION BY RANGE (day);
         {partitions}
         CREATE TABLE signups (signup_id uuid PRIMARY KEY, email varchar(256), plan text);
         ALTER TABLE clicks OWNER TO {op}; ALTER TABLE signups OWNER TO {op};"
    ))
    .unwrap();
    let clicks_url = h.fresh_queue(&mut c, "e2e-pipe-clicks", 30);
    let signups_url = h.fresh_queue(&mut c, "e2e-pipe-signups", 30);
    let mut o = h.connect_as(db, op);
    o.execute(
        "SELECT sqs_ingest.pipeline_create('clicks', $1, 'clicks', '{
            \"click_id\": {\"from\": \"$.id\", \"required\": true},
            \"email\": {\"from\": \"$.email\", \"mask\": \"encrypt\"},
            \"day\": \"sqs:SentTimestamp\", \"page\": \"$.page\"}')",
        &[&clicks_url],
    )
    .unwrap();
    o.execute(
        "SELECT sqs_ingest.pipeline_create('signups', $1, 'signups', '{
            \"signup_id\": {\"from\": \"$.id\", \"required\": true},
            \"email\": {\"from\": \"$.email\", \"mask\": \"encrypt\"}, \"plan\": \"$.plan\"}')",
        &[&signups_url],
    )
    .unwrap();
    let uuid = |kind: u32, i: usize| format!("00000000-0000-4000-800{kind}-{i:012}");
    let clicks: Vec<String> = (0..30)
        .map(|i| json!({"id": uuid(1, i), "email": format!("c{i}@example.com"), "page": format!("/p{i}")}).to_string())
        .collect();
    let signups: Vec<String> = (0..20)
        .map(|i| json!({"id": uuid(2, i), "email": format!("s{i}@example.com"), "plan": "pro"}).to_string())
        .collect();
    h.send(&mut c, &clicks_url, &clicks);
    h.send(&mut c, &signups_url, &signups);
    for p in ["clicks", "signups"] {
        o.query_one("SELECT sqs_ingest.worker_start($1)", &[&p]).unwrap();
    }
    eventually("both workers stored their queues", std::time::Duration::from_secs(60), || {
        count(&mut c, "SELECT count(*) FROM clicks") == 30 && count(&mut c, "SELECT count(*) FROM signups") == 20
    });
    for p in ["clicks", "signups"] {
        let stopped: i64 = o.query_one("SELECT sqs_ingest.worker_stop($1)", &[&p]).unwrap().get(0);
        assert_eq!(stopped, 1, "worker_stop by pipeline name");
    }
    // Each table got exactly its messages; the partitioned one in its day's partition.
    assert_eq!(count(&mut c, "SELECT count(*) FROM clicks WHERE click_id::text LIKE '00000000-0000-4000-8001-%'"), 30);
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM signups WHERE signup_id::text LIKE '00000000-0000-4000-8002-%'"),
        20
    );
    assert_eq!(count(&mut c, "SELECT count(*) FROM ONLY clicks"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM clicks WHERE tableoid::regclass::text LIKE 'clicks_p%'"), 30);
    assert_eq!(count(&mut c, "SELECT count(*) FROM clicks WHERE email <> sqs_ingest.mask(format('c%s@example.com', substr(click_id::text, 25)::int), 'encrypt')"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM signups WHERE email <> sqs_ingest.mask(format('s%s@example.com', substr(signup_id::text, 25)::int), 'encrypt')"), 0);
    // Stats per pipeline.
    let per: Vec<(String, i64)> = c
        .query("SELECT pipeline, sum(inserted)::int8 FROM sqs_ingest.stats GROUP BY pipeline ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per, vec![("clicks".to_string(), 30), ("signups".to_string(), 20)]);

    // After a rotation, rekey_all() finds every masked column of every pipeline target.
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    let rekeyed: Vec<(String, i64)> = c
        .query("SELECT target, tokens FROM sqs_ingest.rekey_all() ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rekeyed, vec![("public.clicks".to_string(), 30), ("public.signups".to_string(), 20)]);
    let active: i32 = c.query_one("SELECT key_id FROM sqs_ingest.keys WHERE active", &[]).unwrap().get(0);
    assert_eq!(count(&mut c, &format!("SELECT count(*) FROM clicks WHERE email NOT LIKE 'enc:{active}:%'")), 0);
    let clear: String = c
        .query_one("SELECT sqs_ingest.unmask(email) FROM signups WHERE signup_id = $1::text::uuid", &[&uuid(2, 7)])
        .unwrap()
        .get(0);
    assert_eq!(clear, "s7@example.com");
    // rekey(table) on one pipeline target: nothing left to rewrite.
    let again: i64 = c.query_one("SELECT sqs_ingest.rekey('signups')", &[]).unwrap().get(0);
    assert_eq!(again, 0);
}

#[test]
fn values_any_type_refuses_are_dead_letters_and_numbers_keep_their_precision() {
    let h = harness();
    let (db, op) = ("e2e_pipe_types", "e2e_pipe_op7");
    let mut c = h.fresh_db(db);
    h.login_role(&mut c, op, &["sqs_ingest_operator"]);
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    c.batch_execute(&format!(
        "CREATE TABLE words (id int PRIMARY KEY, kw tsvector, tags text[], amount numeric, flags bit(8), codes char(5)[]);
         ALTER TABLE words OWNER TO {op}"
    ))
    .unwrap();
    let url = h.fresh_queue(&mut c, "e2e-pipe-types", 30);
    let mut o = h.connect_as(db, op);
    o.execute(
        "SELECT sqs_ingest.pipeline_create('words', $1, 'words', '{\"id\": {\"from\": \"$.id\", \"required\": true},
            \"kw\": \"$.kw\", \"tags\": \"$.tags\", \"amount\": \"$.amount\", \"flags\": \"$.flags\", \"codes\": \"$.codes\"}')",
        &[&url],
    )
    .unwrap();
    let mut bodies: Vec<String> = (1..=8)
        .map(|i| {
            json!({"id": i, "kw": "fat cat", "tags": ["a", "b"], "flags": "10101010", "codes": ["hello"]}).to_string()
        })
        .collect();
    // A tsvector syntax error (SQLSTATE class 42) and too many array dimensions (54): each one message's fault.
    bodies.push(json!({"id": 9, "kw": "secret@example.com 'x"}).to_string());
    bodies.push(json!({"id": 10, "tags": [[[[[[["secret"]]]]]]]}).to_string());
    bodies.push(r#"{"id": 11, "amount": 12345678901234567.89}"#.to_string());
    h.send(&mut c, &url, &bodies);
    let r = o.query_one("SELECT received, inserted, dead_lettered FROM sqs_ingest('words')", &[]).unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)), (11, 9, 2));
    let reasons: Vec<String> = c
        .query("SELECT reason FROM sqs_ingest.dead_letters ORDER BY reason", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(reasons[0].contains("column \"kw\"") && reasons[1].contains("column \"tags\""), "{reasons:?}");
    assert!(reasons.iter().all(|r| !r.contains("secret")), "{reasons:?}");
    let last_error: Option<String> = c.query_one("SELECT max(last_error) FROM sqs_ingest.stats", &[]).unwrap().get(0);
    assert_eq!(last_error, None, "one message's value never fails the batch");
    let amount: String = c.query_one("SELECT amount::text FROM words WHERE id = 11", &[]).unwrap().get(0);
    assert_eq!(amount, "12345678901234567.89", "numbers keep their exact text");
    let r = c.query_one("SELECT flags::text, codes::text FROM words WHERE id = 1", &[]).unwrap();
    assert_eq!((r.get::<_, String>(0), r.get::<_, String>(1)), ("10101010".into(), "{hello}".into()));

    // A table of the same name owned by another role than at declaration is refused before any message is taken.
    c.batch_execute("ALTER TABLE words OWNER TO postgres; GRANT INSERT ON words TO PUBLIC").unwrap();
    let e = o.query_one("SELECT * FROM sqs_ingest('words')", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e:?}");
    // The failed call's error reaches the pipeline's stats row (through the audit worker: the call rolled back).
    eventually("the error is in the pipeline's stats", std::time::Duration::from_secs(20), || {
        c.query_one("SELECT max(last_error) FROM sqs_ingest.stats WHERE pipeline = 'words'", &[])
            .unwrap()
            .get::<_, Option<String>>(0)
            .is_some_and(|e| e.contains("owned by role"))
    });
}
