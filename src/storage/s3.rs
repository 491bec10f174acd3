//! Amazon S3 (or any S3-compatible store) through aws-sdk-s3.
//!
//! Credentials and region come from aws-config's default chain (environment, profile, web
//! identity, EC2 instance role through IMDS): verger never takes a key on its command line.
//! Throttling (503 SlowDown), 5xx, timeouts and connection resets are retried by the SDK with
//! exponential backoff and jitter. The SDK stops retrying when its retry quota is spent (a
//! storm of failures: the store restarting, the network gone for seconds), and it does not
//! retry a body that breaks while being read; for those, every operation here is tried again
//! a few more times with longer, jittered pauses ([`OUTAGE_PAUSES`]) before it fails.
//! Large files go up as multipart uploads, aborted on failure so none stays open.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::{
    self as storage, ListPage, Listing, ObjectMeta, ObjectStore, StorageError, StoreOptions,
};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::ProvideCredentials;
use aws_sdk_s3::error::ProvideErrorMetadata;

/// Pauses before each verger-level retry of an operation the SDK gave up on (~60 s in all).
pub const OUTAGE_PAUSES: [Duration; 6] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
    Duration::from_secs(30),
];

/// Runs `op` until it succeeds, fails for good (not found, refused, local I/O), or `pauses`
/// (the first `--s3-outage-retries` of [`OUTAGE_PAUSES`]) are spent. Each pause is jittered
/// (50-100%) so that workers do not retry in lockstep. `log` turns an outage into one
/// warning, not one per operation.
async fn outage_retry<T, F, Fut>(
    log: (&OutageLog, &str),
    what: &str,
    pauses: &[Duration],
    mut op: F,
) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    let (outages, location) = log;
    let retries = pauses.len();
    let mut pauses = pauses.iter();
    let mut failed = false;
    loop {
        match op().await {
            Err(e @ StorageError::Remote { .. }) => match pauses.next() {
                Some(pause) => {
                    if !failed {
                        outages.failing(location, what, &e, retries);
                        failed = true;
                    }
                    let pause = pause.mul_f64(rand::random_range(0.5..1.0));
                    tracing::debug!(what, ?pause, "S3 still failing, trying again: {e}");
                    tokio::time::sleep(pause).await;
                }
                None => return Err(e),
            },
            Ok(v) => {
                outages.answered(location);
                return Ok(v);
            }
            other => return other,
        }
    }
}

/// The local staging folder of the output at `location` (endpoint and `s3://` location):
/// `verger-staging/<hash>` in the
/// system temp dir, the same for every run on that output, so that a run holding the output's
/// lease can remove the files of killed runs.
pub fn staging_for(location: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(location.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    std::env::temp_dir().join("verger-staging").join(hex)
}

/// A bucket and a key prefix in it, as `s3://bucket/prefix`.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Prefix of every key, empty or ending in `/`.
    root: String,
    options: StoreOptions,
    outages: std::sync::Arc<OutageLog>,
}

/// What an S3 error code means, when no retry can cure it.
fn refusal(code: &str) -> Option<&'static str> {
    Some(match code {
        "NoSuchBucket" => "the bucket does not exist",
        "AccessDenied" | "AllAccessDisabled" | "AccountProblem" => {
            "access denied: the credentials' IAM policy does not allow this request"
        }
        "InvalidAccessKeyId" => "the access key id is unknown to the store (wrong credentials)",
        "SignatureDoesNotMatch" => {
            "the request signature does not match: the secret key is wrong for this access key id"
        }
        "ExpiredToken" | "TokenRefreshRequired" | "InvalidToken" => {
            "the session token is invalid or has expired"
        }
        "PermanentRedirect" | "AuthorizationHeaderMalformed" => {
            "the bucket is in another region (set AWS_REGION to the bucket's region)"
        }
        "InvalidBucketName" => "not a valid bucket name",
        _ => return None,
    })
}

