//! The output table: its Arrow schema, how rows and error records become record batches,
//! and how a committed Parquet file is read back (every column by name).
//!
//! One table holds both: a row per embedded object version, and a row per failed attempt.
//! `key` utf8, `label` utf8 (null for a key at the root or an error), `width` / `height`
//! int32 (original size; null for an error), `embedding` list<float32> (1,280 values; null
//! for an error), `model` utf8, `etag` utf8 (the version of the object), `epoch` int64 (the
//! epoch that committed it), `prediction` utf8 / `confidence` float32 (a head's, if any),
//! `stage` utf8 (`size` | `fetch` | `decode` | `embed`; null for an embedding) and `reason`
//! utf8 (null for an embedding). A run with `--label-pattern` adds one nullable utf8 column
//! per named group of the pattern other than `label`, after these (e.g. `field`).
//!
//! Types are those every Delta reader has (Delta, Spark and Athena have no unsigned
//! integers nor fixed-size lists): the embedding's dimension is in the table's metadata.
//! One table, not a second one for errors, so that an epoch is one Delta commit: its rows
//! and its error records become visible together, exactly once.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Int32Array, Int64Array, ListArray, RecordBatch,
    StringArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Float32Type, Int32Type, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::record::{Embedded, Epoch, Failure, RowId, Stage};
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
    /// Records could not be encoded as Parquet (a file rewritten without some records).
    #[error("{key}: Parquet encoding failed")]
    Encode {
        /// The file's key.
        key: String,
        /// The writer's error.
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
    /// An error record names a stage verger does not know.
    #[error("{key}: unknown stage `{name}` in an error record")]
    UnknownStage {
        /// The file's key.
        key: String,
        /// The stage as written.
        name: String,
    },
}

/// Rows per Parquet row group: bounds the writer's memory (~6 MiB of embeddings).
pub const ROW_GROUP_ROWS: usize = 1024;

/// Parquet settings of the table's files.
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build()
}

fn embedding_item() -> Arc<Field> {
    Arc::new(Field::new("element", DataType::Float32, false))
}

/// Schema of the table, with the extra string `columns` of a label pattern.
pub fn table_schema(columns: &[String]) -> SchemaRef {
    let mut fields = base_fields();
    fields.extend(columns.iter().map(|c| Field::new(c, DataType::Utf8, true)));
    Arc::new(Schema::new(fields))
}

/// The table's own columns.
fn base_fields() -> Vec<Field> {
    vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, true),
        Field::new("width", DataType::Int32, true),
        Field::new("height", DataType::Int32, true),
        Field::new("embedding", DataType::List(embedding_item()), true),
        Field::new("model", DataType::Utf8, false),
        Field::new("etag", DataType::Utf8, false),
        Field::new("epoch", DataType::Int64, false),
        Field::new("prediction", DataType::Utf8, true),
        Field::new("confidence", DataType::Float32, true),
        Field::new("stage", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
    ]
}

/// The `epoch` column: the same epoch for every row of a file.
fn epoch_column(len: usize, epoch: Epoch) -> ArrayRef {
    Arc::new(Int64Array::from(vec![epoch as i64; len]))
}

/// A column of `len` nulls of `data_type`.
fn nulls(data_type: &DataType, len: usize) -> ArrayRef {
    arrow::array::new_null_array(data_type, len)
}

/// A row's original side as the table's int32 (photos are far below 2^31 pixels a side).
fn side(pixels: u32) -> i32 {
    i32::try_from(pixels).unwrap_or(i32::MAX)
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
    let embedding = ListArray::new(
        embedding_item(),
        OffsetBuffer::from_lengths(rows.iter().map(|r| r.embedding.len())),
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
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| side(r.width)),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| side(r.height)),
        )),
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
        nulls(&DataType::Utf8, rows.len()),
        nulls(&DataType::Utf8, rows.len()),
    ];
    for name in columns {
        arrays.push(Arc::new(StringArray::from_iter(rows.iter().map(|r| {
            r.columns
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| v.as_deref())
        }))));
    }
    RecordBatch::try_new(table_schema(columns), arrays).expect("columns match the schema")
}

