//! EfficientNet-Lite0 as a feature extractor on any Burn device (NCHW tensors).
//!
//! Built from a [`FoldedNet`]: one convolution with bias per layer, ReLU6, residual adds, and a
//! global average pool. Padding is TensorFlow "SAME" ([`same_padding`]).

use super::architecture::{same_padding, FoldedConv, FoldedNet, IMAGENET_CLASSES};
use super::state_dict::RawTensor;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};

/// A convolution with folded BatchNorm on one device: weight OIHW, bias, stride, groups.
#[derive(Clone, Debug)]
struct Conv {
    weight: Tensor<4>,
    bias: Tensor<1>,
    kernel: usize,
    stride: usize,
    groups: usize,
}

impl Conv {
    fn new(folded: &FoldedConv, device: &Device) -> Self {
        Self {
            weight: to_tensor::<4>(&folded.weight, device),
            bias: Tensor::from_data(
                TensorData::new(folded.bias.clone(), [folded.bias.len()]),
                device,
            ),
            kernel: folded.kernel,
            stride: folded.stride,
            groups: folded.groups,
        }
    }

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
    /// Uploads the folded network to `device`.
    pub fn new(net: &FoldedNet, device: &Device) -> Self {
        let blocks = net
            .blocks
            .iter()
            .map(|b| MbConv {
                expand: b.expand.as_ref().map(|c| Conv::new(c, device)),
                depthwise: Conv::new(&b.depthwise, device),
                project: Conv::new(&b.project, device),
                residual: b.residual,
            })
            .collect();
        let classifier = net.classifier.as_ref().map(|(w, b)| {
            (
                to_tensor::<2>(w, device).transpose(),
                Tensor::from_data(TensorData::new(b.clone(), [b.len()]), device),
            )
        });
        Self {
            stem: Conv::new(&net.stem, device),
            blocks,
            head: Conv::new(&net.head, device),
            classifier,
        }
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

fn to_tensor<const D: usize>(raw: &RawTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(
        TensorData::new(raw.values.clone(), raw.shape.clone()),
        device,
    )
}
