//! The SQL surface in schema `sqs_ingest`: masking, keys, dead letters, queue tools and worker control.
//! Privileges are set in `sql/finalize.sql`: nothing here but `app_version_text` is executable by PUBLIC.

use pgrx::prelude::*;

#[pg_schema]
pub mod sqs_ingest {
    use crate::error::{Error, Result};
    use crate::ingest;
    use crate::privilege::{as_owner, extension_owner, role_names};
    use crate::{audit, gucs, hold, keys, sqs, target};
    use pgrx::pg_sys::panic::ErrorReport;
    use pgrx::prelude::*;
    use sqs_ingest_core::event;
    use sqs_ingest_core::mask::{MaskError, Method, Token};
    use sqs_ingest_core::version;

    pub(crate) fn method_of(name: Option<&str>) -> Result<Method> {
        match name {
            Some("encrypt") => Ok(Method::Encrypt),
            Some("hmac") => Ok(Method::Hmac),
            Some(other) => Ok(Method::parse(other)?),
            None => Ok(gucs::masking_method()),
        }
    }

    /// Reverses an `enc:` token. Every call is audited in `sqs_ingest.unmask_audit` and the server log.
    #[pg_extern(volatile, parallel_unsafe, strict)]
    fn unmask(token: &str) -> std::result::Result<String, ErrorReport> {
        audit::refuse_in_parallel_worker("unmask");
        let (current, session) = role_names();
        let parsed = Token::parse(token);
        let key_id = parsed.as_ref().ok().map(|t| t.key_id);
        let result: Result<String> = keys::keyring(false).and_then(|ring| {
            let bytes = ring.unmask_token(parsed.as_ref().map_err(|e| e.clone())?)?;
            String::from_utf8(bytes).map_err(|_| Error::Mask(MaskError::Tampered))
        });
        match result {
            Ok(value) => {
                log!("sqs_ingest audit: unmask by session_role={session} current_role={current} key_id={key_id:?} succeeded");
                audit::record_success(&session, &current, key_id)?;
                Ok(value)
            }
            Err(e) => {
                log!("sqs_ingest audit: unmask by session_role={session} current_role={current} key_id={key_id:?} refused: {e}");
                audit::record_refusal(key_id, audit::Refusal::of(&e));
                Err(e.into())
            }
        }
    }

    /// Makes a freshly generated key the active one; older keys still unmask. Returns the new key id.
    #[pg_extern(volatile, parallel_unsafe)]
    fn rotate_key() -> std::result::Result<i32, ErrorReport> {
        Ok(keys::rotate()?)
    }

    /// Rewrites the reversible tokens of `target` that use an older key to the active key. Returns the count.
    #[pg_extern(volatile, parallel_unsafe, name = "rekey_table")]
    fn rekey_table(target_oid: pg_sys::Oid) -> std::result::Result<i64, ErrorReport> {
        Ok(rekey(target_oid)?)
    }

    /// Rewrites the tokens of `target` as its owner when the caller is a superuser and the owner is not (so the
    /// owner's triggers run with the owner's rights), always with a pinned search_path. Each token is written back
    /// into the row it was read from: rows are matched by `(tableoid, ctid)`, since a ctid repeats across the
    /// partitions of a partitioned table.
    fn rekey(target_oid: pg_sys::Oid) -> Result<i64> {
        crate::privilege::pinned(|| {
            let t = target::resolve_oid(target_oid)?;
            let writer = crate::privilege::writer_for(t.owner);
            crate::privilege::as_role(writer, || rekey_rows(&t))
        })
    }