/// An SDK error as a [`StorageError`]: a [`StorageError::Refused`] when the store refused
/// for good, else [`StorageError::Remote`] (retried by [`outage_retry`]), with the causes on
/// one line.
fn remote<E>(key: &str, err: SdkError<E, HttpResponse>) -> StorageError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    if let SdkError::ServiceError(service) = &err {
        let code = service.err().code().unwrap_or_default();
        let status = service.raw().status().as_u16();
        let meaning = refusal(code).or(match status {
            403 => Some("access denied (HTTP 403)"),
            301 => Some("the bucket is in another region (set AWS_REGION to the bucket's region)"),
            _ => None,
        });
        if let Some(meaning) = meaning {
            let code = if code.is_empty() {
                status.to_string()
            } else {
                code.to_string()
            };
            return StorageError::Refused {
                key: key.to_string(),
                reason: format!("{meaning} ({code})"),
            };
        }
    }
    StorageError::Remote {
        key: key.to_string(),
        reason: storage::error_chain(&err),
    }
}

/// The profile the default chain reads: `AWS_PROFILE`, else `default`.
fn selected_profile() -> String {
    std::env::var("AWS_PROFILE")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// Fails when `AWS_PROFILE` names a profile that no shared config or credentials file defines
/// (the SDK's chain would pass over it silently and try the next source).
async fn check_profile(location: &str) -> Result<(), StorageError> {
    let Some(wanted) = std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let profiles = aws_config::profile::load(
        &aws_types::os_shim_internal::Fs::real(),
        &aws_types::os_shim_internal::Env::real(),
        &aws_runtime::env_config::file::EnvConfigFiles::default(),
        None,
    )
    .await;
    let known: Vec<String> = match &profiles {
        Ok(set) => set.profiles().map(str::to_string).collect(),
        Err(_) => Vec::new(),
    };
    if known.contains(&wanted) {
        return Ok(());
    }
    let found = match (profiles, known.is_empty()) {
        (Err(e), _) => format!("the shared config files could not be read: {e}"),
        (Ok(_), true) => "no profile is defined in ~/.aws/config or ~/.aws/credentials".into(),
        (Ok(_), false) => format!("the profiles defined are {}", known.join(", ")),
    };
    Err(StorageError::Location {
        location: location.to_string(),
        reason: format!("AWS_PROFILE is `{wanted}`, but {found}"),
    })
}

/// Resolves the credentials once, so that a machine without any fails at start-up with one
/// line saying where it looked, not after minutes of retried requests.
async fn check_credentials(
    sdk: &aws_config::SdkConfig,
    location: &str,
) -> Result<(), StorageError> {
    check_profile(location).await?;
    let imds = match std::env::var("AWS_EC2_METADATA_DISABLED") {
        Ok(v) if v.eq_ignore_ascii_case("true") => " (disabled by AWS_EC2_METADATA_DISABLED)",
        _ => "",
    };
    let fail = |reason: String| StorageError::NoCredentials {
        location: location.to_string(),
        reason: format!(
            "looked in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), in profile \
             `{}` of ~/.aws/credentials and ~/.aws/config (AWS_PROFILE names another), for a web \
             identity token (AWS_WEB_IDENTITY_TOKEN_FILE), the ECS container endpoint and the EC2 \
             instance role{imds}: {reason}",
            selected_profile()
        ),
    };
    let Some(provider) = sdk.credentials_provider() else {
        return Err(fail("no credentials provider is configured".into()));
    };
    match tokio::time::timeout(CREDENTIALS_TIMEOUT, provider.provide_credentials()).await {
        Ok(Ok(_)) => Ok(()),
        // The chain lists each source it tried on a line of its own: keep one line.
        Ok(Err(e)) => Err(fail(
            storage::error_chain(&e)
                .split('\n')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; "),
        )),
        Err(_) => Err(fail(format!(
            "no answer within {} s",
            CREDENTIALS_TIMEOUT.as_secs()
        ))),
    }
}

/// How long resolving credentials may take at start-up.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts, and the time limit of each, of the request that checks at start-up that the
/// endpoint answers: an endpoint that accepts connections but never answers fails within
/// about half a minute.
const PREFLIGHT_ATTEMPTS: u32 = 3;
const PREFLIGHT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(8);

/// One message per outage: the first failure of an operation the SDK gave up on logs a
/// warning, the next ones are quiet until an operation succeeds again, which logs how long
/// the outage lasted.
#[derive(Debug, Default)]
struct OutageLog {
    /// When the current outage began and how many operations were retried during it.
    current: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl OutageLog {
    fn failing(&self, location: &str, what: &str, error: &StorageError, retries: usize) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match current.as_mut() {
            Some((_, retried)) => *retried += 1,
            None => {
                *current = Some((std::time::Instant::now(), 1));
                tracing::warn!(
                    "S3 bucket `{location}` is failing ({what}: {error}); every operation is tried up to \
                     {retries} more times over about a minute"
                );
            }
        }
    }

    fn answered(&self, location: &str) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((since, retried)) = current.take() {
            tracing::warn!(
                "S3 bucket `{location}` answers again after {:.1} s ({retried} retried operations)",
                since.elapsed().as_secs_f64()
            );
        }
    }
}