/// Encodes error records of `epoch`: rows of the same table with no embedding, their stage
/// and reason set, and nulls in the extra `columns` of a label pattern.
pub fn errors_batch(
    rows: &[Failure],
    model: &str,
    epoch: Epoch,
    columns: &[String],
) -> RecordBatch {
    let schema = table_schema(columns);
    let n = rows.len();
    let arrays: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|field| -> ArrayRef {
            match field.name().as_str() {
                "key" => Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.key.as_str()),
                )),
                "model" => Arc::new(StringArray::from_iter_values(rows.iter().map(|_| model))),
                "etag" => Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.etag.as_str()),
                )),
                "epoch" => epoch_column(n, epoch),
                "stage" => Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.stage.as_str()),
                )),
                "reason" => Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.reason.as_str()),
                )),
                _ => nulls(field.data_type(), n),
            }
        })
        .collect();
    RecordBatch::try_new(schema, arrays).expect("columns match the schema")
}

/// A file's Delta statistics, gathered as its records are written: readers prune files
/// by `key`, `label`, `epoch` and `stage` with them (`numRecords`, `minValues`,
/// `maxValues`, `nullCount`).
#[derive(Debug, Default)]
pub struct FileStats {
    records: u64,
    epoch: Option<(Epoch, Epoch)>,
    key: Option<(String, String)>,
    label: Option<(String, String)>,
    stage: Option<(String, String)>,
    null_labels: u64,
    null_stages: u64,
}

/// Widens `bounds` to take `value` in.
fn widen(bounds: &mut Option<(String, String)>, value: &str) {
    match bounds {
        None => *bounds = Some((value.to_string(), value.to_string())),
        Some((min, max)) => {
            if value < min.as_str() {
                *min = value.to_string();
            }
            if value > max.as_str() {
                *max = value.to_string();
            }
        }
    }
}

impl FileStats {
    /// Takes one record of `epoch` in: a row (`stage` None) or an error record.
    pub fn observe(&mut self, epoch: Epoch, key: &str, label: Option<&str>, stage: Option<Stage>) {
        self.records += 1;
        self.epoch = Some(match self.epoch {
            None => (epoch, epoch),
            Some((lo, hi)) => (lo.min(epoch), hi.max(epoch)),
        });
        widen(&mut self.key, key);
        match label {
            Some(l) => widen(&mut self.label, l),
            None => self.null_labels += 1,
        }
        match stage {
            Some(s) => widen(&mut self.stage, s.as_str()),
            None => self.null_stages += 1,
        }
    }

    /// The statistics as Delta's JSON. A file's records may span several epochs (a file
    /// that compaction merged).
    pub fn to_json(&self) -> String {
        let (mut min, mut max) = (serde_json::Map::new(), serde_json::Map::new());
        if let Some((lo, hi)) = self.epoch {
            min.insert("epoch".into(), lo.into());
            max.insert("epoch".into(), hi.into());
        }
        for (name, bounds) in [
            ("key", &self.key),
            ("label", &self.label),
            ("stage", &self.stage),
        ] {
            if let Some((lo, hi)) = bounds {
                min.insert(name.into(), lo.as_str().into());
                max.insert(name.into(), hi.as_str().into());
            }
        }
        serde_json::json!({
            "numRecords": self.records,
            "minValues": min,
            "maxValues": max,
            "nullCount": {
                "key": 0,
                "epoch": 0,
                "label": self.null_labels,
                "stage": self.null_stages,
                "reason": self.null_stages,
            },
        })
        .to_string()
    }
}

