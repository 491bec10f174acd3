//! A local directory as an object store: the embedded default.
//!
//! Listing walks the tree in [`key_order`] (component by component) and resumes after a token
//! without re-reading what was already listed: the sorted names of the folders a page stopped
//! in are kept for the page that continues from its token, which starts from a binary search
//! of the token in them, and only the entries a page keeps are `stat`ed. A folder of millions
//! of files thus streams page by page at a cost linear in its size. Writes go to a hidden
//! temporary name in the same directory and are renamed into place (atomic on POSIX).

use super::{key_order, ListPage, Listing, ObjectMeta, ObjectStore, StorageError};
use async_trait::async_trait;
use bytes::Bytes;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Name of the staging folder inside an output directory (ignored by listings).
pub const STAGING: &str = "_staging";

/// A directory on the local filesystem.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    /// The folders the last page stopped in, for the page that continues from its token.
    resume: Arc<Mutex<Option<ResumePoint>>>,
}

/// Where a listing page stopped: its token, and the sorted entries of every folder on the
/// way down to it (by folder key), still to be walked.
#[derive(Debug)]
struct ResumePoint {
    token: String,
    folders: Folders,
}

/// Sorted entries of folders, by folder key (`""` for the root, else ending in `/`).
type Folders = HashMap<String, Arc<Vec<Named>>>;

/// A folder entry by name, as `read_dir` gives it (no `stat` yet).
#[derive(Debug)]
struct Named {
    name: String,
    /// The entry's type, `Err` with the reason when it is not listable.
    kind: Result<std::fs::FileType, String>,
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
    /// Opens `root`; creates it when `create` (and checks that files can be created in it),
    /// else it must be an existing directory. Errors say which of these failed.
    pub fn open(root: &Path, create: bool) -> Result<Self, StorageError> {
        use std::io::ErrorKind::{NotADirectory, NotFound};
        let fail = |reason: String| StorageError::Location {
            location: root.display().to_string(),
            reason,
        };
        match std::fs::metadata(root) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(fail("is a file, not a directory".into())),
            Err(e) if matches!(e.kind(), NotFound | NotADirectory) => {
                if let Some(file) = root.ancestors().skip(1).find(|a| a.is_file()) {
                    return Err(fail(format!(
                        "{}: {} is a file, not a directory",
                        if create {
                            "cannot be created"
                        } else {
                            "no such directory"
                        },
                        file.display()
                    )));
                }
                if !create {
                    return Err(fail("no such directory".into()));
                }
                std::fs::create_dir_all(root)
                    .map_err(|e| fail(format!("cannot create the directory: {e}")))?;
            }
            Err(e) => return Err(fail(format!("cannot be read: {e}"))),
        }
        if create {
            tempfile::tempfile_in(root)
                .map_err(|e| fail(format!("cannot write into the directory: {e}")))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            resume: Arc::default(),
        })
    }

    /// The file of `key`, refusing keys that would leave the root.
    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        super::check_key(key)?;
        Ok(self.root.join(key))
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
        let root = std::fs::metadata(&self.root).map_err(io(&self.location()))?;
        let mut ancestors = vec![dir_id(&root)];
        // The folders the previous page stopped in, if this page continues it.
        let mut folders = {
            let mut resume = self.resume.lock().unwrap_or_else(|e| e.into_inner());
            match resume.take() {
                Some(point) if after == Some(point.token.as_str()) => point.folders,
                _ => Folders::new(),
            }
        };
        walk(
            &self.root,
            "",
            Bounds {
                prefix,
                after,
                limit,
            },
            &mut Page {
                out: &mut objects,
                more: &mut more,
                folders: &mut folders,
            },
            &mut ancestors,
        )?;
        let next = if more {
            objects.last().map(|o| o.key.clone())
        } else {
            None
        };
        if let Some(token) = &next {
            *self.resume.lock().unwrap_or_else(|e| e.into_inner()) = Some(ResumePoint {
                token: token.clone(),
                folders,
            });
        }
        Ok(ListPage { objects, next })
    }
}

/// Identity of a directory (device, inode), to detect symbolic-link loops.
type DirId = (u64, u64);

