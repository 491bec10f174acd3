//! Reading committed output back: only what manifests list, so a reader never sees a file
//! of an epoch that did not commit.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, UInt32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::manifest::Committed;
use super::SinkError;
use crate::record::{Embedded, Failure, FileKind, Stage};
use crate::storage::ObjectStore;

/// The committed content of an output: embedding rows and error records.
#[derive(Debug, Default)]
pub struct Table {
    /// One per embedded object.
    pub rows: Vec<Embedded>,
    /// One per failed attempt.
    pub errors: Vec<Failure>,
    /// Number of committed epochs.
    pub epochs: usize,
}

async fn batches(
    store: &dyn ObjectStore,
    key: &str,
    only_first_column: bool,
) -> Result<Vec<RecordBatch>, SinkError> {
    let bytes = store.get(key).await?;
    let bad = |e: &dyn std::fmt::Display| SinkError::Parquet {
        key: key.to_string(),
        reason: e.to_string(),
    };
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| bad(&e))?;
    if only_first_column {
        let mask = ProjectionMask::roots(builder.parquet_schema(), [0]);
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(|e| bad(&e))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| bad(&e))
}

/// The `key` column of one committed data file.
pub async fn read_keys(store: &dyn ObjectStore, key: &str) -> Result<Vec<String>, SinkError> {
    let mut keys = Vec::new();
    for batch in batches(store, key, true).await? {
        let col = batch.column(0).as_string::<i32>();
        keys.extend(col.iter().map(|k| k.unwrap_or_default().to_string()));
    }
    Ok(keys)
}

/// Everything committed in `store`.
pub async fn read_table(store: &dyn ObjectStore) -> Result<Table, SinkError> {
    let committed = Committed::load(store).await?;
    let mut table = Table {
        epochs: committed.manifests.len(),
        ..Table::default()
    };
    for file in committed.manifests.iter().flat_map(|m| &m.files) {
        for batch in batches(store, &file.key, false).await? {
            match file.kind {
                FileKind::Data => table.rows.extend(decode_rows(&batch)),
                FileKind::Errors => table.errors.extend(decode_errors(&batch)),
            }
        }
    }
    Ok(table)
}

fn decode_rows(batch: &RecordBatch) -> Vec<Embedded> {
    let key = batch.column(0).as_string::<i32>();
    let label = batch.column(1).as_string::<i32>();
    let width = batch.column(2).as_primitive::<UInt32Type>();
    let height = batch.column(3).as_primitive::<UInt32Type>();
    let embedding = batch.column(4).as_fixed_size_list();
    (0..batch.num_rows())
        .map(|i| Embedded {
            key: key.value(i).to_string(),
            label: (!label.is_null(i)).then(|| label.value(i).to_string()),
            width: width.value(i),
            height: height.value(i),
            embedding: embedding
                .value(i)
                .as_primitive::<Float32Type>()
                .values()
                .to_vec(),
        })
        .collect()
}

fn decode_errors(batch: &RecordBatch) -> Vec<Failure> {
    let key = batch.column(0).as_string::<i32>();
    let stage = batch.column(1).as_string::<i32>();
    let reason = batch.column(2).as_string::<i32>();
    (0..batch.num_rows())
        .map(|i| Failure {
            key: key.value(i).to_string(),
            stage: match stage.value(i) {
                "fetch" => Stage::Fetch,
                "decode" => Stage::Decode,
                _ => Stage::Embed,
            },
            reason: reason.value(i).to_string(),
        })
        .collect()
}
