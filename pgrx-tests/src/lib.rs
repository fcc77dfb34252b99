//! Harness for the end-to-end tests: a live Postgres cluster (library preloaded) and a live LocalStack, both
//! started by `scripts/test.sh`, which passes their coordinates in environment variables and tears them down.
//!
//! Each test works in its own database and its own queue, so tests run in parallel without sharing state.

use postgres::{Client, NoTls};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Harness {
    pub host: String,
    pub port: u16,
    pub endpoint: String,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the end-to-end tests through `make test` (scripts/test.sh), which starts Postgres and LocalStack")
    })
}

pub fn harness() -> Harness {
    Harness {
        host: env("SQS_INGEST_PGHOST"),
        port: env("SQS_INGEST_PGPORT").parse().expect("port"),
        endpoint: env("SQS_INGEST_SQS_ENDPOINT"),
    }
}

/// Whether the shared cluster's installation has an optional extension: `pg_cron` (preloaded) and `pg_partman`
/// are Debian packages for Postgres 15 only, so scripts/test.sh sets SQS_INGEST_HAS_PG_CRON and
/// SQS_INGEST_HAS_PG_PARTMAN to 0 for the Postgres 18 tier (unset means present). Tests that need one skip on a
/// server without it; its summary says which tier ran them.
pub fn server_has(extension: &str) -> bool {
    let var = format!("SQS_INGEST_HAS_{}", extension.to_uppercase());
    std::env::var(var).map_or(true, |v| v != "0")
}

/// The major version of the shared cluster's Postgres (scripts/test.sh sets SQS_INGEST_PG_MAJOR; unset means 15).
pub fn server_major() -> u32 {
    std::env::var("SQS_INGEST_PG_MAJOR").map_or(15, |v| v.parse().expect("SQS_INGEST_PG_MAJOR"))
}

/// The real 100 messages of the original take-home queue, if the shared data file is present.
pub fn real_messages() -> Option<Vec<String>> {
    let path = std::env::var("SQS_INGEST_SAMPLE_DATA").ok()?;
    let text = std::fs::read_to_string(&path).ok()?;
    Some(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect())
}

/// A well-formed login body with a distinct user id.
pub fn login(i: usize) -> String {
    serde_json::json!({
        "user_id": format!("00000000-0000-4000-8000-{i:012}"),
        "app_version": format!("{}.{}.{}", i % 10, i % 100, i % 7),
        "device_type": if i.is_multiple_of(2) { "android" } else { "ios" },
        "ip": format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
        "locale": if i.is_multiple_of(3) { serde_json::Value::Null } else { "DE".into() },
        "device_id": format!("{:03}-{:02}-{:04}", i % 1000, i % 100, i % 10000),
    })
    .to_string()
}

impl Harness {
    pub fn connect(&self, db: &str) -> Client {
        postgres::Config::new()
            .host_path(&self.host)
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to database {db}: {e:?}"))
    }

    /// A connection as `user` (a login role), e.g. a non-superuser member of `sqs_ingest_operator`.
    pub fn connect_as(&self, db: &str, user: &str) -> Client {
        postgres::Config::new()
            .host_path(&self.host)
            .port(self.port)
            .user(user)
            .dbname(db)
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to database {db} as {user}: {e:?}"))
    }

    /// A connection as `user` that keeps every NOTICE and WARNING the server sends it (severity and text).
    pub fn connect_collecting_notices(&self, db: &str, user: &str) -> (Client, Arc<Mutex<Vec<String>>>) {
        let notices = Arc::new(Mutex::new(Vec::new()));
        let sink = notices.clone();
        let c = postgres::Config::new()
            .host_path(&self.host)
            .port(self.port)
            .user(user)
            .dbname(db)
            .notice_callback(move |n| {
                let text = format!("{}: {} {:?} {:?}", n.severity(), n.message(), n.detail(), n.hint());
                sink.lock().unwrap().push(text);
            })
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to database {db} as {user}: {e:?}"));
        (c, notices)
    }

