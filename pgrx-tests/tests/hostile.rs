//! A hostile database owner. `e2e_evil` owns a database (and so its `public` schema), sets the database's
//! search_path to `public, pg_catalog`, and plants in `public` operators and functions that shadow every operand
//! type pair and function the extension's SQL could resolve through a path, plus a trigger on the target table
//! it owns. Each trap records who ran it and, if that role is a superuser, makes `e2e_evil` a superuser.
//! Then a superuser uses every entry point in that database: ingest, drain, the static and dynamic workers,
//! the audit worker (refused unmasks), mask() auditing, rotate_key, rekey, redrive, purge, a pg_cron job, and
//! keys under KMS (kms_wrap_keys, a KMS rotation).
//! No trap may run as a superuser, and `e2e_evil` must end as it began.
//!
//! In a cluster of its own: its static worker serves the hostile database as a superuser role.

use sqs_ingest_e2e::*;
use std::time::Duration;

const TRAPS: &str = r#"
CREATE TABLE public.trap_log (at timestamptz DEFAULT clock_timestamp(), who text, what text, su boolean);
GRANT ALL ON public.trap_log TO PUBLIC;
CREATE FUNCTION public.trap(what text) RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog AS $t$
DECLARE su boolean;
BEGIN
    SELECT rolsuper INTO su FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) current_user;
    INSERT INTO public.trap_log (who, what, su) VALUES (current_user, what, su);
    IF su THEN
        EXECUTE 'ALTER ROLE e2e_evil SUPERUSER';
    END IF;
END $t$;
GRANT EXECUTE ON FUNCTION public.trap(text) TO PUBLIC;
DO $d$
DECLARE
    o record;
    n integer := 0;
BEGIN
    -- operator, left, right, result, the pg_catalog expression it stands for
    FOR o IN SELECT * FROM (VALUES
        ('*', 'bigint', 'interval', 'interval', 'a::float8 OPERATOR(pg_catalog.*) b'),
        ('*', 'numeric', 'integer', 'numeric', 'a OPERATOR(pg_catalog.*) b::numeric'),
        ('*', 'double precision', 'integer', 'double precision', 'a OPERATOR(pg_catalog.*) b::float8'),
        ('/', 'bigint', 'numeric', 'numeric', 'a::numeric OPERATOR(pg_catalog./) b'),
        ('~~', 'character varying', 'text', 'boolean', 'a::text OPERATOR(pg_catalog.~~) b'),
        ('~~', 'text', 'text', 'boolean', 'a OPERATOR(pg_catalog.~~) b'),
        ('!~~', 'character varying', 'text', 'boolean', 'a::text OPERATOR(pg_catalog.!~~) b'),
        ('||', 'text', 'text', 'text', 'a OPERATOR(pg_catalog.||) b'),
        ('=', 'text', 'text', 'boolean', 'a OPERATOR(pg_catalog.=) b'),
        ('=', 'name', 'name', 'boolean', 'a OPERATOR(pg_catalog.=) b'),
        ('=', 'oid', 'oid', 'boolean', 'a OPERATOR(pg_catalog.=) b'),
        ('=', 'integer', 'integer', 'boolean', 'a OPERATOR(pg_catalog.=) b'),
        ('=', 'bigint', 'bigint', 'boolean', 'a OPERATOR(pg_catalog.=) b'),
        ('<', 'integer', 'integer', 'boolean', 'a OPERATOR(pg_catalog.<) b'),
        ('<', 'bigint', 'integer', 'boolean', 'a OPERATOR(pg_catalog.<) b'),
        ('<', 'bigint', 'bigint', 'boolean', 'a OPERATOR(pg_catalog.<) b'),
        ('<=', 'bigint', 'integer', 'boolean', 'a OPERATOR(pg_catalog.<=) b'),
        ('<=', 'bigint', 'bigint', 'boolean', 'a OPERATOR(pg_catalog.<=) b'),
        ('>', 'bigint', 'integer', 'boolean', 'a OPERATOR(pg_catalog.>) b'),
        ('>', 'smallint', 'integer', 'boolean', 'a OPERATOR(pg_catalog.>) b'),
        ('>=', 'bigint', 'bigint', 'boolean', 'a OPERATOR(pg_catalog.>=) b'),
        ('+', 'bigint', 'bigint', 'bigint', 'a OPERATOR(pg_catalog.+) b'),
        ('-', 'bigint', 'bigint', 'bigint', 'a OPERATOR(pg_catalog.-) b'),
        ('-', 'timestamp with time zone', 'interval', 'timestamp with time zone', 'a OPERATOR(pg_catalog.-) b'),
        ('-', 'timestamp with time zone', 'timestamp with time zone', 'interval', 'a OPERATOR(pg_catalog.-) b'),
        ('+', 'timestamp with time zone', 'interval', 'timestamp with time zone', 'a OPERATOR(pg_catalog.+) b')
    ) AS v(op, l, r, res, expr)
    LOOP
        n := n + 1;
        EXECUTE format('CREATE FUNCTION public.trap_op_%s(a %s, b %s) RETURNS %s LANGUAGE plpgsql SET search_path = pg_catalog
                        AS $f$ BEGIN PERFORM public.trap(%L); RETURN %s; END $f$',
                       n, o.l, o.r, o.res, format('%s(%s,%s)', o.op, o.l, o.r), o.expr);
        EXECUTE format('CREATE OPERATOR public.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = public.trap_op_%s)',
                       o.op, o.l, o.r, n);
    END LOOP;
