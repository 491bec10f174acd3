//! What the commit protocol writes and reads: the names of the output's files, one manifest
//! per epoch, and what earlier runs committed.
//!
//! A manifest lists the epoch's files with their row counts. What it lists is committed; any
//! file under `data/` or `errors/` that no manifest lists is a leftover of an epoch that did
//! not commit (a crash, a kill), and is deleted when the next run starts, whose listing then
//! processes those keys again. So committed epochs are never redone and uncommitted ones are
//! redone until they commit. Only the holder of the output's lease ([`crate::sink::lease`]) cleans up
//! or commits, and a manifest is created only if its epoch has none: two writers never
//! destroy each other's work.

use std::collections::HashSet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use crate::error::CommitError;
use crate::record::{Epoch, FileKind, RowId, Stage, WrittenFile};
use crate::storage::{check_key, list_all, ObjectStore, StorageError};
use crate::table;

/// Prefix of manifests in the output store.
pub const MANIFEST_PREFIX: &str = "_manifest/";

/// Key of the file that `worker` of `run` writes for `epoch` into table `kind`:
/// `data/e<epoch>-w<worker>-<run>.parquet` or `errors/…`. The run id keeps it apart from any
/// leftover of an earlier run; the epoch and worker, from every other file of this run.
pub fn file_key(kind: FileKind, epoch: Epoch, worker: usize, run: &str) -> String {
    let dir = match kind {
        FileKind::Data => "data",
        FileKind::Errors => "errors",
    };
    format!("{dir}/e{epoch:010}-w{worker:04}-{run}.parquet")
}

/// The commit record of one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The epoch.
    pub epoch: Epoch,
    /// Id of the run that wrote it.
    pub run: String,
    /// Model that computed the embeddings.
    pub model: String,
    /// SHA-256 of the weights that computed them ("" in manifests written before this field existed).
    #[serde(default)]
    pub weights_sha256: String,
    /// How rows were derived from objects besides the model: EXIF orientation and label rule
    /// (`orientation=apply label=parent`; "" in manifests written before this field existed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub derivation: String,
    /// Embedding rows in the epoch.
    pub rows: u64,
    /// Error records in the epoch.
    pub errors: u64,
    /// The files, data and errors.
    pub files: Vec<WrittenFile>,
    /// When the run that wrote it started, in ms since the Unix epoch (throughput per epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_started_ms: Option<u64>,
    /// When its files were all published and the manifest made, in ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_ms: Option<u64>,
}

impl Manifest {
    /// Key of the manifest of `epoch`.
    pub fn key_for(epoch: Epoch) -> String {
        format!("{MANIFEST_PREFIX}{epoch:010}.json")
    }

    /// Key of this manifest.
    pub fn key(&self) -> String {
        Self::key_for(self.epoch)
    }

