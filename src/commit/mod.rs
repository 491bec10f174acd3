//! The commit protocol: an epoch counts once the Delta version that adds its files is
//! committed, and that version is committed only after every worker has published its files
//! of the epoch.
//!
//! - [`delta`]: the output's Delta table: file names, the commit of an epoch (with its
//!   `txn` action), and what earlier runs committed ([`Committed`]).
//! - [`snapshot`]: which file holds each key's record, and the rewrites that take
//!   superseded and deleted records out of the snapshot.
//! - [`compaction`]: small files merged, so the snapshot's file count stays bounded.
//! - [`stage`]: the dataflow's last stage. Every worker's published files go to worker 0,
//!   which gathers an epoch until its frontier passes, commits it, and reports the
//!   committed epoch back to the source through a [`CommitFeed`] the source owns.
//!
//! A committed epoch is never redone; an uncommitted one (a crash, a kill, a failed write) is
//! redone by later runs until it commits.

pub mod compaction;
pub mod delta;
pub mod snapshot;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use serde::{Deserialize, Serialize};
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concat, Exchange, Inspect};
use timely::dataflow::StreamVec;

use crate::error::StageError;
use crate::operators::{async_map, fold_epochs, StageContext};
use crate::record::{Epoch, FileKind, Published, RowId, WorkerFailed};
use crate::storage::ObjectStore;
pub use compaction::CompactionPolicy;
pub use delta::{
    CommitError, Committed, CommittedEpoch, DeltaOutput, EpochCommit, Identity, LOG_PREFIX,
};
pub use snapshot::{key_hash, KeyHash, SnapshotFile, SnapshotIndex};

/// What the commit stage tells the source about one committed epoch.
#[derive(Clone, Debug)]
pub struct CommitReport {
    /// The epoch's commit record (its row and error counts).
    pub commit: EpochCommit,
    /// Its embedding rows (for the per-label counts).
    pub rows: Vec<RowId>,
    /// Its failed reads (for watch mode to list again).
    pub failed_reads: Vec<RowId>,
    /// The records it removed because their key was deleted from the input, with the
    /// epoch of each (for the source's state: a deleted key is new again if it comes back).
    pub deleted: Vec<(Epoch, RowId)>,
}

/// The source's end of the commit stage's reports: committed epochs, oldest first. Owned by
/// the source on worker 0, which lists and commits; the commit stage holds the sending end.
#[derive(Debug)]
pub struct CommitFeed(mpsc::Receiver<CommitReport>);

impl CommitFeed {
    /// The epochs committed since the last call.
    pub fn drain(&self) -> impl Iterator<Item = CommitReport> + '_ {
        self.0.try_iter()
    }
}

/// The commit stage's end: where it reports committed epochs.
#[derive(Clone, Debug)]
pub struct CommitReports(mpsc::Sender<CommitReport>);

/// A connected pair: the commit stage reports into the first, the source reads the second.
pub fn channel() -> (CommitReports, CommitFeed) {
    let (tx, rx) = mpsc::channel();
    (CommitReports(tx), CommitFeed(rx))
}

/// What the commit stage needs besides its input.
pub struct CommitSettings {
    /// The output's Delta table.
    pub output: DeltaOutput,
    /// This run's id, written into every commit record.
    pub run: String,
    /// The model's name, written into every commit record.
    pub model: String,
    /// The SHA-256 of its weights, written into every commit record.
    pub weights_sha256: String,
    /// How rows are derived from objects besides the model
    /// ([`crate::decode::DecodeSettings::derivation`]), written into every commit record.
    pub derivation: String,
    /// Set when the output's lease is lost: from then on nothing is committed.
    pub lease_lost: Arc<AtomicBool>,
    /// Where committed epochs are reported.
    pub reports: CommitReports,
    /// When the run started (ms since the Unix epoch), written into every commit record.
    pub run_started_ms: u64,
    /// The output store, where superseded records' files are rewritten.
    pub store: Arc<dyn ObjectStore>,
    /// Which file holds each key's current record (filled from the table at start-up).
    pub index: Arc<std::sync::Mutex<SnapshotIndex>>,
    /// When the snapshot's small files are merged.
    pub compaction: CompactionPolicy,
}

/// What the committing worker gathers for one epoch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum EpochPart {
    /// A worker's published file.
    File(Published),
    /// A worker that could not finish the epoch.
    Failed(WorkerFailed),
    /// A key deleted from the input (its hash): its records leave the snapshot.
    Deleted(KeyHash),
}

