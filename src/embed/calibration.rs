//! int8 calibration: the range of every 1x1 layer's inputs over real images, measured once by
//! `verger model calibrate` and stored beside the weights as `<weights file>.int8.json`,
//! bound to the model and the weights' SHA-256 so that ranges of other weights are never used.

use super::kernels::{ActivationQuant, RangeObserver};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The activation ranges of one model's weights, in [`super::network::Network::pointwise_layers`]
/// order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The model name.
    pub model: String,
    /// SHA-256 of the weights the ranges were measured with.
    pub weights_sha256: String,
    /// Images the ranges were measured on.
    pub images: usize,
    /// `[min, max]` of each 1x1 layer's inputs.
    pub ranges: Vec<[f32; 2]>,
}

/// Why a calibration cannot be used or written.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// No file beside the weights.
    #[error(
        "no int8 calibration for {model} at {path}: run `verger model calibrate --model {model} --input DIR` first"
    )]
    Missing {
        /// The model.
        model: String,
        /// Where it was looked for.
        path: String,
    },
    /// The file is there but cannot be read or parsed.
    #[error("cannot read the int8 calibration {path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file was made for another model or other weights.
    #[error(
        "the int8 calibration {path} was made for {made_for} (weights {made_sha}), not {model} (weights {sha}): run `verger model calibrate` again"
    )]
    OtherWeights {
        /// The file.
        path: String,
        /// The model it was made for.
        made_for: String,
        /// The first digits of the weights it was made with.
        made_sha: String,
        /// The model loaded.
        model: String,
        /// The first digits of the weights loaded.
        sha: String,
    },
    /// The file holds another number of ranges than the network has 1x1 layers.
    #[error("the int8 calibration {path} has {found} layer ranges; {model} has {want} 1x1 layers")]
    Layers {
        /// The file.
        path: String,
        /// The model.
        model: String,
        /// Ranges in the file.
        found: usize,
        /// Layers of the network.
        want: usize,
    },
    /// Writing the file failed.
    #[error("cannot write the int8 calibration {path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A layer saw no finite input (no image was embedded).
    #[error("no image reached 1x1 layer {0}: nothing to calibrate on")]
    NoRange(usize),
}

/// The first 12 hex digits of a digest, for messages.
fn short(sha: &str) -> String {
    sha.chars().take(12).collect()
}

impl Calibration {
    /// Where the calibration of the weights at `weights` is kept: beside them.
    pub fn path_beside(weights: &Path) -> PathBuf {
        let mut name = weights.file_name().unwrap_or_default().to_os_string();
        name.push(".int8.json");
        weights.with_file_name(name)
    }

    /// The ranges the `observers` recorded (one per 1x1 layer, in order).
    pub fn from_observers(
        model: &str,
        weights_sha256: &str,
        images: usize,
        observers: &[Arc<RangeObserver>],
    ) -> Result<Self, CalibrationError> {
        let ranges = observers
            .iter()
            .enumerate()
            .map(|(i, o)| {
                o.range()
                    .map(|(lo, hi)| [lo, hi])
                    .ok_or(CalibrationError::NoRange(i))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            model: model.to_string(),
            weights_sha256: weights_sha256.to_string(),
            images,
            ranges,
        })
    }

    /// Reads the calibration at `path` and checks it was made for `model` with the weights of
    /// digest `sha256`, for a network of `layers` 1x1 layers.
    pub fn read(
        path: &Path,
        model: &str,
        sha256: &str,
        layers: usize,
    ) -> Result<Self, CalibrationError> {
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CalibrationError::Missing {
                    model: model.to_string(),
                    path: shown,
                })
            }
            Err(e) => {
                return Err(CalibrationError::Unreadable {
                    path: shown,
                    reason: e.to_string(),
                })
            }
            Ok(text) => text,
        };
        let calibration: Self =
            serde_json::from_str(&text).map_err(|e| CalibrationError::Unreadable {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        if calibration.model != model || calibration.weights_sha256 != sha256 {
            return Err(CalibrationError::OtherWeights {
                path: shown,
                made_for: calibration.model,
                made_sha: short(&calibration.weights_sha256),
                model: model.to_string(),
                sha: short(sha256),
            });
        }
        if calibration.ranges.len() != layers {
            return Err(CalibrationError::Layers {
                path: shown,
                model: model.to_string(),
                found: calibration.ranges.len(),
                want: layers,
            });
        }
        Ok(calibration)
    }

    /// Writes the calibration to `path` (through a temporary file renamed into place, so a
    /// reader never sees half a file).
    pub fn write(&self, path: &Path) -> Result<(), CalibrationError> {
        let failed = |e: std::io::Error| CalibrationError::Write {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let json = serde_json::to_string_pretty(self).expect("a calibration serialises");
        let mut tmp = path.as_os_str().to_os_string();
        tmp.push(".tmp");
        std::fs::write(&tmp, json + "\n").map_err(failed)?;
        std::fs::rename(&tmp, path).map_err(failed)
    }

    /// How each layer's inputs are quantised.
    pub fn quants(&self) -> Vec<ActivationQuant> {
        self.ranges
            .iter()
            .map(|&[lo, hi]| ActivationQuant::from_range(lo, hi))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Calibration {
        Calibration {
            model: "efficientnet-lite0".into(),
            weights_sha256: "ab".repeat(32),
            images: 3,
            ranges: vec![[-1.0, 2.0], [0.0, 6.0]],
        }
    }

    #[test]
    fn calibration_is_read_back_only_for_its_model_weights_and_layers() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("lite0.pth");
        let path = Calibration::path_beside(&weights);
        assert_eq!(path, dir.path().join("lite0.pth.int8.json"));
        let missing = Calibration::read(&path, "efficientnet-lite0", &"ab".repeat(32), 2);
        assert!(
            matches!(missing, Err(CalibrationError::Missing { .. })),
            "{missing:?}"
        );
        sample().write(&path).unwrap();
        let back = Calibration::read(&path, "efficientnet-lite0", &"ab".repeat(32), 2).unwrap();
        assert_eq!(back, sample());
        assert_eq!(back.quants()[1], ActivationQuant::from_range(0.0, 6.0));
        let other = Calibration::read(&path, "efficientnet-lite0", &"cd".repeat(32), 2)
            .unwrap_err()
            .to_string();
        assert!(
            other.contains("made for efficientnet-lite0 (weights abababababab)")
                && other.contains("(weights cdcdcdcdcdcd)"),
            "{other}"
        );
        let model = Calibration::read(&path, "efficientnet-lite1", &"ab".repeat(32), 2);
        assert!(matches!(model, Err(CalibrationError::OtherWeights { .. })));
        let layers = Calibration::read(&path, "efficientnet-lite0", &"ab".repeat(32), 3);
        assert!(matches!(
            layers,
            Err(CalibrationError::Layers {
                found: 2,
                want: 3,
                ..
            })
        ));
        std::fs::write(&path, "{").unwrap();
        let bad = Calibration::read(&path, "efficientnet-lite0", &"ab".repeat(32), 2);
        assert!(matches!(bad, Err(CalibrationError::Unreadable { .. })));
    }

    #[test]
    fn a_layer_that_saw_nothing_is_an_error() {
        let seen = Arc::new(RangeObserver::default());
        seen.record(&[1.0, -1.0]);
        let observers = [seen, Arc::new(RangeObserver::default())];
        let err = Calibration::from_observers("m", "s", 1, &observers).unwrap_err();
        assert!(matches!(err, CalibrationError::NoRange(1)));
    }
}
