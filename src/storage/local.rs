//! A local directory as an object store: the embedded default.
//!
//! Listing walks the tree in key order and resumes after a token without re-reading what was
//! already listed, so a folder of millions of files streams page by page. Writes go to a
//! hidden temporary name in the same directory and are renamed into place (atomic on POSIX).

use super::{key_order, ListPage, ObjectMeta, ObjectStore, StorageError};
use async_trait::async_trait;
use bytes::Bytes;
use std::cmp::Ordering;
use std::path::{Path, PathBuf};

/// Name of the staging folder inside an output directory (ignored by listings).
pub const STAGING: &str = "_staging";

/// A directory on the local filesystem.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

fn io(key: &str) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            StorageError::NotFound {
                key: key.to_string(),
            }
        } else {
            StorageError::Io {
                key: key.to_string(),
                source,
            }
        }
    }
}

/// The version tag of a local file: its size and modification time (nanoseconds), in hex.
/// Rewriting a file changes it; reading or renaming the directory does not.
pub fn local_etag(meta: &std::fs::Metadata) -> String {
    let nanos = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{nanos:x}", meta.len())
}

impl LocalStore {
    /// Opens `root`; creates it when `create`, else it must be an existing directory.
    pub fn open(root: &Path, create: bool) -> Result<Self, StorageError> {
        let name = root.display().to_string();
        if create {
            std::fs::create_dir_all(root).map_err(io(&name))?;
        }
        let meta = std::fs::metadata(root).map_err(io(&name))?;
        if !meta.is_dir() {
            return Err(StorageError::Io {
                key: name,
                source: std::io::Error::other("not a directory"),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Synchronous listing of one page (runs on the blocking pool).
    fn list_sync(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, StorageError> {
        let mut objects = Vec::new();
        let mut more = false;
        walk(
            &self.root,
            "",
            prefix,
            after,
            limit,
            &mut objects,
            &mut more,
        )?;
        let next = if more {
            objects.last().map(|o| o.key.clone())
        } else {
            None
        };
        Ok(ListPage { objects, next })
    }
}

/// Depth-first walk in key order, skipping whole directories that lie before `after`.
fn walk(
    root: &Path,
    dir: &str,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    out: &mut Vec<ObjectMeta>,
    more: &mut bool,
) -> Result<(), StorageError> {
    let abs = root.join(dir);
    let mut entries: Vec<(String, std::fs::Metadata)> = Vec::new();
    for entry in std::fs::read_dir(&abs).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            tracing::warn!(dir, "skipping a file name that is not UTF-8");
            continue;
        };
        // Hidden files, temporary files and verger's own staging area are not objects.
        if name.starts_with('.') || (dir.is_empty() && name == STAGING) {
            continue;
        }
        let meta = entry.metadata().map_err(io(&name))?;
        entries.push((name, meta));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, meta) in entries {
        let key = format!("{dir}{name}");
        let kind = meta.file_type();
        if kind.is_dir() {
            let sub = format!("{key}/");
            // Prune: a directory whose keys cannot match the prefix or all lie before `after`.
            if !(sub.starts_with(prefix) || prefix.starts_with(&sub)) {
                continue;
            }
            if let Some(a) = after {
                if !a.starts_with(&sub) && key_order(a, &key) == Ordering::Greater {
                    continue;
                }
            }
            walk(root, &sub, prefix, after, limit, out, more)?;
        } else if kind.is_file() && key.starts_with(prefix) {
            if after.is_some_and(|a| key_order(&key, a) != Ordering::Greater) {
                continue;
            }
            if out.len() == limit {
                *more = true;
            } else {
                out.push(ObjectMeta {
                    key,
                    size: meta.len(),
                    etag: local_etag(&meta),
                });
            }
        }
        if *more {
            return Ok(());
        }
    }
    Ok(())
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
        limit: usize,
    ) -> Result<ListPage, StorageError> {
        let this = self.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || this.list_sync(&prefix, token.as_deref(), limit.max(1)))
            .await
            .expect("listing task panicked")
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        tokio::fs::read(self.path(key))
            .await
            .map(Bytes::from)
            .map_err(io(key))
    }

    async fn get_version(&self, key: &str, etag: &str) -> Result<Bytes, StorageError> {
        use tokio::io::AsyncReadExt;
        let mut file = tokio::fs::File::open(self.path(key))
            .await
            .map_err(io(key))?;
        let meta = file.metadata().await.map_err(io(key))?;
        if !etag.is_empty() && local_etag(&meta) != etag {
            return Err(StorageError::Changed {
                key: key.to_string(),
            });
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).await.map_err(io(key))?;
        Ok(Bytes::from(bytes))
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let target = self.path(key);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io(key))?;
        }
        let tmp = temp_sibling(&target);
        tokio::fs::write(&tmp, &bytes).await.map_err(io(key))?;
        let file = tokio::fs::File::open(&tmp).await.map_err(io(key))?;
        file.sync_all().await.map_err(io(key))?;
        tokio::fs::rename(&tmp, &target).await.map_err(io(key))
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let target = self.path(key);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io(key))?;
        }
        if tokio::fs::rename(path, &target).await.is_ok() {
            return Ok(());
        }
        // Another filesystem: copy to a hidden sibling, then rename into place.
        let tmp = temp_sibling(&target);
        tokio::fs::copy(path, &tmp).await.map_err(io(key))?;
        tokio::fs::rename(&tmp, &target).await.map_err(io(key))?;
        tokio::fs::remove_file(path).await.map_err(io(key))
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match tokio::fs::remove_file(self.path(key)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(key)(e)),
            _ => Ok(()),
        }
    }

    fn staging_dir(&self) -> Option<PathBuf> {
        Some(self.root.join(STAGING))
    }
}

