//! The inverted-residual network family as Burn modules: the one definition of every network
//! verger runs (EfficientNet-Lite0/1/2 and MobileNetV2).
//!
//! [`NetworkConfig`] holds the stage table; [`NetworkConfig::init`] builds the modules on a
//! device, [`super::import`] loads a PyTorch checkpoint into them and folds every BatchNorm into
//! its convolution. Both families are a stem, inverted-residual blocks (1x1 expansion, depthwise,
//! linear 1x1 projection, shortcut), a 1x1 head and a global average pool, with ReLU6 and no
//! squeeze-excitation. They differ in the stage table, the BatchNorm epsilon and the padding:
//! the Lite weights were trained with TensorFlow "SAME" (burn-nn's `PaddingConfig2d::Same`:
//! asymmetric on stride 2, the odd pixel at the bottom/right), torchvision's MobileNetV2 with
//! `(k - 1) / 2` on every side ([`PaddingStyle`]).
//!
//! [`Network::features`] is the forward pass. Each layer runs through verger's fused
//! kernels ([`super::extension`]) when the module was prepared for them
//! ([`Network::with_kernels`]) and its input lives on a backend that has them (Flex,
//! NdArray); everywhere else, and always when not prepared, through Burn's own operations
//! (`conv2d` with groups, explicit padding, `clamp`, `mean_dim`). Both paths compute the same
//! function, and the tests hold both to PyTorch's features.

use super::extension;
use super::kernels::{
    self, ActivationQuant, DepthwiseWeights, Padding, Pointwise, RangeObserver, StemWeights,
};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One stage of inverted-residual blocks: the first block has `stride` and goes from `input`
/// to `output` channels, the `repeats - 1` others keep `output` channels at stride 1.
#[derive(Config, Debug, PartialEq)]
pub struct StageConfig {
    /// Blocks in the stage.
    pub repeats: usize,
    /// Depthwise kernel side.
    pub kernel: usize,
    /// Stride of the stage's first block.
    pub stride: usize,
    /// Expanded channels per input channel (1: no expansion convolution).
    pub expand_ratio: usize,
    /// Input channels of the stage.
    pub input: usize,
    /// Output channels of every block of the stage.
    pub output: usize,
}

/// How every convolution of a network pads its input: what its weights were trained with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaddingStyle {
    /// TensorFlow "SAME": `ceil(size / stride)` outputs, the odd pixel at the bottom/right
    /// (EfficientNet-Lite).
    TfSame,
    /// `(kernel - 1) / 2` on every side (torchvision's MobileNetV2).
    Symmetric,
}

impl PaddingStyle {
    fn config(self, kernel: usize) -> PaddingConfig2d {
        let p = (kernel - 1) / 2;
        match self {
            PaddingStyle::TfSame => PaddingConfig2d::Same,
            PaddingStyle::Symmetric => PaddingConfig2d::Explicit(p, p, p, p),
        }
    }
}

/// The architecture: stem, stage table, head and classifier sizes, padding.
#[derive(Config, Debug)]
pub struct NetworkConfig {
    /// Channels of the stem convolution (3x3, stride 2).
    pub stem_channels: usize,
    /// The stage table.
    pub stages: Vec<StageConfig>,
    /// Channels of the head convolution: the width of the features.
    pub head_channels: usize,
    /// ImageNet classes of the classifier kept beside the features.
    #[config(default = 1000)]
    pub num_classes: usize,
    /// BatchNorm epsilon used in training.
    #[config(default = 1e-3)]
    pub batch_norm_eps: f64,
    /// Padding of every convolution.
    #[config(default = "PaddingStyle::TfSame")]
    pub padding: PaddingStyle,
}

