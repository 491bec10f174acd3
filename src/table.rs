//! The two output tables: their Arrow schemas, how rows become record batches, and how a
//! committed Parquet file is read back (every column by name).
//!
//! `embeddings`: `key` utf8, `label` utf8 (null for a key at the root), `width` / `height`
//! uint32 (original size), `embedding` FixedSizeList<Float32, 1280>, `model` utf8, `etag`
//! utf8 (the version of the object embedded), `epoch` uint64 (the epoch that committed it).
//! A run with `--label-pattern` adds one nullable utf8 column per named group of the pattern
//! other than `label`, after these (e.g. `field`).
//! `errors`: `key`, `stage` (`size` | `fetch` | `decode` | `embed`), `reason`, `model`,
//! `etag`, all utf8, and `epoch` uint64.
//!
//! With `epoch` in every row, "the latest row of each key" is one query over the files (an
//! `arg_max` or window over `epoch`), no manifest reading needed.
//!
//! A key appears again, in a later epoch, when its object was replaced (new ETag): the row
//! of the latest epoch supersedes the earlier ones ([`crate::sink::reader::Table::latest_rows`]).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, RecordBatch, StringArray,
    UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef, UInt32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::record::{Embedded, Epoch, Failure, FileKind, RowId, Stage, FEATURE_DIM};
use crate::storage::{ObjectStore, StorageError};

/// Why a committed file could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The store could not give the file.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The bytes are not a readable Parquet file.
    #[error("{key}: not a readable Parquet file")]
    Parquet {
        /// The file's key.
        key: String,
        /// The reader's error.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// A column is missing or of another type.
    #[error("{key}: no {expected} column `{column}` (written by an older verger?)")]
    Column {
        /// The file's key.
        key: String,
        /// The column's name.
        column: &'static str,
        /// The type it must have.
        expected: &'static str,
    },
    /// An errors table names a stage verger does not know.
    #[error("{key}: unknown stage `{name}` in the errors table")]
    UnknownStage {
        /// The file's key.
        key: String,
        /// The stage as written.
        name: String,
    },
}

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

/// Schema of the embeddings table, with the extra string `columns` of a label pattern.
pub fn embeddings_schema(columns: &[String]) -> SchemaRef {
    let mut fields = base_fields();
    fields.extend(columns.iter().map(|c| Field::new(c, DataType::Utf8, true)));
    Arc::new(Schema::new(fields))
}

/// The embeddings table's own columns.
fn base_fields() -> Vec<Field> {
    vec![
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
        Field::new("prediction", DataType::Utf8, true),
        Field::new("confidence", DataType::Float32, true),
    ]
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

/// Encodes embedding rows of `epoch`, with the extra string `columns` of a label pattern (a
/// row without one of them has a null there).
pub fn embeddings_batch(
    rows: &[Embedded],
    model: &str,
    epoch: Epoch,
    columns: &[String],
) -> RecordBatch {
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
    let mut arrays: Vec<ArrayRef> = vec![
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
        Arc::new(StringArray::from_iter(
            rows.iter()
                .map(|r| r.prediction.as_ref().map(|p| p.label.as_str())),
        )),
        Arc::new(Float32Array::from_iter(
            rows.iter()
                .map(|r| r.prediction.as_ref().map(|p| p.confidence)),
        )),
    ];
    for name in columns {
        arrays.push(Arc::new(StringArray::from_iter(rows.iter().map(|r| {
            r.columns
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| v.as_deref())
        }))));
    }
    RecordBatch::try_new(embeddings_schema(columns), arrays).expect("columns match the schema")
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

/// The key, version and label of a committed row, or the key, version and stage of an
/// error record.
#[derive(Clone, Debug)]
pub struct IndexEntry {
    /// Key, version, label (`None` for error records).
    pub row: RowId,
    /// The stage of an error record; `None` for a row.
    pub stage: Option<Stage>,
}

/// The record batches of a committed file, only the named columns if `columns` is given.
pub async fn read_batches(
    store: &dyn ObjectStore,
    key: &str,
    columns: Option<&[&str]>,
) -> Result<Vec<RecordBatch>, TableError> {
    let bytes = store.get(key).await?;
    let bad = |source| TableError::Parquet {
        key: key.to_string(),
        source,
    };
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(bad)?;
    if let Some(columns) = columns {
        let schema = builder.parquet_schema();
        let fields = schema.root_schema().get_fields();
        let roots: Vec<usize> = (0..fields.len())
            .filter(|&i| columns.contains(&fields[i].name()))
            .collect();
        let mask = ProjectionMask::roots(schema, roots);
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(bad)?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.into()))
}

