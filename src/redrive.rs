//! `redrive()`: stores a dead letter again once its cause is fixed (its sealed body opened with the key it was
//! sealed with, validated or mapped and inserted as ingest would), or records why it still cannot be stored. A
//! pipeline's dead letter goes through its pipeline as declared now (its message attributes were sealed beside
//! the body); its filter is not applied again: redriving it is the operator's explicit choice.

use crate::error::{Error, Result};
use crate::privilege::{as_owner, extension_owner, pinned};
use crate::rows::{insert_isolated, Rows, TextRows};
use crate::{gucs, keys, pipeline, target};
use pgrx::prelude::*;
use sqs_ingest_core::event::{self, Rejection};
use sqs_ingest_core::mask::MaskError;
use sqs_ingest_core::pipeline::MessageView;

/// A dead letter as redrive reads it.
struct Found {
    url: String,
    key_id: i32,
    sealed: Vec<u8>,
    body_bytes: i32,
    sent_ms: Option<i64>,
    receive_count: Option<i32>,
    already: bool,
    pipeline: Option<String>,
    /// The sealed message attributes of a pipeline's dead letter (`\x…` hex from `to_jsonb`).
    attributes: Option<String>,
}

pub fn redrive(message_id: &str, queue_url: Option<&str>) -> Result<bool> {
    let owner = extension_owner();
    let Some(found) = pinned(|| find(owner, message_id, queue_url))? else {
        return Err(Error::InvalidArgument(format!("no dead letter with message id \"{message_id}\"")));
    };
    if found.already {
        notice!("dead letter {message_id} was already redriven");
        return Ok(false);
    }
    if found.body_bytes as usize > event::MAX_BODY_BYTES {
        return Err(Error::InvalidArgument(format!(
            "dead letter {message_id} cannot be redriven: its body is {} bytes, over the {} byte limit, so only its first {} bytes were kept",
            found.body_bytes,
            event::MAX_BODY_BYTES,
            event::KEPT_BODY_PREFIX_BYTES
        )));
    }
    // The target is named by the caller's settings and path (the login pipeline) or by the pipeline's declaration;
    // every other statement runs pinned.
    match found.pipeline.clone() {
        None => {
            let t = target::resolve_or_create(&gucs::target_table())?;
            pinned(|| redrive_login(owner, message_id, &found, &t))
        }
        Some(name) => {
            let p = pinned(|| pipeline::load(&name))?;
            pinned(|| pipeline::may_run(&p))?;
            // Only a dead letter of this very declaration (not of a dropped pipeline whose name was declared again,
            // maybe by another role into another table) and of its queue.
            let ours = pinned(|| {
                as_owner(owner, || {
                    Spi::get_one_with_args::<bool>(
                        "SELECT p.id OPERATOR(pg_catalog.=) (pg_catalog.to_jsonb(d.*) ->> 'pipeline_id')::pg_catalog.int8
                                AND sqs_ingest.queue_arn(p.queue_url) OPERATOR(pg_catalog.=) sqs_ingest.queue_arn(d.queue_url)
                           FROM sqs_ingest.pipelines p, sqs_ingest.dead_letters d
                          WHERE p.name OPERATOR(pg_catalog.=) $1 AND d.queue_url OPERATOR(pg_catalog.=) $2
                            AND d.message_id OPERATOR(pg_catalog.=) $3",
                        &[name.clone().into(), found.url.clone().into(), message_id.into()],
                    )
                })
            })
            .map_err(|e| Error::Internal(e.to_string()))?
            .unwrap_or(false);
            if !ours {
                return Err(Error::Pipeline {
                    code: pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    message: format!(
                        "dead letter {message_id} was dead-lettered by an earlier pipeline named \"{name}\" (dropped since) or from another queue"
                    ),
                });
            }
            let t = target::resolve_existing(&p.target)?;
            pinned(|| redrive_pipeline(owner, message_id, &found, &p, &t))
        }
    }
}

fn find(owner: pg_sys::Oid, message_id: &str, queue_url: Option<&str>) -> Result<Option<Found>> {
    as_owner(owner, || {
        // FOR UPDATE: two concurrent redrives of one dead letter store it once (the second waits, then sees it
        // redriven). The 0.6.0 columns are read through to_jsonb, so an older schema reads them as NULL.
        Spi::connect_mut(|c| {
            let rows = c.update(
                "SELECT queue_url, key_id, body_encrypted, body_bytes,
                        (EXTRACT(EPOCH FROM sent_at) * 1000)::int8, redriven_at IS NOT NULL, receive_count,
                        pg_catalog.to_jsonb(d.*) ->> 'pipeline', pg_catalog.to_jsonb(d.*) ->> 'attributes_encrypted'
                   FROM sqs_ingest.dead_letters d
                  WHERE message_id = $1 AND ($2::text IS NULL OR queue_url = $2)
                  ORDER BY received_at DESC LIMIT 1
                    FOR UPDATE",
                None,
                &[message_id.into(), queue_url.map(str::to_string).into()],
            )?;
            Ok::<_, pgrx::spi::SpiError>(rows.into_iter().next().map(|r| Found {
                url: r.get::<String>(1).ok().flatten().unwrap_or_default(),
                key_id: r.get::<i32>(2).ok().flatten().unwrap_or_default(),
                sealed: r.get::<Vec<u8>>(3).ok().flatten().unwrap_or_default(),
                body_bytes: r.get::<i32>(4).ok().flatten().unwrap_or_default(),
                sent_ms: r.get::<i64>(5).ok().flatten(),
                already: r.get::<bool>(6).ok().flatten().unwrap_or(false),
                receive_count: r.get::<i32>(7).ok().flatten(),
                pipeline: r.get::<String>(8).ok().flatten(),
                attributes: r.get::<String>(9).ok().flatten(),
            }))
        })
    })
    .map_err(|e| Error::Internal(e.to_string()))
}

