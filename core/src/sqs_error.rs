//! Classification of SQS failures into what a DBA can act on.
//!
//! The extension hands over what it saw (service error code, HTTP status, content type, first bytes of the body,
//! or that no response came at all) and gets back a class with its SQLSTATE and hint. Kept here, free of the
//! SDK's types, so every branch is unit-tested.

/// What kind of failure an SQS call ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// No HTTP response: connection refused, DNS failure, TLS failure, timeout.
    Unreachable,
    /// The queue URL names a queue that does not exist.
    NoSuchQueue,
    /// The credentials were rejected (unknown key, bad signature, expired token).
    BadCredentials,
    /// The credentials are valid but not allowed to do this.
    AccessDenied,
    /// The endpoint answered in the legacy query/XML protocol: LocalStack < 3, old ElasticMQ.
    LegacyProtocol,
    /// Throttled or over a service limit.
    Throttled,
    /// Anything else the service said.
    Service,
}

/// What the extension observed about a failed call.
#[derive(Debug, Clone, Default)]
pub struct Observed<'a> {
    pub error_code: Option<&'a str>,
    pub http_status: Option<u16>,
    pub content_type: Option<&'a str>,
    pub body_start: Option<&'a [u8]>,
    pub no_response: bool,
}

impl FailureClass {
    pub fn classify(seen: &Observed<'_>) -> FailureClass {
        if seen.no_response {
            return FailureClass::Unreachable;
        }
        let xml_type = seen.content_type.is_some_and(|t| t.contains("xml"));
        let xml_body = seen.body_start.is_some_and(|b| {
            let trimmed: Vec<u8> = b.iter().copied().skip_while(|c| c.is_ascii_whitespace()).take(16).collect();
            trimmed.starts_with(b"<?xml") || trimmed.starts_with(b"<ErrorResponse") || trimmed.starts_with(b"<")
        });
        if xml_type || xml_body {
            return FailureClass::LegacyProtocol;
        }
        let code = seen.error_code.unwrap_or("");
        let code = code.rsplit('#').next().unwrap_or(code);
        match code {
            "AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist" | "NonExistentQueue" => {
                FailureClass::NoSuchQueue
            }
            "InvalidClientTokenId"
            | "UnrecognizedClientException"
            | "SignatureDoesNotMatch"
            | "IncompleteSignature"
            | "MissingAuthenticationToken"
            | "MissingAuthenticationTokenException"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "InvalidSecurity"
            | "InvalidAccessKeyId" => FailureClass::BadCredentials,
            "AccessDenied" | "AccessDeniedException" | "KmsAccessDenied" | "KMS.AccessDeniedException" => {
                FailureClass::AccessDenied
            }
            "ThrottlingException" | "RequestThrottled" | "OverLimit" | "Throttling" => FailureClass::Throttled,
            _ if seen.http_status == Some(403) => FailureClass::AccessDenied,
            _ => FailureClass::Service,
        }
    }