fn column<'a>(
    batch: &'a RecordBatch,
    name: &'static str,
    file: &str,
    expected: &'static str,
) -> Result<&'a ArrayRef, TableError> {
    let missing = || TableError::Column {
        key: file.to_string(),
        column: name,
        expected,
    };
    let column = batch.column_by_name(name).ok_or_else(missing)?;
    let fits = match expected {
        "utf8" => column.data_type() == &DataType::Utf8,
        "uint32" => column.data_type() == &DataType::UInt32,
        "float32" => column.data_type() == &DataType::Float32,
        _ => matches!(column.data_type(), DataType::FixedSizeList(item, _)
            if item.data_type() == &DataType::Float32),
    };
    fits.then_some(column).ok_or_else(missing)
}

/// A string column by name, or an error naming the file.
fn strings<'a>(
    batch: &'a RecordBatch,
    name: &'static str,
    file: &str,
) -> Result<&'a StringArray, TableError> {
    Ok(column(batch, name, file, "utf8")?.as_string::<i32>())
}

fn uint32s<'a>(
    batch: &'a RecordBatch,
    name: &'static str,
    file: &str,
) -> Result<&'a UInt32Array, TableError> {
    Ok(column(batch, name, file, "uint32")?.as_primitive::<UInt32Type>())
}

fn stage_of(name: &str, file: &str) -> Result<Stage, TableError> {
    Stage::from_name(name).ok_or_else(|| TableError::UnknownStage {
        key: file.to_string(),
        name: name.to_string(),
    })
}

