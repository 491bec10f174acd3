//! The two output tables, as Arrow schemas and record batches.
//!
//! `embeddings`: `key` utf8, `label` utf8 (null for a key at the root), `width` / `height`
//! uint32 (original size), `embedding` FixedSizeList<Float32, 1280>, `model` utf8, `etag`
//! utf8 (the version of the object embedded), `epoch` uint64 (the epoch that committed it).
//! `errors`: `key`, `stage` (`size` | `fetch` | `decode` | `embed`), `reason`, `model`,
//! `etag`, all utf8, and `epoch` uint64.
//!
//! With `epoch` in every row, "the latest row of each key" is one query over the files (an
//! `arg_max` or window over `epoch`), no manifest reading needed.
//!
//! A key appears again, in a later epoch, when its object was replaced (new ETag): the row
//! of the latest epoch supersedes the earlier ones ([`super::reader::Table::latest_rows`]).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::embed::FEATURE_DIM;
use crate::record::{Embedded, Epoch, Failure};

/// Rows per Parquet row group: bounds the writer's memory (~6 MiB of embeddings).
pub const ROW_GROUP_ROWS: usize = 1024;

/// Parquet settings shared by both tables.
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build()
}

fn embedding_item() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Float32, false))
}

/// Schema of the embeddings table.
pub fn embeddings_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("width", DataType::UInt32, false),
        Field::new("height", DataType::UInt32, false),
        Field::new(
            "embedding",
            DataType::FixedSizeList(embedding_item(), FEATURE_DIM as i32),
            false,
        ),
        Field::new("model", DataType::Utf8, false),
        Field::new("etag", DataType::Utf8, false),
        Field::new("epoch", DataType::UInt64, false),
    ]))
}

/// Schema of the errors table.
pub fn errors_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("etag", DataType::Utf8, false),
        Field::new("epoch", DataType::UInt64, false),
    ]))
}

/// The `epoch` column: the same epoch for every row of a file.
fn epoch_column(len: usize, epoch: Epoch) -> ArrayRef {
    Arc::new(UInt64Array::from(vec![epoch; len]))
}

/// Encodes embedding rows of `epoch`.
pub fn embeddings_batch(rows: &[Embedded], model: &str, epoch: Epoch) -> RecordBatch {
    let values: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.embedding.iter().copied())
        .collect();
    let embedding = FixedSizeListArray::new(
        embedding_item(),
        FEATURE_DIM as i32,
        Arc::new(Float32Array::from(values)),
        None,
    );
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.key.as_str()),
        )),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.label.as_deref()),
        )),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.width))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.height))),
        Arc::new(embedding),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|_| model))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.etag.as_str()),
        )),
        epoch_column(rows.len(), epoch),
    ];
    RecordBatch::try_new(embeddings_schema(), columns).expect("columns match the schema")
}

/// Encodes error records of `epoch`.
pub fn errors_batch(rows: &[Failure], model: &str, epoch: Epoch) -> RecordBatch {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.key.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.stage.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.reason.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|_| model))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.etag.as_str()),
        )),
        epoch_column(rows.len(), epoch),
    ];
    RecordBatch::try_new(errors_schema(), columns).expect("columns match the schema")
}
