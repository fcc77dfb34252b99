//! Every `sqs_ingest.*` setting, registered once from `_PG_init`.
//!
//! Settings that hold secrets are `Suset` + `SUPERUSER_ONLY` + `NO_SHOW_ALL`: ordinary roles can neither read
//! them with SHOW nor see them in `pg_settings`. Worker settings are `Sighup` so `pg_reload_conf()` applies them.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::{CStr, CString};

/// `encrypt` (reversible) or `hmac` (irreversible); default `encrypt`.
static MASKING_METHOD: GucSetting<MaskingMethod> = GucSetting::<MaskingMethod>::new(MaskingMethod::Encrypt);
/// Table that ingest writes to; created with the standard schema on first ingest if missing.
static TARGET_TABLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"user_logins"));
/// Region for queue URLs whose host doesn't name one (LocalStack, VPC endpoints).
static REGION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"us-east-1"));
/// Optional static credentials; empty means the AWS default provider chain.
static AWS_ACCESS_KEY_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static AWS_SECRET_ACCESS_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static AWS_SESSION_TOKEN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// ReceiveMessage calls kept in flight at once (each returns up to 10 messages).
static RECEIVE_CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(4);
static MAX_RECEIVE_CONCURRENCY: GucSetting<i32> = GucSetting::<i32>::new(16);
/// Visibility timeout requested on receive; held messages are extended before it runs out.
static VISIBILITY_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(60);
/// Extend the visibility of messages held by an open transaction (off: rely on visibility_timeout alone).
static VISIBILITY_HEARTBEAT: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Long-poll wait used to confirm that a queue is empty (and by the worker between messages).
static WAIT_TIME_S: GucSetting<i32> = GucSetting::<i32>::new(1);
/// Bound on every single SQS call (excluding the long-poll wait itself).
static REQUEST_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Which client makes the hot-path SQS calls (receive, delete, visibility); default `direct`.
static SQS_CLIENT: GucSetting<SqsClient> = GucSetting::<SqsClient>::new(SqsClient::Direct);
/// Seconds between progress NOTICEs of a long ingest (0 disables them).
static PROGRESS_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(10);
/// Hosts that requests (and the credentials that sign them) may be sent to; superuser-only.
static ALLOWED_ENDPOINTS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"*.amazonaws.com, *.amazonaws.com.cn, localhost, 127.0.0.1, ::1"));
/// Bound on the deletes after a COMMIT (the transaction's locks are held until they end).
static POST_COMMIT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
/// Which standbys must have flushed a commit before its messages are deleted from SQS (see core::durability).
static DELETE_AFTER: GucSetting<DeleteAfter> = GucSetting::<DeleteAfter>::new(DeleteAfter::AllStandbys);
/// The physical replication slots whose standbys count for `sqs_ingest.delete_after` (empty: every standby).
static STANDBY_SLOTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Most time a commit's deletes wait for its standbys' confirmation before they are deferred.
static STANDBY_WAIT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(2_000);
/// Receives after which a message not yet stored becomes a dead letter (0: never).
static MAX_RECEIVE_COUNT: GucSetting<i32> = GucSetting::<i32>::new(10);
/// Most dynamic workers (`worker_start()`) running at once in one database.
static MAX_DYNAMIC_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(4);

// Background worker settings (read by the postmaster and by the workers on SIGHUP).
static WORKER_ENABLED: GucSetting<bool> = GucSetting::<bool>::new(false);
static WORKER_QUEUE_URLS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static WORKER_DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
static WORKER_COUNT: GucSetting<i32> = GucSetting::<i32>::new(1);
static WORKER_BATCH_MESSAGES: GucSetting<i32> = GucSetting::<i32>::new(100);
static WORKER_WAIT_S: GucSetting<i32> = GucSetting::<i32>::new(20);
static WORKER_RESTART_S: GucSetting<i32> = GucSetting::<i32>::new(5);
/// Role the static workers connect as; unset: they do not ingest.
static WORKER_ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The AWS KMS key new masking keys are generated and wrapped under (ARN, alias ARN, alias/<name> or key id).
static KMS_KEY_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The KMS endpoint URL; empty: the region's public one (or `AWS_ENDPOINT_URL_KMS` / `AWS_ENDPOINT_URL`).
static KMS_ENDPOINT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Seconds a backend keeps a key it unwrapped with KMS before asking KMS again.
static KMS_KEY_CACHE_LIFETIME_S: GucSetting<i32> = GucSetting::<i32>::new(300);