    fn rekey_rows(t: &target::Target) -> Result<i64> {
        let (ring, active) = keys::active_key()?;
        let key = ring.get(active).expect("active key");
        let active_prefix = format!("enc:{active}:");
        let current = format!("{active_prefix}%");
        let sql = format!(
            "SELECT tableoid, ctid::text, masked_ip, masked_device_id FROM {}
              WHERE (masked_ip::text LIKE 'enc:%' AND masked_ip::text NOT LIKE $1)
                 OR (masked_device_id::text LIKE 'enc:%' AND masked_device_id::text NOT LIKE $1)",
            t.current_name()?
        );
        #[allow(clippy::type_complexity)]
        let rows: Vec<(pg_sys::Oid, String, Option<String>, Option<String>)> = Spi::connect(|c| {
            c.select(&sql, None, &[current.clone().into()]).map(|rows| {
                rows.map(|r| {
                    (
                        r.get(1).ok().flatten().unwrap_or(pg_sys::Oid::INVALID),
                        r.get(2).ok().flatten().unwrap_or_default(),
                        r.get(3).ok().flatten(),
                        r.get(4).ok().flatten(),
                    )
                })
                .collect()
            })
        })
        .map_err(|e| Error::Target(e.to_string()))?;
        let mut rewritten = 0i64;
        let (mut tables, mut ctids, mut ips, mut devices) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut rekey_one = |token: Option<String>| -> Result<Option<String>> {
            match token {
                Some(t) if t.starts_with("enc:") && !t.starts_with(&active_prefix) => {
                    let (_, clear) = ring.unmask(&t)?;
                    rewritten += 1;
                    Ok(Some(key.mask(Method::Encrypt, &clear)?))
                }
                other => Ok(other),
            }
        };
        for (table, ctid, ip, device) in rows {
            tables.push(table);
            ctids.push(ctid);
            ips.push(rekey_one(ip)?);
            devices.push(rekey_one(device)?);
        }
        if !ctids.is_empty() {
            let update = format!(
                "UPDATE {} AS t SET masked_ip = u.ip, masked_device_id = u.dev
                   FROM unnest($1::oid[], $2::text[]::tid[], $3::text[], $4::text[]) AS u(tab, ctid, ip, dev)
                  WHERE t.tableoid = u.tab AND t.ctid = u.ctid",
                t.current_name()?
            );
            Spi::run_with_args(&update, &[tables.into(), ctids.into(), ips.into(), devices.into()])
                .map_err(|e| Error::Target(e.to_string()))?;
        }
        Ok(rewritten)
    }

    /// Prints a packed app_version (M*10000 + m*100 + p) as "M.m.p".
    #[pg_extern(immutable, parallel_safe, strict)]
    fn app_version_text(code: i32) -> Option<String> {
        version::unpack(code)
    }

    /// The queue's ARN, `arn:aws:sqs:<region>:<account>:<name>`: its identity whatever the spelling of its URL
    /// (host name or address, LocalStack's path and domain forms, AWS's current and legacy hosts). The region is
    /// the one the URL names, else `sqs_ingest.region` (requests are signed for it). The ledger, `stats` and
    /// `worker_stop()` key a queue by it. NULL for text that is not a queue URL (no error: views call it).
    #[pg_extern(stable, strict, parallel_safe)]
    fn queue_arn(queue_url: &str) -> Option<String> {
        sqs_ingest_core::queue_url::QueueUrl::parse(queue_url).ok().map(|q| q.arn(&gucs::region()))
    }

    /// Re-processes one dead letter (after its cause was fixed). Returns true if it is now stored.
    #[pg_extern(volatile, parallel_unsafe)]
    fn redrive(message_id: &str, queue_url: default!(Option<&str>, "NULL")) -> std::result::Result<bool, ErrorReport> {
        Ok(redrive_one(message_id, queue_url)?)
    }

    fn redrive_one(message_id: &str, queue_url: Option<&str>) -> Result<bool> {
        // The target is named by the caller's settings and path; every other statement runs pinned.
        let t = target::resolve_or_create(&gucs::target_table())?;
        crate::privilege::pinned(|| redrive_into(message_id, queue_url, &t))
    }

