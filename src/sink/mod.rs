//! Sink stage: outcomes to Parquet files, committed per epoch by a manifest.
//!
//! Output layout (keys in the output store):
//!
//! ```text
//! data/e<epoch>-w<worker>-<run>.parquet     embeddings: key, label, width, height, embedding, model
//! errors/e<epoch>-w<worker>-<run>.parquet   error records: key, stage, reason, model
//! _manifest/<epoch>.json                    the commit: files of the epoch with row counts
//! ```
//!
//! Each worker writes at most one data and one errors file per epoch, so a file holds about
//! `epoch size / workers` rows (2,048 keys per epoch and 2 workers: ~1,024 rows, ~5 MiB).
//! A file is written under a staging name and appears under its final key in one atomic step;
//! an epoch counts only once its manifest exists, and the manifest is written only after
//! every worker has finished the epoch. Readers go through the manifests ([`reader`]).

pub mod lease;
pub mod manifest;
pub mod reader;
pub mod schema;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use parquet::arrow::ArrowWriter;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use crate::metrics::Metrics;
use crate::record::{Embedded, Epoch, Failure, FileKind, Outcome, RowId, Stage};
use crate::stats::{StageClock, TimedStage};

/// Rows buffered before they are encoded into the open Parquet file.
const ENCODE_EVERY: usize = 256;