/// `channels` times `width`, rounded to the nearest multiple of 8 and never below 90% of the
/// scaled value (TensorFlow's `round_filters`, torchvision's `_make_divisible`).
fn round_channels(channels: usize, width: f64) -> usize {
    if width == 1.0 {
        return channels;
    }
    let scaled = channels as f64 * width;
    let rounded = (((scaled + 4.0) as usize) / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * scaled {
        rounded + 8
    } else {
        rounded
    }
}

impl NetworkConfig {
    /// EfficientNet-Lite0: `r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, r2_k5_s22_e6_i24_o40,
    /// r3_k3_s22_e6_i40_o80, r3_k5_s11_e6_i80_o112, r4_k5_s22_e6_i112_o192,
    /// r1_k3_s11_e6_i192_o320`, stem 32, head 1280.
    pub fn lite0() -> Self {
        Self::lite(1.0, 1.0)
    }

    /// The EfficientNet-Lite family member with width multiplier `width` and depth multiplier
    /// `depth` (Lite1: 1.0, 1.1; Lite2: 1.1, 1.2), scaled as TensorFlow's Lite builder does:
    /// every block's channels times `width`, rounded to a multiple of 8 (never below 90% of
    /// the scaled value); every stage's repeats times `depth`, rounded up. The stem (32) and
    /// head (1280) are not scaled, nor are the first stage's input and the first and last
    /// stages' repeats.
    pub fn lite(width: f64, depth: f64) -> Self {
        let channels = |c: usize| round_channels(c, width);
        let base = Self::lite_base();
        let last = base.stages.len() - 1;
        let stages = base
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| StageConfig {
                repeats: match i == 0 || i == last {
                    true => s.repeats,
                    false => (s.repeats as f64 * depth).ceil() as usize,
                },
                input: if i == 0 { s.input } else { channels(s.input) },
                output: channels(s.output),
                ..s.clone()
            })
            .collect();
        Self::new(base.stem_channels, stages, base.head_channels)
    }

    /// torchvision's MobileNetV2 with width multiplier `width` (1.0: the ImageNet model):
    /// stem 32, the stage table `t1_c16_n1_s1, t6_c24_n2_s2, t6_c32_n3_s2, t6_c64_n4_s2,
    /// t6_c96_n3_s1, t6_c160_n3_s2, t6_c320_n1_s1` (all depthwise kernels 3x3), head 1280;
    /// every channel count times `width` rounded as [`round_channels`] does, the head only
    /// widened (never below 1280); BatchNorm epsilon 1e-5, symmetric padding.
    pub fn mobilenet_v2(width: f64) -> Self {
        let channels = |c: usize| round_channels(c, width);
        let mut input = channels(32);
        let stages = [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ]
        .into_iter()
        .map(|(expand_ratio, output, repeats, stride)| {
            let stage = StageConfig {
                repeats,
                kernel: 3,
                stride,
                expand_ratio,
                input,
                output: channels(output),
            };
            input = stage.output;
            stage
        })
        .collect();
        Self::new(channels(32), stages, round_channels(1280, width.max(1.0)))
            .with_batch_norm_eps(1e-5)
            .with_padding(PaddingStyle::Symmetric)
    }

    fn lite_base() -> Self {
        let stage = |repeats, kernel, stride, expand_ratio, input, output| StageConfig {
            repeats,
            kernel,
            stride,
            expand_ratio,
            input,
            output,
        };
        Self::new(
            32,
            vec![
                stage(1, 3, 1, 1, 32, 16),
                stage(2, 3, 2, 6, 16, 24),
                stage(2, 5, 2, 6, 24, 40),
                stage(3, 3, 2, 6, 40, 80),
                stage(3, 5, 1, 6, 80, 112),
                stage(4, 5, 2, 6, 112, 192),
                stage(1, 3, 1, 6, 192, 320),
            ],
            1280,
        )
    }

    /// The network on `device`, with freshly initialised (untrained) parameters and one
    /// BatchNorm after every convolution: the shape a checkpoint is loaded into.
    pub fn init(&self, device: &Device) -> Network {
        let (eps, padding) = (self.batch_norm_eps, self.padding);
        let mut blocks = Vec::new();
        for stage in &self.stages {
            for r in 0..stage.repeats {
                let (c_in, stride) = match r {
                    0 => (stage.input, stage.stride),
                    _ => (stage.output, 1),
                };
                let hidden = c_in * stage.expand_ratio;
                let conv = |c_in, c_out, kernel, stride, groups, relu6| {
                    let layer = Layer {
                        kernel,
                        stride,
                        groups,
                        relu6,
                    };
                    ConvNorm::init([c_in, c_out], layer, padding, eps, device)
                };
                blocks.push(InvertedResidual {
                    expand: (stage.expand_ratio != 1).then(|| conv(c_in, hidden, 1, 1, 1, true)),
                    depthwise: conv(hidden, hidden, stage.kernel, stride, hidden, true),
                    project: conv(hidden, stage.output, 1, 1, 1, false),
                    residual: stride == 1 && c_in == stage.output,
                    kernel: None,
                });
            }
        }
        let last = self.stages.last().map_or(self.stem_channels, |s| s.output);
        Network {
            stem: ConvNorm::init([3, self.stem_channels], Layer::STEM, padding, eps, device),
            blocks,
            head: ConvNorm::init(
                [last, self.head_channels],
                Layer::HEAD,
                padding,
                eps,
                device,
            ),
            classifier: Some(LinearConfig::new(self.head_channels, self.num_classes).init(device)),
            stem_kernel: None,
            head_kernel: None,
        }
    }
}