/// The dead letter's body, opened with the key it was sealed with.
fn open(found: &Found, sealed: &[u8]) -> Result<Vec<u8>> {
    let ring = keys::keyring(true)?;
    let key = ring.get(found.key_id).ok_or(Error::Mask(MaskError::UnknownKey(found.key_id)))?;
    Ok(key.open_blob(sealed)?)
}

/// Records why the dead letter still cannot be stored (a NOTICE says so too).
fn still_refused(owner: pg_sys::Oid, message_id: &str, found: &Found, reason: &Rejection) -> Result<bool> {
    notice!("dead letter {message_id} still cannot be stored: {reason}");
    as_owner(owner, || {
        Spi::run_with_args(
            "UPDATE sqs_ingest.dead_letters SET reason_code = $3, reason = $4 WHERE queue_url = $1 AND message_id = $2",
            &[found.url.clone().into(), message_id.into(), reason.code().into(), reason.to_string().into()],
        )
    })
    .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(false)
}

/// Marks the dead letter redriven, in the dead letters and the ledger.
fn stored(owner: pg_sys::Oid, message_id: &str, found: &Found) -> Result<bool> {
    as_owner(owner, || {
        Spi::run_with_args(
            "UPDATE sqs_ingest.dead_letters SET redriven_at = pg_catalog.now() WHERE queue_url = $1 AND message_id = $2;",
            &[found.url.clone().into(), message_id.into()],
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        crate::bookkeeping::mark_redriven(&crate::bookkeeping::LedgerQueue::of(&found.url)?, message_id)
    })?;
    Ok(true)
}

fn redrive_login(owner: pg_sys::Oid, message_id: &str, found: &Found, t: &target::Target) -> Result<bool> {
    let body = String::from_utf8(open(found, &found.sealed)?).map_err(|_| Error::Mask(MaskError::Tampered))?;
    match event::parse(&body).and_then(|e| event::validate(&e, &t.limits).map(|v| (e, v))) {
        Err(reason) => still_refused(owner, message_id, found, &reason),
        Ok((e, v)) => {
            let (ring, active) = keys::active_key()?;
            let mut rows = Rows::default();
            rows.push(ring.get(active).expect("active"), gucs::masking_method(), e, v, found.sent_ms)?;
            match insert_isolated(rows, t)?.into_iter().next() {
                Some((_, reason)) => still_refused(owner, message_id, found, &reason),
                None => stored(owner, message_id, found),
            }
        }
    }
}

fn redrive_pipeline(
    owner: pg_sys::Oid,
    message_id: &str,
    found: &Found,
    p: &pipeline::Pipeline,
    t: &target::Target,
) -> Result<bool> {
    let body = String::from_utf8(open(found, &found.sealed)?).map_err(|_| Error::Mask(MaskError::Tampered))?;
    let attributes = match &found.attributes {
        Some(hex) => {
            let bytes = (2..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
                .collect::<std::result::Result<Vec<u8>, _>>()
                .map_err(|_| Error::Mask(MaskError::Tampered))?;
            crate::bookkeeping::SealedAttributes::decode(&open(found, &bytes)?)
        }
        None => crate::bookkeeping::SealedAttributes::default(),
    };
    let layout = pipeline::layout(p, t)?;
    let view = MessageView {
        body: &body,
        message_id,
        sent_timestamp_ms: found.sent_ms,
        receive_count: found.receive_count,
        group_id: attributes.group_id.as_deref(),
        sequence_number: attributes.sequence_number.as_deref(),
        attributes: &attributes.attributes,
    };
    let (ring, active) = keys::active_key()?;
    let mut values = Vec::new();
    if let Err(reason) = layout.mapping.extract(&view, ring.get(active), &mut values) {
        return still_refused(owner, message_id, found, &reason);
    }
    let mut rows = TextRows::new(layout.rows.clone());
    rows.push(values);
    match insert_isolated(rows, t)?.into_iter().next() {
        Some((_, reason)) => still_refused(owner, message_id, found, &reason),
        None => stored(owner, message_id, found),
    }
}
