//! Reading committed output back: only what manifests list, so a reader never sees a file
//! of an epoch that did not commit.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, UInt32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::manifest::Committed;
use super::SinkError;
use crate::record::{Embedded, Failure, FileKind, RowId, Stage};
use crate::storage::ObjectStore;

/// The committed content of an output: embedding rows and error records.
#[derive(Debug, Default)]
pub struct Table {
    /// One per embedded object version, in commit order: a key whose object was replaced
    /// has a row per version, and the last one is current ([`Table::latest_rows`]).
    pub rows: Vec<Embedded>,
    /// One per failed attempt.
    pub errors: Vec<Failure>,
    /// Number of committed epochs.
    pub epochs: usize,
}

impl Table {
    /// The current row of every key: the last committed version.
    pub fn latest_rows(&self) -> Vec<&Embedded> {
        let mut latest: std::collections::HashMap<&str, usize> = Default::default();
        for (i, row) in self.rows.iter().enumerate() {
            latest.insert(row.key.as_str(), i);
        }
        let mut index: Vec<usize> = latest.into_values().collect();
        index.sort_unstable();
        index.into_iter().map(|i| &self.rows[i]).collect()
    }
}

impl Table {
    /// The error records not superseded: those of a version that has no row (a read that
    /// failed and then, retried at a later poll, succeeded leaves an error record and a row).
    pub fn current_errors(&self) -> Vec<&Failure> {
        let embedded: std::collections::HashSet<(&str, &str)> = self
            .rows
            .iter()
            .map(|r| (r.key.as_str(), r.etag.as_str()))
            .collect();
        self.errors
            .iter()
            .filter(|e| !embedded.contains(&(e.key.as_str(), e.etag.as_str())))
            .collect()
    }
}

/// The key, version and label of a committed row, or the key, version and stage of an
/// error record.
#[derive(Clone, Debug)]
pub struct IndexEntry {
    /// Key, version, label (`None` for error records).
    pub row: RowId,
    /// The stage of an error record; `None` for a row.
    pub stage: Option<Stage>,
}

fn bad(key: &str) -> impl Fn(&dyn std::fmt::Display) -> SinkError + '_ {
    move |e| SinkError::Parquet {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

/// The record batches of a committed file, only the named columns if `columns` is given.
async fn batches(
    store: &dyn ObjectStore,
    key: &str,
    columns: Option<&[&str]>,
) -> Result<Vec<RecordBatch>, SinkError> {
    let bytes = store.get(key).await?;
    let bad = bad(key);
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| bad(&e))?;
    if let Some(columns) = columns {
        let schema = builder.parquet_schema();
        let roots: Vec<usize> = (0..schema.root_schema().get_fields().len())
            .filter(|&i| columns.contains(&schema.root_schema().get_fields()[i].name()))
            .collect();
        let mask = ProjectionMask::roots(schema, roots);
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(|e| bad(&e))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| bad(&e))
}

/// A string column by name, or an error naming the file.
fn strings<'a>(
    batch: &'a RecordBatch,
    name: &str,
    file: &str,
) -> Result<&'a arrow::array::StringArray, SinkError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| SinkError::Parquet {
            key: file.to_string(),
            reason: format!("no utf8 column `{name}` (written by an older verger?)"),
        })
}

fn stage_of(name: &str, file: &str) -> Result<Stage, SinkError> {
    Stage::from_name(name).ok_or_else(|| SinkError::Parquet {
        key: file.to_string(),
        reason: format!("unknown stage `{name}` in the errors table"),
    })
}

/// Key, version and label (data) or stage (errors) of every record of one committed file:
/// what a restart needs, without reading the embeddings.
pub async fn read_index(
    store: &dyn ObjectStore,
    key: &str,
    kind: FileKind,
) -> Result<Vec<IndexEntry>, SinkError> {
    let columns: &[&str] = match kind {
        FileKind::Data => &["key", "etag", "label"],
        FileKind::Errors => &["key", "etag", "stage"],
    };
    let mut out = Vec::new();
    for batch in batches(store, key, Some(columns)).await? {
        let keys = strings(&batch, "key", key)?;
        let etags = strings(&batch, "etag", key)?;
        let other = strings(&batch, columns[2], key)?;
        for i in 0..batch.num_rows() {
            let third = (!other.is_null(i)).then(|| other.value(i).to_string());
            let (label, stage) = match kind {
                FileKind::Data => (third, None),
                FileKind::Errors => (
                    None,
                    third.as_deref().map(|s| stage_of(s, key)).transpose()?,
                ),
            };
            out.push(IndexEntry {
                row: RowId {
                    key: keys.value(i).to_string(),
                    etag: etags.value(i).to_string(),
                    label,
                },
                stage,
            });
        }
    }
    Ok(out)
}

/// Everything committed in `store`.
pub async fn read_table(store: &dyn ObjectStore) -> Result<Table, SinkError> {
    let committed = Committed::load(store).await?;
    let mut table = Table {
        epochs: committed.manifests.len(),
        ..Table::default()
    };
    for file in committed.manifests.iter().flat_map(|m| &m.files) {
        for batch in batches(store, &file.key, None).await? {
            match file.kind {
                FileKind::Data => table.rows.extend(decode_rows(&batch, &file.key)?),
                FileKind::Errors => table.errors.extend(decode_errors(&batch, &file.key)?),
            }
        }
    }
    Ok(table)
}

fn decode_rows(batch: &RecordBatch, file: &str) -> Result<Vec<Embedded>, SinkError> {
    let key = strings(batch, "key", file)?;
    let etag = strings(batch, "etag", file)?;
    let label = strings(batch, "label", file)?;
    let width = batch.column(2).as_primitive::<UInt32Type>();
    let height = batch.column(3).as_primitive::<UInt32Type>();
    let embedding = batch.column(4).as_fixed_size_list();
    Ok((0..batch.num_rows())
        .map(|i| Embedded {
            key: key.value(i).to_string(),
            etag: etag.value(i).to_string(),
            label: (!label.is_null(i)).then(|| label.value(i).to_string()),
            width: width.value(i),
            height: height.value(i),
            embedding: embedding
                .value(i)
                .as_primitive::<Float32Type>()
                .values()
                .to_vec(),
        })
        .collect())
}

fn decode_errors(batch: &RecordBatch, file: &str) -> Result<Vec<Failure>, SinkError> {
    let key = strings(batch, "key", file)?;
    let etag = strings(batch, "etag", file)?;
    let stage = strings(batch, "stage", file)?;
    let reason = strings(batch, "reason", file)?;
    (0..batch.num_rows())
        .map(|i| {
            Ok(Failure {
                key: key.value(i).to_string(),
                etag: etag.value(i).to_string(),
                stage: stage_of(stage.value(i), file)?,
                reason: reason.value(i).to_string(),
            })
        })
        .collect()
}
