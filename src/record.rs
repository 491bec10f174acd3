//! What flows between the stages of the dataflow.

use serde::{Deserialize, Serialize};

/// Timely timestamp: the epoch a key was released in.
pub type Epoch = u64;

/// The stage at which an object failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Reading the object from the store.
    Fetch,
    /// Decoding or resizing the picture.
    Decode,
    /// Running the network.
    Embed,
}

impl Stage {
    /// Lower-case name, as written in the errors table.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
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
    /// Its bytes.
    pub bytes: bytes::Bytes,
}

/// A decoded, resized and labelled picture waiting for the network.
#[derive(Clone, Debug)]
pub struct Labelled {
    /// The object's key.
    pub key: String,
    /// Parent folder name (`None` at the root).
    pub label: Option<String>,
    /// Original size and the model's input pixels.
    pub pixels: crate::decode::Pixels,
}

/// One row of the embeddings table.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedded {
    /// The object's key.
    pub key: String,
    /// Parent folder name (`None` at the root).
    pub label: Option<String>,
    /// Original width.
    pub width: u32,
    /// Original height.
    pub height: u32,
    /// The feature vector.
    pub embedding: Vec<f32>,
}

/// The outcome for one object: a row, or an error record.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Embedded.
    Row(Embedded),
    /// Failed, with the reason.
    Failed(Failure),
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
}