impl S3Store {
    /// Connects to `s3://bucket/prefix` with the default credential chain and `options`.
    pub async fn open(location: &str, options: &StoreOptions) -> Result<Self, StorageError> {
        let rest = location
            .strip_prefix("s3://")
            .ok_or_else(|| StorageError::Unsupported(location.to_string()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StorageError::Unsupported(location.to_string()));
        }
        let root = match prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let retry = if options.adaptive_retry {
            RetryConfig::adaptive()
        } else {
            RetryConfig::standard()
        }
        .with_max_attempts(options.max_attempts.max(1))
        .with_initial_backoff(Duration::from_millis(200))
        .with_max_backoff(Duration::from_secs(10));
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_secs(120))
            .build();
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(retry)
            .timeout_config(timeouts)
            .load()
            .await;
        let mut config =
            aws_sdk_s3::config::Builder::from(&sdk).force_path_style(options.path_style);
        if let Some(url) = &options.endpoint_url {
            config = config.endpoint_url(url);
        }
        if sdk.region().is_none() {
            config = config.region(Region::new("us-east-1"));
        }
        check_credentials(&sdk, location).await?;
        let store = Self {
            client: Client::from_conf(config.build()),
            bucket: bucket.to_string(),
            root,
            options: options.clone(),
            outages: Default::default(),
        };
        store.preflight(sdk.region()).await?;
        Ok(store)
    }

    /// Lists one key, with few attempts and short timeouts, so that a wrong bucket, refused
    /// credentials or an endpoint that is down or silent fail the run at start-up, in seconds,
    /// with a message saying which.
    async fn preflight(&self, region: Option<&Region>) -> Result<(), StorageError> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(PREFLIGHT_ATTEMPT_TIMEOUT)
            .operation_attempt_timeout(PREFLIGHT_ATTEMPT_TIMEOUT)
            .build();
        let quick = aws_sdk_s3::config::Builder::default()
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(PREFLIGHT_ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(200)),
            )
            .timeout_config(timeouts);
        let result = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.root)
            .max_keys(1)
            .customize()
            .config_override(quick)
            .send()
            .await;
        let location = self.location();
        let err = match result {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let endpoint = match &self.options.endpoint_url {
            Some(url) => url.clone(),
            None => format!(
                "of region {}",
                region.map_or("us-east-1".to_string(), |r| r.to_string())
            ),
        };
        let limit = PREFLIGHT_ATTEMPTS as u64 * PREFLIGHT_ATTEMPT_TIMEOUT.as_secs();
        let reason = match &err {
            SdkError::TimeoutError(_) => format!(
                "did not answer ({PREFLIGHT_ATTEMPTS} attempts of {} s)",
                PREFLIGHT_ATTEMPT_TIMEOUT.as_secs()
            ),
            SdkError::DispatchFailure(d) if d.is_timeout() => format!(
                "did not answer within {limit} s: {}",
                storage::error_chain(&err)
            ),
            SdkError::DispatchFailure(_) => {
                format!("cannot be reached: {}", storage::error_chain(&err))
            }
            SdkError::ResponseError(_) => format!(
                "answered with something that is not S3: {}",
                storage::error_chain(&err)
            ),
            _ => match remote(&location, err) {
                e @ StorageError::Refused { .. } => return Err(e),
                other => format!("failed: {other}"),
            },
        };
        Err(StorageError::Unreachable {
            location,
            reason: format!("{endpoint} {reason}"),
        })
    }

    fn pauses(&self) -> &'static [Duration] {
        &OUTAGE_PAUSES[..self.options.outage_retries.min(OUTAGE_PAUSES.len())]
    }

    fn log(&self) -> (&OutageLog, &str) {
        (&self.outages, &self.bucket)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.root)
    }

    /// The object (only if it is still version `etag`, when given) and its version tag.
    async fn get_once(
        &self,
        key: &str,
        etag: Option<&str>,
    ) -> Result<(Bytes, String), StorageError> {
        let response = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .set_if_match(etag.filter(|e| !e.is_empty()).map(|e| format!("\"{e}\"")))
            .send()
            .await;
        let output = match response {
            Ok(output) => output,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => {
                return Err(StorageError::NotFound {
                    key: key.to_string(),
                })
            }
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 412 => {
                return Err(StorageError::Changed {
                    key: key.to_string(),
                })
            }
            Err(e) => return Err(remote(key, e)),
        };
        let version = output
            .e_tag()
            .unwrap_or_default()
            .trim_matches('"')
            .to_string();
        // The SDK retries requests, not a body cut short: a Remote error is retried by `get`.
        let bytes = output
            .body
            .collect()
            .await
            .map(|b| b.into_bytes())
            .map_err(|e| StorageError::Remote {
                key: key.to_string(),
                reason: format!("reading the body: {}", storage::error_chain(&e)),
            })?;
        Ok((bytes, version))
    }

    async fn put_multipart(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let full = self.full(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| remote(key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let result = self.upload_parts(key, &full, &upload_id, path).await;
        if result.is_err() {
            // Never leave an open multipart upload behind (it is billed and invisible).
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        path: &Path,
    ) -> Result<(), StorageError> {
        let io = |source| StorageError::Io {
            key: path.display().to_string(),
            source,
        };
        let mut file = tokio::fs::File::open(path).await.map_err(io)?;
        let part_size = self.options.part_size.max(5 << 20);
        let mut parts = Vec::new();
        for number in 1.. {
            let mut buf = Vec::with_capacity(part_size);
            (&mut file)
                .take(part_size as u64)
                .read_to_end(&mut buf)
                .await
                .map_err(io)?;
            if buf.is_empty() && number > 1 {
                break;
            }
            let last = buf.len() < part_size;
            let part = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(buf))
                .send()
                .await
                .map_err(|e| remote(key, e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_string))
                    .build(),
            );
            if last {
                break;
            }
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| remote(key, e))?;
        Ok(())
    }
}

