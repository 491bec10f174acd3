//! verger: a bucket of images in, a labelled Parquet table of CNN embeddings out.
//!
//! The pipeline, one module per stage, wired in [`dataflow`]:
//!
//! ```text
//! storage (local dir | s3) -> source (list, epochs) -> fetch -> decode -> label -> embed -> sink (Parquet) -> commit (a Delta version per epoch)
//! ```

pub mod bench;
pub mod cluster;
pub mod commit;
pub mod dataflow;
pub mod decode;
pub mod demo;
pub mod embed;
pub mod error;
pub mod evaluate;
pub mod fetch;
pub mod head;
pub mod label;
pub mod metrics;
pub mod novelty;
pub mod operators;
pub mod panic;
pub mod record;
pub mod report;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod stats;
pub mod storage;
pub mod table;