    fn redrive_into(message_id: &str, queue_url: Option<&str>, t: &target::Target) -> Result<bool> {
        let owner = extension_owner();
        let found = as_owner(owner, || {
            // FOR UPDATE: two concurrent redrives of one dead letter store it once (the second waits, then sees
            // it redriven).
            Spi::connect_mut(|c| {
                let rows = c.update(
                    "SELECT queue_url, key_id, body_encrypted, body_bytes,
                            (EXTRACT(EPOCH FROM sent_at) * 1000)::int8, redriven_at IS NOT NULL
                       FROM sqs_ingest.dead_letters
                      WHERE message_id = $1 AND ($2::text IS NULL OR queue_url = $2)
                      ORDER BY received_at DESC LIMIT 1
                        FOR UPDATE",
                    None,
                    &[message_id.into(), queue_url.map(str::to_string).into()],
                )?;
                Ok::<_, pgrx::spi::SpiError>(rows.into_iter().next().map(|r| {
                    (
                        r.get::<String>(1).ok().flatten().unwrap_or_default(),
                        r.get::<i32>(2).ok().flatten().unwrap_or_default(),
                        r.get::<Vec<u8>>(3).ok().flatten().unwrap_or_default(),
                        r.get::<i32>(4).ok().flatten().unwrap_or_default(),
                        r.get::<i64>(5).ok().flatten(),
                        r.get::<bool>(6).ok().flatten().unwrap_or(false),
                    )
                }))
            })
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        let Some((url, key_id, sealed, body_bytes, sent_ms, already)) = found else {
            return Err(Error::InvalidArgument(format!("no dead letter with message id \"{message_id}\"")));
        };
        if already {
            notice!("dead letter {message_id} was already redriven");
            return Ok(false);
        }
        if body_bytes as usize > event::MAX_BODY_BYTES {
            return Err(Error::InvalidArgument(format!(
                "dead letter {message_id} cannot be redriven: its body is {body_bytes} bytes, over the {} byte limit, so only its first {} bytes were kept",
                event::MAX_BODY_BYTES,
                event::KEPT_BODY_PREFIX_BYTES
            )));
        }
        let ring = keys::keyring(true)?;
        let key = ring.get(key_id).ok_or(Error::Mask(MaskError::UnknownKey(key_id)))?;
        let body = String::from_utf8(key.open_blob(&sealed)?).map_err(|_| Error::Mask(MaskError::Tampered))?;
        match event::parse(&body).and_then(|e| event::validate(&e, &t.limits).map(|v| (e, v))) {
            Err(reason) => {
                notice!("dead letter {message_id} still cannot be stored: {reason}");
                as_owner(owner, || {
                    Spi::run_with_args(
                        "UPDATE sqs_ingest.dead_letters SET reason_code = $3, reason = $4 WHERE queue_url = $1 AND message_id = $2",
                        &[url.clone().into(), message_id.into(), reason.code().into(), reason.to_string().into()],
                    )
                })
                .map_err(|e| Error::Internal(e.to_string()))?;
                Ok(false)
            }
            Ok((e, v)) => {
                let (ring, active) = keys::active_key()?;
                let mut rows = ingest::Rows::default();
                rows.push(ring.get(active).expect("active"), method_of(None)?, e, v, sent_ms)?;
                if let Some((_, reason)) = rows.insert_isolated(t)?.into_iter().next() {
                    notice!("dead letter {message_id} still cannot be stored: {reason}");
                    as_owner(owner, || {
                        Spi::run_with_args(
                            "UPDATE sqs_ingest.dead_letters SET reason_code = $3, reason = $4 WHERE queue_url = $1 AND message_id = $2",
                            &[url.clone().into(), message_id.into(), reason.code().into(), reason.to_string().into()],
                        )
                    })
                    .map_err(|e| Error::Internal(e.to_string()))?;
                    return Ok(false);
                }
                as_owner(owner, || {
                    Spi::run_with_args(
                        "UPDATE sqs_ingest.dead_letters SET redriven_at = pg_catalog.now() WHERE queue_url = $1 AND message_id = $2;",
                        &[url.clone().into(), message_id.into()],
                    )
                    .map_err(|e| Error::Internal(e.to_string()))?;
                    crate::bookkeeping::mark_redriven(&crate::bookkeeping::LedgerQueue::of(&url)?, message_id)
                })?;
                Ok(true)
            }
        }
    }

    /// Delete outcome after this backend's last commit that held messages: (deleted, failed).
    #[pg_extern(volatile, parallel_unsafe)]
    fn last_commit_deletes() -> TableIterator<'static, (name!(deleted, i64), name!(failed, i64))> {
        let o = hold::last_commit();
        TableIterator::once((o.succeeded as i64, o.failed as i64))
    }

    /// Sends message bodies to a queue (batches of 10). Returns how many SQS accepted.
    #[pg_extern(volatile, parallel_unsafe)]
    fn queue_send(queue_url: &str, bodies: Vec<Option<String>>) -> std::result::Result<i64, ErrorReport> {
        let queue = ingest::parse_queue_url(queue_url)?;
        let client = sqs::client(&queue)?;
        let bodies: Vec<String> = bodies.into_iter().flatten().collect();
        Ok(sqs::block_on(sqs::send(&client, &queue.url, &bodies, 8))?? as i64)
    }

    /// Creates a queue named by the last segment of `queue_url` at its endpoint. Returns the queue URL SQS reports.
    #[pg_extern(volatile, parallel_unsafe)]
    fn queue_create(
        queue_url: &str,
        visibility_timeout: default!(i32, 30),
    ) -> std::result::Result<String, ErrorReport> {
        let queue = ingest::parse_queue_url(queue_url)?;
        let client = sqs::client(&queue)?.sdk;
        let name = queue.name.clone();
        let out = sqs::block_on(async move {
            client
                .create_queue()
                .queue_name(name)
                .attributes(aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout, visibility_timeout.to_string())
                .send()
                .await
                .map_err(|e| sqs::classify("CreateQueue", e))
        })??;
        Ok(out.queue_url.unwrap_or_default())
    }

    /// Approximate message counts of a queue: visible, in flight (received, not deleted), delayed.
    #[pg_extern(volatile, parallel_unsafe)]
    fn queue_depth(
        queue_url: &str,
    ) -> std::result::Result<
        TableIterator<'static, (name!(visible, i64), name!(in_flight, i64), name!(delayed, i64))>,
        ErrorReport,
    > {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let queue = ingest::parse_queue_url(queue_url)?;
        let client = sqs::client(&queue)?.sdk;
        let url = queue.url.clone();
        let attrs = sqs::block_on(async move {
            client
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(A::ApproximateNumberOfMessages)
                .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
                .attribute_names(A::ApproximateNumberOfMessagesDelayed)
                .send()
                .await
                .map_err(|e| sqs::classify("GetQueueAttributes", e))
        })??;
        let get = |n: A| attrs.attributes().and_then(|a| a.get(&n)).and_then(|v| v.parse().ok()).unwrap_or(0i64);
        Ok(TableIterator::once((
            get(A::ApproximateNumberOfMessages),
            get(A::ApproximateNumberOfMessagesNotVisible),
            get(A::ApproximateNumberOfMessagesDelayed),
        )))
    }

    /// Benchmark baseline: receives and deletes (discards!) up to `max_messages` with the same client and
    /// concurrency as ingest, touching no table. Superuser only.
    #[pg_extern(volatile, parallel_unsafe)]
    fn bench_raw_drain(
        queue_url: &str,
        max_messages: i64,
    ) -> std::result::Result<
        TableIterator<'static, (name!(received, i64), name!(deleted, i64), name!(elapsed_ms, f64))>,
        ErrorReport,
    > {
        let (queue, _, _) = ingest::parse_args(queue_url, Some(max_messages), None)?;
        let client = sqs::client(&queue)?;
        let started = std::time::Instant::now();
        let (received, deleted) = sqs::block_on(sqs::raw_drain(
            client,
            queue.url.clone(),
            max_messages,
            gucs::receive_concurrency(),
            gucs::visibility_timeout_s(),
        ))??;
        Ok(TableIterator::once((received, deleted, started.elapsed().as_secs_f64() * 1000.0)))
    }

    /// Starts a background worker for one queue in this database (needs shared_preload_libraries). Returns its id.
    #[pg_extern(volatile, parallel_unsafe)]
    fn worker_start(
        queue_url: &str,
        batch_messages: default!(Option<i32>, "NULL"),
        method: default!(Option<&str>, "NULL"),
    ) -> std::result::Result<i32, ErrorReport> {
        Ok(crate::worker::start_dynamic(queue_url, batch_messages, method)?)
    }

    /// Stops this database's dynamic workers (of one queue, or all); each finishes its current batch. Returns how many.
    #[pg_extern(volatile, parallel_unsafe)]
    fn worker_stop(queue_url: default!(Option<&str>, "NULL")) -> std::result::Result<i64, ErrorReport> {
        Ok(crate::worker::stop_dynamic(queue_url)?)
    }

    /// Every running sqs_ingest worker of the server: static (GUC) and dynamic ones.
    #[allow(clippy::type_complexity)]
    #[pg_extern(volatile, parallel_unsafe)]
    fn worker_status() -> std::result::Result<
        TableIterator<
            'static,
            (
                name!(pid, i32),
                name!(worker, String),
                name!(database, Option<String>),
                name!(queue_urls, Option<String>),
                name!(state, Option<String>),
                name!(backend_start, Option<pgrx::datum::TimestampWithTimeZone>),
            ),
        >,
        ErrorReport,
    > {
        let static_urls = gucs::worker_queue_urls().join(",");
        let rows = crate::privilege::pinned(|| {
            Spi::connect(|c| {
                let rows = c.select(
                    "SELECT a.pid, a.application_name::text, a.datname::text, a.state::text, a.backend_start
                   FROM pg_catalog.pg_stat_activity a WHERE a.backend_type = 'sqs_ingest worker' ORDER BY a.pid",
                    None,
                    &[],
                )?;
                Ok::<_, pgrx::spi::SpiError>(
                    rows.map(|r| {
                        (
                            r.get::<i32>(1).ok().flatten().unwrap_or_default(),
                            r.get::<String>(2).ok().flatten().unwrap_or_default(),
                            r.get::<String>(3).ok().flatten(),
                            r.get::<String>(4).ok().flatten(),
                            r.get::<pgrx::datum::TimestampWithTimeZone>(5).ok().flatten(),
                        )
                    })
                    .collect::<Vec<_>>(),
                )
            })
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        let owner = extension_owner();
        let out: Vec<_> = rows
            .into_iter()
            .map(|(pid, label, db, state, start)| {
                let urls = if let Some(id) = label.strip_prefix("dynamic worker ") {
                    // By the worker's id (its label), never by a recorded pid, which may be stale.
                    let id: i32 = id.parse().unwrap_or(-1);
                    as_owner(owner, || {
                        Spi::get_one_with_args::<String>(
                            "SELECT queue_url FROM sqs_ingest.workers WHERE worker_id = $1 AND pid = $2",
                            &[id.into(), pid.into()],
                        )
                    })
                    .ok()
                    .flatten()
                } else {
                    Some(static_urls.clone())
                };
                (pid, label, db, urls, state, start)
            })
            .collect();
        Ok(TableIterator::new(out))
    }

    /// Records counters for a queue (used by sqs_ingest_drain to add post-commit delete outcomes).
    #[pg_extern(volatile, parallel_unsafe)]
    fn flush_stats() -> std::result::Result<(), ErrorReport> {
        let owner = extension_owner();
        Ok(as_owner(owner, || ingest::flush_unreported(""))?)
    }
}

/// `sqs_ingest.mask(value text, method text DEFAULT NULL)`: masks a value with the active key, `encrypt`
/// (reversible, the default from `sqs_ingest.masking_method`) or `hmac` (irreversible).
///
/// Written against Postgres' V1 calling convention directly rather than through `#[pg_extern]`: it runs once per
/// row in bulk masking, where pgrx's generic argument and return conversions cost as much as the HMAC itself.
/// The symbol and SQL definition are the ones `#[pg_extern]` generated up to 0.2.1, so install and upgrade scripts
/// are unchanged.
#[no_mangle]
#[doc(hidden)]
pub extern "C" fn pg_finfo_mask_wrapper() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

thread_local! {
    static TOKEN: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// # Safety
/// Called by Postgres through the V1 convention with the two arguments its SQL definition declares.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn mask_wrapper(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    use crate::error::Error;
    // SAFETY: Postgres passes a valid fcinfo with `nargs` initialised arguments; text arguments are varlenas
    // (detoasted here, possibly into the current memory context), read only while this call runs.
    unsafe {
        let nargs = (*fcinfo).nargs as usize;
        let args = (*fcinfo).args.as_slice(nargs);
        let text = |i: usize| -> Option<&[u8]> {
            let a = args.get(i).filter(|a| !a.isnull)?;
            let v = pg_sys::pg_detoast_datum_packed(a.value.cast_mut_ptr::<pg_sys::varlena>());
            Some(pgrx::varlena::varlena_to_byte_slice(v))
        };
        let Some(value) = text(0) else {
            (*fcinfo).isnull = true;
            return pg_sys::Datum::from(0usize);
        };
        let method_name = text(1).map(|b| std::str::from_utf8(b).unwrap_or("\u{fffd}"));
        let method = sqs_ingest::method_of(method_name).unwrap_or_else(|e| e.raise());
        let key = crate::keys::active_material().unwrap_or_else(|e| e.raise());
        TOKEN.with(|t| {
            let mut token = t.borrow_mut();
            key.mask_into(method, value, &mut token).unwrap_or_else(|e| Error::from(e).raise());
            crate::audit::count_mask();
            pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(token.as_ptr().cast(), token.len() as i32))
        })
    }
}

pgrx::extension_sql!(
    r#"
CREATE  FUNCTION sqs_ingest."mask"(
	"value" TEXT, /* Option < & str > */
	"method" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS TEXT /* Option < String > */
STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'mask_wrapper';
"#,
    name = "mask_function"
);
