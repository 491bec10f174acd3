//! The classifier head: the second half of transfer learning. A small Burn module trained on
//! committed embeddings ([`train`]), scored on a test split ([`metrics`]), saved as a directory
//! ([`SavedHead`]) and applied in the embed stage of `verger run --head`, so every row also
//! gets a prediction.
//!
//! A head directory holds `head.bpk` (the module's Burn record), `head.json` (its shape and the
//! model and weights it was trained on), `labels.json` (labels in output order) and, after
//! `verger train`, `metrics.json`.

pub mod metrics;
pub mod model;
pub mod train;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

pub use crate::record::Prediction;
pub use metrics::{ClassMetrics, Metrics};
pub use model::{Head, HeadShape};
pub use train::{train, Example, TrainConfig, Trained};

/// Why a head cannot be trained, saved, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// A classifier needs two labels.
    #[error(
        "a head needs training rows of two labels at least; found {labels} label(s) in {rows} rows"
    )]
    TooFewLabels {
        /// Distinct labels found.
        labels: usize,
        /// Rows found.
        rows: usize,
    },
    /// Rows of several widths.
    #[error("row {key} has {width} features, the others {expected}")]
    Width {
        /// The odd row.
        key: String,
        /// Its width.
        width: usize,
        /// The first row's.
        expected: usize,
    },
    /// A file of the head directory cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A JSON file of the head directory does not parse.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The Burn record does not load into the head `head.json` describes.
    #[error("{}: {reason}", path.display())]
    Record {
        /// The record file.
        path: PathBuf,
        /// Burn's reason.
        reason: String,
    },
    /// `labels.json` and the record disagree.
    #[error("{}: {labels} labels for a head of {classes} outputs", path.display())]
    Labels {
        /// The head directory.
        path: PathBuf,
        /// Labels listed.
        labels: usize,
        /// Outputs of the record.
        classes: usize,
    },
    /// The head reads features of another model or other weights than the run computes.
    #[error("the head in {} was trained on features of {head_model} (weights {}), this run computes {model} (weights {}): train a head on this model's output", path.display(), short(head_sha256), short(sha256))]
    OtherModel {
        /// The head directory.
        path: PathBuf,
        /// Model the head was trained on.
        head_model: String,
        /// Its weights' SHA-256.
        head_sha256: String,
        /// Model of the run.
        model: String,
        /// Its weights' SHA-256.
        sha256: String,
    },
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// What `head.json` records: the shape to rebuild and the features the head reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadInfo {
    /// The module's shape.
    pub shape: HeadShape,
    /// Model whose features it was trained on.
    pub model: String,
    /// SHA-256 of that model's weights.
    pub weights_sha256: String,
    /// How it was trained.
    pub config: TrainConfig,
    /// Rows it learnt from and validated on.
    pub rows: (usize, usize),
    /// The epoch kept.
    pub best_epoch: usize,
}

/// A head with its labels and provenance, as saved in a directory.
#[derive(Debug)]
pub struct SavedHead {
    /// The module, on the plain CPU device.
    pub head: Head,
    /// Labels in output order.
    pub labels: Vec<String>,
    /// Shape and provenance.
    pub info: HeadInfo,
    /// Where it was loaded from.
    pub dir: PathBuf,
}

const RECORD: &str = "head.bpk";
const INFO: &str = "head.json";
const LABELS: &str = "labels.json";
/// Name of the metrics file `verger train` writes beside the head.
pub const METRICS: &str = "metrics.json";

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), HeadError> {
    let bytes = serde_json::to_vec_pretty(value).expect("serialisable");
    std::fs::write(path, bytes).map_err(|source| HeadError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, HeadError> {
    let bytes = std::fs::read(path).map_err(|source| HeadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| HeadError::Json {
        path: path.to_path_buf(),
        source,
    })
}

impl SavedHead {
    /// Writes the head into `dir` (created if missing): record, info, labels, and `metrics`.
    pub fn save(
        dir: &Path,
        head: &Head,
        labels: &[String],
        info: &HeadInfo,
        metrics: Option<&Metrics>,
    ) -> Result<(), HeadError> {
        std::fs::create_dir_all(dir).map_err(|source| HeadError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let record = dir.join(RECORD);
        head.clone()
            .save_file(&record)
            .map_err(|e| HeadError::Record {
                path: record.clone(),
                reason: e.to_string(),
            })?;
        write_json(&dir.join(LABELS), &labels)?;
        write_json(&dir.join(INFO), info)?;
        if let Some(metrics) = metrics {
            write_json(&dir.join(METRICS), metrics)?;
        }
        Ok(())
    }

    /// Loads the head saved in `dir` onto the plain CPU device.
    pub fn load(dir: &Path) -> Result<Self, HeadError> {
        let info: HeadInfo = read_json(&dir.join(INFO))?;
        let labels: Vec<String> = read_json(&dir.join(LABELS))?;
        if labels.len() != info.shape.classes {
            return Err(HeadError::Labels {
                path: dir.to_path_buf(),
                labels: labels.len(),
                classes: info.shape.classes,
            });
        }
        let width = info.shape.features;
        let record = dir.join(RECORD);
        let head = info
            .shape
            .init(&vec![0.0; width], &vec![1.0; width], &Device::flex())
            .try_load_file(&record)
            .map_err(|e| HeadError::Record {
                path: record.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            head,
            labels,
            info,
            dir: dir.to_path_buf(),
        })
    }

    /// Refuses a head trained on another model's features than `model` with `sha256`.
    pub fn check_model(&self, model: &str, sha256: &str) -> Result<(), HeadError> {
        if self.info.model == model && self.info.weights_sha256 == sha256 {
            return Ok(());
        }
        Err(HeadError::OtherModel {
            path: self.dir.clone(),
            head_model: self.info.model.clone(),
            head_sha256: self.info.weights_sha256.clone(),
            model: model.to_string(),
            sha256: sha256.to_string(),
        })
    }

    /// The prediction of every embedding.
    pub fn predict(&self, rows: &[&[f32]]) -> Vec<Prediction> {
        self.head
            .probabilities(rows)
            .into_iter()
            .map(|p| {
                let (best, confidence) = p.iter().enumerate().fold(
                    (0, f32::MIN),
                    |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
                );
                Prediction {
                    label: self.labels[best].clone(),
                    confidence,
                }
            })
            .collect()
    }
}