/// What one convolution computes, besides its channels.
#[derive(Clone, Copy, Debug)]
struct Layer {
    kernel: usize,
    stride: usize,
    groups: usize,
    relu6: bool,
}

impl Layer {
    /// The 3x3 stride-2 stem (ReLU6).
    const STEM: Self = Self {
        kernel: 3,
        stride: 2,
        groups: 1,
        relu6: true,
    };
    /// The 1x1 head (ReLU6).
    const HEAD: Self = Self {
        kernel: 1,
        stride: 1,
        groups: 1,
        relu6: true,
    };
}

/// A convolution, the BatchNorm after it (until folded into it), and ReLU6 or nothing.
#[derive(Module, Debug)]
pub struct ConvNorm {
    /// The convolution (the network's padding; bias once the norm is folded in).
    pub conv: Conv2d,
    /// The BatchNorm, `None` once folded.
    pub norm: Option<BatchNorm>,
    /// Whether ReLU6 follows.
    pub relu6: bool,
}

impl ConvNorm {
    fn init(
        channels: [usize; 2],
        layer: Layer,
        padding: PaddingStyle,
        eps: f64,
        device: &Device,
    ) -> Self {
        let conv = Conv2dConfig::new(channels, [layer.kernel; 2])
            .with_stride([layer.stride; 2])
            .with_groups(layer.groups)
            .with_padding(padding.config(layer.kernel))
            .with_bias(false)
            .init(device);
        let norm = BatchNormConfig::new(channels[1])
            .with_epsilon(eps)
            .init(device);
        Self {
            conv,
            norm: Some(norm),
            relu6: layer.relu6,
        }
    }

