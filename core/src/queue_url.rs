//! Queue URL parsing: where to send requests, and which region to sign for.
//!
//! An AWS SQS host (`sqs.<region>.amazonaws.com`, `<region>.queue.amazonaws.com`, `queue.amazonaws.com`, and the
//! `.amazonaws.com.cn` forms) gives the region and lets the SDK resolve the endpoint. Any other host (LocalStack,
//! ElasticMQ, a VPC endpoint) becomes the endpoint itself, so `http://localhost:4566/000000000000/login-queue` works.
//! LocalStack's domain forms (`sqs.<region>.localhost.localstack.cloud`, `<region>.queue.localhost.localstack.cloud`)
//! and path form (`/queue/<region>/<account>/<name>`) name their region too.
//!
//! A queue's identity is not its spelling: [`QueueUrl::arn`] is what SQS calls the queue (region, account, name),
//! the same for every URL that reaches it, and is what the ledger, stats and workers key a queue by.

use std::fmt;
use thiserror::Error;

/// The ledger key of a queue's identity text: the first 64 bits of its SHA-256, big-endian, as a signed integer —
/// what the SQL function `sqs_ingest.queue_key(text)` computes (a pgrx test holds the two to each other).
pub fn queue_key(text: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(text.as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueUrl {
    /// The URL exactly as given (used as the SQS QueueUrl parameter and as the queue's identity).
    pub url: String,
    /// `scheme://host[:port]` for non-AWS hosts; `None` for AWS hosts.
    pub endpoint: Option<String>,
    /// Region named by an AWS host; `None` for other hosts (the `sqs_ingest.region` GUC applies).
    pub region: Option<String>,
    pub account: String,
    pub name: String,
    /// The URL's host, lower-cased, without IPv6 brackets or port (what [`QueueUrl::host_allowed`] checks).
    pub host: String,
}

/// The default of `sqs_ingest.allowed_endpoints`: AWS's SQS hosts and loopback.
pub const DEFAULT_ALLOWED_ENDPOINTS: &str = "*.amazonaws.com, *.amazonaws.com.cn, localhost, 127.0.0.1, ::1";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum QueueUrlError {
    #[error("queue URL must start with http:// or https://")]
    Scheme,
    #[error("queue URL must not contain user information (credentials belong in the AWS credential chain)")]
    UserInfo,
    #[error("queue URL has no host")]
    NoHost,
    #[error("queue URL must not have a query string or fragment")]
    Query,
    #[error(
        "queue URL path must be /<account id>/<queue name> (or LocalStack's /queue/<region>/<account id>/<queue name>)"
    )]
    Path,
    #[error("queue name must be 1-80 characters of A-Z, a-z, 0-9, '-' and '_' (optionally ending in .fifo)")]
    Name,
    #[error("queue URL port is not a number between 1 and 65535")]
    Port,
}

impl fmt::Display for QueueUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// The region a host of the AWS (or LocalStack's domain) naming scheme names: `sqs.<region>.`, `sqs-fips.<region>.`,
/// `<region>.queue.`, or `queue.` (us-east-1) before the domain.
fn region_of(base: &str) -> Option<String> {
    if base == "queue" {
        return Some("us-east-1".into());
    }
    let region =
        base.strip_prefix("sqs.").or_else(|| base.strip_prefix("sqs-fips.")).or_else(|| base.strip_suffix(".queue"))?;
    valid_region(region).then(|| region.to_string())
}

