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
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::{ListPage, ObjectMeta, ObjectStore, StorageError, StoreOptions};

/// Pauses before each verger-level retry of an operation the SDK gave up on (~60 s in all).
pub const OUTAGE_PAUSES: [Duration; 6] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
    Duration::from_secs(30),
];

/// Runs `op` until it succeeds, fails for good (not found, local I/O), or the first `retries`
/// of [`OUTAGE_PAUSES`] are spent. Each pause is jittered (50-100%) so that workers do not
/// retry in lockstep.
async fn outage_retry<T, F, Fut>(what: &str, retries: usize, mut op: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    let mut pauses = OUTAGE_PAUSES.iter().take(retries);
    loop {
        match op().await {
            Err(e @ StorageError::Remote { .. }) => match pauses.next() {
                Some(pause) => {
                    let pause = pause.mul_f64(rand::random_range(0.5..1.0));
                    tracing::warn!(
                        what,
                        ?pause,
                        "S3 still failing after the SDK's retries, trying again: {e}"
                    );
                    tokio::time::sleep(pause).await;
                }
                None => return Err(e),
            },
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
}

fn remote<E: std::error::Error + Send + Sync + 'static, R: std::fmt::Debug>(
    key: &str,
    err: SdkError<E, R>,
) -> StorageError {
    StorageError::Remote {
        key: key.to_string(),
        reason: DisplayErrorContext(&err).to_string(),
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
        Ok(Self {
            client: Client::from_conf(config.build()),
            bucket: bucket.to_string(),
            root,
            options: options.clone(),
        })
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
                reason: format!("reading the body: {}", DisplayErrorContext(&e)),
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
impl ObjectStore for S3Store {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.root)
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        limit: usize,
    ) -> Result<ListPage, StorageError> {
        outage_retry(&self.location(), self.options.outage_retries, || {
            self.list_once(prefix, token.clone(), limit)
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        Ok(self.get_tagged(key).await?.0)
    }

    async fn get_version(&self, key: &str, etag: &str) -> Result<Bytes, StorageError> {
        let retries = self.options.outage_retries;
        let found = outage_retry(key, retries, || self.get_once(key, Some(etag))).await?;
        Ok(found.0)
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        outage_retry(key, self.options.outage_retries, || {
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
            outage_retry(key, self.options.outage_retries, || {
                self.put_multipart(key, path)
            })
            .await?;
        } else {
            let body = Bytes::from(tokio::fs::read(path).await.map_err(io)?);
            outage_retry(key, self.options.outage_retries, || {
                self.put_once(key, body.clone())
            })
            .await?;
        }
        let _ = tokio::fs::remove_file(path).await;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        outage_retry(key, self.options.outage_retries, || self.delete_once(key)).await
    }

    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<String, StorageError> {
        outage_retry(key, self.options.outage_retries, || {
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
        outage_retry(key, self.options.outage_retries, || {
            self.put_conditional(key, bytes.clone(), Some(etag))
        })
        .await
    }

    async fn get_tagged(&self, key: &str) -> Result<(Bytes, String), StorageError> {
        outage_retry(key, self.options.outage_retries, || {
            self.get_once(key, None)
        })
        .await
    }

    async fn remove_partial_writes(&self) -> Result<usize, StorageError> {
        outage_retry(&self.location(), self.options.outage_retries, || {
            self.abort_incomplete_once()
        })
        .await
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
                // "Folder" markers some tools create are not objects.
                (!key.ends_with('/')).then(|| ObjectMeta {
                    key,
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().unwrap_or_default().trim_matches('"').to_string(),
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
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => {
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