/// The key, version and label of a committed row, or the key, version and stage of an
/// error record.
#[derive(Clone, Debug)]
pub struct IndexEntry {
    /// The epoch that committed the record.
    pub epoch: Epoch,
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
        "int32" => column.data_type() == &DataType::Int32,
        "float32" => column.data_type() == &DataType::Float32,
        _ => matches!(column.data_type(), DataType::List(item)
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

fn int32s<'a>(
    batch: &'a RecordBatch,
    name: &'static str,
    file: &str,
) -> Result<&'a Int32Array, TableError> {
    Ok(column(batch, name, file, "int32")?.as_primitive::<Int32Type>())
}

fn stage_of(name: &str, file: &str) -> Result<Stage, TableError> {
    Stage::from_name(name).ok_or_else(|| TableError::UnknownStage {
        key: file.to_string(),
        name: name.to_string(),
    })
}

/// The stage of row `i`: `None` for an embedding, the failed stage for an error record.
fn stage_at(stages: &StringArray, i: usize, file: &str) -> Result<Option<Stage>, TableError> {
    match stages.is_null(i) {
        true => Ok(None),
        false => stage_of(stages.value(i), file).map(Some),
    }
}

/// Key, version and label (rows) or stage (error records) of every record of one committed
/// file: what a restart needs, without reading the embeddings.
pub async fn read_index(store: &dyn ObjectStore, key: &str) -> Result<Vec<IndexEntry>, TableError> {
    let columns = ["epoch", "key", "etag", "label", "stage"];
    let mut out = Vec::new();
    for batch in read_batches(store, key, Some(&columns)).await? {
        out.extend(index_of(&batch, key)?);
    }
    Ok(out)
}

/// Epoch, key, version and label (rows) or stage (error records) of every record of
/// `batch`, read from `file`.
pub fn index_of(batch: &RecordBatch, file: &str) -> Result<Vec<IndexEntry>, TableError> {
    let epochs = epochs_of(batch, file)?;
    let keys = strings(batch, "key", file)?;
    let etags = strings(batch, "etag", file)?;
    let labels = strings(batch, "label", file)?;
    let stages = strings(batch, "stage", file)?;
    let mut out = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let stage = stage_at(stages, i, file)?;
        let label = (stage.is_none() && !labels.is_null(i)).then(|| labels.value(i).to_string());
        out.push(IndexEntry {
            epoch: epochs.value(i) as Epoch,
            row: RowId {
                key: keys.value(i).to_string(),
                etag: etags.value(i).to_string(),
                label,
            },
            stage,
        });
    }
    Ok(out)
}

/// The int64 `epoch` column of `batch`, read from `file`.
pub fn epochs_of<'a>(batch: &'a RecordBatch, file: &str) -> Result<&'a Int64Array, TableError> {
    batch
        .column_by_name("epoch")
        .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int64Type>())
        .ok_or_else(|| TableError::Column {
            key: file.to_string(),
            column: "epoch",
            expected: "int64",
        })
}

/// `batches` as one Parquet file with the table's settings (a file rewritten without some
/// of its records), named `key` in errors.
pub fn parquet_bytes(batches: &[RecordBatch], key: &str) -> Result<Vec<u8>, TableError> {
    let bad = |source| TableError::Encode {
        key: key.to_string(),
        source,
    };
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut out, first.schema(), Some(writer_properties()))
            .map_err(bad)?;
    for batch in batches {
        writer.write(batch).map_err(bad)?;
    }
    writer.close().map_err(bad)?;
    Ok(out)
}

/// What one record batch of the table holds: embedding rows and error records, each with
/// its epoch.
#[derive(Debug, Default, PartialEq)]
pub struct Records {
    /// The embedding rows, in file order.
    pub rows: Vec<(Epoch, Embedded)>,
    /// The error records, in file order.
    pub errors: Vec<(Epoch, Failure)>,
}

