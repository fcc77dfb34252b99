//! What every AWS client of the extension shares (SQS in [`crate::sqs`], KMS in [`crate::kms`]): the
//! credentials (the static `sqs_ingest.aws_*` settings, placeholders for a local endpoint, or the SDK's default
//! provider chain), the HTTP client (rustls with ring), timeouts, standard retries, and the SDK config made of them.

use crate::error::{Error, Result};
use crate::gucs;
use aws_credential_types::Credentials;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use std::time::Duration;

/// The credentials requests are signed with: the static settings when both are set; for a non-AWS endpoint
/// (LocalStack, ElasticMQ) without them and without `AWS_ACCESS_KEY_ID`, placeholders (such endpoints accept any
/// signature, and instance-metadata lookups could only time out); otherwise None (the SDK's default chain).
pub fn credentials(aws_endpoint: bool) -> Result<Option<Credentials>> {
    let static_creds = match (gucs::aws_access_key_id(), gucs::aws_secret_access_key()) {
        (Some(id), Some(secret)) => {
            Some(Credentials::new(id, secret, gucs::aws_session_token(), None, "sqs_ingest GUCs"))
        }
        (None, None) => None,
        _ => {
            return Err(Error::InvalidArgument(
                "sqs_ingest.aws_access_key_id and sqs_ingest.aws_secret_access_key must be set together".into(),
            ))
        }
    };
    Ok(static_creds.or_else(|| {
        (!aws_endpoint && std::env::var_os("AWS_ACCESS_KEY_ID").is_none())
            .then(|| Credentials::new("test", "test", None, None, "sqs_ingest local endpoint"))
    }))
}

/// The key a client is cached under: its endpoint (None: the service's public one), region, timeout and a
/// fingerprint of the credentials (never the secret itself). A change of any of them makes a new client.
pub fn client_key(endpoint: Option<&str>, region: &str, timeout_ms: u64, creds: Option<&Credentials>) -> String {
    use std::hash::{Hash, Hasher};
    let fingerprint = creds
        .map(|c| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            c.access_key_id().hash(&mut h);
            c.secret_access_key().hash(&mut h);
            format!("{:x}", h.finish())
        })
        .unwrap_or_default();
    format!("{}|{region}|{timeout_ms}|{fingerprint}", endpoint.unwrap_or("aws"))
}

/// What an SDK call's failure says: the service's error code and message, else the transport error's chain.
pub fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(err: &SdkError<E, HttpResponse>) -> String {
    match (err, err.code()) {
        (SdkError::ServiceError(_), Some(code)) => format!("{code}: {}", err.message().unwrap_or("no message")),
        _ => crate::error::error_chain(err),
    }
}

fn http_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::tls;
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https()
}

/// The SDK config for an endpoint (None: the service's regional one, or `AWS_ENDPOINT_URL[_<SERVICE>]`) and
/// region, with `creds` or, without them, the SDK's default provider chain; `timeout_ms` bounds each attempt
/// (plus 20 s for long polls) and the connect (at most 5 s); three attempts with standard retries.
pub async fn sdk_config(
    endpoint: Option<String>,
    region: String,
    creds: Option<Credentials>,
    timeout_ms: u64,
) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region))
        .http_client(http_client())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_millis(timeout_ms.min(5_000)))
                .operation_attempt_timeout(Duration::from_millis(timeout_ms + 20_000))
                .build(),
        )
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3));
    if let Some(c) = creds {
        loader = loader.credentials_provider(c);
    }
    if let Some(ep) = endpoint {
        loader = loader.endpoint_url(ep);
    }
    loader.load().await
}