fn dir_id(meta: &std::fs::Metadata) -> DirId {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// What a page lists: keys under `prefix`, after `after`, `limit` of them at most.
#[derive(Clone, Copy)]
struct Bounds<'a> {
    prefix: &'a str,
    after: Option<&'a str>,
    limit: usize,
}

/// The page being filled, and the folders read for it.
struct Page<'a> {
    out: &'a mut Vec<ObjectMeta>,
    more: &'a mut bool,
    folders: &'a mut Folders,
}

/// The entries of folder `dir` (key, `""` for the root), sorted by name, without hidden
/// names and verger's staging folder: from `folders` when a page kept them, else read.
fn entries(
    abs: &Path,
    dir: &str,
    prefix: &str,
    folders: &Folders,
) -> std::io::Result<Arc<Vec<Named>>> {
    if let Some(kept) = folders.get(dir) {
        return Ok(kept.clone());
    }
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(abs)? {
        let entry = entry?;
        let name = match entry.file_name().into_string() {
            Ok(name) => name,
            Err(raw) => {
                let name = raw.to_string_lossy().into_owned();
                let reason = format!(
                    "the name is not valid UTF-8 (shown with U+FFFD for the bad bytes: {:?})",
                    raw
                );
                entries.push(Named {
                    name,
                    kind: Err(reason),
                });
                continue;
            }
        };
        // Hidden files, temporary files and verger's own staging area are not objects.
        if dir.is_empty() && name == STAGING {
            continue;
        }
        if name.starts_with('.') {
            let key = format!("{dir}{name}");
            if key.starts_with(prefix) {
                tracing::info!(key, "left out: a hidden file");
            }
            continue;
        }
        let kind = entry
            .file_type()
            .map_err(|e| format!("cannot be read: {e}"));
        entries.push(Named { name, kind });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Arc::new(entries))
}

/// Depth-first walk in [`key_order`], skipping whole directories that lie before `after`
/// (by a binary search of the sorted names, without `stat`ing what is skipped).
/// Symbolic links are followed, to files and to directories alike, under the link's own
/// key; a link to one of its own ancestor directories (a loop) and a dangling link are
/// reported and left out. Hidden names ([`is_hidden`](super::is_hidden)) are left out, each
/// named in a log line. A folder that cannot be read, an entry whose metadata cannot be
/// read and a name that is not UTF-8 are listed as unlistable objects (error records), so
/// one locked folder does not stop the listing of the rest. When the page fills up, the
/// folders on the way down to its last key stay in `page.folders` for the next page.
fn walk(
    root: &Path,
    dir: &str,
    bounds: Bounds<'_>,
    page: &mut Page<'_>,
    ancestors: &mut Vec<DirId>,
) -> Result<(), StorageError> {
    let Bounds {
        prefix,
        after,
        limit,
    } = bounds;
    let abs = root.join(dir);
    let listing = match entries(&abs, dir, prefix, page.folders) {
        Ok(listing) => listing,
        // A folder under the root that cannot be read is one error record, not the end of
        // the listing; it is listed where its first key would be, once.
        Err(e) if !dir.is_empty() => {
            if dir.starts_with(prefix)
                && after
                    .is_none_or(|a| !a.starts_with(dir) && key_order(dir, a) == Ordering::Greater)
            {
                let reason = format!("the folder cannot be read: {e}");
                push(page, limit, unlistable(dir.to_string(), reason));
            }
            return Ok(());
        }
        Err(e) => return Err(io(dir)(e)),
    };
    // Entries named before the token's name at this depth hold only keys already listed.
    let start = match after.and_then(|a| a.strip_prefix(dir)) {
        Some(rest) => {
            let name = rest.split('/').next().unwrap_or_default();
            listing.partition_point(|e| e.name.as_str() < name)
        }
        None => 0,
    };
    for named in &listing[start..] {
        visit(root, (dir, &abs), named, bounds, page, ancestors)?;
        if *page.more {
            page.folders.insert(dir.to_string(), listing);
            return Ok(());
        }
    }
    // Walked to the end: no later page comes back to this folder.
    page.folders.remove(dir);
    Ok(())
}

