//! EfficientNet-Lite0 (ImageNet) as a feature extractor, on any Burn device.
//!
//! The network definition only: it is built from a [`StateDict`] (BatchNorm already folded) and
//! knows nothing about files. Lite variants use ReLU6, no squeeze-excitation, and a fixed stem
//! (32) and head (1280). Padding is TensorFlow "SAME", computed from the input size: on a
//! stride-2 layer the odd pixel of padding goes to the bottom/right, as the weights were
//! trained with.

use super::state_dict::{RawTensor, StateDict, WeightsError};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};

/// Width of the feature vector: channels of the head convolution.
pub const FEATURE_DIM: usize = 1280;
/// Number of ImageNet classes of the optional classifier.
pub const IMAGENET_CLASSES: usize = 1000;

/// One stage of MBConv blocks: `(repeats, kernel, stride, expand ratio, in, out)`.
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];
const STEM: usize = 32;

/// A convolution with folded BatchNorm: weight OIHW, bias, stride, groups.
#[derive(Clone, Debug)]
struct Conv {
    weight: Tensor<4>,
    bias: Tensor<1>,
    kernel: usize,
    stride: usize,
    groups: usize,
}

/// Builds folded convolutions from one state dict onto one device.
struct Loader<'a> {
    sd: &'a StateDict,
    eps: f32,
    device: &'a Device,
}

impl Loader<'_> {
    fn conv(
        &self,
        conv: &str,
        bn: &str,
        shape: [usize; 4],
        stride: usize,
        groups: usize,
    ) -> Result<Conv, WeightsError> {
        let (w, b) = self.sd.conv_bn_folded(conv, bn, shape, self.eps)?;
        Ok(Conv {
            weight: to_tensor::<4>(w, self.device),
            bias: to_tensor::<1>(b, self.device),
            kernel: shape[2],
            stride,
            groups,
        })
    }
}

impl Conv {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let options = ConvOptions::new_with_padding(
            [self.stride; 2],
            [
                same_padding(h, self.kernel, self.stride),
                same_padding(w, self.kernel, self.stride),
            ],
            [1, 1],
            self.groups,
        );
        conv2d(x, self.weight.clone(), Some(self.bias.clone()), options)
    }
}

/// TensorFlow "SAME" padding `(begin, end)` for one spatial dimension: the output has
/// `ceil(size / stride)` positions and the extra pixel, if any, goes at the end.
pub fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// Inverted residual block: optional 1x1 expansion, depthwise kxk, 1x1 projection.
#[derive(Clone, Debug)]
struct MbConv {
    expand: Option<Conv>,
    depthwise: Conv,
    project: Conv,
    residual: bool,
}

impl MbConv {
    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let Some(expand) = &self.expand {
            x = relu6(expand.forward(x));
        }
        x = relu6(self.depthwise.forward(x));
        x = self.project.forward(x);
        if self.residual {
            x = x + input;
        }
        x
    }
}

/// EfficientNet-Lite0 with the classifier kept aside: [`features`](Self::features) is the
/// 1280-d global average pool of the head; [`logits`](Self::logits) applies the ImageNet
/// classifier to such features (used to check the import against PyTorch's top-1).
#[derive(Clone, Debug)]
pub struct EfficientNetLite0 {
    stem: Conv,
    blocks: Vec<MbConv>,
    head: Conv,
    classifier: Option<(Tensor<2>, Tensor<1>)>,
}

impl EfficientNetLite0 {
    /// Builds the network from a lukemelas-style state dict (`_conv_stem`, `_blocks.N.*`,
    /// `_conv_head`, `_bn*`, `_fc`), folding every BatchNorm with epsilon `eps`.
    pub fn from_state_dict(
        sd: &StateDict,
        eps: f32,
        device: &Device,
    ) -> Result<Self, WeightsError> {
        let load = Loader { sd, eps, device };
        let stem = load.conv("_conv_stem", "_bn0", [STEM, 3, 3, 3], 2, 1)?;
        let mut blocks = Vec::new();
        for &(repeats, k, stride, expand, c_in, c_out) in &STAGES {
            for r in 0..repeats {
                let (c_in, stride) = if r == 0 { (c_in, stride) } else { (c_out, 1) };
                let hidden = c_in * expand;
                let p = format!("_blocks.{}", blocks.len());
                let expand = if expand != 1 {
                    let shape = [hidden, c_in, 1, 1];
                    let e = load.conv(
                        &format!("{p}._expand_conv"),
                        &format!("{p}._bn0"),
                        shape,
                        1,
                        1,
                    )?;
                    Some(e)
                } else {
                    None
                };
                let dw_shape = [hidden, 1, k, k];
                let depthwise = load.conv(
                    &format!("{p}._depthwise_conv"),
                    &format!("{p}._bn1"),
                    dw_shape,
                    stride,
                    hidden,
                )?;
                let pr_shape = [c_out, hidden, 1, 1];
                let project = load.conv(
                    &format!("{p}._project_conv"),
                    &format!("{p}._bn2"),
                    pr_shape,
                    1,
                    1,
                )?;
                blocks.push(MbConv {
                    expand,
                    depthwise,
                    project,
                    residual: stride == 1 && c_in == c_out,
                });
            }
        }
        let last = STAGES[STAGES.len() - 1].5;
        let head = load.conv("_conv_head", "_bn1", [FEATURE_DIM, last, 1, 1], 1, 1)?;
        let classifier = match (
            sd.get("_fc.weight", &[IMAGENET_CLASSES, FEATURE_DIM]),
            sd.get("_fc.bias", &[IMAGENET_CLASSES]),
        ) {
            (Ok(w), Ok(b)) => Some((
                to_tensor::<2>(w.clone(), device).transpose(),
                to_tensor::<1>(b.clone(), device),
            )),
            _ => None,
        };
        Ok(Self {
            stem,
            blocks,
            head,
            classifier,
        })
    }

    /// Features of a normalised NCHW batch: `[N, 1280]`.
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = relu6(self.stem.forward(x));
        for block in &self.blocks {
            x = block.forward(x);
        }
        x = relu6(self.head.forward(x));
        let [n, c, h, w] = x.dims();
        x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
    }

    /// ImageNet logits `[N, 1000]` from features, when the checkpoint had a classifier.
    pub fn logits(&self, features: Tensor<2>) -> Option<Tensor<2>> {
        let (w, b) = self.classifier.as_ref()?;
        let n = features.dims()[0];
        Some(
            features.matmul(w.clone())
                + b.clone()
                    .reshape([1, IMAGENET_CLASSES])
                    .expand([n, IMAGENET_CLASSES]),
        )
    }
}

fn relu6<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clamp(0.0, 6.0)
}

fn to_tensor<const D: usize>(raw: RawTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(raw.values, raw.shape), device)
}

#[cfg(test)]
mod tests {
    use super::same_padding;

    #[test]
    fn same_padding_is_asymmetric_on_stride_two() {
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(112, 5, 2), (1, 2));
        assert_eq!(same_padding(225, 3, 2), (1, 1));
        assert_eq!(same_padding(56, 3, 1), (1, 1));
        assert_eq!(same_padding(14, 5, 1), (2, 2));
        assert_eq!(same_padding(7, 1, 1), (0, 0));
    }
}