    /// Burn's operations: convolution, BatchNorm if not folded, ReLU6 if any.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.conv.forward(x);
        let x = match &self.norm {
            Some(norm) => norm.forward(x),
            None => x,
        };
        match self.relu6 {
            true => x.clamp(0.0, 6.0),
            false => x,
        }
    }

    /// The BatchNorm (inference statistics) folded into the convolution:
    /// `w' = w * g / sqrt(v + eps)`, `b' = beta + (b - mean) * g / sqrt(v + eps)`, so the layer
    /// is one convolution with bias.
    pub fn fold(self) -> Self {
        let Some(norm) = self.norm else {
            return self;
        };
        let mut conv = self.conv;
        let scale = norm.gamma.val() / (norm.running_var.value() + norm.epsilon).sqrt();
        let out = scale.dims()[0];
        let weight = conv.weight.val() * scale.clone().reshape([out, 1, 1, 1]);
        let mean = norm.running_mean.value();
        let shifted = match &conv.bias {
            Some(b) => b.val() - mean,
            None => -mean,
        };
        conv.weight = Param::from_tensor(weight);
        conv.bias = Some(Param::from_tensor(norm.beta.val() + shifted * scale));
        Self {
            conv,
            norm: None,
            relu6: self.relu6,
        }
    }

    /// Kernel-side padding of this convolution: TensorFlow "SAME", or `(k - 1) / 2` on every
    /// side. Any other padding has no kernel: packing such a layer is a bug, not a fallback.
    fn padding(&self) -> Padding {
        let (_, _, k) = self.dims();
        let p = (k - 1) / 2;
        match self.conv.padding {
            PaddingConfig2d::Same => Padding::Same,
            PaddingConfig2d::Explicit(t, l, b, r) if [t, l, b, r] == [p; 4] => Padding::Symmetric,
            ref other => panic!("the fused kernels have no {other:?} padding for a {k}x{k} kernel"),
        }
    }

    /// The folded weight (OIHW) and bias, read back to host memory for packing.
    fn host_weights(&self) -> (Vec<f32>, Vec<f32>) {
        assert!(self.norm.is_none(), "kernels are packed from folded layers");
        let values = |t: Tensor<1>| {
            t.into_data()
                .try_to_vec::<f32>()
                .expect("float32 parameters")
        };
        let weight = self.conv.weight.val().flatten::<1>(0, 3);
        let bias = self.conv.bias.as_ref().expect("a folded layer has a bias");
        (values(weight), values(bias.val()))
    }

    /// Output and input channels (per group) and kernel side.
    fn dims(&self) -> (usize, usize, usize) {
        let [o, i, k, _] = self.conv.weight.dims();
        (o, i, k)
    }

    /// As a packed 1x1 convolution, the `index`-th of the network's, in the precision
    /// `packing` asks for.
    fn pointwise(&self, packing: &PointwisePacking<'_>, index: usize) -> Pointwise {
        let (o, i, k) = self.dims();
        assert_eq!(k, 1, "a pointwise layer has a 1x1 kernel");
        let (w, b) = self.host_weights();
        match packing {
            PointwisePacking::F32 => Pointwise::from_out_in(&w, &b, o, i),
            PointwisePacking::Observed(observers) => {
                Pointwise::from_out_in(&w, &b, o, i).observed(Arc::clone(&observers[index]))
            }
            PointwisePacking::Int8(quants) => Pointwise::int8(&w, &b, o, i, quants[index]),
        }
    }
}

/// Inverted-residual block: optional 1x1 expansion (ReLU6), depthwise kxk (ReLU6), linear 1x1
/// projection, plus the block input when stride is 1 and channels match.
#[derive(Module, Debug)]
pub struct InvertedResidual {
    /// 1x1 expansion, absent when the expand ratio is 1.
    pub expand: Option<ConvNorm>,
    /// Depthwise convolution (groups = channels).
    pub depthwise: ConvNorm,
    /// 1x1 projection, no activation.
    pub project: ConvNorm,
    /// Whether the block input is added to its output.
    pub residual: bool,
    /// The block packed for the fused kernels, when prepared.
    #[module(skip)]
    kernel: Option<Arc<kernels::InvertedResidual>>,
}