/// One entry of folder `dir` (at `abs`) in the walk: listed, walked into, or left out.
fn visit(
    root: &Path,
    (dir, abs): (&str, &Path),
    named: &Named,
    bounds: Bounds<'_>,
    page: &mut Page<'_>,
    ancestors: &mut Vec<DirId>,
) -> Result<(), StorageError> {
    let Bounds { prefix, after, .. } = bounds;
    let key = format!("{dir}{}", named.name);
    let kind = match &named.kind {
        Ok(kind) => *kind,
        Err(reason) => {
            push_unlistable(page, bounds, key, reason.clone());
            return Ok(());
        }
    };
    // A folder's keys all begin with `key/`; a file's key is `key`.
    let sub = format!("{key}/");
    let may_hold_keys = sub.starts_with(prefix) || prefix.starts_with(&sub);
    let folder_before = |a: &str| !a.starts_with(&sub) && key_order(a, &key) == Ordering::Greater;
    let file_before = |a: &str| key_order(&key, a) != Ordering::Greater;
    let skip = if kind.is_dir() {
        !may_hold_keys || after.is_some_and(folder_before)
    } else if kind.is_file() {
        !key.starts_with(prefix) || after.is_some_and(file_before)
    } else {
        false // a symbolic link: what it is shows after `stat`
    };
    if skip {
        return Ok(());
    }
    // Only now is the entry `stat`ed: a symbolic link resolved to its target.
    let meta = match std::fs::metadata(abs.join(&named.name)) {
        Ok(meta) => meta,
        Err(e) if kind.is_symlink() => {
            tracing::warn!(key, "skipping a dangling symbolic link: {e}");
            return Ok(());
        }
        // Deleted since its folder was read (by an earlier page): nothing to list.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            push_unlistable(page, bounds, key, format!("cannot be read: {e}"));
            return Ok(());
        }
    };
    if meta.is_dir() {
        // Prune: a directory whose keys cannot match the prefix or all lie before `after`.
        if !may_hold_keys || after.is_some_and(folder_before) {
            return Ok(());
        }
        let id = dir_id(&meta);
        if ancestors.contains(&id) {
            tracing::warn!(
                key,
                "skipping a symbolic link to one of its own parent folders (a loop)"
            );
            return Ok(());
        }
        ancestors.push(id);
        let walked = walk(root, &sub, bounds, page, ancestors);
        ancestors.pop();
        walked?;
    } else if meta.is_file() && key.starts_with(prefix) && !after.is_some_and(file_before) {
        let object = ObjectMeta::new(key, meta.len(), local_etag(&meta));
        push(page, bounds.limit, object);
    } else if !meta.is_file() && key.starts_with(prefix) {
        tracing::warn!(key, "skipping what is neither a file nor a folder");
    }
    Ok(())
}

/// Lists `key` as an unlistable object (an error record) when the page covers it.
fn push_unlistable(page: &mut Page<'_>, bounds: Bounds<'_>, key: String, reason: String) {
    if key.starts_with(bounds.prefix)
        && bounds
            .after
            .is_none_or(|a| key_order(&key, a) == Ordering::Greater)
    {
        push(page, bounds.limit, unlistable(key, reason));
    }
}

/// Adds `object` to the page, or notes that the page is full.
fn push(page: &mut Page<'_>, limit: usize, object: ObjectMeta) {
    if page.out.len() == limit {
        *page.more = true;
    } else {
        page.out.push(object);
    }
}

/// An entry the listing found but cannot give as an object (see [`ObjectMeta::unlistable`]).
/// Its version tag is the reason's, so the same problem is recorded once, and another one
/// again.
fn unlistable(key: String, reason: String) -> ObjectMeta {
    ObjectMeta {
        key,
        size: 0,
        etag: format!(
            "unlistable-{:016x}",
            xxhash_rust::xxh3::xxh3_64(reason.as_bytes())
        ),
        unlistable: Some(reason),
    }
}