    /// A new login role that is a member of `granted` (dropped first if a previous run left it).
    pub fn login_role(&self, c: &mut Client, name: &str, granted: &[&str]) {
        c.batch_execute(&format!(
            "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN
                 EXECUTE 'REASSIGN OWNED BY {name} TO postgres'; EXECUTE 'DROP OWNED BY {name}'; DROP ROLE {name};
             END IF; END $$;
             CREATE ROLE {name} LOGIN"
        ))
        .unwrap();
        for g in granted {
            c.batch_execute(&format!("GRANT {g} TO {name}")).unwrap();
        }
    }

    /// A new, empty database with the extension created (dropped first if a previous run left it).
    pub fn fresh_db(&self, name: &str) -> Client {
        let mut admin = self.connect("postgres");
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let mut c = self.connect(name);
        c.batch_execute("CREATE EXTENSION sqs_ingest").unwrap();
        c
    }

    /// Creates a fresh queue (deleting leftovers of a previous run) and returns its URL.
    pub fn fresh_queue(&self, c: &mut Client, name: &str, visibility_timeout: i32) -> String {
        let url = format!("{}/000000000000/{name}", self.endpoint);
        let _ = c.execute("SELECT sqs_ingest.bench_raw_drain($1, 1000000)", &[&url]);
        let row = c.query_one("SELECT sqs_ingest.queue_create($1, $2)", &[&url, &visibility_timeout]).unwrap();
        let created: String = row.get(0);
        assert!(created.ends_with(name), "{created}");
        // A reused queue keeps its old VisibilityTimeout; drain leftovers so every test starts empty.
        c.execute("SELECT sqs_ingest.bench_raw_drain($1, 1000000)", &[&url]).unwrap();
        url
    }

    pub fn send(&self, c: &mut Client, url: &str, bodies: &[String]) {
        for chunk in bodies.chunks(1000) {
            let v: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let sent: i64 = c.query_one("SELECT sqs_ingest.queue_send($1, $2)", &[&url, &v]).unwrap().get(0);
            assert_eq!(sent as usize, chunk.len(), "SQS accepted fewer messages than sent");
        }
    }
}

