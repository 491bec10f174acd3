//! Object storage: where images are read from and Parquet is written to.
//!
//! One small async trait, [`ObjectStore`], with a local-directory implementation (the embedded
//! default: no cloud needed) and an S3 one (`s3://bucket/prefix`). Keys are `/`-separated paths relative to the store's root
//! (`Training/Apple Red 1/r_3_100.jpg`), whatever the backing store.

pub mod listing;
pub mod local;
pub mod s3;
pub mod table_files;

use async_trait::async_trait;
use bytes::Bytes;
use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a store failed to do, naming the object.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The object does not exist (deleted between listing and reading, say).
    #[error("{key}: object not found")]
    NotFound {
        /// The key.
        key: String,
    },
    /// The object was replaced after it was listed (its ETag no longer matches); the next
    /// listing sees the new version.
    #[error("{key}: object changed since it was listed")]
    Changed {
        /// The key.
        key: String,
    },
    /// Any I/O failure, with the object it concerns.
    #[error("{key}: {source}")]
    Io {
        /// The key or path.
        key: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A remote store answered with an error (after the SDK's retries).
    #[error("{key}: {reason}")]
    Remote {
        /// The key, or the store's location for listings.
        key: String,
        /// The error and its causes.
        reason: String,
    },
    /// A conditional create found the key already there (another writer got there first).
    #[error("{key}: already exists")]
    Exists {
        /// The key.
        key: String,
    },
    /// A key that cannot name an object under the store's root (`..`, absolute, empty part).
    #[error("{key}: not a valid key ({reason})")]
    BadKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A location string verger cannot open.
    #[error("unsupported location `{0}` (expected a local directory or s3://bucket/prefix)")]
    Unsupported(String),
    /// A location that cannot serve as a store: missing, a file, not writable.
    #[error("{location}: {reason}")]
    Location {
        /// The directory or `s3://` location.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store refused the request for a reason no retry can cure: no such bucket, access
    /// denied, unknown access key, wrong secret, expired token, wrong region.
    #[error("{key}: {reason}")]
    Refused {
        /// The key, or the store's location.
        key: String,
        /// The error code and what it means.
        reason: String,
    },
    /// No AWS credentials could be found by the default chain.
    #[error("{location}: no AWS credentials: {reason}")]
    NoCredentials {
        /// The `s3://` location.
        location: String,
        /// Where the chain looked, and what it said.
        reason: String,
    },
    /// The S3 endpoint could not be reached or did not answer at start-up.
    #[error("{location}: the S3 endpoint {reason}")]
    Unreachable {
        /// The `s3://` location.
        location: String,
        /// The endpoint tried and what happened (refused, timed out), with its causes.
        reason: String,
    },
    /// Opening one side of a run (`input` or `output`) failed.
    #[error("{side} {source}")]
    Side {
        /// `input` or `output`.
        side: &'static str,
        /// Why.
        source: Box<StorageError>,
    },
}

impl StorageError {
    /// This error, said of the run's `side` (`input` or `output`), so that a message tells
    /// which location is wrong.
    pub fn on_side(self, side: &'static str) -> Self {
        Self::Side {
            side,
            source: Box::new(self),
        }
    }
}

/// An error and its causes on one line, each cause once (SDK errors nest the same message
/// at several levels), without Debug dumps.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

/// An object found by listing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectMeta {
    /// Key relative to the store root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Version tag: the S3 ETag (content hash for simple uploads), or size and modification
    /// time for a local file. A key listed with a new ETag is a new version to process.
    pub etag: String,
    /// Set when the listing found this entry but cannot give it as an object, with why (a
    /// folder that cannot be read, a name that is not UTF-8): it becomes an error record
    /// (stage `list`) instead of stopping the listing, and is never read.
    #[serde(default)]
    pub unlistable: Option<String>,
}

impl ObjectMeta {
    /// An object as listed.
    pub fn new(key: String, size: u64, etag: String) -> Self {
        Self {
            key,
            size,
            etag,
            unlistable: None,
        }
    }
}

/// Whether `key` is hidden: some folder or file name in it starts with `.` (`.DS_Store`,
/// macOS's `._photo.jpg`, `.git/`, editors' and verger's own temporary files). Every store
/// leaves hidden keys out of its listings alike, naming each in a log line.
pub fn is_hidden(key: &str) -> bool {
    key.split('/').any(|name| name.starts_with('.'))
}

/// One page of a listing; `next` continues it.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    /// Objects of this page, in the store's listing order: ascending UTF-8 bytes of the keys
    /// on S3, component by component ([`key_order`]) for a local directory.
    pub objects: Vec<ObjectMeta>,
    /// Token for the next page, `None` at the end.
    pub next: Option<String>,
}

/// What a store is to a listing: a location whose keys come page by page. The listing task
/// ([`listing::start_listing`]) needs nothing more, so a test double of a listing implements
/// only this.
#[async_trait]
pub trait Listing: Send + Sync + std::fmt::Debug {
    /// Human-readable location, for logs and the manifest.
    fn location(&self) -> String;

    /// One page of at most `limit` keys under `prefix` (`""` for all), after `token`.
    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        limit: usize,
    ) -> Result<ListPage, StorageError>;
}