#[async_trait]
impl Listing for S3Store {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.root)
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        limit: usize,
    ) -> Result<ListPage, StorageError> {
        outage_retry(self.log(), &self.location(), self.pauses(), || {
            self.list_once(prefix, token.clone(), limit)
        })
        .await
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        Ok(self.get_tagged(key).await?.0)
    }

    async fn get_version(&self, key: &str, etag: &str) -> Result<Bytes, StorageError> {
        let found = outage_retry(self.log(), key, self.pauses(), || {
            self.get_once(key, Some(etag))
        })
        .await?;
        Ok(found.0)
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        outage_retry(self.log(), key, self.pauses(), || {
            self.put_once(key, bytes.clone())
        })
        .await
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let io = |source| StorageError::Io {
            key: path.display().to_string(),
            source,
        };
        let size = tokio::fs::metadata(path).await.map_err(io)?.len();
        if size >= self.options.multipart_threshold as u64 {
            outage_retry(self.log(), key, self.pauses(), || {
                self.put_multipart(key, path)
            })
            .await?;
        } else {
            let body = Bytes::from(tokio::fs::read(path).await.map_err(io)?);
            outage_retry(self.log(), key, self.pauses(), || {
                self.put_once(key, body.clone())
            })
            .await?;
        }
        let _ = tokio::fs::remove_file(path).await;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        outage_retry(self.log(), key, self.pauses(), || self.delete_once(key)).await
    }

    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<String, StorageError> {
        outage_retry(self.log(), key, self.pauses(), || {
            self.put_conditional(key, bytes.clone(), None)
        })
        .await
    }

    async fn put_if_match(
        &self,
        key: &str,
        bytes: Bytes,
        etag: &str,
    ) -> Result<String, StorageError> {
        outage_retry(self.log(), key, self.pauses(), || {
            self.put_conditional(key, bytes.clone(), Some(etag))
        })
        .await
    }

    async fn get_tagged(&self, key: &str) -> Result<(Bytes, String), StorageError> {
        outage_retry(self.log(), key, self.pauses(), || self.get_once(key, None)).await
    }

    async fn remove_partial_writes(&self) -> Result<usize, StorageError> {
        let found = outage_retry(self.log(), &self.location(), self.pauses(), || {
            self.abort_incomplete_once()
        })
        .await;
        match found {
            Err(StorageError::Refused { key, reason }) => {
                tracing::warn!(
                    "cannot list the multipart uploads left open under {key} ({reason}): \
                     skipping their clean-up; allow s3:ListBucketMultipartUploads on the bucket \
                     (without an s3:prefix condition, which that action does not carry), or \
                     let a lifecycle rule abort incomplete uploads"
                );
                Ok(0)
            }
            other => other,
        }
    }

    fn staging_dir(&self) -> PathBuf {
        let endpoint = self.options.endpoint_url.as_deref().unwrap_or("aws");
        staging_for(&format!("{endpoint} {}", self.location()))
    }
}