fn string(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting.get().and_then(|c| c.into_string().ok()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Values of `sqs_ingest.masking_method` (an enum setting: Postgres refuses anything else at SET time, with
/// 22023, and `mask()` reads it without parsing or allocating per row).
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum MaskingMethod {
    /// Reversible (`enc:` tokens, `unmask()`).
    #[name = c"encrypt"]
    Encrypt,
    /// Irreversible (`hmac:` tokens).
    #[name = c"hmac"]
    Hmac,
}

pub fn masking_method() -> sqs_ingest_core::mask::Method {
    match MASKING_METHOD.get() {
        MaskingMethod::Encrypt => sqs_ingest_core::mask::Method::Encrypt,
        MaskingMethod::Hmac => sqs_ingest_core::mask::Method::Hmac,
    }
}
/// The masking method a call names (`encrypt`, `hmac`), else `sqs_ingest.masking_method`. An unknown name is
/// `MaskError::UnknownMethod` (22023).
pub fn masking_method_or(
    name: Option<&str>,
) -> std::result::Result<sqs_ingest_core::mask::Method, sqs_ingest_core::mask::MaskError> {
    name.map_or(Ok(masking_method()), sqs_ingest_core::mask::Method::parse)
}
pub fn target_table() -> String {
    string(&TARGET_TABLE).unwrap_or_else(|| "user_logins".into())
}
pub fn region() -> String {
    string(&REGION).unwrap_or_else(|| "us-east-1".into())
}
pub fn aws_access_key_id() -> Option<String> {
    string(&AWS_ACCESS_KEY_ID)
}
pub fn aws_secret_access_key() -> Option<String> {
    string(&AWS_SECRET_ACCESS_KEY)
}
pub fn aws_session_token() -> Option<String> {
    string(&AWS_SESSION_TOKEN)
}
pub fn kms_key_id() -> Option<String> {
    string(&KMS_KEY_ID)
}
pub fn kms_endpoint() -> Option<String> {
    string(&KMS_ENDPOINT)
}
pub fn kms_key_cache_lifetime() -> std::time::Duration {
    std::time::Duration::from_secs(KMS_KEY_CACHE_LIFETIME_S.get() as u64)
}
/// ReceiveMessage calls in flight when a backend starts on a queue (core::concurrency adapts it from there).
pub fn receive_concurrency() -> usize {
    RECEIVE_CONCURRENCY.get() as usize
}
/// The most ReceiveMessage calls one backend keeps in flight: `sqs_ingest.max_receive_concurrency`, or
/// `receive_concurrency` if that is set higher (a 0.7.0 setting of 32 stays 32).
pub fn receive_cap() -> usize {
    MAX_RECEIVE_CONCURRENCY.get().max(RECEIVE_CONCURRENCY.get()) as usize
}
/// DeleteMessageBatch calls in flight after a commit: twice the receive cap, at least 8 (0.7.0's number).
pub fn delete_concurrency() -> usize {
    (2 * receive_cap()).max(8)
}
pub fn visibility_timeout_s() -> i32 {
    VISIBILITY_TIMEOUT_S.get()
}
pub fn visibility_heartbeat() -> bool {
    VISIBILITY_HEARTBEAT.get()
}
pub fn wait_time_s() -> i32 {
    WAIT_TIME_S.get()
}
/// Values of `sqs_ingest.sqs_client`.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum SqsClient {
    /// The built-in JSON-protocol client (`crate::sqs::direct`).
    #[name = c"direct"]
    Direct,
    /// The AWS SDK for Rust.
    #[name = c"sdk"]
    Sdk,
}

/// Values of `sqs_ingest.delete_after`.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum DeleteAfter {
    /// The commit is flushed to the local WAL.
    #[name = c"local"]
    Local,
    /// ... and at least one standby the primary knows has flushed it.
    #[name = c"any_standby"]
    AnyStandby,
    /// ... and every standby the primary knows has flushed it.
    #[name = c"all_standbys"]
    AllStandbys,
}

/// `sqs_ingest.delete_after`, as the pure rule takes it.
pub fn delete_after() -> sqs_ingest_core::durability::DeleteAfter {
    use sqs_ingest_core::durability::DeleteAfter as Rule;
    match DELETE_AFTER.get() {
        DeleteAfter::Local => Rule::Local,
        DeleteAfter::AnyStandby => Rule::AnyStandby,
        DeleteAfter::AllStandbys => Rule::AllStandbys,
    }
}
/// `sqs_ingest.standby_slots`: slot names (empty: every standby the primary knows counts).
pub fn standby_slots() -> Vec<String> {
    string(&STANDBY_SLOTS)
        .map(|s| s.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect())
        .unwrap_or_default()
}
pub fn standby_wait_timeout_ms() -> u64 {
    STANDBY_WAIT_TIMEOUT_MS.get() as u64
}

pub fn sqs_client() -> SqsClient {
    SQS_CLIENT.get()
}
pub fn request_timeout_ms() -> u64 {
    REQUEST_TIMEOUT_MS.get() as u64
}
pub fn progress_interval_s() -> u64 {
    PROGRESS_INTERVAL_S.get() as u64
}
pub fn worker_enabled() -> bool {
    WORKER_ENABLED.get()
}
pub fn worker_queue_urls() -> Vec<String> {
    string(&WORKER_QUEUE_URLS)
        .map(|s| s.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect())
        .unwrap_or_default()
}
pub fn worker_database() -> String {
    string(&WORKER_DATABASE).unwrap_or_else(|| "postgres".into())
}
pub fn worker_count() -> i32 {
    WORKER_COUNT.get()
}
pub fn worker_batch_messages() -> i64 {
    WORKER_BATCH_MESSAGES.get() as i64
}
pub fn worker_wait_s() -> i32 {
    WORKER_WAIT_S.get()
}
pub fn worker_restart_s() -> i32 {
    WORKER_RESTART_S.get()
}
pub fn worker_role() -> Option<String> {
    string(&WORKER_ROLE)
}
pub fn allowed_endpoints() -> String {
    string(&ALLOWED_ENDPOINTS).unwrap_or_default()
}
pub fn post_commit_timeout_ms() -> u64 {
    POST_COMMIT_TIMEOUT_MS.get() as u64
}
pub fn max_receive_count() -> i32 {
    MAX_RECEIVE_COUNT.get()
}
pub fn max_dynamic_workers() -> i64 {
    MAX_DYNAMIC_WORKERS.get() as i64
}

/// Secret values currently configured, for [`sqs_ingest_core::scrub::scrub`].
pub fn configured_secrets() -> Vec<String> {
    [aws_access_key_id(), aws_secret_access_key(), aws_session_token()].into_iter().flatten().collect()
}

fn define_string(
    name: &'static CStr,
    short: &'static CStr,
    long: &'static CStr,
    setting: &'static GucSetting<Option<CString>>,
    context: GucContext,
    flags: GucFlags,
) {
    GucRegistry::define_string_guc(name, short, long, setting, context, flags);
}

/// Secrets are accepted only from the server's configuration files (postgresql.conf, `ALTER SYSTEM`) or its
/// command line: values from `ALTER DATABASE/ROLE ... SET` would sit in `pg_db_role_setting` and `pg_roles`,
/// which every login role can read, and `SET` would put them in a session other code can inspect.
///
/// # Safety
/// Called by Postgres as a GUC check hook with a valid (possibly NULL) new value.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn only_from_configuration_files(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    use pgrx::pg_sys::{self, GucSource::*};
    // SAFETY: Postgres passes a valid pointer to the candidate value (which may itself be NULL).
    let empty = unsafe { newval.is_null() || (*newval).is_null() || *(*newval) == 0 };
    if empty || matches!(source, PGC_S_DEFAULT | PGC_S_DYNAMIC_DEFAULT | PGC_S_ENV_VAR | PGC_S_FILE | PGC_S_ARGV) {
        return true;
    }
    // SAFETY: the documented way for a check hook to describe its refusal: palloc'd strings in these globals.
    unsafe {
        pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_CANT_CHANGE_RUNTIME_PARAM as i32);
        pg_sys::GUC_check_errmsg_string =
            pg_sys::pstrdup(c"sqs_ingest AWS credentials can only be set in the server's configuration files".as_ptr());
        pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(
            c"Use ALTER SYSTEM (or postgresql.conf) and SELECT pg_reload_conf(), or give the server process an AWS identity (the default credential chain). Values set with ALTER DATABASE/ROLE ... SET are readable by every login role.".as_ptr(),
        );
    }
    false
}