    /// Writes it to the store, atomically and only if no manifest of this epoch exists: two
    /// writers can never overwrite each other's commit. Finding this very manifest already
    /// there (a retried request whose first attempt did land) is success.
    pub async fn write(&self, store: &dyn ObjectStore) -> Result<(), CommitError> {
        let key = self.key();
        let json = serde_json::to_vec_pretty(self).map_err(|source| CommitError::Json {
            key: key.clone(),
            source,
        })?;
        match store.put_new(&key, Bytes::from(json)).await {
            Ok(_) => Ok(()),
            Err(StorageError::Exists { .. }) => {
                let there = Manifest::parse(&key, &store.get(&key).await?)?;
                if there == *self {
                    Ok(())
                } else {
                    Err(CommitError::AlreadyCommitted {
                        epoch: self.epoch,
                        run: there.run,
                    })
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the manifest stored under `key`, refusing one that does not describe that epoch
    /// or lists a file outside `data/` and `errors/` (a manifest is data from storage: a
    /// hand-edited one must not make verger open `../../etc/passwd`).
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self, CommitError> {
        let bad = |reason: String| CommitError::Invalid {
            key: key.to_string(),
            reason,
        };
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|source| CommitError::Json {
                key: key.to_string(),
                source,
            })?;
        if manifest.key() != key {
            return Err(bad(format!(
                "it describes epoch {}, whose manifest is {}",
                manifest.epoch,
                manifest.key()
            )));
        }
        for file in &manifest.files {
            let folder = match file.kind {
                FileKind::Data => "data/",
                FileKind::Errors => "errors/",
            };
            check_key(&file.key).map_err(|e| bad(e.to_string()))?;
            if !file.key.starts_with(folder) || !file.key.ends_with(".parquet") {
                return Err(bad(format!(
                    "file {} is not a Parquet file under {folder}",
                    file.key
                )));
            }
        }
        Ok(manifest)
    }
}

/// An epoch whose manifest is written, with its embedding rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedEpoch {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its embedding rows.
    pub rows: Vec<RowId>,
    /// Its error records of failed reads (stage `fetch`): what watch mode lists again.
    pub failed_reads: Vec<RowId>,
}

/// What earlier runs committed to an output.
#[derive(Debug, Default)]
pub struct Committed {
    /// All manifests, by epoch.
    pub manifests: Vec<Manifest>,
    /// Versions (epoch, key, ETag) handled: every committed row, and every error record but
    /// those of failed reads, which a new run retries. A key's version of the latest epoch
    /// is its current one, not processed again while it is the one listed.
    pub handled: Vec<(Epoch, String, String)>,
    /// Every committed row with its epoch, oldest first.
    pub rows: Vec<(Epoch, RowId)>,
}

impl Committed {
    /// Reads every manifest and the key, version and label (or stage) of every committed
    /// row and error record.
    pub async fn load(store: &dyn ObjectStore) -> Result<Self, CommitError> {
        let mut keys_of_manifests = Vec::new();
        list_all(store, MANIFEST_PREFIX, 1000, |page| {
            keys_of_manifests.extend(
                page.into_iter()
                    .map(|o| o.key)
                    .filter(|k| k.ends_with(".json")),
            );
            true
        })
        .await?;
        let mut manifests = Vec::new();
        for key in keys_of_manifests {
            let bytes = store.get(&key).await?;
            manifests.push(Manifest::parse(&key, &bytes)?);
        }
        manifests.sort_by_key(|m| m.epoch);
        let (mut handled, mut rows) = (Vec::new(), Vec::new());
        for manifest in &manifests {
            for file in &manifest.files {
                for entry in table::read_index(store, &file.key, file.kind).await? {
                    if entry.stage != Some(Stage::Fetch) {
                        handled.push((
                            manifest.epoch,
                            entry.row.key.clone(),
                            entry.row.etag.clone(),
                        ));
                    }
                    if file.kind == FileKind::Data {
                        rows.push((manifest.epoch, entry.row));
                    }
                }
            }
        }
        Ok(Self {
            manifests,
            handled,
            rows,
        })
    }

    /// The first committed manifest whose rows were not computed by `model` with the weights
    /// `weights_sha256`: an output holds one model's features, or its rows would not be
    /// comparable. (A manifest that predates the weights' digest is checked by name only.)
    pub fn other_model(&self, model: &str, weights_sha256: &str) -> Option<&Manifest> {
        self.manifests.iter().find(|m| {
            m.model != model || (!m.weights_sha256.is_empty() && m.weights_sha256 != weights_sha256)
        })
    }

    /// The first committed epoch whose rows were derived otherwise than `derivation` says
    /// (another EXIF orientation or label rule); manifests older than the field are taken as
    /// agreeing.
    pub fn other_derivation(&self, derivation: &str) -> Option<&Manifest> {
        self.manifests
            .iter()
            .find(|m| !m.derivation.is_empty() && m.derivation != derivation)
    }

    /// The first epoch number a new run may use.
    pub fn next_epoch(&self) -> Epoch {
        self.manifests.last().map_or(0, |m| m.epoch + 1)
    }

    /// Every file some manifest lists.
    pub fn files(&self) -> HashSet<&str> {
        self.manifests
            .iter()
            .flat_map(|m| &m.files)
            .map(|f| f.key.as_str())
            .collect()
    }

    /// Deletes data and error files that no manifest lists (leftovers of uncommitted epochs),
    /// partial writes (multipart uploads left open, hidden temporary files) and the output's
    /// local staging folder. Only the holder of the output's lease may call it. Returns how
    /// many objects, uploads and temporary files were removed.
    pub async fn remove_uncommitted(&self, store: &dyn ObjectStore) -> Result<usize, CommitError> {
        let committed = self.files();
        let mut doomed = Vec::new();
        for prefix in ["data/", "errors/"] {
            list_all(store, prefix, 1000, |page| {
                doomed.extend(
                    page.into_iter()
                        .map(|o| o.key)
                        .filter(|k| !committed.contains(k.as_str())),
                );
                true
            })
            .await?;
        }
        for key in &doomed {
            tracing::info!(key, "removing leftover of an uncommitted epoch");
            store.delete(key).await?;
        }
        let partial = store.remove_partial_writes().await?;
        let staging = store.staging_dir();
        if staging.exists() {
            tracing::info!(dir = %staging.display(), "removing staging files of killed runs");
            let _ = std::fs::remove_dir_all(&staging);
        }
        Ok(doomed.len() + partial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStore;

    fn manifest(epoch: Epoch, file: &str) -> Manifest {
        Manifest {
            derivation: String::new(),
            epoch,
            run: "r1".into(),
            model: "efficientnet-lite0".into(),
            weights_sha256: "5793".into(),
            rows: 1,
            errors: 0,
            files: vec![WrittenFile {
                key: file.into(),
                kind: FileKind::Data,
                rows: 1,
                bytes: 10,
            }],
            run_started_ms: Some(1_000),
            committed_ms: Some(2_000 + epoch),
        }
    }

    #[test]
    fn a_manifest_naming_a_file_outside_the_output_is_refused() {
        for file in [
            "data/../../../etc/passwd",
            "/etc/passwd",
            "errors/e0.parquet", // listed as data
            "data/e0.json",
        ] {
            let json = serde_json::to_vec(&manifest(3, file)).unwrap();
            let err = Manifest::parse(&Manifest::key_for(3), &json).unwrap_err();
            assert!(
                err.to_string().contains(&Manifest::key_for(3)) && err.to_string().contains(file),
                "{file}: {err}"
            );
        }
        let good = manifest(3, "data/e0000000003-w0000-r1.parquet");
        let json = serde_json::to_vec(&good).unwrap();
        assert_eq!(Manifest::parse(&Manifest::key_for(3), &json).unwrap(), good);
        let moved = Manifest::parse(&Manifest::key_for(4), &json).unwrap_err();
        assert!(moved.to_string().contains("epoch 3"), "{moved}");
    }

    #[tokio::test]
    async fn loading_an_output_with_a_hand_edited_manifest_fails_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        let json = serde_json::to_vec(&manifest(0, "data/../../etc/passwd")).unwrap();
        store.put(&Manifest::key_for(0), json.into()).await.unwrap();
        let err = Committed::load(&store).await.unwrap_err();
        assert!(
            err.to_string().contains("_manifest/0000000000.json"),
            "{err}"
        );
        assert!(err.to_string().contains(".."), "{err}");
    }

    #[test]
    fn another_model_or_other_weights_are_found_in_the_commits() {
        let mut old = manifest(0, "data/a.parquet");
        old.weights_sha256 = String::new(); // written before the digest was recorded
        let committed = Committed {
            manifests: vec![old, manifest(1, "data/b.parquet")],
            ..Committed::default()
        };
        assert!(committed
            .other_model("efficientnet-lite0", "5793")
            .is_none());
        let other = committed.other_model("efficientnet-lite2", "5793").unwrap();
        assert_eq!(other.epoch, 0);
        let retrained = committed.other_model("efficientnet-lite0", "beef").unwrap();
        assert_eq!(retrained.epoch, 1, "epoch 0 has no digest to compare");
    }

    #[tokio::test]
    async fn a_second_commit_of_an_epoch_is_refused_unless_it_is_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        let first = manifest(7, "data/e0000000007-w0000-r1.parquet");
        first.write(&store).await.unwrap();
        first.write(&store).await.unwrap(); // a retried request: the same manifest
        let mut other = manifest(7, "data/e0000000007-w0000-r2.parquet");
        other.run = "r2".into();
        let err = other.write(&store).await.unwrap_err();
        assert!(
            err.to_string().contains("already committed by run r1"),
            "{err}"
        );
        let key = Manifest::key_for(7);
        let stored = Manifest::parse(&key, &store.get(&key).await.unwrap()).unwrap();
        assert_eq!(stored, first, "the first commit stands");
    }

    #[tokio::test]
    async fn start_up_clean_up_removes_staging_and_partial_writes_of_killed_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), false).unwrap();
        let staged = store.staging_dir().join("deadrun/data__e1.parquet");
        std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
        std::fs::write(&staged, b"half").unwrap();
        let tmp = dir.path().join("_manifest/.0000000001.json.1f.99.tmp");
        std::fs::create_dir_all(tmp.parent().unwrap()).unwrap();
        std::fs::write(&tmp, b"{").unwrap();
        store
            .put(
                "data/e0000000001-w0000-dead.parquet",
                Bytes::from_static(b"x"),
            )
            .await
            .unwrap();
        let removed = Committed::default()
            .remove_uncommitted(&store)
            .await
            .unwrap();
        assert_eq!(
            removed, 2,
            "the uncommitted file and the manifest's temporary"
        );
        assert!(!staged.exists() && !tmp.exists());
        assert!(!store.staging_dir().exists());
    }
}