fn valid_region(region: &str) -> bool {
    !region.is_empty() && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// LocalStack's domain endpoint strategy: `<sqs.region | region.queue>.localhost.localstack.cloud`.
const LOCALSTACK_DOMAIN: &str = ".localhost.localstack.cloud";

fn aws_region(host: &str) -> Option<Option<String>> {
    let host = host.to_ascii_lowercase();
    let base = host.strip_suffix(".amazonaws.com").or_else(|| host.strip_suffix(".amazonaws.com.cn"))?;
    // Another amazonaws.com host (e.g. a VPC endpoint name) is AWS too, but its region comes from the GUC.
    Some(region_of(base))
}

fn valid_name(name: &str) -> bool {
    let stem = name.strip_suffix(".fifo").unwrap_or(name);
    !stem.is_empty() && name.len() <= 80 && stem.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl QueueUrl {
    /// Whether the queue is a FIFO queue: SQS requires their names to end in `.fifo`.
    pub fn is_fifo(&self) -> bool {
        self.name.ends_with(".fifo")
    }

    pub fn parse(text: &str) -> Result<QueueUrl, QueueUrlError> {
        let text = text.trim();
        let (scheme, rest) = if let Some(r) = text.strip_prefix("https://") {
            ("https", r)
        } else if let Some(r) = text.strip_prefix("http://") {
            ("http", r)
        } else {
            return Err(QueueUrlError::Scheme);
        };
        if rest.contains('?') || rest.contains('#') {
            return Err(QueueUrlError::Query);
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return Err(QueueUrlError::UserInfo);
        }
        let host = match authority.rsplit_once(':') {
            Some((h, port)) if !h.ends_with(']') || authority.starts_with('[') => match port.parse::<u16>() {
                Ok(p) if p > 0 => h,
                _ => return Err(QueueUrlError::Port),
            },
            _ => authority,
        };
        if host.is_empty() {
            return Err(QueueUrlError::NoHost);
        }
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        // `/<account>/<name>`, or LocalStack's path form `/queue/<region>/<account>/<name>` (what its CreateQueue
        // and GetQueueUrl return with SQS_ENDPOINT_STRATEGY=path).
        let (path_region, account, name) = match segments.as_slice() {
            [account, name] => (None, *account, *name),
            ["queue", region, account, name] if valid_region(region) => (Some(region.to_string()), *account, *name),
            _ => return Err(QueueUrlError::Path),
        };
        if account.is_empty() || !account.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(QueueUrlError::Path);
        }
        if !valid_name(name) {
            return Err(QueueUrlError::Name);
        }
        let lower_host = host.to_ascii_lowercase();
        let (endpoint, region) = match aws_region(host) {
            Some(region) => (None, region),
            None => {
                let domain_region = lower_host.strip_suffix(LOCALSTACK_DOMAIN).and_then(region_of);
                (Some(format!("{scheme}://{authority}")), path_region.or(domain_region))
            }
        };
        Ok(QueueUrl {
            url: text.trim_end_matches('/').to_string(),
            endpoint,
            region,
            account: account.to_string(),
            name: name.to_string(),
            host: host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase(),
        })
    }

    /// Whether requests (and the credentials signing them) may go to this URL's host, given the comma-separated
    /// patterns of `sqs_ingest.allowed_endpoints`: `*` allows every host, `*.example.com` any host under
    /// example.com (not example.com itself), anything else one host exactly (case-insensitive; IPv6 with or
    /// without brackets).
    pub fn host_allowed(&self, patterns: &str) -> bool {
        host_allowed(&self.host, patterns)
    }

    pub fn is_aws(&self) -> bool {
        self.endpoint.is_none()
    }

    /// The region requests are signed for: the one the URL names, else `default_region` (`sqs_ingest.region`).
    pub fn signing_region<'a>(&'a self, default_region: &'a str) -> &'a str {
        self.region.as_deref().unwrap_or(default_region)
    }

    /// The queue's ARN, `arn:<partition>:sqs:<region>:<account>:<name>`: its identity whatever the spelling of the
    /// URL (`localhost` or `127.0.0.1`, path or domain form, current or legacy AWS host), as SQS reports it in
    /// the `QueueArn` attribute. SQS scopes a queue by the region a request is signed for, so the region is the
    /// signing region ([`QueueUrl::signing_region`]).
    pub fn arn(&self, default_region: &str) -> String {
        let region = self.signing_region(default_region);
        let partition = if region.starts_with("cn-") || self.host.ends_with(".amazonaws.com.cn") {
            "aws-cn"
        } else if region.starts_with("us-gov-") {
            "aws-us-gov"
        } else {
            "aws"
        };
        format!("arn:{partition}:sqs:{region}:{}:{}", self.account, self.name)
    }
}

/// Whether `host` (lower-case, IPv6 without brackets) matches one of the comma-separated patterns of
/// `sqs_ingest.allowed_endpoints` (see [`QueueUrl::host_allowed`]).
pub fn host_allowed(host: &str, patterns: &str) -> bool {
    patterns.split(',').map(|p| p.trim().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase()).any(|p| {
        match p.strip_prefix("*.") {
            _ if p == "*" => true,
            Some(suffix) => {
                !suffix.is_empty()
                    && host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            None => !p.is_empty() && p == host,
        }
    })
}

/// Whether a host (as [`endpoint_host`] gives it) names this machine: `localhost`, 127.0.0.0/8 or `::1`.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost" || host == "::1" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

/// The host of an endpoint URL (`http(s)://host[:port][/]`), lower-case, IPv6 without brackets; None when the
/// text is not such a URL (no scheme, user info, a path, a query).
pub fn endpoint_host(url: &str) -> Option<String> {
    let rest = url.trim().strip_prefix("https://").or_else(|| url.trim().strip_prefix("http://"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return None;
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        (host, if rest.is_empty() { None } else { Some(rest.strip_prefix(':')?) })
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 5) {
        return None;
    }
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localstack_url_becomes_the_endpoint() {
        let q = QueueUrl::parse("http://localhost:4566/000000000000/login-queue").unwrap();
        assert_eq!(q.endpoint.as_deref(), Some("http://localhost:4566"));
        assert_eq!(q.region, None);
        assert_eq!(q.account, "000000000000");
        assert_eq!(q.name, "login-queue");
        assert!(!q.is_aws());
    }

    #[test]
    fn aws_hosts_give_the_region() {
        let cases = [
            ("https://sqs.eu-west-1.amazonaws.com/123456789012/q", Some("eu-west-1")),
            ("https://eu-central-1.queue.amazonaws.com/123456789012/q.fifo", Some("eu-central-1")),
            ("https://queue.amazonaws.com/123456789012/q", Some("us-east-1")),
            ("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q", Some("cn-north-1")),
            ("https://sqs-fips.us-gov-west-1.amazonaws.com/123456789012/q", Some("us-gov-west-1")),
            ("https://vpce-1.sqs.amazonaws.com/123456789012/q", None),
        ];
        for (url, region) in cases {
            let q = QueueUrl::parse(url).unwrap();
            assert!(q.is_aws(), "{url}");
            assert_eq!(q.region.as_deref(), region, "{url}");
        }
    }

    #[test]
    fn localstack_path_form_names_its_region() {
        let q = QueueUrl::parse("http://localhost:4566/queue/eu-west-1/000000000000/login-queue").unwrap();
        assert_eq!(q.endpoint.as_deref(), Some("http://localhost:4566"));
        assert_eq!(q.region.as_deref(), Some("eu-west-1"));
        assert_eq!((q.account.as_str(), q.name.as_str()), ("000000000000", "login-queue"));
        assert_eq!(q.url, "http://localhost:4566/queue/eu-west-1/000000000000/login-queue");
        assert_eq!(QueueUrl::parse("http://h/queue/EU/0/q"), Err(QueueUrlError::Path));
        assert_eq!(QueueUrl::parse("http://h/other/r/0/q"), Err(QueueUrlError::Path));
    }

    #[test]
    fn malformed_urls_are_refused() {
        assert_eq!(QueueUrl::parse("localhost:4566/0/q"), Err(QueueUrlError::Scheme));
        assert_eq!(QueueUrl::parse("ftp://h/0/q"), Err(QueueUrlError::Scheme));
        assert_eq!(QueueUrl::parse("http:///0/q"), Err(QueueUrlError::NoHost));
        assert_eq!(QueueUrl::parse("http://user:secret@h/0/q"), Err(QueueUrlError::UserInfo));
        assert_eq!(QueueUrl::parse("http://h/0/q?x=1"), Err(QueueUrlError::Query));
        assert_eq!(QueueUrl::parse("http://h/q"), Err(QueueUrlError::Path));
        assert_eq!(QueueUrl::parse("http://h/0/q/extra"), Err(QueueUrlError::Path));
        assert_eq!(QueueUrl::parse("http://h:99999/0/q"), Err(QueueUrlError::Port));
        assert_eq!(QueueUrl::parse("http://h:abc/0/q"), Err(QueueUrlError::Port));
        assert_eq!(QueueUrl::parse("http://h/0/bad name"), Err(QueueUrlError::Name));
        assert_eq!(QueueUrl::parse(&format!("http://h/0/{}", "q".repeat(81))), Err(QueueUrlError::Name));
        assert_eq!(QueueUrl::parse("http://h/0/.fifo"), Err(QueueUrlError::Name));
    }

    #[test]
    fn allowed_endpoints_match_hosts_exactly_or_by_domain() {
        let allowed = |url: &str| QueueUrl::parse(url).unwrap().host_allowed(DEFAULT_ALLOWED_ENDPOINTS);
        assert!(allowed("https://sqs.eu-west-1.amazonaws.com/123456789012/q"));
        assert!(allowed("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q"));
        assert!(allowed("http://localhost:4566/000000000000/q"));
        assert!(allowed("http://LOCALHOST:4566/000000000000/q"));
        assert!(allowed("http://127.0.0.1:4566/000000000000/q"));
        assert!(allowed("http://[::1]:4566/000000000000/q"));
        assert!(!allowed("http://127.0.0.2:4566/000000000000/q"));
        assert!(!allowed("http://evil.example:80/000000000000/q"));
        assert!(!allowed("http://amazonaws.com.evil.example/000000000000/q"));
        assert!(!allowed("http://evilamazonaws.com/000000000000/q"));
        assert!(!allowed("http://localhost.evil.example/000000000000/q"));
        let q = QueueUrl::parse("http://queue.internal:9324/0/q").unwrap();
        assert!(!q.host_allowed(""));
        assert!(q.host_allowed("*"));
        assert!(q.host_allowed(" queue.internal "));
        assert!(q.host_allowed("*.internal"));
        assert!(!q.host_allowed("*.queue.internal"));
    }

    #[test]
    fn every_spelling_of_a_queue_has_one_arn() {
        let local = [
            "http://localhost:4566/000000000000/q",
            "http://127.0.0.1:4566/000000000000/q",
            "http://LocalHost:4566/000000000000/q/",
            "http://[::1]:4566/000000000000/q",
            "http://localstack.internal:4566/000000000000/q",
            "http://localhost:4566/queue/us-east-1/000000000000/q",
            "http://sqs.us-east-1.localhost.localstack.cloud:4566/000000000000/q",
            "http://us-east-1.queue.localhost.localstack.cloud:4566/000000000000/q",
        ];
        for url in local {
            let q = QueueUrl::parse(url).unwrap();
            assert_eq!(q.arn("us-east-1"), "arn:aws:sqs:us-east-1:000000000000:q", "{url}");
            assert!(!q.is_aws(), "{url}");
        }
        let domain = QueueUrl::parse("http://sqs.eu-west-1.localhost.localstack.cloud:4566/000000000000/q").unwrap();
        assert_eq!(domain.endpoint.as_deref(), Some("http://sqs.eu-west-1.localhost.localstack.cloud:4566"));
        assert_eq!(domain.arn("us-east-1"), "arn:aws:sqs:eu-west-1:000000000000:q", "the host's region wins");
        let aws = [
            "https://sqs.us-east-1.amazonaws.com/123456789012/q",
            "https://us-east-1.queue.amazonaws.com/123456789012/q",
            "https://queue.amazonaws.com/123456789012/q",
            "https://vpce-1.sqs.amazonaws.com/123456789012/q",
        ];
        for url in aws {
            assert_eq!(QueueUrl::parse(url).unwrap().arn("us-east-1"), "arn:aws:sqs:us-east-1:123456789012:q", "{url}");
        }
        let other = |u: &str| QueueUrl::parse(u).unwrap().arn("us-east-1");
        assert_ne!(other("https://sqs.eu-west-1.amazonaws.com/123456789012/q"), other(aws[0]), "another region");
        assert_ne!(other("https://sqs.us-east-1.amazonaws.com/210987654321/q"), other(aws[0]), "another account");
        assert_ne!(
            other("https://sqs.us-east-1.amazonaws.com/123456789012/Q"),
            other(aws[0]),
            "names are case-sensitive"
        );
        assert_eq!(
            other("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q"),
            "arn:aws-cn:sqs:cn-north-1:123456789012:q"
        );
        assert_eq!(other("http://localhost:4566/000000000000/q.fifo"), "arn:aws:sqs:us-east-1:000000000000:q.fifo");
    }

    #[test]
    fn queue_key_is_the_first_64_bits_of_the_sha256() {
        // The values the SQL function gives (src/pg_tests.rs checks the same ones there).
        assert_eq!(queue_key("http://localhost:4566/000000000000/login-queue"), 3_372_887_132_628_947_437);
        assert_eq!(queue_key("https://sqs.eu-west-1.amazonaws.com/123456789012/logins"), -6_200_339_497_826_981_772);
    }

    #[test]
    fn trailing_slash_is_tolerated() {
        assert_eq!(QueueUrl::parse("http://h:1/0/q/").unwrap().url, "http://h:1/0/q");
    }

    #[test]
    fn endpoint_hosts_are_parsed_for_the_allow_list() {
        assert_eq!(endpoint_host("http://localhost:4566").as_deref(), Some("localhost"));
        assert_eq!(
            endpoint_host("https://KMS.eu-west-1.amazonaws.com/").as_deref(),
            Some("kms.eu-west-1.amazonaws.com")
        );
        assert_eq!(endpoint_host("http://[::1]:4566").as_deref(), Some("::1"));
        for bad in [
            "localhost:4566",
            "http://user@evil.example",
            "http://h/path",
            "http://",
            "ftp://h",
            "http://localhost:4566.evil.com",
            "http://[::1]x",
        ] {
            assert_eq!(endpoint_host(bad), None, "{bad}");
        }
        assert!(host_allowed("kms.eu-west-1.amazonaws.com", "*.amazonaws.com"));
        assert!(is_loopback("127.0.0.2") && is_loopback("localhost") && is_loopback("::1"));
        assert!(!is_loopback("127.evil.example") && !is_loopback("10.0.0.1"));
        assert!(!host_allowed("evil.example", "*.amazonaws.com,localhost"));
    }
}