impl InvertedResidual {
    /// The block: fused when prepared and `x` is on a backend with the kernels, else Burn's
    /// operations layer by layer.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        if let Some(kernel) = self.kernel.as_ref().filter(|_| extension::applies(&x)) {
            return extension::inverted_residual(x, kernel);
        }
        let mut y = x.clone();
        if let Some(expand) = &self.expand {
            y = expand.forward(y);
        }
        y = self.project.forward(self.depthwise.forward(y));
        match self.residual {
            true => y + x,
            false => y,
        }
    }

    /// The block's kernels; its 1x1 layers are the network's `index`-th (expansion, if any)
    /// and next.
    fn packed(
        &self,
        packing: &PointwisePacking<'_>,
        index: &mut usize,
    ) -> kernels::InvertedResidual {
        let (hidden, _, k) = self.depthwise.dims();
        let stride = self.depthwise.conv.stride[0];
        let (w, b) = self.depthwise.host_weights();
        let mut next = || {
            *index += 1;
            *index - 1
        };
        let expand = self.expand.as_ref().map(|e| e.pointwise(packing, next()));
        let project = self.project.pointwise(packing, next());
        kernels::InvertedResidual::new(
            expand,
            DepthwiseWeights::new(&w, &b, hidden, k, stride),
            project,
            self.residual,
            self.depthwise.padding(),
        )
    }

    fn fold(self) -> Self {
        Self {
            expand: self.expand.map(ConvNorm::fold),
            depthwise: self.depthwise.fold(),
            project: self.project.fold(),
            residual: self.residual,
            kernel: None,
        }
    }
}

/// EfficientNet-Lite with the ImageNet classifier kept aside: [`features`](Self::features) is
/// the global average pool of the head (the embedding); [`logits`](Self::logits) applies the
/// classifier to features (used to check the import against PyTorch's top-1).
#[derive(Module, Debug)]
pub struct Network {
    /// 3x3 stride-2 stem convolution (ReLU6).
    pub stem: ConvNorm,
    /// Inverted-residual blocks in order.
    pub blocks: Vec<InvertedResidual>,
    /// 1x1 head convolution (ReLU6), pooled into the features.
    pub head: ConvNorm,
    /// ImageNet classifier on the features, when the checkpoint has one.
    pub classifier: Option<Linear>,
    /// The stem packed for the fused kernels, when prepared.
    #[module(skip)]
    stem_kernel: Option<Arc<StemWeights>>,
    /// The head packed for the fused kernels, when prepared.
    #[module(skip)]
    head_kernel: Option<Arc<Pointwise>>,
}

