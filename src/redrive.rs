//! `redrive()`: stores a dead letter again once its cause is fixed (its sealed body opened with the key it was
//! sealed with, validated and inserted as ingest would), or records why it still cannot be stored.

use crate::error::{Error, Result};
use crate::privilege::{as_owner, extension_owner};
use crate::{gucs, keys, target};
use pgrx::prelude::*;
use sqs_ingest_core::event;
use sqs_ingest_core::mask::MaskError;

pub fn redrive(message_id: &str, queue_url: Option<&str>) -> Result<bool> {
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
                        (EXTRACT(EPOCH FROM sent_at) * 1000)::int8, redriven_at IS NOT NULL,
                        pg_catalog.to_jsonb(d.*) ->> 'pipeline'
                   FROM sqs_ingest.dead_letters d
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
                    r.get::<String>(7).ok().flatten(),
                )
            }))
        })
    })
    .map_err(|e| Error::Internal(e.to_string()))?;
    let Some((url, key_id, sealed, body_bytes, sent_ms, already, pipeline)) = found else {
        return Err(Error::InvalidArgument(format!("no dead letter with message id \"{message_id}\"")));
    };
    if let Some(pipeline) = pipeline {
        // Its message attributes were not kept with the body, so it cannot be stored as its pipeline would.
        return Err(Error::Pipeline {
            code: pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            message: format!("dead letter {message_id} of pipeline \"{pipeline}\" cannot be redriven by this version"),
        });
    }
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
            let mut rows = crate::rows::Rows::default();
            rows.push(ring.get(active).expect("active"), gucs::masking_method(), e, v, sent_ms)?;
            if let Some((_, reason)) = crate::rows::insert_isolated(rows, t)?.into_iter().next() {
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
