//! Weight import: a PyTorch checkpoint read by burn-store into the Burn module, with the
//! checkpoint's tensor names mapped onto the module's (per [`Architecture`]), every shape
//! checked, and the BatchNorms folded afterwards (inference only).

use super::network::Network;
use super::Architecture;
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
    /// The descriptor's architecture has features of another width than verger's rows hold.
    #[error(
        "{model} gives {width}-d features; verger's rows hold {}",
        crate::record::FEATURE_DIM
    )]
    FeatureWidth {
        /// The model.
        model: String,
        /// Its head's channels.
        width: usize,
    },
    /// `--precision int8` without a usable calibration.
    #[error(transparent)]
    Calibration(#[from] super::calibration::CalibrationError),
    /// `--precision int8` on a backend without verger's kernels.
    #[error("--precision int8 runs on verger's fused kernels: use --backend flex (or ndarray), not {backend}")]
    Int8Backend {
        /// The backend asked for.
        backend: String,
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

/// How torchvision's MobileNetV2 state-dict names map onto the module's fields, for the blocks
/// of `model`: `features.0.{0,1}` is the stem's convolution and norm, `features.{b+1}.conv.*`
/// block `b` (`conv.0` the expansion and `conv.1` the depthwise layer, each a convolution `.0`
/// and a norm `.1`, then `conv.2`/`conv.3` the projection's convolution and norm; a block
/// without expansion starts at the depthwise layer), `features.{n+1}.{0,1}` the head,
/// `classifier.1` the ImageNet classifier (`classifier.0` is its dropout).
fn torchvision_names(model: &Network) -> Vec<(String, String)> {
    let mut names = vec![
        (r"^features\.0\.0\.".into(), "stem.conv.".into()),
        (r"^features\.0\.1\.".into(), "stem.norm.".into()),
    ];
    for (b, block) in model.blocks.iter().enumerate() {
        let layers = match block.expand {
            Some(_) => vec![
                ("0.0", "expand.conv"),
                ("0.1", "expand.norm"),
                ("1.0", "depthwise.conv"),
                ("1.1", "depthwise.norm"),
                ("2", "project.conv"),
                ("3", "project.norm"),
            ],
            None => vec![
                ("0.0", "depthwise.conv"),
                ("0.1", "depthwise.norm"),
                ("1", "project.conv"),
                ("2", "project.norm"),
            ],
        };
        for (from, to) in layers {
            let from = from.replace('.', r"\.");
            names.push((
                format!(r"^features\.{}\.conv\.{from}\.", b + 1),
                format!("blocks.{b}.{to}."),
            ));
        }
    }
    let head = model.blocks.len() + 1;
    names.push((format!(r"^features\.{head}\.0\."), "head.conv.".into()));
    names.push((format!(r"^features\.{head}\.1\."), "head.norm.".into()));
    names.push((r"^classifier\.1\.".into(), "classifier.".into()));
    names
}

/// Loads `path`, a checkpoint in `architecture`'s layout, into `model` (from
/// [`NetworkConfig::init`](super::network::NetworkConfig::init)) and folds its BatchNorms. Every
/// tensor of the network must be in the checkpoint with its shape; the first missing or
/// mismatching one, in the network's order, is named in the error. The ImageNet classifier is
/// optional: a checkpoint without one (a feature extractor), or with another number of classes
/// (fine-tuned), loads without it.
pub fn load_checkpoint(
    mut model: Network,
    architecture: Architecture,
    path: &Path,
) -> Result<Network, WeightsError> {
    let names: Vec<(String, String)> = match architecture {
        Architecture::EfficientnetLite => LUKEMELAS_NAMES
            .iter()
            .map(|(from, to)| (from.to_string(), to.to_string()))
            .collect(),
        Architecture::MobilenetV2 => torchvision_names(&model),
    };
    let mut store = names.iter().fold(
        PytorchStore::from_file(path)
            .allow_partial(true)
            .validate(false),
        |store, (from, to)| store.with_key_remapping(from, to.clone()),
    );
    let result = model
        .load_from(&mut store)
        .map_err(|e| WeightsError::Unreadable {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    let in_classifier = |name: &str| name.starts_with("classifier.");
    let mut classifier_unfit = false;
    for error in &result.errors {
        let error = mismatch(error);
        match &error {
            WeightsError::Mismatch { name, .. } if in_classifier(name) => classifier_unfit = true,
            _ => return Err(error),
        }
    }
    // burn-store lists the missing tensors by name; report them in the network's order.
    let order: std::collections::HashMap<String, usize> = model
        .collect(None, None, false)
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t.name, i))
        .collect();
    let mut missing: Vec<&String> = result.missing.iter().map(|(name, _)| name).collect();
    missing.sort_by_key(|name| order.get(*name).copied().unwrap_or(usize::MAX));
    for name in missing {
        match in_classifier(name) {
            true => classifier_unfit = true,
            false => return Err(WeightsError::Missing(name.clone())),
        }
    }
    if classifier_unfit {
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