/// The precision of the network's 1x1 layers in the fused kernels, one entry per layer in
/// [`Network::pointwise_layers`] order.
#[derive(Clone, Copy, Debug)]
pub enum PointwisePacking<'a> {
    /// float32, as trained.
    F32,
    /// float32, each layer recording the range of its inputs (calibration).
    Observed(&'a [Arc<RangeObserver>]),
    /// int8 weights, inputs quantised to 7 bits as given.
    Int8(&'a [ActivationQuant]),
}

/// Where one forward pass spends its time: one line of [`Network::layer_times`].
#[derive(Clone, Debug)]
pub struct LayerTime {
    /// What the layer computes: input size, channels, kernel and stride.
    pub layer: String,
    /// Wall time of the layer.
    pub time: Duration,
    /// For a fused block: time in its expansion, depthwise and projection kernels.
    pub kernels: Option<[Duration; 3]>,
}

impl Network {
    /// Every BatchNorm folded into its convolution (inference only): one convolution with
    /// bias per layer.
    pub fn fold_batch_norms(self) -> Self {
        Self {
            stem: self.stem.fold(),
            blocks: self
                .blocks
                .into_iter()
                .map(InvertedResidual::fold)
                .collect(),
            head: self.head.fold(),
            classifier: self.classifier,
            stem_kernel: None,
            head_kernel: None,
        }
    }

    /// Packs the folded layers for verger's fused kernels, once: the forward pass then runs
    /// them whenever its input is on a backend that has them ([`extension::supports`]). The
    /// module must be folded ([`fold_batch_norms`](Self::fold_batch_norms)).
    pub fn with_kernels(self) -> Self {
        self.with_kernels_packed(&PointwisePacking::F32)
    }

    /// The network's 1x1 layers (expansions and projections in block order, then the head):
    /// the ones [`PointwisePacking`] quantises or observes, in that order.
    pub fn pointwise_layers(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| 1 + usize::from(b.expand.is_some()))
            .sum();
        blocks + 1
    }

    /// [`with_kernels`](Self::with_kernels), the 1x1 layers packed as `packing` says (its
    /// slices hold one entry per [`pointwise_layers`](Self::pointwise_layers)).
    pub fn with_kernels_packed(mut self, packing: &PointwisePacking<'_>) -> Self {
        let layers = self.pointwise_layers();
        match packing {
            PointwisePacking::F32 => {}
            PointwisePacking::Observed(o) => assert_eq!(o.len(), layers, "one observer a layer"),
            PointwisePacking::Int8(q) => assert_eq!(q.len(), layers, "one range a layer"),
        }
        let (_, _, k) = self.stem.dims();
        let (w, b) = self.stem.host_weights();
        let stride = self.stem.conv.stride[0];
        self.stem_kernel = Some(Arc::new(StemWeights::new(
            &w,
            &b,
            k,
            stride,
            self.stem.padding(),
        )));
        let mut index = 0;
        for block in &mut self.blocks {
            block.kernel = Some(Arc::new(block.packed(packing, &mut index)));
        }
        self.head_kernel = Some(Arc::new(self.head.pointwise(packing, index)));
        self
    }

    /// Whether the module was prepared for the fused kernels.
    pub fn has_kernels(&self) -> bool {
        self.stem_kernel.is_some()
    }

    /// The stem: `[N, 3, H, W]` to `[N, 32, H/2, W/2]`.
    fn stem(&self, x: Tensor<4>) -> Tensor<4> {
        match self.stem_kernel.as_ref().filter(|_| extension::applies(&x)) {
            Some(kernel) => extension::stem(x, kernel),
            None => self.stem.forward(x),
        }
    }

    /// The head and the global average pool: `[N, C, H, W]` to `[N, 1280]`.
    fn head_pool(&self, x: Tensor<4>) -> Tensor<2> {
        if let Some(kernel) = self.head_kernel.as_ref().filter(|_| extension::applies(&x)) {
            return extension::head_pool(x, kernel);
        }
        let x = self.head.forward(x);
        let [n, c, h, w] = x.dims();
        x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
    }

    /// Features of a normalised `[N, 3, H, W]` batch: `[N, 1280]`.
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = self.stem(x);
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.head_pool(x)
    }

    /// ImageNet logits `[N, 1000]` from features, when the checkpoint had a classifier.
    pub fn logits(&self, features: Tensor<2>) -> Option<Tensor<2>> {
        Some(self.classifier.as_ref()?.forward(features))
    }

    /// The forward pass of `x` layer by layer, timed: the stem, each block (with the split
    /// between its expansion, depthwise and projection kernels when fused) and the head with
    /// pooling, named by what they compute. For `cargo bench --bench embed`: profile first,
    /// then fix the largest share.
    pub fn layer_times(&self, x: Tensor<4>) -> Vec<LayerTime> {
        let [_, _, h, w] = x.dims();
        let (stem_out, _, k) = self.stem.dims();
        let stride = self.stem.conv.stride[0];
        let started = Instant::now();
        let mut x = self.stem(x);
        let mut lines = vec![LayerTime {
            layer: format!("stem {h}x{w} 3->{stem_out} k{k}/{stride}"),
            time: started.elapsed(),
            kernels: None,
        }];
        for (i, block) in self.blocks.iter().enumerate() {
            let [_, c_in, h, w] = x.dims();
            let (hidden, _, k) = block.depthwise.dims();
            let started = Instant::now();
            let (y, split) = kernels::kernel_times(|| block.forward(x));
            let time = started.elapsed();
            lines.push(LayerTime {
                layer: format!(
                    "block {i:>2} {h}x{w} {c_in}->{hidden}->{} k{k}/{}",
                    y.dims()[1],
                    block.depthwise.conv.stride[0]
                ),
                time,
                kernels: (split != [Duration::ZERO; 3]).then_some(split),
            });
            x = y;
        }
        let [_, c, h, w] = x.dims();
        let started = Instant::now();
        let features = self.head_pool(x);
        lines.push(LayerTime {
            layer: format!("head {h}x{w} {c}->{} + pool", features.dims()[1]),
            time: started.elapsed(),
            kernels: None,
        });
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::RunningState;
    use burn::tensor::{Distribution, TensorData};

    /// The scaled stage tables are those of the published Lite1 and Lite2 checkpoints (channels
    /// and block counts read off their `_blocks.N` tensors).
    #[test]
    fn lite_multipliers_give_the_published_stage_tables() {
        let table = |c: &NetworkConfig| -> Vec<(usize, usize, usize)> {
            c.stages
                .iter()
                .map(|s| (s.repeats, s.input, s.output))
                .collect()
        };
        assert_eq!(
            table(&NetworkConfig::lite(1.0, 1.1)),
            [
                (1, 32, 16),
                (3, 16, 24),
                (3, 24, 40),
                (4, 40, 80),
                (4, 80, 112),
                (5, 112, 192),
                (1, 192, 320)
            ]
        );
        assert_eq!(
            table(&NetworkConfig::lite(1.1, 1.2)),
            [
                (1, 32, 16),
                (3, 16, 24),
                (3, 24, 48),
                (4, 48, 88),
                (4, 88, 120),
                (5, 120, 208),
                (1, 208, 352)
            ]
        );
        let lite2 = NetworkConfig::lite(1.1, 1.2);
        assert_eq!((lite2.stem_channels, lite2.head_channels), (32, 1280));
        assert_eq!(
            table(&NetworkConfig::lite0()),
            table(&NetworkConfig::lite(1.0, 1.0))
        );
    }

    /// MobileNetV2 at width 1.0 has torchvision's stage table and its published parameter
    /// count (3,504,872 with the ImageNet classifier, BatchNorm statistics not counted); narrower widths round every channel
    /// count to a multiple of 8 but keep the 1280 head, wider ones widen it.
    #[test]
    fn mobilenet_v2_has_torchvisions_shape() {
        let outputs = |c: &NetworkConfig| -> Vec<(usize, usize)> {
            c.stages.iter().map(|s| (s.repeats, s.output)).collect()
        };
        let full = NetworkConfig::mobilenet_v2(1.0);
        assert_eq!(
            outputs(&full),
            [
                (1, 16),
                (2, 24),
                (3, 32),
                (4, 64),
                (3, 96),
                (3, 160),
                (1, 320)
            ]
        );
        assert_eq!((full.stem_channels, full.head_channels), (32, 1280));
        assert_eq!(full.padding, PaddingStyle::Symmetric);
        // Burn counts a BatchNorm's running mean and variance too; torchvision does not.
        let network = full.init(&Device::flex());
        let norms = std::iter::once(&network.stem)
            .chain(
                network
                    .blocks
                    .iter()
                    .flat_map(|b| b.expand.iter().chain([&b.depthwise, &b.project])),
            )
            .chain([&network.head]);
        let running: usize = norms.map(|l| 2 * l.conv.weight.dims()[0]).sum();
        assert_eq!(network.num_params() - running, 3_504_872);
        let narrow = NetworkConfig::mobilenet_v2(0.25);
        let widths: Vec<usize> = outputs(&narrow).iter().map(|s| s.1).collect();
        assert_eq!(widths, [8, 8, 8, 16, 24, 40, 80]);
        assert_eq!((narrow.stem_channels, narrow.head_channels), (8, 1280));
        assert_eq!(NetworkConfig::mobilenet_v2(1.4).head_channels, 1792);
    }

    fn uniform<const D: usize>(shape: [usize; D], lo: f64, hi: f64) -> Tensor<D> {
        Tensor::random(shape, Distribution::Uniform(lo, hi), &Device::flex())
    }

    /// A layer's padding maps onto the kernels' geometry only where they compute exactly it.
    #[test]
    fn padding_maps_to_the_kernels_or_refuses() {
        let layer = |padding| {
            let dw = Layer {
                kernel: 3,
                stride: 2,
                groups: 4,
                relu6: true,
            };
            let mut l = ConvNorm::init([4, 4], dw, PaddingStyle::TfSame, 1e-3, &Device::flex());
            l.conv.padding = padding;
            l
        };
        assert_eq!(layer(PaddingConfig2d::Same).padding(), Padding::Same);
        let symmetric = layer(PaddingConfig2d::Explicit(1, 1, 1, 1));
        assert_eq!(symmetric.padding(), Padding::Symmetric);
        for other in [
            PaddingConfig2d::Valid,
            PaddingConfig2d::Explicit(0, 1, 1, 1),
        ] {
            let l = layer(other);
            let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.padding()));
            assert!(refused.is_err(), "{:?} was mapped", l.conv.padding);
        }
    }

    /// `got` has `want`'s shape and every value within 1e-4 (relative above 1).
    fn assert_close(got: TensorData, want: TensorData) {
        assert_eq!(got.shape(), want.shape());
        let got = got.try_to_vec::<f32>().unwrap();
        for (a, b) in got.iter().zip(&want.try_to_vec::<f32>().unwrap()) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// Folding gives the same function as convolution then BatchNorm (inference statistics),
    /// for a dense, a depthwise and a strided layer.
    #[test]
    fn folded_layer_computes_conv_then_batch_norm() {
        for (c_in, c_out, kernel, stride, groups, relu6) in [
            (5, 7, 3, 1, 1, false),
            (6, 6, 5, 2, 6, true),
            (4, 3, 1, 1, 1, true),
        ] {
            let shape = Layer {
                kernel,
                stride,
                groups,
                relu6,
            };
            let style = PaddingStyle::TfSame;
            let mut layer = ConvNorm::init([c_in, c_out], shape, style, 1e-3, &Device::flex());
            let norm = layer.norm.as_mut().unwrap();
            norm.gamma = Param::from_tensor(uniform([c_out], 0.5, 2.0));
            norm.beta = Param::from_tensor(uniform([c_out], -1.0, 1.0));
            norm.running_mean = RunningState::new(uniform([c_out], -0.5, 0.5));
            norm.running_var = RunningState::new(uniform([c_out], 0.1, 3.0));
            let x = uniform([2, c_in, 9, 8], -2.0, 2.0);
            let want = layer.forward(x.clone()).into_data();
            let folded = layer.fold();
            assert!(folded.norm.is_none() && folded.conv.bias.is_some());
            assert_close(folded.forward(x).into_data(), want);
        }
    }

    /// The fused path and Burn's own operations agree on one block with a shortcut, fed an
    /// ordinary (not channels-last) NCHW tensor, and the fused output keeps the NCHW shape.
    #[test]
    fn fused_block_matches_burn_operations_on_an_nchw_input() {
        let config = NetworkConfig::lite0();
        let device = Device::flex();
        let mut block = config.init(&device).blocks.remove(2); // 24 -> 144 -> 24, shortcut
        for layer in [&mut block.depthwise, &mut block.project] {
            layer.norm.as_mut().unwrap().running_var =
                RunningState::new(uniform([layer.conv.weight.dims()[0]], 0.5, 1.5));
        }
        let mut block = block.fold();
        assert!(block.residual);
        let values: Vec<f32> = (0..2 * 24 * 11 * 13)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(values, [2, 24, 11, 13]), &device);
        let plain = block.forward(x.clone()).into_data();
        block.kernel = Some(Arc::new(block.packed(&PointwisePacking::F32, &mut 0)));
        assert_close(block.forward(x).into_data(), plain);
    }
}