/// The commit stage: gathers every worker's published files on worker 0, commits each
/// epoch's Delta version once the epoch is finished everywhere, and reports it. An epoch in which
/// a worker failed is not committed. Its output is the committed epochs, for a probe.
pub fn stage<'s>(
    published: StreamVec<'s, Epoch, Result<Published, WorkerFailed>>,
    deleted: StreamVec<'s, Epoch, KeyHash>,
    ctx: &StageContext,
    settings: CommitSettings,
) -> StreamVec<'s, Epoch, Option<CommittedEpoch>> {
    let CommitSettings {
        output,
        run,
        model,
        weights_sha256,
        derivation,
        lease_lost,
        reports,
        run_started_ms,
        store,
        index,
        compaction,
    } = settings;
    let fatal = ctx.fatal.clone();
    let parts = published
        .map(|p| match p {
            Ok(file) => EpochPart::File(file),
            Err(failed) => EpochPart::Failed(failed),
        })
        .concat(deleted.map(EpochPart::Deleted));
    let epochs = fold_epochs(
        parts.exchange(|_| 0),
        "GatherEpoch",
        |_| Gathered::default(),
        |g: &mut Gathered, part, _| match part {
            EpochPart::File(f) => g.files.push(f),
            EpochPart::Deleted(hash) => g.deleted.push(hash),
            EpochPart::Failed(e) => {
                g.failed.get_or_insert(e);
            }
        },
        move |epoch, g, out| match g.failed {
            None => out.push(gather(
                epoch,
                (g.files, g.deleted),
                (&run, run_started_ms),
                (&model, &weights_sha256, &derivation),
            )),
            Some(WorkerFailed { worker, reason }) => {
                fatal.set(StageError::Peer {
                    epoch,
                    worker,
                    reason,
                });
            }
        },
    );
    let (ctx_in, metrics) = (ctx.clone(), ctx.metrics.clone());
    let table = Arc::new(tokio::sync::Mutex::new(None));
    async_map(epochs, "Commit", ctx, 1, None, move |epoch| {
        let target = Target {
            output: output.clone(),
            table: table.clone(),
            store: store.clone(),
            index: index.clone(),
            compaction,
        };
        commit(target, epoch, ctx_in.clone(), lease_lost.clone())
    })
    .inspect(move |committed: &Option<CommittedEpoch>| {
        let Some(c) = committed else { return };
        let m = &c.commit;
        metrics.committed.inc_by(m.rows + m.errors);
        metrics.epochs_committed.inc();
        tracing::info!(
            epoch = m.epoch,
            rows = m.rows,
            errors = m.errors,
            superseded = m.superseded,
            deleted = m.deleted,
            merged = m.compacted_from.len(),
            "epoch committed"
        );
        // The source may be gone already (a failing run): nothing left to tell.
        let _ = reports.0.send(CommitReport {
            commit: m.clone(),
            rows: c.rows.clone(),
            failed_reads: c.failed_reads.clone(),
            deleted: c.deleted_rows.clone(),
        });
    })
}

/// What the committing worker holds of an epoch until it is finished everywhere.
#[derive(Default)]
struct Gathered {
    files: Vec<Published>,
    deleted: Vec<KeyHash>,
    failed: Option<WorkerFailed>,
}