fn define_secret(
    name: &'static CStr,
    short: &'static CStr,
    setting: &'static GucSetting<Option<CString>>,
    flags: GucFlags,
) {
    // SAFETY: registers a string GUC backed by pgrx's static setting cell (as GucRegistry does), adding the
    // check hook above; called once from _PG_init on the main thread.
    unsafe {
        pgrx::pg_sys::DefineCustomStringVariable(
            name.as_ptr(),
            short.as_ptr(),
            c"Superuser-only, hidden from non-superusers, and accepted only from postgresql.conf / ALTER SYSTEM."
                .as_ptr(),
            setting.as_ptr().cast(),
            std::ptr::null(),
            GucContext::Suset as isize as _,
            flags.bits(),
            Some(only_from_configuration_files),
            None,
            None,
        );
    }
}

pub fn init() {
    let secret = GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL;
    GucRegistry::define_enum_guc(
        c"sqs_ingest.masking_method",
        c"Masking method for ip and device_id: encrypt (reversible by unmask) or hmac (irreversible).",
        c"Default encrypt. Overridable per call with the method argument.",
        &MASKING_METHOD,
        GucContext::Userset,
        GucFlags::default(),
    );
    define_string(
        c"sqs_ingest.target_table",
        c"Table ingest writes login rows to (resolved with search_path; created on first ingest if missing).",
        c"Default user_logins.",
        &TARGET_TABLE,
        GucContext::Userset,
        GucFlags::default(),
    );
    define_string(
        c"sqs_ingest.region",
        c"AWS region for queue URLs whose host does not name one.",
        c"Default us-east-1.",
        &REGION,
        GucContext::Suset,
        GucFlags::default(),
    );
    define_secret(
        c"sqs_ingest.aws_access_key_id",
        c"Static AWS access key id; empty uses the AWS default credential provider chain.",
        &AWS_ACCESS_KEY_ID,
        secret,
    );
    define_secret(
        c"sqs_ingest.aws_secret_access_key",
        c"Static AWS secret access key; empty uses the AWS default credential provider chain.",
        &AWS_SECRET_ACCESS_KEY,
        secret,
    );
    define_secret(
        c"sqs_ingest.aws_session_token",
        c"Static AWS session token to go with the static key pair.",
        &AWS_SESSION_TOKEN,
        secret,
    );
    define_string(
        c"sqs_ingest.allowed_endpoints",
        c"Hosts SQS requests (and the credentials signing them) may be sent to: comma-separated host names, *.domain patterns, or *.",
        c"Superuser-only. Default: AWS's SQS hosts (*.amazonaws.com, *.amazonaws.com.cn) and loopback. A queue URL whose host is not listed is refused (42501) before any request.",
        &ALLOWED_ENDPOINTS,
        GucContext::Suset,
        GucFlags::default(),
    );
    define_string(
        c"sqs_ingest.kms_key_id",
        c"AWS KMS key that wraps the masking keys (ARN, alias ARN, alias/<name> or key id); empty keeps them in sqs_ingest.keys.",
        c"Superuser-only. When set, new masking keys are generated by KMS (GenerateDataKey) and stored only wrapped; sqs_ingest.kms_wrap_keys() wraps existing ones. Keys already wrapped are unwrapped with the KMS key that wrapped them, whatever this setting says.",
        &KMS_KEY_ID,
        GucContext::Suset,
        GucFlags::default(),
    );
    define_string(
        c"sqs_ingest.kms_endpoint",
        c"AWS KMS endpoint URL (e.g. http://localhost:4566 for LocalStack); empty: the region's public endpoint.",
        c"Superuser-only. Its host must be in sqs_ingest.allowed_endpoints (requests carry the server's AWS credentials). The region is the key ARN's, else sqs_ingest.region.",
        &KMS_ENDPOINT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.kms_key_cache_lifetime",
        c"How long a backend keeps a masking key it unwrapped with AWS KMS before asking KMS again.",
        c"Superuser-only. Default 300 s; 0 asks KMS in every transaction. Bounds how long disabling the KMS key or revoking access takes to stop a running backend.",
        &KMS_KEY_CACHE_LIFETIME_S,
        0,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.post_commit_timeout",
        c"Upper bound on deleting a committed transaction's messages from SQS (its locks are held until then).",
        c"Default 5000 ms. Messages not deleted in time are redelivered later and recognised as duplicates. Terminating the backend (pg_terminate_backend, fast shutdown) also ends the phase.",
        &POST_COMMIT_TIMEOUT_MS,
        100,
        600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_enum_guc(
        c"sqs_ingest.delete_after",
        c"How durable a commit must be before its messages are deleted from SQS: local, any_standby or all_standbys.",
        c"Default all_standbys. The commit is always flushed to the local WAL first, whatever synchronous_commit is at COMMIT; any_standby and all_standbys also wait until one or every standby the primary knows (its physical replication slots, and physical standbys streaming without a slot) has flushed it. A commit not confirmed within sqs_ingest.standby_wait_timeout (or at once, when no standby that could confirm it is connected) leaves its messages in the queue: they come back after their visibility timeout and are recognised as duplicates. Superuser-only.",
        &DELETE_AFTER,
        GucContext::Suset,
        GucFlags::default(),
    );
    define_string(
        c"sqs_ingest.standby_slots",
        c"Physical replication slots whose standbys sqs_ingest.delete_after waits for (comma-separated names).",
        c"Default empty: every physical slot that holds WAL for a standby, and every physical standby streaming without a slot. Set, only the persistent physical slots it names count (standbys on temporary slots or without one do not), and a named slot that is missing or unusable holds every commit back, as PostgreSQL 17's synchronized_standby_slots does. Set it to leave out WAL archivers (pg_receivewal, Barman) that report their flush only per segment. Superuser-only.",
        &STANDBY_SLOTS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.standby_wait_timeout",
        c"Most time a commit's deletes wait for the standbys sqs_ingest.delete_after names to flush it.",
        c"Default 2000 ms; superuser-only. At most three quarters of sqs_ingest.post_commit_timeout; 0 never waits (a commit the standbys have not confirmed already is deferred). A commit not confirmed in time leaves its messages in the queue (counted in sqs_ingest.stats.deletes_deferred); they come back after their visibility timeout and are recognised as duplicates.",
        &STANDBY_WAIT_TIMEOUT_MS,
        0,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.max_receive_count",
        c"Receives (SQS ApproximateReceiveCount) after which a message that was never stored becomes a dead letter.",
         c"Default 10; 0 turns it off; superuser-only (it decides the fate of messages every consumer of the queue shares). Each earlier attempt failed (a transient error rolls the batch back and releases its messages with a backoff of 2^receive_count seconds); the dead letter is redrivable once the cause is fixed. Keep it below the maxReceiveCount of an SQS redrive policy, or SQS moves the message first.",
        &MAX_RECEIVE_COUNT,
        0,
        1000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.max_dynamic_workers",
        c"Most workers started with sqs_ingest.worker_start() that run at once in one database.",
        c"Default 4; superuser-only. worker_start() beyond it fails with 53400.",
        &MAX_DYNAMIC_WORKERS,
        0,
        64,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.receive_concurrency",
        c"ReceiveMessage calls kept in flight when a backend starts on a queue (each returns up to 10 messages).",
        c"Default 4. From there the number adapts: it grows while throughput grows, up to sqs_ingest.max_receive_concurrency, and shrinks on empty receives, throttling, or a database slower than the receives.",
        &RECEIVE_CONCURRENCY,
        1,
        64,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.max_receive_concurrency",
        c"Most ReceiveMessage calls one backend keeps in flight; twice as many DeleteMessageBatch calls run after a commit.",
        c"Default 16. One backend receives at most this many times 10 messages per round trip.",
        &MAX_RECEIVE_CONCURRENCY,
        1,
        64,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.visibility_timeout",
        c"Visibility timeout requested on receive; messages held by an open transaction are extended before it ends.",
        c"Default 60 seconds.",
        &VISIBILITY_TIMEOUT_S,
        1,
        43_200,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"sqs_ingest.visibility_heartbeat",
        c"Extend the visibility timeout of messages held by a still-open transaction.",
        c"Default on. Off relies on sqs_ingest.visibility_timeout alone: a transaction that outlives it lets SQS redeliver its messages (the ledger still stores each once).",
        &VISIBILITY_HEARTBEAT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.wait_time",
        c"Long-poll wait used to confirm a queue is empty before sqs_ingest() returns.",
        c"Default 1 second; 0 trusts a single short poll (exact on LocalStack, not on AWS).",
        &WAIT_TIME_S,
        0,
        20,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.request_timeout",
        c"Upper bound on one SQS call, excluding its long-poll wait.",
        c"Default 10000 ms.",
        &REQUEST_TIMEOUT_MS,
        100,
        600_000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_enum_guc(
        c"sqs_ingest.sqs_client",
        c"Client for the hot-path SQS calls (ReceiveMessage, DeleteMessageBatch, ChangeMessageVisibilityBatch).",
        c"direct (default): a built-in SigV4-signed JSON-protocol client, several times cheaper in CPU; sdk: the AWS SDK for Rust (use it behind an HTTP proxy or for FIPS/dual-stack endpoints). Other calls always use the SDK.",
        &SQS_CLIENT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.progress_interval",
        c"Seconds between progress NOTICEs of a long ingest; 0 disables them.",
        c"Default 10 seconds.",
        &PROGRESS_INTERVAL_S,
        0,
        3600,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"sqs_ingest.worker_enabled",
        c"Start the background ingest workers (needs shared_preload_libraries = 'sqs_ingest').",
        c"Default off.",
        &WORKER_ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    define_string(
        c"sqs_ingest.worker_queue_urls",
        c"Comma-separated queue URLs the background workers ingest from.",
        c"Default empty.",
        &WORKER_QUEUE_URLS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.worker_batch_messages",
        c"Most messages a worker stores per transaction.",
        c"Default 100.",
        &WORKER_BATCH_MESSAGES,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.worker_wait_time",
        c"Long-poll wait of a worker's ReceiveMessage when the queue is idle.",
        c"Default 20 seconds (the SQS maximum).",
        &WORKER_WAIT_S,
        0,
        20,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    // Postmaster-context settings can only be defined while shared_preload_libraries is being processed;
    // without the preload there are no static workers for them to configure.
    // SAFETY: a plain read of a postmaster flag during _PG_init.
    if !unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    define_string(
        c"sqs_ingest.worker_database",
        c"Database the background workers connect to (the one where CREATE EXTENSION sqs_ingest ran).",
        c"Default postgres.",
        &WORKER_DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.worker_count",
        c"Number of background workers started at server start.",
        c"Default 1. Workers share the queue list; SQS hands each message to one of them.",
        &WORKER_COUNT,
        0,
        64,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    define_string(
        c"sqs_ingest.worker_role",
        c"Role the static background workers connect as (its privileges are what they have).",
        c"Unset (default): the static workers start but do not ingest, and say so in the server log. Never a superuser for tables other roles own: a superuser worker writes such a table as its owner.",
        &WORKER_ROLE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sqs_ingest.worker_restart_delay",
        c"Seconds before the postmaster restarts a worker that died.",
        c"Default 5 seconds.",
        &WORKER_RESTART_S,
        1,
        3600,
        GucContext::Postmaster,
        GucFlags::UNIT_S,
    );
}
