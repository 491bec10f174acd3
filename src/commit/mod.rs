//! The commit protocol: an epoch counts once the Delta version that adds its files is
//! committed, and that version is committed only after every worker has published its files
//! of the epoch.
//!
//! - [`delta`]: the output's Delta table: file names, the commit of an epoch (with its
//!   `txn` action), and what earlier runs committed ([`Committed`]).
//! - [`stage`]: the dataflow's last stage. Every worker's published files go to worker 0,
//!   which gathers an epoch until its frontier passes, commits it, and reports the
//!   committed epoch back to the source through a [`CommitFeed`] the source owns.
//!
//! A committed epoch is never redone; an uncommitted one (a crash, a kill, a failed write) is
//! redone by later runs until it commits.

pub mod delta;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use timely::dataflow::operators::{Exchange, Inspect};
use timely::dataflow::StreamVec;

use crate::error::StageError;
use crate::operators::{async_map, fold_epochs, StageContext};
use crate::record::{Epoch, FileKind, Published, RowId, WorkerFailed};
pub use delta::{
    CommitError, Committed, CommittedEpoch, DeltaOutput, EpochCommit, Identity, LOG_PREFIX,
};

/// What the commit stage tells the source about one committed epoch.
#[derive(Clone, Debug)]
pub struct CommitReport {
    /// The epoch's commit record (its row and error counts).
    pub commit: EpochCommit,
    /// Its embedding rows (for the per-label counts).
    pub rows: Vec<RowId>,
    /// Its failed reads (for watch mode to list again).
    pub failed_reads: Vec<RowId>,
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
}

/// The commit stage: gathers every worker's published files on worker 0, commits each
/// epoch's Delta version once the epoch is finished everywhere, and reports it. An epoch in which
/// a worker failed is not committed. Its output is the committed epochs, for a probe.
pub fn stage<'s>(
    published: StreamVec<'s, Epoch, Result<Published, WorkerFailed>>,
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
    } = settings;
    let fatal = ctx.fatal.clone();
    let epochs = fold_epochs(
        published.exchange(|_| 0),
        "GatherEpoch",
        |_| (Vec::new(), None),
        |(files, failed): &mut (Vec<Published>, Option<WorkerFailed>), file, _| match file {
            Ok(f) => files.push(f),
            Err(e) => {
                failed.get_or_insert(e);
            }
        },
        move |epoch, (files, failed), out| match failed {
            None => out.push(gather(
                epoch,
                files,
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
        let target = (output.clone(), table.clone());
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
            "epoch committed"
        );
        // The source may be gone already (a failing run): nothing left to tell.
        let _ = reports.0.send(CommitReport {
            commit: m.clone(),
            rows: c.rows.clone(),
            failed_reads: c.failed_reads.clone(),
        });
    })
}

/// The commit of `epoch` from every worker's published files.
fn gather(
    epoch: Epoch,
    published: Vec<Published>,
    (run, run_started_ms): (&str, u64),
    (model, weights_sha256, derivation): (&str, &str, &str),
) -> CommittedEpoch {
    let mut files = Vec::with_capacity(published.len());
    let (mut rows, mut failed_reads) = (Vec::new(), Vec::new());
    for p in published {
        match p.file.kind {
            FileKind::Data => rows.extend(p.rows),
            FileKind::Errors => failed_reads.extend(p.rows),
        }
        files.push(p.file);
    }
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
    };
    CommittedEpoch {
        commit,
        rows,
        failed_reads,
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Commits the epoch's Delta version, unless the lease is lost or the run is failing. The
/// table is opened at the first commit and kept, up to date, for the next ones.
async fn commit(
    (output, table): (
        DeltaOutput,
        Arc<tokio::sync::Mutex<Option<deltalake_core::DeltaTable>>>,
    ),
    epoch: CommittedEpoch,
    ctx: StageContext,
    lease_lost: Arc<AtomicBool>,
) -> Option<CommittedEpoch> {
    let e = epoch.commit.epoch;
    if lease_lost.load(Ordering::Acquire) {
        ctx.fatal.set(StageError::LeaseLost {
            epoch: e,
            location: output.location().to_string(),
        });
        return None;
    }
    if ctx.fatal.is_set() {
        return None; // the run is failing, for a reason already recorded
    }
    let mut table = table.lock().await;
    let committed = output.commit(&mut table, &epoch.commit);
    match ctx.metrics.request(committed).await {
        Ok(()) => Some(epoch),
        Err(source) => {
            ctx.fatal.set(StageError::Commit { epoch: e, source });
            None
        }
    }
}
