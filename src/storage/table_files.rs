//! The output's table files through the object store delta-rs opened for the table.
//!
//! Data and error files, and the files a snapshot rewrite makes, are the Delta table's: they
//! are read and written by the same client, credentials, endpoint and retry policy as the
//! log's commits (`object_store`, from `deltalake-core`/`deltalake-aws`), so the output has one
//! code path whether it is a local folder or S3. What is verger's own protocol beside the
//! table stays on verger's store: the output's lease (conditional puts on a key outside the
//! table), the listing that checks an output holds nothing foreign, the clean-up of uploads
//! that killed runs left open, and the local staging folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;

use super::{check_key, error_chain, ListPage, Listing, ObjectStore, StorageError, StoreOptions};

/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// An output store whose table files go through delta-rs's object store; see the module
/// documentation for what stays on verger's own store.
#[derive(Debug)]
pub struct TableFiles {
    /// The table's object store, rooted at the table (the output's location).
    objects: Arc<dyn object_store::ObjectStore>,
    /// verger's store of the same location: lease, listing, clean-up, staging.
    own: Arc<dyn ObjectStore>,
    /// Files at least this large are uploaded in parts of `part_size`.
    multipart_threshold: usize,
    part_size: usize,
}

impl TableFiles {
    /// The table files of `own`'s location, through `objects` (the table's object store).
    pub fn new(
        objects: Arc<dyn object_store::ObjectStore>,
        own: Arc<dyn ObjectStore>,
        options: &StoreOptions,
    ) -> Self {
        Self {
            objects,
            own,
            multipart_threshold: options.multipart_threshold,
            part_size: options.part_size.max(1),
        }
    }

    fn path(key: &str) -> Result<ObjectPath, StorageError> {
        check_key(key)?;
        ObjectPath::parse(key).map_err(|e| StorageError::BadKey {
            key: key.to_string(),
            reason: match e {
                object_store::path::Error::BadSegment { .. } => "not a valid object name",
                _ => "not a valid object path",
            },
        })
    }

    /// Uploads the file at `path` in parts, aborting the upload if a part fails.
    async fn put_parts(
        &self,
        key: &str,
        location: &ObjectPath,
        path: &Path,
    ) -> Result<(), StorageError> {
        let upload = self
            .objects
            .put_multipart(location)
            .await
            .map_err(|e| store_error(key, e))?;
        let mut parts = WriteMultipart::new_with_chunk_size(upload, self.part_size);
        let mut file = tokio::fs::File::open(path).await.map_err(io(path))?;
        let mut buffer = vec![0u8; self.part_size];
        loop {
            let read = match read_up_to(&mut file, &mut buffer).await {
                Ok(read) => read,
                Err(e) => {
                    let _ = parts.abort().await;
                    return Err(io(path)(e));
                }
            };
            if read == 0 {
                break;
            }
            if let Err(e) = parts.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = parts.abort().await;
                return Err(store_error(key, e));
            }
            parts.write(&buffer[..read]);
        }
        parts.finish().await.map_err(|e| store_error(key, e))?;
        Ok(())
    }
}

/// Reads until `buffer` is full or the file ends; returns how many bytes were read.
async fn read_up_to(file: &mut tokio::fs::File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        key: path.display().to_string(),
        source,
    }
}

/// An object store's error as verger's, naming `key`.
fn store_error(key: &str, error: object_store::Error) -> StorageError {
    let key = key.to_string();
    match error {
        object_store::Error::NotFound { .. } => StorageError::NotFound { key },
        object_store::Error::AlreadyExists { .. } => StorageError::Exists { key },
        object_store::Error::Precondition { .. } => StorageError::Changed { key },
        e @ (object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. }) => StorageError::Refused {
            key,
            reason: error_chain(&e),
        },
        e => StorageError::Remote {
            key,
            reason: error_chain(&e),
        },
    }
}

#[async_trait]
impl Listing for TableFiles {
    fn location(&self) -> String {
        self.own.location()
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        limit: usize,
    ) -> Result<ListPage, StorageError> {
        self.own.list_page(prefix, token, limit).await
    }
}