#[async_trait]
impl Listing for LocalStore {
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
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        tokio::fs::read(self.path(key)?)
            .await
            .map(Bytes::from)
            .map_err(io(key))
    }

    async fn get_version(&self, key: &str, etag: &str) -> Result<Bytes, StorageError> {
        use tokio::io::AsyncReadExt;
        let mut file = tokio::fs::File::open(self.path(key)?)
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
        let target = self.path(key)?;
        let tmp = write_temp_sibling(key, &target, &bytes).await?;
        tokio::fs::rename(&tmp, &target).await.map_err(io(key))
    }

    async fn put_new(&self, key: &str, bytes: Bytes) -> Result<String, StorageError> {
        let target = self.path(key)?;
        let tmp = write_temp_sibling(key, &target, &bytes).await?;
        // A hard link never replaces an existing name: the create-if-absent of POSIX.
        let linked = tokio::fs::hard_link(&tmp, &target).await;
        let _ = tokio::fs::remove_file(&tmp).await;
        match linked {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(StorageError::Exists {
                key: key.to_string(),
            }),
            Err(e) => Err(io(key)(e)),
            Ok(()) => {
                let meta = tokio::fs::metadata(&target).await.map_err(io(key))?;
                Ok(local_etag(&meta))
            }
        }
    }

    /// Not atomic against another process writing the same file between the check and the
    /// rename: local outputs are guarded by their lock file instead (see `sink::lease`).
    async fn put_if_match(
        &self,
        key: &str,
        bytes: Bytes,
        etag: &str,
    ) -> Result<String, StorageError> {
        let target = self.path(key)?;
        let meta = tokio::fs::metadata(&target).await.map_err(io(key))?;
        if local_etag(&meta) != etag {
            return Err(StorageError::Changed {
                key: key.to_string(),
            });
        }
        let tmp = write_temp_sibling(key, &target, &bytes).await?;
        tokio::fs::rename(&tmp, &target).await.map_err(io(key))?;
        let meta = tokio::fs::metadata(&target).await.map_err(io(key))?;
        Ok(local_etag(&meta))
    }

    async fn get_tagged(&self, key: &str) -> Result<(Bytes, String), StorageError> {
        let path = self.path(key)?;
        let meta = tokio::fs::metadata(&path).await.map_err(io(key))?;
        let bytes = tokio::fs::read(&path).await.map_err(io(key))?;
        Ok((Bytes::from(bytes), local_etag(&meta)))
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        let target = self.path(key)?;
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
        match tokio::fs::remove_file(self.path(key)?).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(key)(e)),
            _ => Ok(()),
        }
    }

    async fn remove_partial_writes(&self) -> Result<usize, StorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.remove_temporaries_sync())
            .await
            .map_err(|e| StorageError::Io {
                key: self.location(),
                source: std::io::Error::other(format!("clean-up task failed: {e}")),
            })?
    }

    fn staging_dir(&self) -> PathBuf {
        self.root.join(STAGING)
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }
}