/// Key, version and label (data) or stage (errors) of every record of one committed file:
/// what a restart needs, without reading the embeddings.
pub async fn read_index(
    store: &dyn ObjectStore,
    key: &str,
    kind: FileKind,
) -> Result<Vec<IndexEntry>, TableError> {
    let columns: [&'static str; 3] = match kind {
        FileKind::Data => ["key", "etag", "label"],
        FileKind::Errors => ["key", "etag", "stage"],
    };
    let mut out = Vec::new();
    for batch in read_batches(store, key, Some(&columns)).await? {
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

/// The embedding rows of one record batch of the embeddings table, every column by name.
pub fn decode_rows(batch: &RecordBatch, file: &str) -> Result<Vec<Embedded>, TableError> {
    let key = strings(batch, "key", file)?;
    let etag = strings(batch, "etag", file)?;
    let label = strings(batch, "label", file)?;
    let width = uint32s(batch, "width", file)?;
    let height = uint32s(batch, "height", file)?;
    let embedding =
        column(batch, "embedding", file, "fixed_size_list<float32>")?.as_fixed_size_list();
    // Files written before heads existed, or by a run without one, may lack the two columns.
    let prediction = match batch.column_by_name("prediction") {
        Some(_) => Some((
            strings(batch, "prediction", file)?,
            column(batch, "confidence", file, "float32")?.as_primitive::<Float32Type>(),
        )),
        None => None,
    };
    // The extra columns of a label pattern: every other string column, in the file's order.
    let extra: Vec<(&str, &StringArray)> = batch
        .schema_ref()
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(f, _)| {
            f.data_type() == &DataType::Utf8
                && !crate::label::TABLE_COLUMNS.contains(&f.name().as_str())
        })
        .map(|(f, c)| (f.name().as_str(), c.as_string::<i32>()))
        .collect();
    Ok((0..batch.num_rows())
        .map(|i| Embedded {
            key: key.value(i).to_string(),
            etag: etag.value(i).to_string(),
            label: (!label.is_null(i)).then(|| label.value(i).to_string()),
            columns: extra
                .iter()
                .map(|(name, values)| {
                    let value = (!values.is_null(i)).then(|| values.value(i).to_string());
                    (name.to_string(), value)
                })
                .collect(),
            width: width.value(i),
            height: height.value(i),
            embedding: embedding
                .value(i)
                .as_primitive::<Float32Type>()
                .values()
                .to_vec(),
            prediction: prediction.and_then(|(label, confidence)| {
                (!label.is_null(i)).then(|| crate::record::Prediction {
                    label: label.value(i).to_string(),
                    confidence: confidence.value(i),
                })
            }),
        })
        .collect())
}

/// The error records of one record batch of the errors table.
pub fn decode_errors(batch: &RecordBatch, file: &str) -> Result<Vec<Failure>, TableError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStore;

    fn write(store_dir: &std::path::Path, key: &str, batch: &RecordBatch) {
        let path = store_dir.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = std::fs::File::create(path).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        w.write(batch).unwrap();
        w.close().unwrap();
    }

    /// Columns are found by name, whatever their order in the file.
    #[tokio::test]
    async fn rows_are_read_by_column_name_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let row = Embedded {
            columns: Vec::new(),
            key: "Training/kiwi/a.jpg".into(),
            etag: "e1".into(),
            label: Some("kiwi".into()),
            width: 100,
            height: 80,
            embedding: (0..FEATURE_DIM).map(|i| i as f32).collect(),
            prediction: Some(crate::record::Prediction {
                label: "kiwi".into(),
                confidence: 0.75,
            }),
        };
        let batch = embeddings_batch(std::slice::from_ref(&row), "m", 3, &[]);
        let schema = batch.schema();
        let reversed: Vec<usize> = (0..batch.num_columns()).rev().collect();
        let shuffled = batch.project(&reversed).unwrap();
        assert_ne!(shuffled.schema().field(0).name(), schema.field(0).name());
        write(dir.path(), "data/x.parquet", &shuffled);
        let store = LocalStore::open(dir.path(), false).unwrap();
        let batches = read_batches(&store, "data/x.parquet", None).await.unwrap();
        assert_eq!(
            decode_rows(&batches[0], "data/x.parquet").unwrap(),
            vec![row]
        );
    }

    /// A file without a column, or with it in another type, is an error naming the file and
    /// the column.
    #[tokio::test]
    async fn a_missing_or_mistyped_column_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let row = Embedded {
            columns: Vec::new(),
            key: "k".into(),
            etag: "e".into(),
            label: None,
            width: 1,
            height: 1,
            embedding: vec![0.0; FEATURE_DIM],
            prediction: None,
        };
        let batch = embeddings_batch(&[row], "m", 0, &[]);
        let without_height = batch.project(&[0, 1, 2, 4, 5, 6, 7]).unwrap();
        write(dir.path(), "data/a.parquet", &without_height);
        let store = LocalStore::open(dir.path(), false).unwrap();
        let batches = read_batches(&store, "data/a.parquet", None).await.unwrap();
        let err = decode_rows(&batches[0], "data/a.parquet").unwrap_err();
        assert_eq!(
            err.to_string(),
            "data/a.parquet: no uint32 column `height` (written by an older verger?)"
        );
        let failures = errors_batch(
            &[Failure {
                key: "k".into(),
                etag: "e".into(),
                stage: Stage::Decode,
                reason: "r".into(),
            }],
            "m",
            0,
        );
        let err = decode_rows(&failures, "errors/b.parquet").unwrap_err();
        assert!(err.to_string().contains("`label`"), "{err}");
    }
}