/// Why output could not be written: always fatal for the run.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Local staging file trouble.
    #[error("{path}: {reason}")]
    Staging {
        /// The staging file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The output store refused a write.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// A manifest could not be encoded or decoded.
    #[error("manifest {key}: {reason}")]
    Manifest {
        /// Its key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A committed Parquet file could not be read back.
    #[error("{key}: {reason}")]
    Parquet {
        /// The file's key.
        key: String,
        /// The reader's message.
        reason: String,
    },
}

/// A finished local file, ready to be moved to `key` in the output store.
#[derive(Clone, Debug)]
pub struct StagedFile {
    /// Local path.
    pub path: PathBuf,
    /// Final key in the output store.
    pub key: String,
    /// Which table.
    pub kind: FileKind,
    /// Rows written.
    pub rows: u64,
    /// The rows of a data file, for the incremental per-label counts; for an errors file,
    /// the versions whose read failed (stage `fetch`), which watch mode retries.
    pub ids: Vec<RowId>,
}

/// Where and under which names one worker stages its files.
#[derive(Clone, Debug)]
pub struct Naming {
    /// Local staging directory.
    pub staging: PathBuf,
    /// This worker's global index.
    pub worker: usize,
    /// Unique id of this run, so that no name collides with a leftover of an earlier run.
    pub run: String,
    /// Model name, written to every row.
    pub model: String,
}

impl Naming {
    fn key(&self, kind: FileKind, epoch: Epoch) -> String {
        let dir = match kind {
            FileKind::Data => "data",
            FileKind::Errors => "errors",
        };
        format!(
            "{dir}/e{epoch:010}-w{:04}-{}.parquet",
            self.worker, self.run
        )
    }
}

/// One open Parquet file with its pending rows.
struct TableWriter<R> {
    path: PathBuf,
    key: String,
    writer: ArrowWriter<File>,
    pending: Vec<R>,
    rows: u64,
    ids: Vec<RowId>,
}

impl<R> TableWriter<R> {
    fn create(
        naming: &Naming,
        kind: FileKind,
        epoch: Epoch,
        schema: arrow::datatypes::SchemaRef,
    ) -> Result<Self, SinkError> {
        let key = naming.key(kind, epoch);
        let path = naming.staging.join(key.replace('/', "__"));
        let staging = |e: &dyn std::fmt::Display| SinkError::Staging {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&naming.staging).map_err(|e| staging(&e))?;
        let file = File::create(&path).map_err(|e| staging(&e))?;
        let writer = ArrowWriter::try_new(file, schema, Some(schema::writer_properties()))
            .map_err(|e| staging(&e))?;
        Ok(Self {
            path,
            key,
            writer,
            pending: Vec::new(),
            rows: 0,
            ids: Vec::new(),
        })
    }

    fn push(&mut self, row: R, encode: impl Fn(&[R]) -> RecordBatch) -> Result<(), SinkError> {
        self.pending.push(row);
        if self.pending.len() >= ENCODE_EVERY {
            self.flush(encode)?;
        }
        Ok(())
    }

    fn flush(&mut self, encode: impl Fn(&[R]) -> RecordBatch) -> Result<(), SinkError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = encode(&self.pending);
        self.rows += self.pending.len() as u64;
        self.pending.clear();
        self.writer.write(&batch).map_err(|e| SinkError::Staging {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })
    }

    fn finish(
        mut self,
        kind: FileKind,
        encode: impl Fn(&[R]) -> RecordBatch,
    ) -> Result<StagedFile, SinkError> {
        self.flush(encode)?;
        let file = self.writer.into_inner().map_err(|e| SinkError::Staging {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        file.sync_all().map_err(|e| SinkError::Staging {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(StagedFile {
            path: self.path,
            key: self.key,
            kind,
            rows: self.rows,
            ids: self.ids,
        })
    }
}

/// The files one worker writes for one epoch, opened on first use.
pub struct EpochWriter {
    epoch: Epoch,
    naming: Arc<Naming>,
    data: Option<TableWriter<Embedded>>,
    errors: Option<TableWriter<Failure>>,
    metrics: Arc<Metrics>,
}

impl EpochWriter {
    /// A writer for `epoch` that has not created any file yet.
    pub fn new(epoch: Epoch, naming: Arc<Naming>, metrics: Arc<Metrics>) -> Self {
        Self {
            epoch,
            naming,
            data: None,
            errors: None,
            metrics,
        }
    }

    /// Appends one outcome to the right table.
    pub fn push(&mut self, outcome: Outcome) -> Result<(), SinkError> {
        let (model, epoch) = (self.naming.model.clone(), self.epoch);
        match outcome {
            Outcome::Row(row) => {
                if self.data.is_none() {
                    self.data = Some(TableWriter::create(
                        &self.naming,
                        FileKind::Data,
                        self.epoch,
                        schema::embeddings_schema(),
                    )?);
                }
                let w = self.data.as_mut().expect("just created");
                w.ids.push(RowId {
                    key: row.key.clone(),
                    etag: row.etag.clone(),
                    label: row.label.clone(),
                });
                w.push(row, |rows| schema::embeddings_batch(rows, &model, epoch))
            }
            Outcome::Failed(failure) => {
                if self.errors.is_none() {
                    self.errors = Some(TableWriter::create(
                        &self.naming,
                        FileKind::Errors,
                        self.epoch,
                        schema::errors_schema(),
                    )?);
                }
                tracing::info!(
                    key = failure.key,
                    stage = failure.stage.as_str(),
                    "{}",
                    failure.reason
                );
                self.metrics.failed.inc();
                let w = self.errors.as_mut().expect("just created");
                if failure.stage == Stage::Fetch {
                    w.ids.push(RowId {
                        key: failure.key.clone(),
                        etag: failure.etag.clone(),
                        label: None,
                    });
                }
                w.push(failure, |rows| schema::errors_batch(rows, &model, epoch))
            }
            Outcome::Vanished(_) => Ok(()),
        }
    }

    /// Closes the files (footer written, synced) and returns them.
    pub fn finish(self) -> Result<Vec<StagedFile>, SinkError> {
        let (model, epoch) = (self.naming.model.clone(), self.epoch);
        let mut files = Vec::new();
        if let Some(w) = self.data {
            files.push(w.finish(FileKind::Data, |rows| {
                schema::embeddings_batch(rows, &model, epoch)
            })?);
        }
        if let Some(w) = self.errors {
            files.push(w.finish(FileKind::Errors, |rows| {
                schema::errors_batch(rows, &model, epoch)
            })?);
        }
        Ok(files)
    }
}

/// The sink operator: writes each epoch's outcomes into this worker's files and, once the
/// epoch is complete at this worker, emits the finished files at that epoch.
pub fn write_epochs<'s>(
    outcomes: StreamVec<'s, Epoch, Outcome>,
    naming: Arc<Naming>,
    clock: Arc<StageClock>,
    metrics: Arc<Metrics>,
) -> StreamVec<'s, Epoch, Result<StagedFile, String>> {
    outcomes.unary_frontier(Pipeline, "WriteParquet", move |initial, _info| {
        drop(initial);
        let mut open: BTreeMap<Epoch, (Capability<Epoch>, EpochWriter, Option<String>)> =
            BTreeMap::new();
        move |(input, frontier), output| {
            let _busy = clock.start(TimedStage::Write);
            let port = output.output_index();
            input.for_each_stamp(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let (_, writer, failed) = open.entry(t).or_insert_with(|| {
                    (
                        cap.retain_least(port).expect("input time"),
                        EpochWriter::new(t, naming.clone(), metrics.clone()),
                        None,
                    )
                });
                for batch in data {
                    for outcome in batch.drain(..) {
                        if failed.is_none() {
                            if let Err(e) = writer.push(outcome) {
                                *failed = Some(e.to_string());
                            }
                        }
                    }
                }
            });
            while let Some((&t, _)) = open.first_key_value() {
                if frontier.less_equal(&t) {
                    break;
                }
                let (cap, writer, failed) = open.remove(&t).expect("first key");
                let mut session = output.session(&cap);
                match failed {
                    Some(reason) => session.give(Err(reason)),
                    None => match writer.finish() {
                        Ok(files) => session.give_iterator(files.into_iter().map(Ok)),
                        Err(e) => session.give(Err(e.to_string())),
                    },
                }
            }
        }
    })
}

/// Removes a staged file that will not be published (best effort).
pub fn discard(path: &Path) {
    let _ = std::fs::remove_file(path);
}
