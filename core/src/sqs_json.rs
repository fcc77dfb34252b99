//! The three SQS calls of the ingest hot path in the AWS JSON 1.0 protocol, as bytes in and bytes out:
//! ReceiveMessage, DeleteMessageBatch and ChangeMessageVisibilityBatch request bodies, their responses, and the
//! error shape. The extension's direct client signs and sends these; keeping them here, free of HTTP and tokio,
//! lets every field name and every error form be unit-tested.
//!
//! Reference: the SQS API's JSON protocol (`Content-Type: application/x-amz-json-1.0`,
//! `X-Amz-Target: AmazonSQS.<Operation>`), the same wire format the AWS SDKs have used since 2023.

use serde::{Deserialize, Serialize};

/// `Content-Type` of every request.
pub const CONTENT_TYPE: &str = "application/x-amz-json-1.0";

/// An SQS operation of the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ReceiveMessage,
    DeleteMessageBatch,
    ChangeMessageVisibilityBatch,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::ReceiveMessage => "ReceiveMessage",
            Operation::DeleteMessageBatch => "DeleteMessageBatch",
            Operation::ChangeMessageVisibilityBatch => "ChangeMessageVisibilityBatch",
        }
    }

    /// The `X-Amz-Target` header value.
    pub fn target(self) -> &'static str {
        match self {
            Operation::ReceiveMessage => "AmazonSQS.ReceiveMessage",
            Operation::DeleteMessageBatch => "AmazonSQS.DeleteMessageBatch",
            Operation::ChangeMessageVisibilityBatch => "AmazonSQS.ChangeMessageVisibilityBatch",
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ReceiveRequest<'a> {
    queue_url: &'a str,
    max_number_of_messages: i32,
    wait_time_seconds: i32,
    visibility_timeout: i32,
    message_system_attribute_names: [&'static str; 4],
    message_attribute_names: [&'static str; 1],
}

/// ReceiveMessage body: up to `max` (clamped to 1..=10) messages with the system attributes pipelines can map
/// (SentTimestamp, ApproximateReceiveCount, and for FIFO queues MessageGroupId and SequenceNumber) and every
/// message attribute.
pub fn receive_request(queue_url: &str, max: i32, wait_s: i32, visibility_s: i32) -> Vec<u8> {
    serde_json::to_vec(&ReceiveRequest {
        queue_url,
        max_number_of_messages: max.clamp(1, 10),
        wait_time_seconds: wait_s.max(0),
        visibility_timeout: visibility_s.max(0),
        message_system_attribute_names: RECEIVED_SYSTEM_ATTRIBUTES,
        message_attribute_names: ["All"],
    })
    .expect("serializing strings and integers cannot fail")
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct BatchEntry<'a> {
    id: String,
    receipt_handle: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    visibility_timeout: Option<i32>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct BatchRequest<'a> {
    queue_url: &'a str,
    entries: Vec<BatchEntry<'a>>,
}

fn batch_request(queue_url: &str, receipts: &[String], visibility_s: Option<i32>) -> Vec<u8> {
    let entries = receipts
        .iter()
        .enumerate()
        .map(|(i, r)| BatchEntry { id: i.to_string(), receipt_handle: r, visibility_timeout: visibility_s })
        .collect();
    serde_json::to_vec(&BatchRequest { queue_url, entries }).expect("serializing strings cannot fail")
}

/// DeleteMessageBatch body for at most 10 receipts (entry ids are their positions).
pub fn delete_batch_request(queue_url: &str, receipts: &[String]) -> Vec<u8> {
    batch_request(queue_url, receipts, None)
}

/// ChangeMessageVisibilityBatch body for at most 10 receipts.
pub fn change_visibility_batch_request(queue_url: &str, receipts: &[String], visibility_s: i32) -> Vec<u8> {
    batch_request(queue_url, receipts, Some(visibility_s.max(0)))
}

/// The system attributes every ReceiveMessage asks for (either client).
pub const RECEIVED_SYSTEM_ATTRIBUTES: [&str; 4] =
    ["SentTimestamp", "ApproximateReceiveCount", "MessageGroupId", "SequenceNumber"];

/// One received message, as the wire gives it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WireMessage {
    pub message_id: String,
    pub receipt_handle: String,
    pub body: String,
    pub sent_timestamp_ms: Option<i64>,
    pub receive_count: Option<i32>,
    /// FIFO queues only.
    pub group_id: Option<String>,
    pub sequence_number: Option<String>,
    /// Message attributes: name and string value (a binary value as its base64 text).
    pub attributes: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ReceiveResponse {
    #[serde(default)]
    messages: Vec<RawMessage>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawMessage {
    #[serde(default)]
    message_id: String,
    #[serde(default)]
    receipt_handle: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    attributes: Attributes,
    #[serde(default)]
    message_attributes: std::collections::BTreeMap<String, MessageAttribute>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct MessageAttribute {
    string_value: Option<String>,
    binary_value: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Attributes {
    sent_timestamp: Option<String>,
    approximate_receive_count: Option<String>,
    message_group_id: Option<String>,
    sequence_number: Option<String>,
}

/// Parses a successful ReceiveMessage response (`{}` when the queue had nothing).
pub fn parse_receive(body: &[u8]) -> Result<Vec<WireMessage>, String> {
    let r: ReceiveResponse =
        serde_json::from_slice(body).map_err(|e| format!("unreadable ReceiveMessage answer: {e}"))?;
    Ok(r.messages
        .into_iter()
        .map(|m| WireMessage {
            message_id: m.message_id,
            receipt_handle: m.receipt_handle,
            body: m.body,
            sent_timestamp_ms: m.attributes.sent_timestamp.and_then(|v| v.parse().ok()),
            receive_count: m.attributes.approximate_receive_count.and_then(|v| v.parse().ok()),
            group_id: m.attributes.message_group_id,
            sequence_number: m.attributes.sequence_number,
            attributes: m
                .message_attributes
                .into_iter()
                .filter_map(|(name, a)| a.string_value.or(a.binary_value).map(|v| (name, v)))
                .collect(),
        })
        .collect())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BatchResponse {
    #[serde(default)]
    successful: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    failed: Vec<serde::de::IgnoredAny>,
}

/// Parses a successful batch response: (entries that succeeded, entries that failed).
pub fn parse_batch(body: &[u8]) -> Result<(usize, usize), String> {
    let r: BatchResponse = serde_json::from_slice(body).map_err(|e| format!("unreadable batch answer: {e}"))?;
    Ok((r.successful.len(), r.failed.len()))
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "__type")]
    kind: Option<String>,
    #[serde(alias = "Message")]
    message: Option<String>,
}

/// The error code and message of a failed call. SQS is query-compatible: the `x-amzn-query-error` header
/// (`AWS.SimpleQueueService.NonExistentQueue;Sender`) carries the classic code and wins over the body's
/// `__type` (`com.amazonaws.sqs#QueueDoesNotExist`, possibly with a `:`-suffix).
pub fn parse_error(body: &[u8], query_error_header: Option<&str>) -> (Option<String>, Option<String>) {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let from_header = query_error_header.and_then(|h| h.split(';').next()).filter(|c| !c.is_empty());
    let from_body = parsed.as_ref().and_then(|b| b.kind.as_deref()).map(|t| {
        let t = t.rsplit('#').next().unwrap_or(t);
        t.split(':').next().unwrap_or(t)
    });
    let code = from_header.or(from_body).map(str::to_string);
    (code, parsed.and_then(|b| b.message))
}

/// Whether a failed attempt is worth another try: no answer, a 5xx, or throttling.
pub fn retryable(http_status: Option<u16>, code: Option<&str>) -> bool {
    let throttled = matches!(
        code,
        Some("ThrottlingException" | "RequestThrottled" | "Throttling" | "ServiceUnavailable" | "InternalFailure")
    );
    match http_status {
        None => true,
        Some(s) => s >= 500 || s == 429 || throttled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn json(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn receive_request_names_every_field_and_clamps() {
        let v = json(&receive_request("http://h/1/q", 25, 20, 30));
        assert_eq!(v["QueueUrl"], "http://h/1/q");
        assert_eq!(v["MaxNumberOfMessages"], 10);
        assert_eq!(v["WaitTimeSeconds"], 20);
        assert_eq!(v["VisibilityTimeout"], 30);
        assert_eq!(
            v["MessageSystemAttributeNames"],
            serde_json::json!(["SentTimestamp", "ApproximateReceiveCount", "MessageGroupId", "SequenceNumber"])
        );
        assert_eq!(v["MessageAttributeNames"], serde_json::json!(["All"]));
        assert_eq!(json(&receive_request("u", 0, -1, 5))["MaxNumberOfMessages"], 1);
        assert_eq!(json(&receive_request("u", 0, -1, 5))["WaitTimeSeconds"], 0);
    }

    #[test]
    fn batch_requests_use_positions_as_ids_and_escape_handles() {
        let receipts = vec!["a\"b".to_string(), "c\\d".to_string()];
        let v = json(&delete_batch_request("http://h/1/q", &receipts));
        assert_eq!(v["QueueUrl"], "http://h/1/q");
        assert_eq!(v["Entries"][0]["Id"], "0");
        assert_eq!(v["Entries"][0]["ReceiptHandle"], "a\"b");
        assert_eq!(v["Entries"][1]["Id"], "1");
        assert_eq!(v["Entries"][1]["ReceiptHandle"], "c\\d");
        assert!(v["Entries"][0].get("VisibilityTimeout").is_none());
        let v = json(&change_visibility_batch_request("u", &receipts, 45));
        assert_eq!(v["Entries"][1]["VisibilityTimeout"], 45);
    }

    #[test]
    fn receive_response_is_parsed_with_attributes_and_unicode() {
        let body = br#"{"Messages":[
            {"MessageId":"m-1","ReceiptHandle":"r-1","MD5OfBody":"x","Body":"{\"a\":\"\u00e9\\u0000\"}",
             "Attributes":{"SentTimestamp":"1700000000123","ApproximateReceiveCount":"3","SenderId":"s",
                           "MessageGroupId":"g-1","SequenceNumber":"18"},
             "MessageAttributes":{"kind":{"DataType":"String","StringValue":"created"},
                                  "blob":{"DataType":"Binary","BinaryValue":"AAE="}}},
            {"MessageId":"m-2","ReceiptHandle":"r-2","Body":"b"}]}"#;
        let m = parse_receive(body).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].message_id, "m-1");
        assert_eq!(m[0].receipt_handle, "r-1");
        assert_eq!(m[0].body, "{\"a\":\"\u{e9}\\u0000\"}");
        assert_eq!(m[0].sent_timestamp_ms, Some(1_700_000_000_123));
        assert_eq!(m[0].receive_count, Some(3));
        assert_eq!(m[1].sent_timestamp_ms, None);
        assert_eq!(m[0].group_id.as_deref(), Some("g-1"));
        assert_eq!(m[0].sequence_number.as_deref(), Some("18"));
        assert_eq!(
            m[0].attributes,
            vec![("blob".to_string(), "AAE=".to_string()), ("kind".to_string(), "created".to_string())]
        );
        assert!(m[1].attributes.is_empty() && m[1].group_id.is_none());
        assert_eq!(parse_receive(b"{}").unwrap(), vec![]);
        assert!(parse_receive(b"<xml/>").is_err());
    }

    #[test]
    fn batch_response_counts_successes_and_failures() {
        let body = br#"{"Successful":[{"Id":"0"},{"Id":"2"}],"Failed":[{"Id":"1","Code":"ReceiptHandleIsInvalid","SenderFault":true}]}"#;
        assert_eq!(parse_batch(body).unwrap(), (2, 1));
        assert_eq!(parse_batch(br#"{"Successful":[{"Id":"0"}]}"#).unwrap(), (1, 0));
    }

    #[test]
    fn error_codes_come_from_the_query_header_first_then_the_body() {
        let body =
            br#"{"__type":"com.amazonaws.sqs#QueueDoesNotExist","message":"The specified queue does not exist."}"#;
        let (code, msg) = parse_error(body, Some("AWS.SimpleQueueService.NonExistentQueue;Sender"));
        assert_eq!(code.as_deref(), Some("AWS.SimpleQueueService.NonExistentQueue"));
        assert_eq!(msg.as_deref(), Some("The specified queue does not exist."));
        let (code, _) = parse_error(body, None);
        assert_eq!(code.as_deref(), Some("QueueDoesNotExist"));
        let (code, msg) = parse_error(br#"{"__type":"InvalidSignatureException:http://x","Message":"bad"}"#, None);
        assert_eq!(code.as_deref(), Some("InvalidSignatureException"));
        assert_eq!(msg.as_deref(), Some("bad"));
        assert_eq!(parse_error(b"<ErrorResponse/>", None), (None, None));
    }

    #[test]
    fn only_transient_failures_are_retried() {
        assert!(retryable(None, None));
        assert!(retryable(Some(503), None));
        assert!(retryable(Some(400), Some("ThrottlingException")));
        assert!(retryable(Some(429), None));
        assert!(!retryable(Some(400), Some("AWS.SimpleQueueService.NonExistentQueue")));
        assert!(!retryable(Some(403), Some("InvalidClientTokenId")));
    }
}