/// An object store holding images (input) or Parquet and manifests (output): a listing that
/// also reads and writes objects.
#[async_trait]
pub trait ObjectStore: Listing {
    /// The whole object.
    async fn get(&self, key: &str) -> Result<Bytes, StorageError>;

    /// The whole object if it is still the version listed with `etag`, else
    /// [`StorageError::Changed`] (a deleted object is [`StorageError::NotFound`]).
    async fn get_version(&self, key: &str, etag: &str) -> Result<Bytes, StorageError>;

    /// Writes `bytes` under `key` atomically: readers see the old object or the whole new one.
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError>;

    /// Creates `key` with `bytes` only if it does not exist yet ([`StorageError::Exists`]
    /// otherwise), atomically; returns the new object's version tag.
    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<String, StorageError>;

    /// Replaces `key` only if it is still the version `etag` ([`StorageError::Changed`]
    /// otherwise, [`StorageError::NotFound`] if it is gone); returns the new version tag.
    async fn put_if_match(
        &self,
        key: &str,
        bytes: Bytes,
        etag: &str,
    ) -> Result<String, StorageError>;

    /// The whole object with its current version tag.
    async fn get_tagged(&self, key: &str) -> Result<(Bytes, String), StorageError>;

    /// Moves the finished local file `path` to `key` atomically (rename or upload).
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError>;

    /// Deletes `key`; deleting a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// Removes what a writer that died mid-write left under this store's root: multipart
    /// uploads still open (S3), hidden temporary files of unfinished atomic writes (local).
    /// Only the holder of the output's lease may call it. Returns how many were removed.
    async fn remove_partial_writes(&self) -> Result<usize, StorageError>;

    /// The local directory where files destined for this store are staged (for a local store,
    /// inside it, so that [`put_file`](Self::put_file) is a rename; for S3, a folder of the
    /// system temp dir named after the location). One per output, so that the lease holder
    /// can remove what killed runs left there.
    fn staging_dir(&self) -> PathBuf;

    /// The directory of a local store (`None` for remote stores).
    fn local_root(&self) -> Option<&Path> {
        None
    }
}

/// How remote stores are reached; ignored by local directories.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// S3 endpoint for S3-compatible stores (`AWS_ENDPOINT_URL` is honoured too).
    pub endpoint_url: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible stores need.
    pub path_style: bool,
    /// Attempts per request, the first included (throttling, 5xx, timeouts, resets).
    pub max_attempts: u32,
    /// Use the SDK's adaptive retry mode (client-side rate limiting) instead of standard.
    pub adaptive_retry: bool,
    /// How many more times an operation is tried, with growing pauses (`s3::OUTAGE_PAUSES`),
    /// once the SDK's own retries are spent: rides out an outage of about a minute.
    pub outage_retries: usize,
    /// Files at least this large are uploaded in parts.
    pub multipart_threshold: usize,
    /// Size of each part (S3 requires at least 5 MiB but for the last).
    pub part_size: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            endpoint_url: None,
            path_style: false,
            max_attempts: 10,
            adaptive_retry: false,
            outage_retries: s3::OUTAGE_PAUSES.len(),
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
        }
    }
}

/// Opens a location given on the command line: `s3://bucket/prefix`, or a local directory
/// (created if `create`).
pub async fn open(
    location: &str,
    create: bool,
    options: &StoreOptions,
) -> Result<Arc<dyn ObjectStore>, StorageError> {
    if location.starts_with("s3://") {
        return Ok(Arc::new(s3::S3Store::open(location, options).await?));
    }
    if location.contains("://") && !location.starts_with("file://") {
        return Err(StorageError::Unsupported(location.to_string()));
    }
    let path = location.strip_prefix("file://").unwrap_or(location);
    Ok(Arc::new(local::LocalStore::open(Path::new(path), create)?))
}

/// Checks that `key` names an object under a store's root: relative, `/`-separated, with no
/// empty, `.` or `..` component. Keys come from listings, but also from manifests, which are
/// data from storage and may have been edited by hand.
pub fn check_key(key: &str) -> Result<(), StorageError> {
    let bad = |reason| {
        Err(StorageError::BadKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.starts_with('/') || key.starts_with('\\') {
        return bad("absolute path");
    }
    for part in key.split('/') {
        match part {
            "" => return bad("empty path component"),
            "." | ".." => return bad("`.` or `..` component"),
            _ if part.contains('\0') => return bad("NUL byte"),
            _ => {}
        }
    }
    Ok(())
}

/// Order of keys in listings: component by component, so that a directory's keys stay
/// together (`a/x` < `a b/x`, unlike plain string order).
pub fn key_order(a: &str, b: &str) -> Ordering {
    a.split('/').cmp(b.split('/'))
}

/// Lists every object under `prefix`, page by page, calling `on_page` as pages arrive.
pub async fn list_all(
    store: &dyn ObjectStore,
    prefix: &str,
    page_size: usize,
    mut on_page: impl FnMut(Vec<ObjectMeta>) -> bool,
) -> Result<(), StorageError> {
    let mut token = None;
    loop {
        let page = store.list_page(prefix, token, page_size).await?;
        if !on_page(page.objects) {
            return Ok(());
        }
        match page.next {
            Some(next) => token = Some(next),
            None => return Ok(()),
        }
    }
}
