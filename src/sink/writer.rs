//! One worker's Parquet files of one epoch: opened on first use under a staging name, rows
//! encoded in batches, closed (footer written, synced) when the epoch is complete.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use parquet::arrow::ArrowWriter;

use crate::commit::delta::file_key;
pub use crate::error::SinkError;
use crate::metrics::Metrics;
use crate::record::{Embedded, Epoch, Failure, FileKind, Outcome, RowId, Stage};
use crate::table;

/// Rows buffered before they are encoded into the open Parquet file.
const ENCODE_EVERY: usize = 256;

/// A finished local file, ready to be moved to `key` in the output store.
#[derive(Clone, Debug)]
pub struct StagedFile {
    /// The epoch it belongs to.
    pub epoch: Epoch,
    /// Local path.
    pub path: PathBuf,
    /// Final key in the output store.
    pub key: String,
    /// Which table.
    pub kind: FileKind,
    /// Rows written.
    pub rows: u64,
    /// Its Delta statistics (JSON), for the Add action that commits it.
    pub stats: String,
    /// Every record's key and version (and a row's label): the per-label counts, and what
    /// the epoch's commit supersedes.
    pub ids: Vec<RowId>,
    /// The versions whose read failed (stage `fetch`), which watch mode retries.
    pub failed_reads: Vec<RowId>,
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
    /// The extra string columns of every row (a label pattern's named groups).
    pub columns: Vec<String>,
}

impl Naming {
    fn key(&self, kind: FileKind, epoch: Epoch) -> String {
        file_key(kind, epoch, self.worker, &self.run)
    }
}

/// One open Parquet file with its pending rows.
struct TableWriter<R> {
    epoch: Epoch,
    path: PathBuf,
    key: String,
    writer: ArrowWriter<File>,
    pending: Vec<R>,
    rows: u64,
    ids: Vec<RowId>,
    failed_reads: Vec<RowId>,
    stats: table::FileStats,
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
        std::fs::create_dir_all(&naming.staging).map_err(SinkError::staging(&path))?;
        let file = File::create(&path).map_err(SinkError::staging(&path))?;
        let writer = ArrowWriter::try_new(file, schema, Some(table::writer_properties()))
            .map_err(SinkError::parquet(&path))?;
        Ok(Self {
            epoch,
            path,
            key,
            writer,
            pending: Vec::new(),
            rows: 0,
            ids: Vec::new(),
            failed_reads: Vec::new(),
            stats: table::FileStats::default(),
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
        self.writer
            .write(&batch)
            .map_err(SinkError::parquet(&self.path))
    }

    fn finish(
        mut self,
        kind: FileKind,
        encode: impl Fn(&[R]) -> RecordBatch,
    ) -> Result<StagedFile, SinkError> {
        self.flush(encode)?;
        let file = self
            .writer
            .into_inner()
            .map_err(SinkError::parquet(&self.path))?;
        file.sync_all().map_err(SinkError::staging(&self.path))?;
        Ok(StagedFile {
            epoch: self.epoch,
            path: self.path,
            key: self.key,
            kind,
            rows: self.rows,
            stats: self.stats.to_json(),
            ids: self.ids,
            failed_reads: self.failed_reads,
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
        let naming = self.naming.clone();
        match outcome {
            Outcome::Row(row) => {
                if self.data.is_none() {
                    self.data = Some(TableWriter::create(
                        &self.naming,
                        FileKind::Data,
                        self.epoch,
                        table::table_schema(&self.naming.columns),
                    )?);
                }
                let w = self.data.as_mut().expect("just created");
                w.stats.observe(epoch, &row.key, row.label.as_deref(), None);
                w.ids.push(RowId {
                    key: row.key.clone(),
                    etag: row.etag.clone(),
                    label: row.label.clone(),
                });
                w.push(row, |rows| {
                    table::embeddings_batch(rows, &model, epoch, &naming.columns)
                })
            }
            Outcome::Failed(failure) => {
                if self.errors.is_none() {
                    self.errors = Some(TableWriter::create(
                        &self.naming,
                        FileKind::Errors,
                        self.epoch,
                        table::table_schema(&self.naming.columns),
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
                w.stats
                    .observe(epoch, &failure.key, None, Some(failure.stage));
                let id = RowId {
                    key: failure.key.clone(),
                    etag: failure.etag.clone(),
                    label: None,
                };
                if failure.stage == Stage::Fetch {
                    w.failed_reads.push(id.clone());
                }
                w.ids.push(id);
                w.push(failure, |rows| {
                    table::errors_batch(rows, &model, epoch, &naming.columns)
                })
            }
            Outcome::Vanished => Ok(()),
        }
    }

    /// Closes the files (footer written, synced) and returns them.
    pub fn finish(self) -> Result<Vec<StagedFile>, SinkError> {
        let (model, epoch) = (self.naming.model.clone(), self.epoch);
        let mut files = Vec::new();
        if let Some(w) = self.data {
            files.push(w.finish(FileKind::Data, |rows| {
                table::embeddings_batch(rows, &model, epoch, &self.naming.columns)
            })?);
        }
        if let Some(w) = self.errors {
            files.push(w.finish(FileKind::Errors, |rows| {
                table::errors_batch(rows, &model, epoch, &self.naming.columns)
            })?);
        }
        Ok(files)
    }
}

/// Removes a staged file that will not be published (best effort).
pub fn discard(path: &Path) {
    let _ = std::fs::remove_file(path);
}