END $d$;
-- Functions the extension could call unqualified, with the exact signatures of pg_catalog's.
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql SET search_path = pg_catalog
    AS $f$ BEGIN PERFORM public.trap('now()'); RETURN pg_catalog.now(); END $f$;
CREATE FUNCTION public.pg_backend_pid() RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog
    AS $f$ BEGIN PERFORM public.trap('pg_backend_pid()'); RETURN pg_catalog.pg_backend_pid(); END $f$;
CREATE FUNCTION public.to_regclass(text) RETURNS regclass LANGUAGE plpgsql SET search_path = pg_catalog
    AS $f$ BEGIN PERFORM public.trap('to_regclass(text)'); RETURN pg_catalog.to_regclass($1); END $f$;
CREATE FUNCTION public.generate_series(bigint, bigint) RETURNS SETOF bigint LANGUAGE plpgsql SET search_path = pg_catalog
    AS $f$ BEGIN PERFORM public.trap('generate_series'); RETURN QUERY SELECT pg_catalog.generate_series($1, $2); END $f$;
CREATE FUNCTION public.unnest(text[]) RETURNS SETOF text LANGUAGE plpgsql SET search_path = pg_catalog
    AS $f$ BEGIN PERFORM public.trap('unnest(text[])'); RETURN QUERY SELECT pg_catalog.unnest($1); END $f$;
CREATE FUNCTION public.date_trunc(text, timestamptz) RETURNS timestamptz LANGUAGE plpgsql SET search_path = pg_catalog
    AS $f$ BEGIN PERFORM public.trap('date_trunc'); RETURN pg_catalog.date_trunc($1, $2); END $f$;
CREATE FUNCTION public.clock_timestamp() RETURNS timestamptz LANGUAGE plpgsql SET search_path = pg_catalog
    AS $f$ BEGIN PERFORM public.trap('clock_timestamp()'); RETURN pg_catalog.clock_timestamp(); END $f$;
-- The target table, owned by the hostile role, with a trigger that fires on every insert and update.
CREATE TABLE public.user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
    masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date);
CREATE FUNCTION public.trap_trigger() RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog
    AS $f$ BEGIN
        PERFORM public.trap('trigger ' || TG_OP);
        -- A setting changed here must not outlive the write into the caller's session.
        PERFORM set_config('sqs_ingest.masking_method', 'hmac', false);
        RETURN NEW;
    END $f$;
CREATE TRIGGER promote BEFORE INSERT OR UPDATE ON public.user_logins FOR EACH ROW EXECUTE FUNCTION public.trap_trigger();
GRANT ALL ON public.user_logins TO PUBLIC;
-- A pipeline's target (0.6.0), with the same trigger and a domain whose CHECK calls a trap (run by the
-- declaration's default check, every insert's cast and the probe that names a refused column).
CREATE FUNCTION public.trap_check(v integer) RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog
    AS $f$ BEGIN PERFORM public.trap('domain check'); RETURN true; END $f$;
