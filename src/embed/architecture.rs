//! EfficientNet-Lite0's layer list and its weights with BatchNorm folded, independent of the
//! engine that runs them (a Burn backend or verger's own kernels).
//!
//! Lite variants use ReLU6, no squeeze-excitation, and a fixed stem (32) and head (1280).
//! Padding is TensorFlow "SAME" ([`same_padding`]): on a stride-2 layer the odd pixel of
//! padding goes to the bottom/right, as the weights were trained with.

use super::state_dict::{RawTensor, StateDict, WeightsError};

/// Width of the feature vector: channels of the head convolution.
pub const FEATURE_DIM: usize = 1280;
/// Number of ImageNet classes of the optional classifier.
pub const IMAGENET_CLASSES: usize = 1000;
/// Channels of the stem convolution.
pub const STEM_CHANNELS: usize = 32;

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

/// TensorFlow "SAME" padding `(begin, end)` for one spatial dimension: the output has
/// `ceil(size / stride)` positions and the extra pixel, if any, goes at the end.
pub fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// A convolution with its BatchNorm folded in: OIHW weight (I = 1 when depthwise) and bias.
#[derive(Clone, Debug)]
pub struct FoldedConv {
    /// Weight, OIHW, row-major.
    pub weight: RawTensor,
    /// One bias per output channel.
    pub bias: Vec<f32>,
    /// Square kernel side.
    pub kernel: usize,
    /// Stride in both dimensions.
    pub stride: usize,
    /// 1 for a dense convolution, the channel count for a depthwise one.
    pub groups: usize,
}

impl FoldedConv {
    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.shape[0]
    }

    /// Input channels per group (1 for a depthwise convolution).
    pub fn in_channels(&self) -> usize {
        self.weight.shape[1]
    }

    /// True for a depthwise convolution (one filter per channel).
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1
    }
}

/// Inverted residual block: optional 1x1 expansion (ReLU6), depthwise kxk (ReLU6), linear 1x1
/// projection, plus the input when stride is 1 and channels match.
#[derive(Clone, Debug)]
pub struct FoldedBlock {
    /// 1x1 expansion, absent when the expand ratio is 1.
    pub expand: Option<FoldedConv>,
    /// Depthwise convolution (groups = channels).
    pub depthwise: FoldedConv,
    /// 1x1 projection, no activation.
    pub project: FoldedConv,
    /// Whether the block input is added to its output.
    pub residual: bool,
}

/// The whole network, folded: stem, 16 blocks, head, and the ImageNet classifier if present.
#[derive(Clone, Debug)]
pub struct FoldedNet {
    /// 3x3 stride-2 stem convolution (ReLU6).
    pub stem: FoldedConv,
    /// MBConv blocks in order.
    pub blocks: Vec<FoldedBlock>,
    /// 1x1 head convolution to [`FEATURE_DIM`] channels (ReLU6), then global average pool.
    pub head: FoldedConv,
    /// `_fc` weight `[1000, 1280]` and bias, when the checkpoint has them.
    pub classifier: Option<(RawTensor, Vec<f32>)>,
}

impl FoldedNet {
    /// Reads a lukemelas-style state dict (`_conv_stem`, `_blocks.N.*`, `_conv_head`, `_bn*`,
    /// `_fc`), folding every BatchNorm with epsilon `eps`.
    pub fn from_state_dict(sd: &StateDict, eps: f32) -> Result<Self, WeightsError> {
        let conv = |conv: &str, bn: &str, shape: [usize; 4], stride: usize| {
            let (weight, bias) = sd.conv_bn_folded(conv, bn, shape, eps)?;
            // A weight with one input channel per output, on a spatial kernel, is depthwise.
            let groups = if shape[1] == 1 && shape[2] > 1 {
                shape[0]
            } else {
                1
            };
            Ok::<_, WeightsError>(FoldedConv {
                weight,
                bias: bias.values,
                kernel: shape[2],
                stride,
                groups,
            })
        };
        let stem = conv("_conv_stem", "_bn0", [STEM_CHANNELS, 3, 3, 3], 2)?;
        let mut blocks = Vec::new();
        for &(repeats, k, stride, ratio, c_in, c_out) in &STAGES {
            for r in 0..repeats {
                let (c_in, stride) = if r == 0 { (c_in, stride) } else { (c_out, 1) };
                let hidden = c_in * ratio;
                let p = format!("_blocks.{}", blocks.len());
                let expand = if ratio != 1 {
                    let name = format!("{p}._expand_conv");
                    Some(conv(&name, &format!("{p}._bn0"), [hidden, c_in, 1, 1], 1)?)
                } else {
                    None
                };
                let name = format!("{p}._depthwise_conv");
                let depthwise = conv(&name, &format!("{p}._bn1"), [hidden, 1, k, k], stride)?;
                let name = format!("{p}._project_conv");
                let project = conv(&name, &format!("{p}._bn2"), [c_out, hidden, 1, 1], 1)?;
                blocks.push(FoldedBlock {
                    expand,
                    depthwise,
                    project,
                    residual: stride == 1 && c_in == c_out,
                });
            }
        }
        let last = STAGES[STAGES.len() - 1].5;
        let head = conv("_conv_head", "_bn1", [FEATURE_DIM, last, 1, 1], 1)?;
        let classifier = match (
            sd.get("_fc.weight", &[IMAGENET_CLASSES, FEATURE_DIM]),
            sd.get("_fc.bias", &[IMAGENET_CLASSES]),
        ) {
            (Ok(w), Ok(b)) => Some((w.clone(), b.values.clone())),
            _ => None,
        };
        Ok(Self {
            stem,
            blocks,
            head,
            classifier,
        })
    }
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