impl LocalStore {
    /// Deletes the hidden temporary files of atomic writes ([`temp_sibling`]) anywhere in the
    /// tree: a writer killed between writing one and renaming it leaves it behind.
    fn remove_temporaries_sync(&self) -> Result<usize, StorageError> {
        let mut removed = 0;
        // Only where verger writes: the output root may hold other things.
        let mut dirs: Vec<PathBuf> = ["data", "errors"]
            .iter()
            .map(|d| self.root.join(d))
            .filter(|d| d.is_dir())
            .collect();
        while let Some(dir) = dirs.pop() {
            let name = dir.display().to_string();
            for entry in std::fs::read_dir(&dir).map_err(io(&name))? {
                let entry = entry.map_err(io(&name))?;
                let kind = entry.file_type().map_err(io(&name))?;
                let file_name = entry.file_name();
                let file_name = file_name.to_string_lossy();
                if kind.is_dir() && file_name != STAGING {
                    dirs.push(entry.path());
                } else if kind.is_file() && is_temp_name(&file_name) {
                    tracing::info!(path = %entry.path().display(), "removing a partial write");
                    std::fs::remove_file(entry.path()).map_err(io(&name))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Writes `bytes` to a new hidden sibling of `target` and syncs it; returns its path.
async fn write_temp_sibling(
    key: &str,
    target: &Path,
    bytes: &[u8],
) -> Result<PathBuf, StorageError> {
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io(key))?;
    }
    let tmp = temp_sibling(target);
    tokio::fs::write(&tmp, bytes).await.map_err(io(key))?;
    let file = tokio::fs::File::open(&tmp).await.map_err(io(key))?;
    file.sync_all().await.map_err(io(key))?;
    Ok(tmp)
}

/// Whether `name` is one of [`temp_sibling`]'s names, `.<name>.<nonce>.<pid>.tmp`, or a
/// staged write of the table's object store (`object_store`'s local store writes
/// `<name>#<n>` and renames it into place).
fn is_temp_name(name: &str) -> bool {
    let staged_by_object_store = name.rsplit_once('#').is_some_and(|(file, n)| {
        !file.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    });
    (name.starts_with('.') && name.ends_with(".tmp")) || staged_by_object_store
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

    /// A page that fills up in a folder keeps the sorted names of the folders on the way down
    /// to its last key, and the page continuing from its token starts from them instead of
    /// reading the folders again (what makes listing a flat folder linear); a file deleted
    /// between pages is then simply not listed (no error record), and a listing that starts
    /// over reads the folders afresh.
    #[tokio::test]
    async fn a_page_continues_from_the_folders_the_last_one_stopped_in() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys: Vec<String> = (0..100).map(|i| format!("flat/f{i:04}.jpg")).collect();
        keys.extend(["a/x.jpg".to_string(), "z/y.jpg".to_string()]);
        for k in &keys {
            touch(dir.path(), k);
        }
        let store = LocalStore::open(dir.path(), false).unwrap();
        let first = store.list_page("", None, 10).await.unwrap();
        let token = first.next.clone().unwrap();
        assert_eq!(token, "flat/f0008.jpg");
        {
            let resume = store.resume.lock().unwrap();
            let point = resume.as_ref().unwrap();
            assert_eq!(point.token, token);
            let mut kept: Vec<&str> = point.folders.keys().map(String::as_str).collect();
            kept.sort();
            assert_eq!(kept, ["", "flat/"], "the folders on the way to the token");
            assert_eq!(point.folders["flat/"].len(), 100);
        }
        std::fs::remove_file(dir.path().join("flat/f0050.jpg")).unwrap();
        let mut seen: Vec<String> = first.objects.into_iter().map(|o| o.key).collect();
        let mut token = Some(token);
        while let Some(after) = token {
            let page = store.list_page("", Some(after), 10).await.unwrap();
            assert!(
                page.objects.iter().all(|o| o.unlistable.is_none()),
                "{page:?}"
            );
            seen.extend(page.objects.into_iter().map(|o| o.key));
            token = page.next;
        }
        keys.retain(|k| k != "flat/f0050.jpg");
        keys.sort_by(|a, b| key_order(a, b));
        assert_eq!(seen, keys);
        assert!(
            store.resume.lock().unwrap().is_none(),
            "the last page keeps nothing"
        );
        // A new listing reads the folder again: the deleted file stays away, a new one shows.
        touch(dir.path(), "flat/f0050b.jpg");
        let mut again = Vec::new();
        list_all(&store, "flat/", 7, |page| {
            again.extend(page.into_iter().map(|o| o.key));
            true
        })
        .await
        .unwrap();
        assert_eq!(again.len(), 100);
        assert!(again.contains(&"flat/f0050b.jpg".to_string()));
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

    /// Names that are not UTF-8 are listed as unlistable objects (error records naming them),
    /// once whatever the page size; hidden names at any depth are left out, as on S3.
    #[tokio::test]
    async fn non_utf8_names_are_unlistable_objects_and_hidden_ones_left_out() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        for k in [
            "a/1.jpg",
            "a/.DS_Store",
            "a/._1.jpg",
            ".git/x.jpg",
            "b/.cache/y.jpg",
            "z.jpg",
        ] {
            touch(dir.path(), k);
        }
        let bad = std::ffi::OsStr::from_bytes(b"caf\xe9.jpg");
        std::fs::write(dir.path().join("a").join(bad), b"x").unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        for page_size in [1, 2, 100] {
            let mut seen = Vec::new();
            list_all(&store, "", page_size, |page| {
                seen.extend(page);
                true
            })
            .await
            .unwrap();
            let keys: Vec<&str> = seen.iter().map(|o| o.key.as_str()).collect();
            assert_eq!(
                keys,
                ["a/1.jpg", "a/caf\u{fffd}.jpg", "z.jpg"],
                "page size {page_size}"
            );
            let reason = seen[1].unlistable.as_deref().unwrap();
            assert!(
                reason.starts_with("the name is not valid UTF-8"),
                "{reason}"
            );
            assert!(seen[0].unlistable.is_none() && seen[2].unlistable.is_none());
        }
    }

    #[test]
    fn hidden_means_a_name_starting_with_a_dot_at_any_depth() {
        use crate::storage::is_hidden;
        for key in [".DS_Store", "a/._x.jpg", ".git/objects/x", "a/.b/c.jpg"] {
            assert!(is_hidden(key), "{key}");
        }
        for key in ["a/x.jpg", "a.b/c.jpg", "x.jpg.", "a/b"] {
            assert!(!is_hidden(key), "{key}");
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

    async fn all_keys(store: &LocalStore) -> Vec<String> {
        let mut seen = Vec::new();
        list_all(store, "", 2, |page| {
            seen.extend(page.into_iter().map(|o| o.key));
            true
        })
        .await
        .unwrap();
        seen
    }

    #[tokio::test]
    async fn symbolic_links_are_followed_and_loops_and_dangling_links_left_out() {
        use std::os::unix::fs::symlink;
        let outside = tempfile::tempdir().unwrap();
        touch(outside.path(), "elsewhere/far.jpg");
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "a/1.jpg");
        symlink(dir.path().join("a/1.jpg"), dir.path().join("a/2.jpg")).unwrap();
        symlink(outside.path().join("elsewhere"), dir.path().join("linked")).unwrap();
        symlink(dir.path().join("a"), dir.path().join("a/loop")).unwrap();
        symlink(dir.path(), dir.path().join("a/root-loop")).unwrap();
        symlink(dir.path().join("gone.jpg"), dir.path().join("dangling.jpg")).unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        assert_eq!(
            all_keys(&store).await,
            ["a/1.jpg", "a/2.jpg", "linked/far.jpg"],
            "links to files and folders followed, loops and dangling links left out"
        );
        assert_eq!(
            &store.get("linked/far.jpg").await.unwrap()[..],
            b"elsewhere/far.jpg"
        );
    }

    #[tokio::test]
    async fn keys_leaving_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("out"), true).unwrap();
        for key in ["../secret", "/etc/passwd", "a/../../b", "", "a//b"] {
            let err = store.get(key).await.unwrap_err();
            assert!(matches!(err, StorageError::BadKey { .. }), "{key}: {err}");
            assert!(store.put(key, Bytes::from_static(b"x")).await.is_err());
        }
    }

    #[tokio::test]
    async fn put_new_never_replaces_and_partial_writes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        store
            .put_new("errors/1.json", Bytes::from_static(b"first"))
            .await
            .unwrap();
        let again = store
            .put_new("errors/1.json", Bytes::from_static(b"second"))
            .await;
        assert!(
            matches!(again, Err(StorageError::Exists { .. })),
            "{again:?}"
        );
        assert_eq!(&store.get("errors/1.json").await.unwrap()[..], b"first");
        // What a writer killed between write and rename leaves: verger's (hidden, so never
        // listed) and the table's object store's (`<name>#<n>`).
        touch(dir.path(), "errors/.0000000002.json.18a2b.4242.tmp");
        touch(dir.path(), "data/.e0-w0-r.parquet.18a2b.4242.tmp");
        touch(dir.path(), "data/e1-w0-r.parquet#1");
        touch(dir.path(), "data/e0-w0-r.parquet");
        assert_eq!(store.remove_partial_writes().await.unwrap(), 3);
        let mut left: Vec<_> = std::fs::read_dir(dir.path().join("data"))
            .unwrap()
            .chain(std::fs::read_dir(dir.path().join("errors")).unwrap())
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["1.json", "e0-w0-r.parquet"]);
    }
}