#[async_trait]
impl ObjectStore for TableFiles {
    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let location = Self::path(key)?;
        let found = self
            .objects
            .get(&location)
            .await
            .map_err(|e| store_error(key, e))?;
        found.bytes().await.map_err(|e| store_error(key, e))
    }

    async fn get_version(&self, key: &str, etag: &str) -> Result<Bytes, StorageError> {
        self.own.get_version(key, etag).await
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let location = Self::path(key)?;
        self.objects
            .put(&location, PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| store_error(key, e))?;
        Ok(())
    }

    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<String, StorageError> {
        self.own.put_new(key, bytes).await
    }

    async fn put_if_match(
        &self,
        key: &str,
        bytes: Bytes,
        etag: &str,
    ) -> Result<String, StorageError> {
        self.own.put_if_match(key, bytes, etag).await
    }

    async fn get_tagged(&self, key: &str) -> Result<(Bytes, String), StorageError> {
        self.own.get_tagged(key).await
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let location = Self::path(key)?;
        let size = tokio::fs::metadata(path).await.map_err(io(path))?.len();
        if size >= self.multipart_threshold as u64 {
            self.put_parts(key, &location, path).await?;
        } else {
            let bytes = Bytes::from(tokio::fs::read(path).await.map_err(io(path))?);
            self.put(key, bytes).await?;
        }
        let _ = tokio::fs::remove_file(path).await;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let location = Self::path(key)?;
        match self.objects.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(key, e)),
        }
    }

    async fn remove_partial_writes(&self) -> Result<usize, StorageError> {
        self.own.remove_partial_writes().await
    }

    fn staging_dir(&self) -> PathBuf {
        self.own.staging_dir()
    }

    fn local_root(&self) -> Option<&Path> {
        self.own.local_root()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStore;

    fn files(dir: &Path, options: &StoreOptions) -> TableFiles {
        let own = Arc::new(LocalStore::open(dir, true).unwrap());
        let objects = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap());
        TableFiles::new(objects, own, options)
    }

    fn staged(dir: &Path, bytes: &[u8]) -> PathBuf {
        let path = dir.join("staged.parquet");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[tokio::test]
    async fn a_staged_file_lands_whole_under_its_key_in_one_put_or_in_parts() {
        let (out, stage) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let options = StoreOptions {
            multipart_threshold: 1000,
            part_size: 300,
            ..StoreOptions::default()
        };
        let store = files(out.path(), &options);
        let small: Vec<u8> = (0..999u32).map(|i| (i % 251) as u8).collect();
        let large: Vec<u8> = (0..2_345u32).map(|i| (i % 241) as u8).collect();
        for (key, bytes) in [
            ("data/small.parquet", &small),
            ("data/large.parquet", &large),
        ] {
            let path = staged(stage.path(), bytes);
            store.put_file(key, &path).await.unwrap();
            assert!(!path.exists(), "{key}: the staged file is removed");
            assert_eq!(
                std::fs::read(out.path().join(key)).unwrap(),
                *bytes,
                "{key}"
            );
            assert_eq!(store.get(key).await.unwrap(), Bytes::from(bytes.clone()));
        }
    }

    #[tokio::test]
    async fn missing_objects_and_bad_keys_are_verger_errors_naming_the_key() {
        let out = tempfile::tempdir().unwrap();
        let store = files(out.path(), &StoreOptions::default());
        assert!(matches!(
            store.get("data/gone.parquet").await,
            Err(StorageError::NotFound { key }) if key == "data/gone.parquet"
        ));
        assert!(matches!(
            store.put("../escape", Bytes::new()).await,
            Err(StorageError::BadKey { .. })
        ));
        store.delete("data/gone.parquet").await.unwrap();
        store
            .put("data/a.parquet", Bytes::from_static(b"x"))
            .await
            .unwrap();
        store.delete("data/a.parquet").await.unwrap();
        assert!(!out.path().join("data/a.parquet").exists());
    }
}