CREATE DOMAIN public.n_t AS integer CHECK (public.trap_check(VALUE));
CREATE TABLE public.events (id integer, email text, kind text, n public.n_t);
CREATE TRIGGER promote BEFORE INSERT OR UPDATE ON public.events FOR EACH ROW EXECUTE FUNCTION public.trap_trigger();
GRANT ALL ON public.events TO PUBLIC;
ALTER DATABASE e2e_hostile SET search_path = public, pg_catalog;
"#;

#[test]
fn a_hostile_database_owner_gains_nothing_from_any_entry_point() {
    let h = harness();
    let mut shared = h.fresh_db("e2e_hostile_queues");
    let url = h.fresh_queue(&mut shared, "e2e-hostile", 30);
    let worker_url = h.fresh_queue(&mut shared, "e2e-hostile-worker", 30);
    // pg_cron where it is packaged (Postgres 15 here); every other entry point on every major.
    let cron = server_has("pg_cron");
    if !cron {
        eprintln!("NOTE a_hostile_database_owner_gains_nothing_from_any_entry_point: without its pg_cron job (not packaged for Postgres {})", server_major());
    }
    let preload = if cron { "sqs_ingest,pg_cron" } else { "sqs_ingest" };
    let cluster = PrivateCluster::start(
        "hostile",
        &format!(
            "shared_preload_libraries = '{preload}'
max_worker_processes = 16
cron.database_name = 'postgres'
cron.use_background_workers = on
sqs_ingest.worker_database = 'e2e_hostile'
sqs_ingest.worker_role = 'postgres'
sqs_ingest.worker_count = 1
sqs_ingest.worker_enabled = on
sqs_ingest.worker_wait_time = 1
sqs_ingest.worker_restart_delay = 1
sqs_ingest.worker_queue_urls = '{worker_url}'"
        ),
    );
    let mut admin = cluster.connect("postgres", "postgres");
    admin.batch_execute("CREATE ROLE e2e_evil LOGIN; CREATE ROLE e2e_hostile_unmasker LOGIN").unwrap();
    admin.batch_execute("CREATE DATABASE e2e_hostile OWNER e2e_evil").unwrap();
    if cron {
        admin.batch_execute("CREATE EXTENSION pg_cron").unwrap();
    }
    let mut checker = cluster.connect_checker("e2e_hostile");
    checker
        .batch_execute(
            "CREATE EXTENSION sqs_ingest SCHEMA public;
             GRANT sqs_ingest_unmasker TO e2e_hostile_unmasker; SELECT sqs_ingest.rotate_key()",
        )
        .unwrap();
    cluster.connect("e2e_hostile", "e2e_evil").batch_execute(TRAPS).unwrap();
    // Every session from now on, the static worker's included, starts with the hostile search_path.
    drop((admin, checker));
    cluster.restart();
    let mut admin = cluster.connect("postgres", "postgres");
    let mut checker = cluster.connect_checker("e2e_hostile");
    let mut evil = cluster.connect("e2e_hostile", "e2e_evil");
    // The traps work: an expression the hostile role runs itself is recorded (as itself, not a superuser).
    evil.batch_execute("SELECT 2::bigint * interval '1 second'").unwrap();
    let fired = |c: &mut postgres::Client, su: bool| -> Vec<String> {
        c.query("SELECT who || ': ' || what FROM public.trap_log WHERE su = $1 ORDER BY at", &[&su])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert!(fired(&mut checker, false).iter().any(|f| f.contains("*(bigint,interval)")), "the traps do not fire");

    // Every entry point, called by a superuser whose session has the hostile search_path.
    let mut su = cluster.connect("e2e_hostile", "postgres");
    let path: String = su.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert_eq!(path, "public, pg_catalog");
    // pg_cron's own bookkeeping runs in cron.database_name (postgres); its job runs here, as the superuser.
    if cron {
        admin
            .batch_execute(&format!(
                "SELECT cron.schedule_in_database('hostile-ingest', '* * * * *', 'SELECT * FROM sqs_ingest(''{url}'')', 'e2e_hostile')"
            ))
            .unwrap();
    }
    let bad_version = {
        let mut v: serde_json::Value = serde_json::from_str(&login(9)).unwrap();
        v["device_type"] = "d".repeat(40).into();
        v.to_string()
    };
    h.send(&mut shared, &url, &[login(1), login(2), bad_version]);
    su.query("SELECT * FROM sqs_ingest($1)", &[&url]).unwrap();
    let method: String = su.query_one("SHOW sqs_ingest.masking_method", &[]).unwrap().get(0);
    assert_eq!(method, "encrypt", "a setting made by the table owner's trigger leaked into the caller's session");
    h.send(&mut shared, &url, &(3..30).map(login).collect::<Vec<_>>());
    su.query("CALL sqs_ingest_drain($1, batch_messages => 10)", &[&url]).unwrap();
    // Static worker (connected as a superuser) and a dynamic worker started by a superuser.
    h.send(&mut shared, &worker_url, &(100..110).map(login).collect::<Vec<_>>());
    let dynamic_url = h.fresh_queue(&mut shared, "e2e-hostile-dynamic", 30);
    su.query("SELECT sqs_ingest.worker_start($1)", &[&dynamic_url]).unwrap();
    h.send(&mut shared, &dynamic_url, &(200..210).map(login).collect::<Vec<_>>());
    eventually("both workers stored their messages", Duration::from_secs(60), || {
        count(&mut checker, "SELECT count(*) FROM public.user_logins") >= 2 + 27 + 10 + 10
    });
    su.query("SELECT sqs_ingest.worker_stop()", &[]).unwrap();
    // A pipeline (0.6.0), declared and run by the superuser into the hostile owner's table: declaration (its default
    // checked against the trapped domain), a filter, sqs_ingest(), the drain procedure and a dynamic worker by name.
    let pipe_url = h.fresh_queue(&mut shared, "e2e-hostile-pipe", 30);
    let columns = serde_json::json!({"id": {"from": "$.id", "required": true},
        "email": {"from": "$.email", "mask": "encrypt"}, "kind": "$.kind", "n": {"from": "$.n", "default": "0"}});
    su.execute(
        "SELECT sqs_ingest.pipeline_create('evil-events', $1, 'events', $2::text::jsonb,
                filter => '$.body.kind != \"skip\"', filter_fate => 'dead_letter')",
        &[&pipe_url, &columns.to_string()],
    )
    .unwrap();
    let event =
        |i: usize| serde_json::json!({"id": i, "email": format!("e{i}@example.com"), "kind": "sale"}).to_string();
    let mut first: Vec<String> = (1..=6).map(event).collect();
    first.push(r#"{"id": "x7", "kind": "sale"}"#.to_string());
    first.push(r#"{"id": 8, "kind": "skip"}"#.to_string());
    h.send(&mut shared, &pipe_url, &first);
    su.query("SELECT * FROM sqs_ingest('evil-events')", &[]).unwrap();
    h.send(&mut shared, &pipe_url, &(10..15).map(event).collect::<Vec<_>>());
    su.query("CALL sqs_ingest_drain('evil-events', batch_messages => 2)", &[]).unwrap();
    su.query("SELECT sqs_ingest.worker_start('evil-events')", &[]).unwrap();
    h.send(&mut shared, &pipe_url, &(20..25).map(event).collect::<Vec<_>>());
    eventually("the pipeline stored its messages", Duration::from_secs(60), || {
        count(&mut checker, "SELECT count(*) FROM public.events") == 6 + 5 + 5
    });
    su.query("SELECT sqs_ingest.worker_stop()", &[]).unwrap();
    assert_eq!(count(&mut checker, "SELECT count(*) FROM sqs_ingest.dead_letters WHERE pipeline = 'evil-events'"), 2);
    // Keys, rekey, redrive, purge, mask auditing and the audit worker.
    su.query("SELECT sqs_ingest.rotate_key()", &[]).unwrap();
    su.query("SELECT sqs_ingest.rekey()", &[]).unwrap();
    su.query("SELECT * FROM sqs_ingest.rekey_all()", &[]).unwrap();
    evil.batch_execute("ALTER TABLE public.user_logins ALTER COLUMN device_type TYPE varchar(64)").unwrap();
    let id: String =
        checker.query_one("SELECT message_id FROM sqs_ingest.dead_letters WHERE pipeline IS NULL", &[]).unwrap().get(0);
    assert!(su.query_one("SELECT sqs_ingest.redrive($1)", &[&id]).unwrap().get::<_, bool>(0));
    evil.batch_execute("ALTER TABLE public.events ALTER COLUMN id TYPE text").unwrap();
    let id: String = checker
        .query_one("SELECT message_id FROM sqs_ingest.dead_letters WHERE reason_code = 'invalid_value'", &[])
        .unwrap()
        .get(0);
    assert!(su.query_one("SELECT sqs_ingest.redrive($1)", &[&id]).unwrap().get::<_, bool>(0));
    assert!(
        fired(&mut checker, false).iter().any(|f| f == "e2e_evil: domain check"),
        "the domain's CHECK ran, as the table's owner"
    );
    su.query("SELECT sqs_ingest.purge_dead_letters('0 seconds', true)", &[]).unwrap();
    su.query("SELECT sqs_ingest.mask('198.51.100.1')", &[]).unwrap();
    su.batch_execute("BEGIN; SELECT sqs_ingest.mask('198.51.100.2'); ROLLBACK").unwrap();
    let _ = su.query("SELECT sqs_ingest.unmask('enc:1:AAAA')", &[]);
    let mut unmasker = cluster.connect("e2e_hostile", "e2e_hostile_unmasker");
    let _ = unmasker.query("SELECT sqs_ingest.unmask('hmac:1:AAAA')", &[]);
    eventually("the audit worker wrote the refusals", Duration::from_secs(30), || {
        count(&mut checker, "SELECT count(*) FROM sqs_ingest.unmask_audit WHERE NOT succeeded") == 2
            && count(&mut checker, "SELECT count(*) FROM sqs_ingest.mask_audit") == 2
    });
    // pg_cron's job (minute granularity on Debian 12's pg_cron 1.4).
    if cron {
        h.send(&mut shared, &url, &[login(500)]);
        eventually("pg_cron ran the job", Duration::from_secs(130), || {
            count(&mut admin, "SELECT count(*) FROM cron.job_run_details WHERE status = 'succeeded'") >= 1
        });
    }
    // Keys under AWS KMS (0.7.0): wrapping the keys, a rotation generated by KMS, a mask with a wrapped key.
    let made = kms_call(&h.endpoint, "CreateKey", serde_json::json!({"Description": "sqs_ingest hostile"}));
    let arn = made["KeyMetadata"]["Arn"].as_str().unwrap().to_string();
    su.batch_execute(&format!("SET sqs_ingest.kms_key_id = '{arn}'; SET sqs_ingest.kms_endpoint = '{}'", h.endpoint))
        .unwrap();
    assert!(su.query_one("SELECT sqs_ingest.kms_wrap_keys()", &[]).unwrap().get::<_, i64>(0) >= 1);
    su.query("SELECT sqs_ingest.rotate_key()", &[]).unwrap();
    su.query("SELECT sqs_ingest.mask('198.51.100.3')", &[]).unwrap();
    assert_eq!(count(&mut checker, "SELECT count(*) FROM sqs_ingest.keys WHERE key_bytes IS NOT NULL"), 0);

    // The trigger fired for every insert and update, as the table's owner; nothing ran as a superuser.
    assert!(
        fired(&mut checker, false).iter().any(|f| f == "e2e_evil: trigger INSERT"),
        "{:?}",
        fired(&mut checker, false)
    );
    assert!(fired(&mut checker, false).iter().any(|f| f == "e2e_evil: trigger UPDATE"), "rekey updated no row");
    assert_eq!(fired(&mut checker, true), Vec::<String>::new(), "traps ran as a superuser");
    let promoted: bool =
        checker.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'e2e_evil'", &[]).unwrap().get(0);
    assert!(!promoted, "e2e_evil became a superuser");
    let who: Vec<String> = fired(&mut checker, false);
    assert!(who.iter().all(|f| f.starts_with("e2e_evil: ")), "{who:?}");
    for q in [&url, &worker_url, &dynamic_url] {
        let _ = shared.query("SELECT sqs_ingest.bench_raw_drain($1, 100000)", &[q]);
    }
}