fn temp_sibling(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    target.with_file_name(format!(".{name}.{nonce:x}.{}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::list_all;

    fn touch(root: &Path, key: &str) {
        let p = root.join(key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, key.as_bytes()).unwrap();
    }

    #[tokio::test]
    async fn pages_cover_every_key_once_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let keys = [
            "a/x.jpg",
            "a b/y.jpg",
            "a/b/c.jpg",
            "root.jpg",
            "z/é.jpg",
            "a/.hidden",
            "m/n/o/p.jpg",
        ];
        for k in keys {
            touch(dir.path(), k);
        }
        let store = LocalStore::open(dir.path(), false).unwrap();
        for page_size in [1, 2, 3, 100] {
            let mut seen = Vec::new();
            list_all(&store, "", page_size, |page| {
                assert!(page.len() <= page_size);
                seen.extend(page.into_iter().map(|o| o.key));
                true
            })
            .await
            .unwrap();
            let mut want: Vec<_> = keys
                .iter()
                .filter(|k| !k.contains("/."))
                .map(|s| s.to_string())
                .collect();
            want.sort_by(|a, b| key_order(a, b));
            assert_eq!(seen, want, "page size {page_size}");
        }
    }

    #[tokio::test]
    async fn a_rewritten_file_gets_a_new_etag_and_the_listed_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "a/1.jpg");
        let store = LocalStore::open(dir.path(), false).unwrap();
        let first = store
            .list_page("", None, 10)
            .await
            .unwrap()
            .objects
            .remove(0);
        assert_eq!(
            &store.get_version("a/1.jpg", &first.etag).await.unwrap()[..],
            b"a/1.jpg"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("a/1.jpg"), b"new content").unwrap();
        let second = store
            .list_page("", None, 10)
            .await
            .unwrap()
            .objects
            .remove(0);
        assert_ne!(first.etag, second.etag);
        let err = store.get_version("a/1.jpg", &first.etag).await.unwrap_err();
        assert!(matches!(err, StorageError::Changed { .. }), "{err}");
        assert_eq!(
            &store.get_version("a/1.jpg", &second.etag).await.unwrap()[..],
            b"new content"
        );
    }

    #[tokio::test]
    async fn prefix_limits_the_listing() {
        let dir = tempfile::tempdir().unwrap();
        for k in ["Training/A/1.jpg", "Training/B/2.jpg", "Test/A/3.jpg"] {
            touch(dir.path(), k);
        }
        let store = LocalStore::open(dir.path(), false).unwrap();
        let page = store.list_page("Training/", None, 10).await.unwrap();
        let keys: Vec<_> = page.objects.into_iter().map(|o| o.key).collect();
        assert_eq!(keys, ["Training/A/1.jpg", "Training/B/2.jpg"]);
    }

    #[tokio::test]
    async fn put_is_atomic_and_get_reports_missing_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        store
            .put("m/1.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        assert_eq!(&store.get("m/1.json").await.unwrap()[..], b"{}");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("m")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
        assert!(matches!(
            store.get("nope.jpg").await,
            Err(StorageError::NotFound { .. })
        ));
        store.delete("nope.jpg").await.unwrap();
    }
}
