//! Weight import: a PyTorch checkpoint read by burn-store into the Burn module, with the
//! checkpoint's tensor names mapped onto the module's, every shape checked, and the BatchNorms
//! folded afterwards (inference only).

use super::efficientnet::EfficientNet;
use burn::store::{ApplyError, ModuleSnapshot, PytorchStore};
use std::path::Path;

/// Why the weights could not be loaded into the network.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file is not a PyTorch checkpoint burn-store can read.
    #[error("cannot read PyTorch checkpoint {path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// The reader's message.
        reason: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("tensor `{0}` missing from the checkpoint")]
    Missing(String),
    /// A tensor has another shape (or type) than the architecture expects.
    #[error("tensor `{name}` does not fit the architecture: {reason}")]
    Mismatch {
        /// The module's name of the tensor.
        name: String,
        /// Expected and found shape or type.
        reason: String,
    },
}

/// How the lukemelas-style names of the EfficientNet-Lite checkpoints (`_conv_stem`, `_bn0`,
/// `_blocks.N._expand_conv`, `_blocks.N._bn{0,1,2}`, `_conv_head`, `_bn1`, `_fc`) map onto the
/// module's fields. burn-store's PyTorch adapter renames BatchNorm `weight`/`bias` to
/// `gamma`/`beta` and transposes the linear layer.
const LUKEMELAS_NAMES: [(&str, &str); 11] = [
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.norm."),
    (r"^_blocks\.(\d+)\._expand_conv\.", "blocks.$1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", "blocks.$1.expand.norm."),
    (
        r"^_blocks\.(\d+)\._depthwise_conv\.",
        "blocks.$1.depthwise.conv.",
    ),
    (r"^_blocks\.(\d+)\._bn1\.", "blocks.$1.depthwise.norm."),
    (
        r"^_blocks\.(\d+)\._project_conv\.",
        "blocks.$1.project.conv.",
    ),
    (r"^_blocks\.(\d+)\._bn2\.", "blocks.$1.project.norm."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.norm."),
    (r"^_fc\.", "classifier."),
];

/// Loads `path` into `model` (from [`EfficientNetConfig::init`](super::efficientnet::EfficientNetConfig::init))
/// and folds its BatchNorms. Every tensor of the architecture must be in the checkpoint with its
/// shape, except the classifier: a checkpoint without one (a feature extractor) loads without
/// it. The first mismatching or missing tensor is named in the error.
pub fn load_checkpoint(mut model: EfficientNet, path: &Path) -> Result<EfficientNet, WeightsError> {
    let mut store = LUKEMELAS_NAMES.iter().fold(
        PytorchStore::from_file(path)
            .allow_partial(true)
            .validate(false),
        |store, (from, to)| store.with_key_remapping(*from, *to),
    );
    let result = model
        .load_from(&mut store)
        .map_err(|e| WeightsError::Unreadable {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if let Some(error) = result.errors.first() {
        return Err(mismatch(error));
    }
    let classifier_missing = result
        .missing
        .iter()
        .any(|(name, _)| name.starts_with("classifier."));
    if let Some((name, _)) = result
        .missing
        .iter()
        .find(|(name, _)| !name.starts_with("classifier."))
    {
        return Err(WeightsError::Missing(name.clone()));
    }
    if classifier_missing {
        model.classifier = None;
    }
    Ok(model.fold_batch_norms())
}

fn mismatch(error: &ApplyError) -> WeightsError {
    let (name, reason) = match error {
        ApplyError::ShapeMismatch {
            path,
            expected,
            found,
        } => (
            path,
            format!(
                "shape {:?}, expected {:?}",
                found.as_slice(),
                expected.as_slice()
            ),
        ),
        ApplyError::DTypeMismatch {
            path,
            expected,
            found,
        } => (path, format!("type {found:?}, expected {expected:?}")),
        ApplyError::AdapterError { path, message } | ApplyError::LoadError { path, message } => {
            (path, message.clone())
        }
    };
    WeightsError::Mismatch {
        name: name.clone(),
        reason,
    }
}