/// The commit of `epoch` from every worker's published files and the keys deleted from the
/// input.
fn gather(
    epoch: Epoch,
    (published, mut deleted): (Vec<Published>, Vec<KeyHash>),
    (run, run_started_ms): (&str, u64),
    (model, weights_sha256, derivation): (&str, &str, &str),
) -> CommittedEpoch {
    let mut files = Vec::with_capacity(published.len());
    let (mut rows, mut failed_reads) = (Vec::new(), Vec::new());
    let mut file_keys = Vec::with_capacity(published.len());
    for p in published {
        file_keys.push((
            p.file.key.clone(),
            p.rows.iter().map(|r| r.key.clone()).collect(),
        ));
        match p.file.kind {
            FileKind::Data => rows.extend(p.rows),
            FileKind::Errors => failed_reads.extend(p.failed_reads),
        }
        files.push(p.file);
    }
    deleted.sort_unstable();
    deleted.dedup();
    files.sort_by(|a, b| a.key.cmp(&b.key));
    let count = |kind| {
        files
            .iter()
            .filter(|f| f.kind == kind)
            .map(|f| f.rows)
            .sum()
    };
    let commit = EpochCommit {
        epoch,
        run: run.to_string(),
        model: model.to_string(),
        weights_sha256: weights_sha256.to_string(),
        derivation: derivation.to_string(),
        rows: count(FileKind::Data),
        errors: count(FileKind::Errors),
        files,
        run_started_ms: Some(run_started_ms),
        committed_ms: Some(unix_ms(std::time::SystemTime::now())),
        ..EpochCommit::default()
    };
    CommittedEpoch {
        commit,
        rows,
        failed_reads,
        file_keys,
        deleted,
        deleted_rows: Vec::new(),
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where the commit stage commits: the table (opened at the first commit and kept, up to
/// date, for the next ones), the output store, the snapshot's index and the compaction
/// policy.
struct Target {
    output: DeltaOutput,
    table: Arc<tokio::sync::Mutex<Option<deltalake_core::DeltaTable>>>,
    store: Arc<dyn ObjectStore>,
    index: Arc<std::sync::Mutex<SnapshotIndex>>,
    compaction: CompactionPolicy,
}

/// Commits the epoch's Delta version, unless the lease is lost or the run is failing: its
/// files, the rewrites that take its keys' older records and its deleted keys' records
/// out of the snapshot, and the merges of small files.
async fn commit(
    target: Target,
    mut epoch: CommittedEpoch,
    ctx: StageContext,
    lease_lost: Arc<AtomicBool>,
) -> Option<CommittedEpoch> {
    let e = epoch.commit.epoch;
    if lease_lost.load(Ordering::Acquire) {
        ctx.fatal.set(StageError::LeaseLost {
            epoch: e,
            location: target.output.location().to_string(),
        });
        return None;
    }
    if ctx.fatal.is_set() {
        return None; // the run is failing, for a reason already recorded
    }
    let mut table = target.table.lock().await;
    let place = EpochTarget {
        output: &target.output,
        store: target.store.as_ref(),
        index: &target.index,
        compaction: target.compaction,
    };
    let committed = commit_epoch(place, &mut table, &mut epoch);
    match ctx.metrics.request(committed).await {
        Ok(()) => Some(epoch),
        Err(source) => {
            ctx.fatal.set(StageError::Commit { epoch: e, source });
            None
        }
    }
}

/// Where [`commit_epoch`] commits.
#[derive(Clone, Copy)]
pub struct EpochTarget<'a> {
    /// The output's Delta table.
    pub output: &'a DeltaOutput,
    /// The output store, where rewritten and merged files are written.
    pub store: &'a dyn ObjectStore,
    /// Which file holds each key's current record; updated once the epoch is committed.
    pub index: &'a std::sync::Mutex<SnapshotIndex>,
    /// When small files are merged.
    pub compaction: CompactionPolicy,
}

/// Commits `epoch` into `table` (opened here if `None`): the rewrites that take its keys'
/// older records and its deleted keys' records out of the snapshot, the merges of small
/// files, and its own files, in one Delta version; then updates the index and fills the
/// epoch's commit record and the records its deletions removed.
pub async fn commit_epoch(
    target: EpochTarget<'_>,
    table: &mut Option<deltalake_core::DeltaTable>,
    epoch: &mut CommittedEpoch,
) -> Result<(), CommitError> {
    let e = epoch.commit.epoch;
    let new_keys: Vec<&str> = epoch
        .file_keys
        .iter()
        .flat_map(|(_, keys)| keys.iter().map(String::as_str))
        .collect();
    let run = epoch.commit.run.clone();
    let mut removal = snapshot::supersede(
        target.store,
        target.index,
        (e, &run),
        &new_keys,
        &epoch.deleted,
    )
    .await?;
    compaction::compact(
        target.store,
        target.index,
        (e, &run),
        target.compaction,
        &mut removal,
    )
    .await?;
    use std::mem::take;
    epoch.commit.rewritten = take(&mut removal.rewritten);
    epoch.commit.removed = take(&mut removal.removed);
    epoch.commit.compacted = take(&mut removal.compacted);
    epoch.commit.compacted_from = take(&mut removal.compacted_from);
    epoch.commit.superseded = removal.superseded;
    epoch.commit.deleted = removal.deleted.len() as u64;
    target.output.commit(table, &epoch.commit).await?;
    let sizes: HashMap<&str, u64> = epoch
        .commit
        .files
        .iter()
        .map(|f| (f.key.as_str(), f.bytes))
        .collect();
    let files = epoch.file_keys.iter().map(|(path, keys)| {
        let file = SnapshotFile {
            path: path.clone(),
            bytes: sizes.get(path.as_str()).copied().unwrap_or_default(),
        };
        (file, keys.iter().map(String::as_str).collect())
    });
    target
        .index
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .apply(&removal, &epoch.deleted, files);
    epoch.deleted_rows = removal.deleted;
    Ok(())
}