impl S3Store {
    async fn list_once(
        &self,
        prefix: &str,
        token: Option<String>,
        limit: usize,
    ) -> Result<ListPage, StorageError> {
        let response = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full(prefix))
            .set_continuation_token(token)
            .max_keys(limit.clamp(1, 1000) as i32)
            .send()
            .await
            .map_err(|e| remote(&self.location(), e))?;
        let objects = response
            .contents()
            .iter()
            .filter_map(|o| {
                let key = o.key()?.strip_prefix(&self.root)?.to_string();
                if super::is_hidden(&key) {
                    tracing::info!(key, "left out: a hidden file");
                    return None;
                }
                // "Folder" markers some tools create are not objects.
                (!key.ends_with('/')).then(|| {
                    ObjectMeta::new(
                        key,
                        o.size().unwrap_or(0).max(0) as u64,
                        o.e_tag().unwrap_or_default().trim_matches('"').to_string(),
                    )
                })
            })
            .collect();
        let next = match response.is_truncated() {
            Some(true) => response.next_continuation_token().map(str::to_string),
            _ => None,
        };
        Ok(ListPage { objects, next })
    }

    async fn put_once(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| remote(key, e))?;
        Ok(())
    }

    /// PutObject with `If-None-Match: *` (`etag` is `None`) or `If-Match: etag`.
    async fn put_conditional(
        &self,
        key: &str,
        bytes: Bytes,
        etag: Option<&str>,
    ) -> Result<String, StorageError> {
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .body(ByteStream::from(bytes));
        let request = match etag {
            None => request.if_none_match("*"),
            Some(etag) => request.if_match(format!("\"{}\"", etag.trim_matches('"'))),
        };
        match request.send().await {
            Ok(out) => Ok(out
                .e_tag()
                .unwrap_or_default()
                .trim_matches('"')
                .to_string()),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 412 => Err(match etag {
                None => StorageError::Exists {
                    key: key.to_string(),
                },
                Some(_) => StorageError::Changed {
                    key: key.to_string(),
                },
            }),
            Err(SdkError::ServiceError(e))
                if e.raw().status().as_u16() == 404 && e.err().code() != Some("NoSuchBucket") =>
            {
                Err(StorageError::NotFound {
                    key: key.to_string(),
                })
            }
            Err(e) => Err(remote(key, e)),
        }
    }

    async fn delete_once(&self, key: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
            .map_err(|e| remote(key, e))?;
        Ok(())
    }

    async fn abort_incomplete_once(&self) -> Result<usize, StorageError> {
        let mut aborted = 0;
        let (mut key_marker, mut id_marker) = (None, None);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&self.root)
                .set_key_marker(key_marker)
                .set_upload_id_marker(id_marker)
                .send()
                .await
                .map_err(|e| remote(&self.location(), e))?;
            for upload in page.uploads() {
                let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                    continue;
                };
                tracing::info!(
                    key,
                    "aborting a multipart upload left open by an earlier run"
                );
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await
                    .map_err(|e| remote(key, e))?;
                aborted += 1;
            }
            if page.is_truncated() != Some(true) {
                return Ok(aborted);
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    /// Log lines written while `f` runs on this thread.
    fn logs_of(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(data);
                Ok(data.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn remote_error() -> StorageError {
        StorageError::Remote {
            key: "k".into(),
            reason: "dispatch failure: connection refused".into(),
        }
    }

    #[test]
    fn an_outage_is_one_warning_and_one_recovery_line_however_many_operations_wait() {
        let log = OutageLog::default();
        let attempts: Vec<AtomicU32> = (0..4).map(|_| AtomicU32::new(0)).collect();
        let pauses = [Duration::ZERO; 3];
        let op = |i: usize| {
            let attempts = &attempts;
            move || async move {
                tokio::task::yield_now().await; // the four operations interleave
                match attempts[i].fetch_add(1, Ordering::Relaxed) {
                    0 | 1 => Err(remote_error()),
                    _ => Ok(i),
                }
            }
        };
        let text = logs_of(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let results = rt.block_on(async {
                let l = (&log, "fruit");
                tokio::join!(
                    outage_retry(l, "a", &pauses, op(0)),
                    outage_retry(l, "b", &pauses, op(1)),
                    outage_retry(l, "c", &pauses, op(2)),
                    outage_retry(l, "d", &pauses, op(3)),
                )
            });
            assert_eq!(
                [
                    results.0.unwrap(),
                    results.1.unwrap(),
                    results.2.unwrap(),
                    results.3.unwrap()
                ],
                [0, 1, 2, 3]
            );
        });
        assert_eq!(text.matches("is failing").count(), 1, "{text}");
        assert_eq!(text.matches("answers again").count(), 1, "{text}");
        assert_eq!(text.lines().count(), 2, "nothing per operation: {text}");
        assert!(!text.contains("Remote {"), "no Debug dump: {text}");
    }

    #[test]
    fn refusals_are_not_retried_and_spent_pauses_give_the_error() {
        let calls = AtomicU32::new(0);
        let log = OutageLog::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let refused = rt.block_on(outage_retry((&log, "b"), "k", &[Duration::ZERO; 6], || {
            calls.fetch_add(1, Ordering::Relaxed);
            async {
                Err::<(), _>(StorageError::Refused {
                    key: "k".into(),
                    reason: "the bucket does not exist (NoSuchBucket)".into(),
                })
            }
        }));
        assert!(matches!(refused, Err(StorageError::Refused { .. })));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        calls.store(0, Ordering::Relaxed);
        let failing = rt.block_on(outage_retry((&log, "b"), "k", &[Duration::ZERO; 2], || {
            calls.fetch_add(1, Ordering::Relaxed);
            async { Err::<(), _>(remote_error()) }
        }));
        assert!(matches!(failing, Err(StorageError::Remote { .. })));
        assert_eq!(
            calls.load(Ordering::Relaxed),
            3,
            "the first try and one per pause"
        );
    }

    #[test]
    fn error_codes_no_retry_can_cure_are_named() {
        for code in [
            "NoSuchBucket",
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
        ] {
            assert!(refusal(code).is_some(), "{code}");
        }
        for code in [
            "SlowDown",
            "InternalError",
            "ServiceUnavailable",
            "RequestTimeout",
        ] {
            assert!(refusal(code).is_none(), "{code} is transient");
        }
    }
}
