//! The AWS SDK side of the SQS transport: the client (its config is [`crate::aws`]'s) and every call made through
//! `aws-sdk-sqs`, its failures classified into [`Error`]. Reached only through [`super`]'s interface.

use super::direct::Direct;
use super::{QueueInfo, Received};
use crate::error::{Error, Result};
use aws_sdk_sqs::config::Credentials;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use sqs_ingest_core::sqs_error::Observed;
use std::time::Duration;

/// Makes the SDK client for an endpoint (None: the region's public one, or `AWS_ENDPOINT_URL`) and region (see
/// [`crate::aws::sdk_config`]), and the direct client for the same endpoint and credentials (None when the config
/// has no credentials provider).
pub async fn connect(
    endpoint: Option<String>,
    region: String,
    creds: Option<Credentials>,
    timeout: u64,
) -> (aws_sdk_sqs::Client, Option<Result<Direct>>) {
    let region_name = region.clone();
    let config = crate::aws::sdk_config(endpoint, region, creds, timeout).await;
    // The direct client posts to the same endpoint the SDK would: the configured one (queue URL host,
    // AWS_ENDPOINT_URL) or the region's public SQS endpoint.
    let direct_endpoint = config.endpoint_url().map(str::to_string).unwrap_or_else(|| {
        let suffix = if region_name.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
        format!("https://sqs.{region_name}.{suffix}")
    });
    let direct = config
        .credentials_provider()
        .map(|provider| Direct::new(&direct_endpoint, &region_name, provider, Duration::from_millis(timeout)));
    (aws_sdk_sqs::Client::new(&config), direct)
}

/// Turns an SDK failure into an [`Error`] a DBA can act on.
pub fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    operation: &str,
    err: SdkError<E, HttpResponse>,
) -> Error {
    let raw = err.raw_response();
    let content_type = raw.and_then(|r| r.headers().get("content-type")).map(str::to_string);
    let body = raw.and_then(|r| r.body().bytes()).map(|b| b[..b.len().min(256)].to_vec());
    let status = raw.map(|r| r.status().as_u16());
    let no_response = matches!(err, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_));
    let code = err.code().map(str::to_string);
    let seen = Observed {
        error_code: code.as_deref(),
        http_status: status,
        content_type: content_type.as_deref(),
        body_start: body.as_deref(),
        no_response,
    };
    let what = crate::aws::describe(&err);
    crate::error::sqs_failure(operation, &seen, what)
}

/// Reads depth and retention; doubles as the connectivity and existence check before any side effect.
pub async fn queue_info(client: &aws_sdk_sqs::Client, url: &str) -> Result<QueueInfo> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::MessageRetentionPeriod)
        .send()
        .await
        .map_err(|e| classify("GetQueueAttributes", e))?;
    let attrs = out.attributes();
    let num = |name: QueueAttributeName| attrs.and_then(|a| a.get(&name)).and_then(|v| v.parse().ok());
    Ok(QueueInfo {
        approximate_depth: num(QueueAttributeName::ApproximateNumberOfMessages),
        retention_s: num(QueueAttributeName::MessageRetentionPeriod),
    })
}

/// Approximate counts: (visible, in flight, delayed).
pub async fn queue_counts(client: &aws_sdk_sqs::Client, url: &str) -> Result<(i64, i64, i64)> {
    use QueueAttributeName as A;
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(A::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .map_err(|e| classify("GetQueueAttributes", e))?;
    let get = |n: A| out.attributes().and_then(|a| a.get(&n)).and_then(|v| v.parse().ok()).unwrap_or(0i64);
    Ok((
        get(A::ApproximateNumberOfMessages),
        get(A::ApproximateNumberOfMessagesNotVisible),
        get(A::ApproximateNumberOfMessagesDelayed),
    ))
}

/// CreateQueue with a visibility timeout (seconds); the queue URL SQS reports.
pub async fn create_queue(client: &aws_sdk_sqs::Client, name: &str, visibility_timeout_s: i32) -> Result<String> {
    let out = client
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::VisibilityTimeout, visibility_timeout_s.to_string())
        .send()
        .await
        .map_err(|e| classify("CreateQueue", e))?;
    Ok(out.queue_url.unwrap_or_default())
}

/// One ReceiveMessage call.
pub async fn receive(
    client: &aws_sdk_sqs::Client,
    url: &str,
    max: i32,
    wait_s: i32,
    visibility_s: i32,
) -> Result<Vec<Received>> {
    let out = client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(max.clamp(1, 10))
        .wait_time_seconds(wait_s)
        .visibility_timeout(visibility_s)
        .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
        .message_system_attribute_names(MessageSystemAttributeName::SequenceNumber)
        .message_attribute_names("All")
        .send()
        .await
        .map_err(|e| classify("ReceiveMessage", e))?;
    Ok(out
        .messages
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            let attr = |n: MessageSystemAttributeName| m.attributes.as_ref().and_then(|a| a.get(&n)).cloned();
            use base64::Engine;
            let attributes = m
                .message_attributes
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(name, v)| {
                    let text = v.string_value.or_else(|| {
                        v.binary_value.map(|b| base64::engine::general_purpose::STANDARD.encode(b.as_ref()))
                    });
                    text.map(|t| (name, t))
                })
                .collect();
            Received {
                sent_timestamp_ms: attr(MessageSystemAttributeName::SentTimestamp).and_then(|v| v.parse().ok()),
                receive_count: attr(MessageSystemAttributeName::ApproximateReceiveCount).and_then(|v| v.parse().ok()),
                group_id: attr(MessageSystemAttributeName::MessageGroupId),
                sequence_number: attr(MessageSystemAttributeName::SequenceNumber),
                message_id: m.message_id.unwrap_or_default(),
                receipt_handle: m.receipt_handle.unwrap_or_default(),
                body: m.body.unwrap_or_default(),
                attributes,
            }
        })
        .collect())
}

/// One DeleteMessageBatch of up to 10 receipts (positional ids): (succeeded, failed) entries, None if the call
/// failed.
pub async fn delete_batch(client: &aws_sdk_sqs::Client, url: &str, receipts: &[String]) -> Option<(usize, usize)> {
    let entries = receipts
        .iter()
        .enumerate()
        .filter_map(|(i, r)| DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(r).build().ok())
        .collect();
    let out = client.delete_message_batch().queue_url(url).set_entries(Some(entries)).send().await.ok()?;
    Some((out.successful().len(), out.failed().len()))
}

/// One ChangeMessageVisibilityBatch of up to 10 receipts: (succeeded, failed) entries, None if the call failed.
pub async fn change_visibility_batch(
    client: &aws_sdk_sqs::Client,
    url: &str,
    receipts: &[String],
    visibility_s: i32,
) -> Option<(usize, usize)> {
    let entries = receipts
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(r)
                .visibility_timeout(visibility_s)
                .build()
                .ok()
        })
        .collect();
    let out = client.change_message_visibility_batch().queue_url(url).set_entries(Some(entries)).send().await.ok()?;
    Some((out.successful().len(), out.failed().len()))
}

/// One SendMessageBatch of up to 10 bodies: how many SQS accepted.
pub async fn send_batch(client: &aws_sdk_sqs::Client, url: &str, bodies: &[String]) -> Result<u64> {
    let entries = bodies
        .iter()
        .enumerate()
        .filter_map(|(i, b)| SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(b).build().ok())
        .collect();
    let out = client
        .send_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(|e| classify("SendMessageBatch", e))?;
    Ok(out.successful().len() as u64)
}
