//! The direct SQS client: ReceiveMessage, DeleteMessageBatch and ChangeMessageVisibilityBatch as SigV4-signed
//! AWS JSON 1.0 requests over pooled keep-alive connections (hyper, rustls), without the SDK's per-request
//! pipeline.
//!
//! Why: `make bench` measured the SDK's pipeline (config bag, interceptors, endpoint rules, identity cache,
//! retry and timeout layers) at most of the backend's CPU per message, for two requests per ten messages. This
//! client does the same three calls signed by the SDK's own SigV4 signer (`aws-sigv4`), with the same credentials
//! (the SDK config's provider chain, cached until shortly before expiry) and the same error classification. Everything
//! else (GetQueueAttributes, queue administration, the pre-flight probe) stays on the SDK, and
//! `sqs_ingest.sqs_client = 'sdk'` puts the hot path back on it too (for proxies, FIPS or dual-stack endpoints).
//! Wire formats live in `sqs_ingest_core::sqs_json`.

use crate::error::error_chain;
use crate::error::{Error, Result};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sqs_ingest_core::sqs_error::Observed;
use sqs_ingest_core::sqs_json::{self, Operation, WireMessage};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// Attempts per call, as the SDK's standard retry mode.
const MAX_ATTEMPTS: u32 = 3;
/// Refresh temporary credentials this long before they expire.
const CREDENTIALS_MARGIN: Duration = Duration::from_secs(300);

type Http = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct Direct {
    http: Http,
    /// Where every request is POSTed (`scheme://host[:port]/`).
    endpoint: String,
    /// The Host header (port only when not the scheme's default).
    host: String,
    region: String,
    provider: SharedCredentialsProvider,
    credentials: tokio::sync::Mutex<Option<Credentials>>,
    request_timeout: Duration,
}

/// A failed attempt, as observed.
struct Failure {
    status: Option<u16>,
    code: Option<String>,
    message: Option<String>,
    content_type: Option<String>,
    body_start: Vec<u8>,
    transport: Option<String>,
}

/// Boxed: the failure path is rare and the success path should stay small.
type Attempt<T> = std::result::Result<T, Box<Failure>>;

impl Failure {
    fn no_response(why: String) -> Box<Failure> {
        Box::new(Failure {
            status: None,
            code: None,
            message: None,
            content_type: None,
            body_start: Vec::new(),
            transport: Some(why),
        })
    }

    fn into_error(self, op: Operation) -> Error {
        let seen = Observed {
            error_code: self.code.as_deref(),
            http_status: self.status,
            content_type: self.content_type.as_deref(),
            body_start: (!self.body_start.is_empty()).then_some(&self.body_start[..]),
            no_response: self.status.is_none(),
        };
        let what = match (&self.transport, &self.code) {
            (Some(t), _) => t.clone(),
            (None, Some(code)) => format!("{code}: {}", self.message.as_deref().unwrap_or("no message")),
            (None, None) => format!("HTTP {}", self.status.unwrap_or(0)),
        };
        crate::error::sqs_failure(op.name(), &seen, what)
    }
}

