//! The commit protocol: one manifest per epoch, written once every worker has finished it.
//!
//! A manifest lists the epoch's files with their row counts. What it lists is committed; any
//! file under `data/` or `errors/` that no manifest lists is a leftover of an epoch that did
//! not commit (a crash, a kill), and is deleted when the next run starts, whose listing then
//! processes those keys again. So committed epochs are never redone and uncommitted ones are
//! redone exactly once.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use super::{reader, SinkError};
use crate::record::{Epoch, FileKind, Published, RowId, Stage, WrittenFile};
use crate::storage::{list_all, ObjectStore};

/// Prefix of manifests in the output store.
pub const MANIFEST_PREFIX: &str = "_manifest/";

/// The commit record of one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The epoch.
    pub epoch: Epoch,
    /// Id of the run that wrote it.
    pub run: String,
    /// Model that computed the embeddings.
    pub model: String,
    /// Embedding rows in the epoch.
    pub rows: u64,
    /// Error records in the epoch.
    pub errors: u64,
    /// The files, data and errors.
    pub files: Vec<WrittenFile>,
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

    /// Writes it (atomically) to the store.
    pub async fn write(&self, store: &dyn ObjectStore) -> Result<(), SinkError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| SinkError::Manifest {
            key: self.key(),
            reason: e.to_string(),
        })?;
        store.put(&self.key(), Bytes::from(json)).await?;
        Ok(())
    }
}

/// An epoch whose manifest is written, with its embedding rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedEpoch {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its embedding rows.
    pub rows: Vec<RowId>,
}

/// What earlier runs committed to an output.
#[derive(Debug, Default)]
pub struct Committed {
    /// All manifests, by epoch.
    pub manifests: Vec<Manifest>,
    /// Versions (key, ETag) not to process again: every committed row, and every error
    /// record but those of failed reads, which a new run retries.
    pub handled: Vec<(String, String)>,
    /// Every committed row with its epoch, oldest first.
    pub rows: Vec<(Epoch, RowId)>,
}

impl Committed {
    /// Reads every manifest and the key, version and label (or stage) of every committed
    /// row and error record.
    pub async fn load(store: &dyn ObjectStore) -> Result<Self, SinkError> {
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
            let manifest: Manifest =
                serde_json::from_slice(&bytes).map_err(|e| SinkError::Manifest {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            manifests.push(manifest);
        }
        manifests.sort_by_key(|m| m.epoch);
        let (mut handled, mut rows) = (Vec::new(), Vec::new());
        for manifest in &manifests {
            for file in &manifest.files {
                for entry in reader::read_index(store, &file.key, file.kind).await? {
                    if entry.stage != Some(Stage::Fetch) {
                        handled.push((entry.row.key.clone(), entry.row.etag.clone()));
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

    /// Deletes data and error files that no manifest lists (leftovers of uncommitted epochs)
    /// multipart uploads left open, and the local staging area. Returns how many objects and
    /// uploads were removed.
    pub async fn remove_uncommitted(&self, store: &dyn ObjectStore) -> Result<usize, SinkError> {
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
        let aborted = store.abort_incomplete_uploads().await?;
        if let Some(staging) = store.staging_dir() {
            let _ = std::fs::remove_dir_all(staging);
        }
        Ok(doomed.len() + aborted)
    }
}

/// An epoch being gathered: its capability, the files written, the failures reported.
type Gathering = (Capability<Epoch>, Vec<Published>, Vec<String>);

/// Gathers, on one worker, the files every worker wrote for an epoch, and emits the epoch's
/// manifest once the frontier shows the epoch finished everywhere. An epoch in which any
/// file failed to be written is not committed: its reason is emitted instead.
pub fn gather_epochs<'s>(
    files: StreamVec<'s, Epoch, Result<Published, String>>,
    run: String,
    model: String,
) -> StreamVec<'s, Epoch, Result<CommittedEpoch, String>> {
    files.unary_frontier(Pipeline, "GatherEpoch", move |initial, _info| {
        drop(initial);
        let mut pending: BTreeMap<Epoch, Gathering> = BTreeMap::new();
        move |(input, frontier), output| {
            let port = output.output_index();
            input.for_each_stamp(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let (_, files, failures) = pending.entry(t).or_insert_with(|| {
                    (
                        cap.retain_least(port).expect("input time"),
                        Vec::new(),
                        Vec::new(),
                    )
                });
                for batch in data {
                    for file in batch.drain(..) {
                        match file {
                            Ok(f) => files.push(f),
                            Err(e) => failures.push(e),
                        }
                    }
                }
            });
            while let Some((&t, _)) = pending.first_key_value() {
                if frontier.less_equal(&t) {
                    break;
                }
                let (cap, published, failures) = pending.remove(&t).expect("first key");
                let result = if failures.is_empty() {
                    let mut files = Vec::with_capacity(published.len());
                    let mut rows = Vec::new();
                    for p in published {
                        files.push(p.file);
                        rows.extend(p.rows);
                    }
                    files.sort_by(|a, b| a.key.cmp(&b.key));
                    let count = |kind| {
                        files
                            .iter()
                            .filter(|f| f.kind == kind)
                            .map(|f| f.rows)
                            .sum()
                    };
                    let manifest = Manifest {
                        epoch: t,
                        run: run.clone(),
                        model: model.clone(),
                        rows: count(FileKind::Data),
                        errors: count(FileKind::Errors),
                        files,
                    };
                    Ok(CommittedEpoch { manifest, rows })
                } else {
                    Err(format!("epoch {t} not committed: {}", failures.join("; ")))
                };
                output.session(&cap).give(result);
            }
        }
    })
}