    /// The SQLSTATE the extension raises for this class.
    pub fn sqlstate(self) -> &'static str {
        match self {
            FailureClass::Unreachable => "08001",
            FailureClass::NoSuchQueue => "42704",
            FailureClass::BadCredentials => "28000",
            FailureClass::AccessDenied => "42501",
            FailureClass::LegacyProtocol => "0A000",
            FailureClass::Throttled => "53400",
            FailureClass::Service => "58000",
        }
    }

    pub fn summary(self) -> &'static str {
        match self {
            FailureClass::Unreachable => "SQS endpoint is unreachable",
            FailureClass::NoSuchQueue => "SQS queue does not exist",
            FailureClass::BadCredentials => "SQS rejected the AWS credentials",
            FailureClass::AccessDenied => "SQS denied access to the queue",
            FailureClass::LegacyProtocol => {
                "SQS endpoint speaks only the legacy query/XML protocol, not the JSON protocol this extension uses"
            }
            FailureClass::Throttled => "SQS throttled the request",
            FailureClass::Service => "SQS request failed",
        }
    }

    pub fn hint(self) -> &'static str {
        match self {
            FailureClass::Unreachable => {
                "Check the host and port in the queue URL, that the endpoint is running and reachable from the database server, and sqs_ingest.request_timeout."
            }
            FailureClass::NoSuchQueue => "Check the queue URL (account id and queue name) or create the queue first.",
            FailureClass::BadCredentials => {
                "Check the server's AWS credentials (environment of the postmaster, ~/.aws of the postgres user, instance role) or the superuser-only GUCs sqs_ingest.aws_access_key_id / sqs_ingest.aws_secret_access_key."
            }
            FailureClass::AccessDenied => {
                "Grant sqs:ReceiveMessage, sqs:DeleteMessage, sqs:ChangeMessageVisibility and sqs:GetQueueAttributes on the queue to the credentials the server uses."
            }
            FailureClass::LegacyProtocol => {
                "Use LocalStack 3 or later (or real AWS SQS); LocalStack 0.x/1.x/2.x images such as localstack/localstack:0.14 only speak the XML protocol."
            }
            FailureClass::Throttled => "Retry later, lower sqs_ingest.max_receive_concurrency, or raise the account's SQS limits.",
            FailureClass::Service => "See the detail for the service's message.",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(c: &str) -> FailureClass {
        FailureClass::classify(&Observed { error_code: Some(c), http_status: Some(400), ..Default::default() })
    }

    #[test]
    fn no_response_is_unreachable() {
        let seen = Observed { no_response: true, ..Default::default() };
        assert_eq!(FailureClass::classify(&seen), FailureClass::Unreachable);
        assert_eq!(FailureClass::Unreachable.sqlstate(), "08001");
    }

    #[test]
    fn service_codes_are_classified() {
        assert_eq!(code("AWS.SimpleQueueService.NonExistentQueue"), FailureClass::NoSuchQueue);
        assert_eq!(code("com.amazonaws.sqs#QueueDoesNotExist"), FailureClass::NoSuchQueue);
        assert_eq!(code("InvalidClientTokenId"), FailureClass::BadCredentials);
        assert_eq!(code("SignatureDoesNotMatch"), FailureClass::BadCredentials);
        assert_eq!(code("AccessDenied"), FailureClass::AccessDenied);
        assert_eq!(code("RequestThrottled"), FailureClass::Throttled);
        assert_eq!(code("InternalFailure"), FailureClass::Service);
        let forbidden = Observed { http_status: Some(403), ..Default::default() };
        assert_eq!(FailureClass::classify(&forbidden), FailureClass::AccessDenied);
    }

    #[test]
    fn xml_answers_mean_the_legacy_protocol() {
        let by_type = Observed { http_status: Some(500), content_type: Some("text/xml"), ..Default::default() };
        assert_eq!(FailureClass::classify(&by_type), FailureClass::LegacyProtocol);
        let body = b"  <?xml version=\"1.0\"?><ErrorResponse>";
        let by_body = Observed { http_status: Some(500), body_start: Some(body), ..Default::default() };
        assert_eq!(FailureClass::classify(&by_body), FailureClass::LegacyProtocol);
        assert_eq!(FailureClass::LegacyProtocol.sqlstate(), "0A000");
        assert!(FailureClass::LegacyProtocol.hint().contains("LocalStack 3"));
    }

    #[test]
    fn every_class_has_distinct_sqlstate_and_a_hint() {
        let all = [
            FailureClass::Unreachable,
            FailureClass::NoSuchQueue,
            FailureClass::BadCredentials,
            FailureClass::AccessDenied,
            FailureClass::LegacyProtocol,
            FailureClass::Throttled,
            FailureClass::Service,
        ];
        let states: std::collections::HashSet<_> = all.iter().map(|c| c.sqlstate()).collect();
        assert_eq!(states.len(), all.len());
        assert!(all.iter().all(|c| c.sqlstate().len() == 5 && !c.hint().is_empty()));
    }
}