impl Direct {
    /// A client for `endpoint` (scheme://host[:port], from the SDK config or the region's public endpoint).
    pub fn new(
        endpoint: &str,
        region: &str,
        provider: SharedCredentialsProvider,
        request_timeout: Duration,
    ) -> Result<Direct> {
        let uri: http::Uri =
            endpoint.parse().map_err(|e| Error::Internal(format!("SQS endpoint {endpoint} is not a URI: {e}")))?;
        let scheme = uri.scheme_str().unwrap_or("https").to_string();
        let authority =
            uri.authority().ok_or_else(|| Error::Internal(format!("SQS endpoint {endpoint} has no host")))?.clone();
        let default_port = if scheme == "http" { 80 } else { 443 };
        let host = match authority.port_u16() {
            Some(p) if p != default_port => format!("{}:{p}", authority.host()),
            _ => authority.host().to_string(),
        };
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(request_timeout.min(Duration::from_secs(5))));
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(scheme == "https"))
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(tls);
        Ok(Direct {
            http,
            endpoint: format!("{scheme}://{host}/"),
            host,
            region: region.to_string(),
            provider,
            credentials: tokio::sync::Mutex::new(None),
            request_timeout,
        })
    }

    pub async fn receive(&self, queue_url: &str, max: i32, wait_s: i32, visibility_s: i32) -> Result<Vec<WireMessage>> {
        let op = Operation::ReceiveMessage;
        let body = self.call(op, sqs_json::receive_request(queue_url, max, wait_s, visibility_s), wait_s).await?;
        sqs_json::parse_receive(&body).map_err(|e| crate::error::sqs_failure(op.name(), &Observed::default(), e))
    }

    /// One DeleteMessageBatch of at most 10 receipts: (succeeded, failed) entries, `None` if the call failed.
    pub async fn delete_batch(&self, queue_url: &str, receipts: &[String]) -> Option<(usize, usize)> {
        let body = sqs_json::delete_batch_request(queue_url, receipts);
        let answer = self.call(Operation::DeleteMessageBatch, body, 0).await.ok()?;
        sqs_json::parse_batch(&answer).ok()
    }

    /// One ChangeMessageVisibilityBatch of at most 10 receipts.
    pub async fn change_visibility_batch(
        &self,
        queue_url: &str,
        receipts: &[String],
        visibility_s: i32,
    ) -> Option<(usize, usize)> {
        let body = sqs_json::change_visibility_batch_request(queue_url, receipts, visibility_s);
        let answer = self.call(Operation::ChangeMessageVisibilityBatch, body, 0).await.ok()?;
        sqs_json::parse_batch(&answer).ok()
    }

    /// Sends with up to [`MAX_ATTEMPTS`] tries for transient failures (no answer, 5xx, throttling).
    async fn call(&self, op: Operation, body: Vec<u8>, wait_s: i32) -> Result<Bytes> {
        let body = Bytes::from(body);
        let mut attempt = 1;
        loop {
            match self.attempt(op, body.clone(), wait_s).await {
                Ok(answer) => return Ok(answer),
                Err(f) if attempt < MAX_ATTEMPTS && sqs_json::retryable(f.status, f.code.as_deref()) => {
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    attempt += 1;
                }
                Err(f) => return Err(f.into_error(op)),
            }
        }
    }

    async fn attempt(&self, op: Operation, body: Bytes, wait_s: i32) -> Attempt<Bytes> {
        let creds = self.current_credentials().await?;
        // Signed by the SDK's signer: the host, content type, operation and query-mode headers, and the body.
        let headers = [
            ("host", self.host.as_str()),
            ("content-type", sqs_json::CONTENT_TYPE),
            ("x-amz-target", op.target()),
            ("x-amzn-query-mode", "true"),
        ];
        let identity = creds.into();
        let signing = || -> std::result::Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let params = aws_sigv4::sign::v4::SigningParams::builder()
                .identity(&identity)
                .region(&self.region)
                .name("sqs")
                .time(SystemTime::now())
                .settings(aws_sigv4::http_request::SigningSettings::default())
                .build()?
                .into();
            let signable = aws_sigv4::http_request::SignableRequest::new(
                "POST",
                self.endpoint.as_str(),
                headers.into_iter(),
                aws_sigv4::http_request::SignableBody::Bytes(&body),
            )?;
            Ok(aws_sigv4::http_request::sign(signable, &params)?.into_parts().0)
        };
        let instructions = signing().map_err(|e| Failure::no_response(format!("cannot sign the request: {e}")))?;
        // The headers sent are the ones signed, plus what the signer adds (date, authorization, session token).
        let mut request = http::Request::post(self.endpoint.as_str());
        for (name, value) in headers.into_iter().chain(instructions.headers()) {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| Failure::no_response(format!("cannot build the request: {e}")))?;
        let limit = self.request_timeout + Duration::from_secs(wait_s.max(0) as u64);
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| Failure::no_response(error_chain(&e)))?;
            let status = response.status().as_u16();
            let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
            let (content_type, query_error) = (header("content-type"), header("x-amzn-query-error"));
            let answer =
                response.into_body().collect().await.map_err(|e| Failure::no_response(error_chain(&e)))?.to_bytes();
            if (200..300).contains(&status) {
                return Ok(answer);
            }
            let (code, message) = sqs_json::parse_error(&answer, query_error.as_deref());
            Err(Box::new(Failure {
                status: Some(status),
                code,
                message,
                content_type,
                body_start: answer[..answer.len().min(256)].to_vec(),
                transport: None,
            }))
        };
        tokio::time::timeout(limit, exchange)
            .await
            .unwrap_or_else(|_| Err(Failure::no_response(format!("no answer within {} ms", limit.as_millis()))))
    }

    /// The provider chain's credentials, asked again only when they are about to expire.
    async fn current_credentials(&self) -> Attempt<Credentials> {
        let mut cached = self.credentials.lock().await;
        let fresh = cached
            .as_ref()
            .filter(|c| c.expiry().is_none_or(|at| at > SystemTime::now() + CREDENTIALS_MARGIN))
            .cloned();
        if let Some(c) = fresh {
            return Ok(c);
        }
        let c = self.provider.provide_credentials().await.map_err(|e| {
            // Reported like an SDK credentials failure: no request was sent.
            Failure::no_response(format!("no AWS credentials: {}", error_chain(&e)))
        })?;
        *cached = Some(c.clone());
        Ok(c)
    }
}

/// TLS with the system's roots (rustls + ring), read once per process and only for an https endpoint; plain-http
/// endpoints (LocalStack) never use it. With no readable roots an https call fails with a certificate error.
fn tls_config(https: bool) -> rustls::ClientConfig {
    static WITH_ROOTS: OnceLock<rustls::ClientConfig> = OnceLock::new();
    let build = |roots: rustls::RootCertStore| {
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth()
    };
    if !https {
        return build(rustls::RootCertStore::empty());
    }
    WITH_ROOTS
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            build(roots)
        })
        .clone()
}
