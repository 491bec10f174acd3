//! What flows between the stages of the dataflow.

use serde::{Deserialize, Serialize};

/// Timely timestamp: the epoch a key was released in.
pub type Epoch = u64;

/// Width of an embedding row: channels of the network's head convolution.
pub const FEATURE_DIM: usize = 1280;

/// The stage at which an object failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Listing: found but not readable as an object (a folder that cannot be read, a name
    /// that is not UTF-8); recorded once per listed version, as decode errors are.
    List,
    /// Reading the object from the store (retried by the next run, or poll in watch mode).
    Fetch,
    /// Not read at all: larger than `--max-object-bytes` (not retried until it changes).
    Size,
    /// Decoding or resizing the picture.
    Decode,
    /// Running the network.
    Embed,
}

impl Stage {
    /// The stage named `name` in the errors table.
    pub fn from_name(name: &str) -> Option<Stage> {
        [
            Stage::List,
            Stage::Fetch,
            Stage::Size,
            Stage::Decode,
            Stage::Embed,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// Lower-case name, as written in the errors table.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::List => "list",
            Stage::Fetch => "fetch",
            Stage::Size => "size",
            Stage::Decode => "decode",
            Stage::Embed => "embed",
        }
    }
}

/// An object that could not be embedded, and why: one row of the errors table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The object's key.
    pub key: String,
    /// The version that failed (its ETag when listed).
    pub etag: String,
    /// Where it failed.
    pub stage: Stage,
    /// The reason, human-readable.
    pub reason: String,
}

/// An object read from the store, not yet decoded.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The object's key.
    pub key: String,
    /// The version read.
    pub etag: String,
    /// Its bytes.
    pub bytes: bytes::Bytes,
}

/// An image ready for the network: `side x side` RGB8, row-major, plus its original size.
#[derive(Clone, Debug)]
pub struct Pixels {
    /// Width of the original picture.
    pub width: u32,
    /// Height of the original picture.
    pub height: u32,
    /// `side * side * 3` bytes, RGB interleaved.
    pub rgb: Vec<u8>,
}

/// A decoded, resized and labelled picture waiting for the network.
#[derive(Clone, Debug)]
pub struct Labelled {
    /// The object's key.
    pub key: String,
    /// The version read.
    pub etag: String,
    /// The label under the run's rule (`None`: the key has none).
    pub label: Option<String>,
    /// Extra columns from the key (`--label-pattern`'s other named groups): name and value.
    pub columns: Vec<(String, Option<String>)>,
    /// Original size and the model's input pixels.
    pub pixels: Pixels,
}

/// One row of the embeddings table.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedded {
    /// The object's key.
    pub key: String,
    /// The version embedded; a later row of the same key with another ETag supersedes it.
    pub etag: String,
    /// The label under the run's rule (`None`: the key has none).
    pub label: Option<String>,
    /// Extra columns from the key (`--label-pattern`'s other named groups): name and value.
    pub columns: Vec<(String, Option<String>)>,
    /// Original width.
    pub width: u32,
    /// Original height.
    pub height: u32,
    /// The feature vector.
    pub embedding: Vec<f32>,
    /// The head's prediction (`verger run --head`), `None` without a head.
    pub prediction: Option<Prediction>,
}

/// A classifier head's prediction for one row: the most probable label and its probability.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The label.
    pub label: String,
    /// Its probability (softmax of the head's logits).
    pub confidence: f32,
}

/// An object that left the pipeline before it was embedded.
#[derive(Clone, Debug, PartialEq)]
pub enum Miss {
    /// It failed: an error record is written.
    Failed(Failure),
    /// It was deleted or replaced after it was listed: not an error and no record; a
    /// replaced object's new version is picked up by the next listing.
    Vanished {
        /// The object's key.
        key: String,
        /// Deleted or changed.
        reason: String,
    },
}

/// The outcome for one object: a row, an error record, or nothing because it vanished.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Embedded.
    Row(Embedded),
    /// Failed, with the reason.
    Failed(Failure),
    /// Deleted or replaced since listed: no record (the fetch stage logged it and counted it
    /// in `vanished`).
    Vanished,
}

impl From<Miss> for Outcome {
    fn from(miss: Miss) -> Self {
        match miss {
            Miss::Failed(f) => Outcome::Failed(f),
            Miss::Vanished { .. } => Outcome::Vanished,
        }
    }
}

/// A committed embedding row, as far as the incremental state cares: which version of which
/// key, under which label.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RowId {
    /// The object's key.
    pub key: String,
    /// Its version.
    pub etag: String,
    /// Its label.
    pub label: Option<String>,
}

/// What kind of table a committed file belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// Embeddings.
    Data,
    /// Error records.
    Errors,
}

/// A Parquet file now in the output store under its final key, waiting for its epoch's commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenFile {
    /// Key in the output store.
    pub key: String,
    /// Which table.
    pub kind: FileKind,
    /// Rows in the file.
    pub rows: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// Its Delta statistics (JSON: record count, bounds of key, label, epoch and stage).
    pub stats: String,
}

/// A file published to the output store, with its records' keys and versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The file, as its epoch's commit adds it to the table.
    pub file: WrittenFile,
    /// Every record's key and version (a row's with its label).
    pub rows: Vec<RowId>,
    /// Of an errors file, the versions whose read failed (stage `fetch`).
    pub failed_reads: Vec<RowId>,
}

/// A worker's word that it could not finish its part of an epoch, sent on to the committing
/// worker (maybe in another process) so that the epoch is not committed without its files.
/// The typed cause is in the failing worker's own process ([`crate::error::Fatal`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerFailed {
    /// The worker's global index.
    pub worker: usize,
    /// Its error with causes, as one line.
    pub reason: String,
}
