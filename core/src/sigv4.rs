//! AWS Signature Version 4 for the direct SQS client's one request shape: `POST /` with a JSON body and a fixed
//! set of headers. A general signer (the `aws-sigv4` crate) builds and sorts a canonical request from arbitrary
//! headers and query strings with several allocations per step; this one writes the canonical request for the
//! known shape straight into one buffer. The unit tests check every signature against `aws-sigv4` itself.
//!
//! Signed headers, in canonical (byte) order: content-type, host, x-amz-date, x-amz-security-token (when the
//! credentials have a session token), x-amz-target, x-amzn-query-mode.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Credentials as SigV4 needs them.
pub struct Credentials<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
}

/// One request to sign.
pub struct Request<'a> {
    /// Host header value (`host` or `host:port` when the port is not the scheme's default).
    pub host: &'a str,
    pub content_type: &'a str,
    pub target: &'a str,
    pub query_mode: &'a str,
    pub body: &'a [u8],
}

/// The headers to add to the request: `x-amz-date`, `authorization` (and the session token, if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub amz_date: String,
    pub authorization: String,
}

/// Signs `request` for `service` in `region` at `time`.
pub fn sign(request: &Request<'_>, creds: &Credentials<'_>, region: &str, service: &str, time: SystemTime) -> Signed {
    let (amz_date, date) = timestamps(time);
    let signed_headers = if creds.session_token.is_some() {
        "content-type;host;x-amz-date;x-amz-security-token;x-amz-target;x-amzn-query-mode"
    } else {
        "content-type;host;x-amz-date;x-amz-target;x-amzn-query-mode"
    };
    let mut canonical = String::with_capacity(512);
    canonical.push_str("POST\n/\n\n");
    header(&mut canonical, "content-type", request.content_type);
    header(&mut canonical, "host", request.host);
    header(&mut canonical, "x-amz-date", &amz_date);
    if let Some(token) = creds.session_token {
        header(&mut canonical, "x-amz-security-token", token);
    }
    header(&mut canonical, "x-amz-target", request.target);
    header(&mut canonical, "x-amzn-query-mode", request.query_mode);
    canonical.push('\n');
    canonical.push_str(signed_headers);
    canonical.push('\n');
    hex_into(&mut canonical, &Sha256::digest(request.body));

    let scope = format!("{date}/{region}/{service}/aws4_request");
    let mut to_sign = String::with_capacity(160);
    let _ = write!(to_sign, "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n");
    hex_into(&mut to_sign, &Sha256::digest(canonical.as_bytes()));

    let mut secret = Vec::with_capacity(4 + creds.secret_access_key.len());
    secret.extend_from_slice(b"AWS4");
    secret.extend_from_slice(creds.secret_access_key.as_bytes());
    let k_date = hmac(&secret, date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let signature = hmac(&k_signing, to_sign.as_bytes());

    let mut authorization = String::with_capacity(256);
    let _ = write!(
        authorization,
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature=",
        creds.access_key_id
    );
    hex_into(&mut authorization, &signature);
    Signed { amz_date, authorization }
}

/// A canonical header line: value trimmed, inner runs of spaces collapsed to one.
fn header(out: &mut String, name: &str, value: &str) {
    out.push_str(name);
    out.push(':');
    let mut space = false;
    for c in value.trim().chars() {
        if c == ' ' {
            space = true;
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push(c);
    }
    out.push('\n');
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(data);
    m.finalize().into_bytes().into()
}

fn hex_into(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
}

/// (`YYYYMMDDTHHMMSSZ`, `YYYYMMDD`) in UTC.
fn timestamps(time: SystemTime) -> (String, String) {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let date = format!("{y:04}{m:02}{d:02}");
    (format!("{date}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60), date)
}

/// Proleptic Gregorian (year, month, day) of a count of days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// What the `aws-sigv4` crate (the AWS SDK's signer) produces for the same request.
    fn reference(request: &Request<'_>, creds: &Credentials<'_>, region: &str, time: SystemTime) -> Signed {
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        let identity = aws_credential_types::Credentials::new(
            creds.access_key_id,
            creds.secret_access_key,
            creds.session_token.map(str::to_string),
            None,
            "test",
        )
        .into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name("sqs")
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let uri = format!("http://{}/", request.host);
        let headers = [
            ("host", request.host),
            ("content-type", request.content_type),
            ("x-amz-target", request.target),
            ("x-amzn-query-mode", request.query_mode),
        ];
        let signable =
            SignableRequest::new("POST", uri, headers.into_iter(), SignableBody::Bytes(request.body)).unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        let get = |name: &str| instructions.headers().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()).unwrap();
        Signed { amz_date: get("x-amz-date"), authorization: get("authorization") }
    }

    #[test]
    fn signatures_match_the_sdk_signer() {
        let bodies: [&[u8]; 3] =
            [b"{}", br#"{"QueueUrl":"http://localhost:4566/000000000000/q","MaxNumberOfMessages":10}"#, b""];
        let times = [0u64, 1_700_000_000, 1_795_000_123, 951_782_400 /* 2000-02-29 */, 4_102_444_799];
        let tokens = [None, Some("IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ")];
        let hosts = ["localhost:4566", "sqs.eu-west-1.amazonaws.com"];
        let mut checked = 0;
        for (i, body) in bodies.iter().enumerate() {
            for (j, t) in times.iter().enumerate() {
                for token in tokens {
                    for host in hosts {
                        let request = Request {
                            host,
                            content_type: "application/x-amz-json-1.0",
                            target: if (i + j) % 2 == 0 {
                                "AmazonSQS.ReceiveMessage"
                            } else {
                                "AmazonSQS.DeleteMessageBatch"
                            },
                            query_mode: "true",
                            body,
                        };
                        let creds = Credentials {
                            access_key_id: "AKIDEXAMPLE",
                            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                            session_token: token,
                        };
                        let region = if j % 2 == 0 { "us-east-1" } else { "eu-west-1" };
                        let time = UNIX_EPOCH + Duration::from_secs(*t);
                        assert_eq!(
                            sign(&request, &creds, region, "sqs", time),
                            reference(&request, &creds, region, time)
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 60);
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(timestamps(UNIX_EPOCH), ("19700101T000000Z".into(), "19700101".into()));
        let leap = UNIX_EPOCH + Duration::from_secs(951_825_599); // 2000-02-29 11:59:59
        assert_eq!(timestamps(leap).0, "20000229T115959Z");
        let late = UNIX_EPOCH + Duration::from_secs(4_102_444_799); // 2099-12-31 23:59:59
        assert_eq!(timestamps(late).0, "20991231T235959Z");
    }

    #[test]
    fn header_values_are_trimmed_and_collapsed() {
        let mut out = String::new();
        header(&mut out, "x", "  a   b c  ");
        assert_eq!(out, "x:a b c\n");
    }
}