/// The rows and error records of one record batch of the table, every column by name.
pub fn decode_records(batch: &RecordBatch, file: &str) -> Result<Records, TableError> {
    let key = strings(batch, "key", file)?;
    let etag = strings(batch, "etag", file)?;
    let label = strings(batch, "label", file)?;
    let stage = strings(batch, "stage", file)?;
    let reason = strings(batch, "reason", file)?;
    let width = int32s(batch, "width", file)?;
    let height = int32s(batch, "height", file)?;
    let epochs = epochs_of(batch, file)?;
    let embedding = column(batch, "embedding", file, "list<float32>")?.as_list::<i32>();
    let prediction = strings(batch, "prediction", file)?;
    let confidence = column(batch, "confidence", file, "float32")?.as_primitive::<Float32Type>();
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
    let text = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
    let mut out = Records::default();
    for i in 0..batch.num_rows() {
        let epoch = epochs.value(i) as Epoch;
        if let Some(stage) = stage_at(stage, i, file)? {
            out.errors.push((
                epoch,
                Failure {
                    key: key.value(i).to_string(),
                    etag: etag.value(i).to_string(),
                    stage,
                    reason: text(reason, i).unwrap_or_default(),
                },
            ));
            continue;
        }
        out.rows.push((
            epoch,
            Embedded {
                key: key.value(i).to_string(),
                etag: etag.value(i).to_string(),
                label: text(label, i),
                columns: extra
                    .iter()
                    .map(|(name, values)| (name.to_string(), text(values, i)))
                    .collect(),
                width: width.value(i).max(0) as u32,
                height: height.value(i).max(0) as u32,
                embedding: embedding
                    .value(i)
                    .as_primitive::<Float32Type>()
                    .values()
                    .to_vec(),
                prediction: text(prediction, i).map(|label| crate::record::Prediction {
                    label,
                    confidence: confidence.value(i),
                }),
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::FEATURE_DIM;
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
        let records = decode_records(&batches[0], "data/x.parquet").unwrap();
        assert_eq!(records.rows, vec![(3, row)]);
        assert!(records.errors.is_empty());
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
        let height = batch.schema().index_of("height").unwrap();
        let without_height: Vec<usize> =
            (0..batch.num_columns()).filter(|&i| i != height).collect();
        let without_height = batch.project(&without_height).unwrap();
        write(dir.path(), "data/a.parquet", &without_height);
        let store = LocalStore::open(dir.path(), false).unwrap();
        let batches = read_batches(&store, "data/a.parquet", None).await.unwrap();
        let err = decode_records(&batches[0], "data/a.parquet").unwrap_err();
        assert_eq!(
            err.to_string(),
            "data/a.parquet: no int32 column `height` (written by an older verger?)"
        );
        // The earlier layout's unsigned sides are refused the same way.
        let mut fields: Vec<arrow::datatypes::Field> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields[height] = arrow::datatypes::Field::new("height", DataType::UInt32, true);
        let mut columns = batch.columns().to_vec();
        columns[height] = Arc::new(arrow::array::UInt32Array::from(vec![1]));
        let unsigned = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        let err = decode_records(&unsigned, "data/u.parquet").unwrap_err();
        assert!(err.to_string().contains("int32 column `height`"), "{err}");
    }

    /// Error records share the table's schema: no embedding, their stage and reason set, and
    /// they decode back as error records, not rows.
    #[test]
    fn error_records_are_rows_of_the_same_table_with_no_embedding() {
        let failure = Failure {
            key: "k".into(),
            etag: "e".into(),
            stage: Stage::Decode,
            reason: "r".into(),
        };
        let columns = vec!["field".to_string()];
        let batch = errors_batch(std::slice::from_ref(&failure), "m", 4, &columns);
        assert_eq!(batch.schema(), table_schema(&columns));
        assert!(batch.column_by_name("embedding").unwrap().is_null(0));
        let records = decode_records(&batch, "errors/b.parquet").unwrap();
        assert_eq!(records.errors, vec![(4, failure)]);
        assert!(records.rows.is_empty());
    }
}
