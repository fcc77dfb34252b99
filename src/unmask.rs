//! `unmask()`: reverses an `enc:` token with the key it names, and audits every call, refused or not, in
//! `sqs_ingest.unmask_audit` and the server log.

use crate::error::{Error, Result};
use crate::privilege::role_names;
use crate::{audit, keys};
use pgrx::prelude::*;
use sqs_ingest_core::mask::{MaskError, Token};

/// The clear value of `token`; every call is audited (a refusal with its reason, never the token's value).
pub fn unmask(token: &str) -> Result<String> {
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
            log!(
                "sqs_ingest audit: unmask by session_role={session} current_role={current} key_id={key_id:?} succeeded"
            );
            audit::record_success(&session, &current, key_id)?;
            Ok(value)
        }
        Err(e) => {
            log!("sqs_ingest audit: unmask by session_role={session} current_role={current} key_id={key_id:?} refused: {e}");
            audit::record_refusal(key_id, audit::Refusal::of(&e));
            Err(e)
        }
    }
}