/// The server log of the shared end-to-end cluster (scripts/test.sh starts it with `-l <dir>/postgres.log`).
/// Runs a Postgres client tool (`pg_dump`, `pg_restore`, …) of the server's installation against the harness'
/// cluster as `postgres`; panics with its stderr when it fails.
pub fn pg_tool(h: &Harness, tool: &str, args: &[&str]) {
    let bin = std::env::var("SQS_INGEST_PG_BIN").expect("SQS_INGEST_PG_BIN");
    let out = std::process::Command::new(format!("{bin}/{tool}"))
        .args(["-h", &h.host, "-p", &h.port.to_string(), "-U", "postgres"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn server_log() -> String {
    let data = std::env::var("SQS_INGEST_PGDATA").expect("SQS_INGEST_PGDATA");
    std::fs::read_to_string(format!("{data}/../postgres.log")).unwrap_or_default()
}

/// Runs a command as the `postgres` user; panics with its stderr when it fails.
fn as_postgres(args: &[&str]) {
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A Postgres cluster of a test's own (for settings the shared cluster must not get: a hostile database, a
/// tiny max_worker_processes), with the library preloaded; stopped when dropped.
pub struct PrivateCluster {
    pub dir: String,
    pub port: u16,
    bin: String,
}

impl PrivateCluster {
    pub fn start(name: &str, conf: &str) -> PrivateCluster {
        let bin = std::env::var("SQS_INGEST_PG_BIN").expect("SQS_INGEST_PG_BIN");
        let shared = std::env::var("SQS_INGEST_PGDATA").expect("SQS_INGEST_PGDATA");
        let dir = format!("{shared}/../../{name}");
        let _ = std::process::Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &format!("{bin}/pg_ctl"),
                "-D",
                &format!("{dir}/data"),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        std::process::Command::new("chown").args(["postgres:postgres", &dir]).status().unwrap();
        as_postgres(&[&format!("{bin}/initdb"), "-D", &format!("{dir}/data"), "-U", "postgres", "--auth=trust"]);
        let conf = format!(
            "listen_addresses = ''\nport = {port}\nunix_socket_directories = '{dir}'\nlog_min_messages = warning\n{conf}\n"
        );
        let mut file = std::fs::OpenOptions::new().append(true).open(format!("{dir}/data/postgresql.conf")).unwrap();
        file.write_all(conf.as_bytes()).unwrap();
        as_postgres(&[
            &format!("{bin}/pg_ctl"),
            "-D",
            &format!("{dir}/data"),
            "-l",
            &format!("{dir}/postgres.log"),
            "-w",
            "-t",
            "60",
            "start",
        ]);
        PrivateCluster { dir, port, bin }
    }

    /// A streaming standby of `primary` (pg_basebackup -R), started with `conf` appended: asynchronous unless the
    /// primary names it in synchronous_standby_names (its application_name is `name`). With `slot`, it streams
    /// through that physical replication slot, which this creates on the primary first.
    pub fn standby_of(primary: &PrivateCluster, name: &str, slot: Option<&str>, conf: &str) -> PrivateCluster {
        let bin = primary.bin.clone();
        let shared = std::env::var("SQS_INGEST_PGDATA").expect("SQS_INGEST_PGDATA");
        let dir = format!("{shared}/../../{name}");
        let data = format!("{dir}/data");
        let pg_ctl = format!("{bin}/pg_ctl");
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &pg_ctl, "-D", &data, "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::process::Command::new("chown").args(["postgres:postgres", &dir]).status().unwrap();
        if let Some(slot) = slot {
            primary
                .connect("postgres", "postgres")
                .execute("SELECT pg_create_physical_replication_slot($1, true)", &[&slot])
                .unwrap();
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let primary_port = primary.port.to_string();
        as_postgres(&[&format!("{bin}/pg_basebackup"), "-D", &data, "-h", &primary.dir, "-p", &primary_port]);
        let slot_line = slot.map(|s| format!("primary_slot_name = '{s}'\n")).unwrap_or_default();
        let conf = format!(
            "port = {port}\nunix_socket_directories = '{dir}'\nprimary_conninfo = 'host={} port={} user=postgres application_name={name}'\n{slot_line}{conf}\n",
            primary.dir, primary.port
        );
        let mut file = std::fs::OpenOptions::new().append(true).open(format!("{data}/postgresql.conf")).unwrap();
        file.write_all(conf.as_bytes()).unwrap();
        std::fs::write(format!("{data}/standby.signal"), "").unwrap();
        std::process::Command::new("chown")
            .args(["postgres:postgres", &format!("{data}/standby.signal")])
            .status()
            .unwrap();
        as_postgres(&[&pg_ctl, "-D", &data, "-l", &format!("{dir}/postgres.log"), "-w", "-t", "60", "start"]);
        PrivateCluster { dir, port, bin }
    }

    /// Promotes a standby (`pg_ctl promote -w`): it replays the WAL it has, then accepts writes.
    pub fn promote(&self) {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{}/pg_ctl", self.bin), "-D", &format!("{}/data", self.dir)])
            .args(["-w", "-t", "60", "promote"])
            .output()
            .unwrap();
        assert!(out.status.success(), "promote failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Stops the cluster with `pg_ctl -m <mode> -w -t <timeout_s> stop`; whether pg_ctl succeeded in time.
    pub fn stop(&self, mode: &str, timeout_s: u32) -> bool {
        std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{}/pg_ctl", self.bin), "-D", &format!("{}/data", self.dir)])
            .args(["-m", mode, "-w", "-t", &timeout_s.to_string(), "stop"])
            .output()
            .unwrap()
            .status
            .success()
    }

    /// Starts the stopped cluster again.
    pub fn start_again(&self) {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{}/pg_ctl", self.bin), "-D", &format!("{}/data", self.dir)])
            .args(["-l", &format!("{}/postgres.log", self.dir), "-w", "-t", "60", "start"])
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        assert!(out.status.success(), "start failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Restarts the cluster (fast): every session, background workers included, starts over.
    pub fn restart(&self) {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{}/pg_ctl", self.bin), "-D", &format!("{}/data", self.dir)])
            .args(["-l", &format!("{}/postgres.log", self.dir), "-m", "fast", "-w", "-t", "60", "restart"])
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        assert!(out.status.success(), "restart failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn connect(&self, db: &str, user: &str) -> Client {
        postgres::Config::new()
            .host_path(&self.dir)
            .port(self.port)
            .user(user)
            .dbname(db)
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to database {db} as {user}: {e:?}"))
    }

    /// A connection with a search_path of pg_catalog only, for the test's own checks in a hostile database.
    pub fn connect_checker(&self, db: &str) -> Client {
        postgres::Config::new()
            .host_path(&self.dir)
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .options("-c search_path=pg_catalog")
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to database {db}: {e:?}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(format!("{}/postgres.log", self.dir)).unwrap_or_default()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{}/pg_ctl", self.bin), "-D", &format!("{}/data", self.dir)])
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }
}

/// A TCP proxy on 127.0.0.1 in front of another local port that can be frozen: while frozen it forwards
/// nothing (requests hang as on a stalled endpoint) without stopping the endpoint for anyone else.
pub struct FreezingProxy {
    pub port: u16,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingProxy {
    pub fn start(target_port: u16) -> FreezingProxy {
        FreezingProxy::start_rewriting(target_port, None)
    }

    /// A proxy that also replaces, in what the endpoint sends back, every `from` with `to` (of the same length, so
    /// no Content-Length changes): a fault in the answers of a real endpoint, e.g. a JSON key renamed.
    pub fn start_rewriting(target_port: u16, rewrite: Option<(&'static str, &'static str)>) -> FreezingProxy {
        if let Some((from, to)) = rewrite {
            assert_eq!(from.len(), to.len(), "a rewrite keeps the length");
        }
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target_port)) else { continue };
                let directions =
                    [(client.try_clone().unwrap(), server.try_clone().unwrap(), None), (server, client, rewrite)];
                for (mut from, mut to, rewrite) in directions {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            let n = match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while flag.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            if let Some((old, new)) = rewrite {
                                let (old, new) = (old.as_bytes(), new.as_bytes());
                                let mut i = 0;
                                while i + old.len() <= n {
                                    if &buf[i..i + old.len()] == old {
                                        buf[i..i + old.len()].copy_from_slice(new);
                                        i += old.len();
                                    } else {
                                        i += 1;
                                    }
                                }
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        FreezingProxy { port, frozen }
    }

    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Commits the first masking key and `user_logins` up front: a first ingest creates both, and concurrent
/// sessions wait for that transaction to commit before they can use them.
pub fn create_user_logins(c: &mut Client) {
    c.batch_execute("SELECT sqs_ingest.rotate_key()").unwrap();
    c.batch_execute(
        "CREATE TABLE user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
           masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date)",
    )
    .unwrap();
}

/// (visible, in_flight) messages of a queue.
pub fn depth(c: &mut Client, url: &str) -> (i64, i64) {
    let r = c.query_one("SELECT visible, in_flight FROM sqs_ingest.queue_depth($1)", &[&url]).unwrap();
    (r.get(0), r.get(1))
}

/// Waits until `f` holds (SQS counters are approximate and settle within a moment).
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// Counts returned by `SELECT * FROM sqs_ingest(...)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub received: i64,
    pub inserted: i64,
    pub duplicates: i64,
    pub dead_lettered: i64,
    pub deleted: i64,
}

pub fn ingest(c: &mut Client, url: &str) -> Counts {
    let r = c
        .query_one("SELECT received, inserted, duplicates, dead_lettered, deleted FROM sqs_ingest($1)", &[&url])
        .unwrap();
    Counts { received: r.get(0), inserted: r.get(1), duplicates: r.get(2), dead_lettered: r.get(3), deleted: r.get(4) }
}

pub fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// The SQLSTATE of a failed statement.
pub fn sqlstate(e: &postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

/// A local HTTP endpoint that answers every request with one fixed response and records each request's head
/// (request line and headers, lower-cased names). Stands in for endpoints LocalStack cannot imitate.
pub struct FixedEndpoint {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<Vec<String>>>>,
}

impl FixedEndpoint {
    pub fn start(status: &str, content_type: &str, body: &str) -> FixedEndpoint {
        FixedEndpoint::start_on("127.0.0.1", status, content_type, body)
    }

    /// The same, listening on another loopback address (e.g. 127.0.0.2, which is not in the default
    /// `sqs_ingest.allowed_endpoints`).
    pub fn start_on(address: &str, status: &str, content_type: &str, body: &str) -> FixedEndpoint {
        let listener = TcpListener::bind(format!("{address}:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (seen, status, content_type, body) =
            (requests.clone(), status.to_string(), content_type.to_string(), body.to_string());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let (mut len, mut head) = (0, Vec::new());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let line = line.trim_end().to_string();
                    let line = match line.split_once(':') {
                        Some((name, value)) if !head.is_empty() => format!("{}:{value}", name.to_ascii_lowercase()),
                        _ => line,
                    };
                    if let Some(v) = line.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    head.push(line);
                }
                let mut request_body = vec![0; len];
                let _ = std::io::Read::read_exact(&mut reader, &mut request_body);
                seen.lock().unwrap().push(head);
                let mut s = stream;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FixedEndpoint { port, requests }
    }

    /// Answers like LocalStack < 3 (legacy query/XML protocol only): an XML error for any JSON call.
    pub fn legacy_xml() -> FixedEndpoint {
        FixedEndpoint::start(
            "400 Bad Request",
            "text/xml",
            "<?xml version=\"1.0\"?><ErrorResponse><Error><Type>Sender</Type><Code>InvalidAction</Code><Message>Missing Action</Message></Error><RequestId>1</RequestId></ErrorResponse>",
        )
    }
}

/// One SQS API call (JSON protocol) straight to a LocalStack endpoint (`http://host:port`), for what the
/// extension's own SQL helpers do not cover (FIFO queues: CreateQueue attributes, MessageGroupId). LocalStack does
/// not check signatures; the Authorization header only names the region and service.
pub fn sqs_call(endpoint: &str, action: &str, body: serde_json::Value) -> serde_json::Value {
    aws_json_call(endpoint, "sqs", "application/x-amz-json-1.0", &format!("AmazonSQS.{action}"), body)
}

/// One AWS KMS API call (JSON 1.1 protocol) to LocalStack's KMS: keys for the tests (CreateKey, DisableKey, …).
pub fn kms_call(endpoint: &str, action: &str, body: serde_json::Value) -> serde_json::Value {
    aws_json_call(endpoint, "kms", "application/x-amz-json-1.1", &format!("TrentService.{action}"), body)
}

fn aws_json_call(
    endpoint: &str,
    service: &str,
    content_type: &str,
    target: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    use std::io::Read;
    let authority = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(authority).unwrap_or_else(|e| panic!("connect {authority}: {e}"));
    let payload = body.to_string();
    let request = format!(
        "POST / HTTP/1.1\r\nHost: {authority}\r\nContent-Type: {content_type}\r\n\
         X-Amz-Target: {target}\r\nX-Amz-Date: 20260101T000000Z\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=00\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    assert!(head.starts_with("HTTP/1.1 200"), "{target} failed: {head}\n{body}");
    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
}

/// Creates (or empties) a FIFO queue at the harness' LocalStack; returns its URL under the endpoint's spelling.
pub fn fresh_fifo_queue(endpoint: &str, name: &str, visibility_timeout: i32) -> String {
    assert!(name.ends_with(".fifo"));
    let made = sqs_call(
        endpoint,
        "CreateQueue",
        serde_json::json!({"QueueName": name, "Attributes": {"FifoQueue": "true",
            "VisibilityTimeout": visibility_timeout.to_string()}}),
    );
    let url = format!("{}/000000000000/{name}", endpoint.trim_end_matches('/'));
    assert!(made["QueueUrl"].as_str().unwrap_or_default().ends_with(name), "{made}");
    url
}

/// Sends `(group, body)` pairs to a FIFO queue in order (batches of 10; each body its own deduplication id).
pub fn send_fifo(endpoint: &str, url: &str, messages: &[(String, String)]) {
    // Deduplication ids unique across runs (SQS drops a repeated one for five minutes).
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    for (n, chunk) in messages.chunks(10).enumerate() {
        let entries: Vec<serde_json::Value> = chunk
            .iter()
            .enumerate()
            .map(|(i, (group, body))| {
                serde_json::json!({"Id": i.to_string(), "MessageBody": body, "MessageGroupId": group,
                    "MessageDeduplicationId": format!("{run}-{n}-{i}")})
            })
            .collect();
        let out = sqs_call(endpoint, "SendMessageBatch", serde_json::json!({"QueueUrl": url, "Entries": entries}));
        assert_eq!(out["Successful"].as_array().map_or(0, Vec::len), chunk.len(), "{out}");
    }
}
