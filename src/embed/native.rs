//! EfficientNet-Lite0 on verger's own [`kernels`](super::kernels): NHWC activations, weights
//! rearranged once at load time so every layer reads them with unit stride, one image at a
//! time through buffers allocated once per worker.
//!
//! Why not a Burn backend: measured on this network, Burn's CPU backends spend most of their
//! time in depthwise and 1x1 convolutions on NCHW tensors (flex about 3x slower than ONNX
//! Runtime per core). Here a 1x1 convolution is one matrix product on the NHWC buffer with no
//! reshaping, a depthwise convolution is one pass with bias and ReLU6 fused, and no tensor is
//! allocated per layer. The Burn path stays available (`--backend flex|ndarray`) and the tests
//! hold both to the same PyTorch reference.

use super::architecture::{FoldedConv, FoldedNet, FEATURE_DIM};
use super::kernels::{self, ConvShape, Init, PackedWeights, STEM_OUT};
use crate::decode::normalise_interleaved_into;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A 1x1 convolution: weights packed in column panels for this CPU.
#[derive(Debug)]
struct Pointwise {
    weights: PackedWeights,
    bias: Vec<f32>,
    c_out: usize,
}

impl Pointwise {
    /// From PyTorch's `[out][in]` layout (a 1x1 convolution or a linear layer).
    fn from_out_in(values: &[f32], c_out: usize, c_in: usize, bias: &[f32]) -> Self {
        let mut weights = vec![0.0; c_in * c_out];
        for o in 0..c_out {
            for i in 0..c_in {
                weights[i * c_out + o] = values[o * c_in + i];
            }
        }
        Self {
            weights: PackedWeights::new(&weights, c_in, c_out),
            bias: bias.to_vec(),
            c_out,
        }
    }

    fn new(conv: &FoldedConv) -> Self {
        let (c_out, c_in) = (conv.out_channels(), conv.in_channels());
        Self::from_out_in(&conv.weight.values, c_out, c_in, &conv.bias)
    }

    /// The convolution over `pixels` rows of `input`, onto `init` (no activation).
    fn apply(&self, input: &[f32], pixels: usize, init: Init<'_>, out: &mut [f32]) {
        kernels::pointwise_packed(input, pixels, &self.weights, init, out);
    }
}

/// A depthwise convolution: weights `[k][k][channels]`.
#[derive(Debug)]
struct Depthwise {
    weights: Vec<f32>,
    bias: Vec<f32>,
    kernel: usize,
    stride: usize,
    channels: usize,
}

impl Depthwise {
    fn new(conv: &FoldedConv) -> Self {
        let (c, k) = (conv.out_channels(), conv.kernel);
        let mut weights = vec![0.0; k * k * c];
        for ch in 0..c {
            for t in 0..k * k {
                weights[t * c + ch] = conv.weight.values[ch * k * k + t];
            }
        }
        Self {
            weights,
            bias: conv.bias.clone(),
            kernel: k,
            stride: conv.stride,
            channels: c,
        }
    }
}

#[derive(Debug)]
struct Block {
    expand: Option<Pointwise>,
    depthwise: Depthwise,
    project: Pointwise,
    residual: bool,
}

/// Weights in kernel-ready layouts, shared by every clone of a [`NativeNet`].
#[derive(Debug)]
struct Weights {
    /// Stem weights `[k][k][3][32]`.
    stem: Vec<f32>,
    stem_bias: Vec<f32>,
    stem_kernel: usize,
    stem_stride: usize,
    blocks: Vec<Block>,
    head: Pointwise,
    /// Classifier as a 1x1 convolution `[1280][1000]`.
    classifier: Option<Pointwise>,
    /// Zero input bias for a depthwise layer that reads an activated tensor.
    zeros: Vec<f32>,
}

/// Per-worker activation buffers, each large enough for the largest activation.
#[derive(Debug, Default)]
struct Scratch {
    input: Vec<f32>,
    current: Vec<f32>,
    next: Vec<f32>,
    expanded: Vec<f32>,
    depthwise: Vec<f32>,
}

/// The network on verger's kernels. Cloning shares the weights and gives the clone its own
/// buffers, so each timely worker holds one clone and never contends.
#[derive(Debug)]
pub struct NativeNet {
    weights: Arc<Weights>,
    side: usize,
    /// Floats in the largest activation at this input size: the size of every buffer.
    largest: usize,
    scratch: Mutex<Scratch>,
}

impl Clone for NativeNet {
    fn clone(&self) -> Self {
        Self {
            weights: Arc::clone(&self.weights),
            side: self.side,
            largest: self.largest,
            scratch: Mutex::default(),
        }
    }
}

impl NativeNet {
    /// Rearranges the folded network for `side x side` inputs.
    pub fn new(net: &FoldedNet, side: usize) -> Self {
        let stem = &net.stem;
        let (c_out, c_in, k) = (stem.out_channels(), stem.in_channels(), stem.kernel);
        assert_eq!((c_out, c_in), (STEM_OUT, 3), "stem must be 3 -> {STEM_OUT}");
        let mut stem_w = vec![0.0; k * k * c_in * c_out];
        for o in 0..c_out {
            for i in 0..c_in {
                for t in 0..k * k {
                    stem_w[(t * c_in + i) * c_out + o] =
                        stem.weight.values[(o * c_in + i) * k * k + t];
                }
            }
        }
        let blocks: Vec<Block> = net
            .blocks
            .iter()
            .map(|b| Block {
                expand: b.expand.as_ref().map(Pointwise::new),
                depthwise: Depthwise::new(&b.depthwise),
                project: Pointwise::new(&b.project),
                residual: b.residual,
            })
            .collect();
        let widest = blocks
            .iter()
            .map(|b| b.depthwise.channels)
            .max()
            .unwrap_or(0);
        let classifier = net
            .classifier
            .as_ref()
            .map(|(w, b)| Pointwise::from_out_in(&w.values, w.shape[0], w.shape[1], b));
        let mut native = Self {
            weights: Arc::new(Weights {
                stem: stem_w,
                stem_bias: stem.bias.clone(),
                stem_kernel: k,
                stem_stride: stem.stride,
                blocks,
                head: Pointwise::new(&net.head),
                classifier,
                zeros: vec![0.0; widest],
            }),
            side,
            largest: 0,
            scratch: Mutex::default(),
        };
        native.largest = native.largest_activation();
        native
    }

    fn scratch(&self) -> MutexGuard<'_, Scratch> {
        // A panic mid-forward leaves only stale numbers in the buffers, never bad state.
        self.scratch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Features of one `side x side` RGB8 image, normalised with `mean` and `std` here.
    pub fn features(&self, rgb: &[u8], mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
        let w = &*self.weights;
        let largest = self.largest;
        let mut guard = self.scratch();
        let Scratch {
            input,
            current,
            next,
            expanded,
            depthwise,
        } = &mut *guard;
        for buf in [&mut *current, &mut *next, &mut *expanded, &mut *depthwise] {
            if buf.len() < largest {
                buf.resize(largest, 0.0);
            }
        }
        input.resize(self.side * self.side * 3, 0.0);
        normalise_interleaved_into(rgb, mean, std, input);

        let stem = ConvShape::same(self.side, self.side, w.stem_kernel, w.stem_stride);
        kernels::stem_relu6(&stem, input, &w.stem, &w.stem_bias, current);
        let (mut h, mut wd, mut c) = (stem.out_h, stem.out_w, STEM_OUT);
        for block in &w.blocks {
            let pixels = h * wd;
            // The expansion's raw product: the depthwise kernel adds its bias and applies
            // ReLU6 as it reads (a stem output is already activated: zero bias).
            let (dw_in, in_bias): (&[f32], &[f32]) = match &block.expand {
                Some(e) => {
                    let out = &mut expanded[..pixels * e.c_out];
                    e.apply(&current[..pixels * c], pixels, Init::Zero, out);
                    (out, &e.bias)
                }
                None => (&current[..pixels * c], &w.zeros[..c]),
            };
            let dw = &block.depthwise;
            let shape = ConvShape::same(h, wd, dw.kernel, dw.stride);
            let dw_out = &mut depthwise[..shape.out_pixels() * dw.channels];
            kernels::depthwise_relu6(
                &shape,
                dw.channels,
                dw_in,
                in_bias,
                &dw.weights,
                &dw.bias,
                dw_out,
            );
            (h, wd) = (shape.out_h, shape.out_w);
            let pixels = h * wd;
            let p = &block.project;
            let out = &mut next[..pixels * p.c_out];
            let init = match block.residual {
                true => Init::BiasResidual(&p.bias, &current[..pixels * c]),
                false => Init::Bias(&p.bias),
            };
            p.apply(dw_out, pixels, init, out);
            c = p.c_out;
            std::mem::swap(current, next);
        }
        let pixels = h * wd;
        let head_out = &mut expanded[..pixels * w.head.c_out];
        w.head
            .apply(&current[..pixels * c], pixels, Init::Zero, head_out);
        let mut pooled = vec![0.0; FEATURE_DIM];
        kernels::sum_rows_bias_relu6(head_out, &w.head.bias, &mut pooled);
        let scale = 1.0 / pixels as f32;
        pooled.iter_mut().for_each(|v| *v *= scale);
        pooled
    }

    /// Floats in the largest activation of the network at this input size.
    fn largest_activation(&self) -> usize {
        let w = &*self.weights;
        let stem = ConvShape::same(self.side, self.side, w.stem_kernel, w.stem_stride);
        let (mut h, mut wd) = (stem.out_h, stem.out_w);
        let mut largest = h * wd * STEM_OUT;
        for b in &w.blocks {
            let hidden = b.depthwise.channels;
            largest = largest.max(h * wd * hidden);
            let s = ConvShape::same(h, wd, b.depthwise.kernel, b.depthwise.stride);
            (h, wd) = (s.out_h, s.out_w);
            largest = largest.max(h * wd * hidden.max(b.project.c_out));
        }
        largest.max(h * wd * w.head.c_out)
    }

    /// ImageNet logits of one feature row, when the checkpoint had a classifier.
    pub fn logits(&self, features: &[f32]) -> Option<Vec<f32>> {
        let fc = self.weights.classifier.as_ref()?;
        let mut out = vec![0.0; fc.c_out];
        fc.apply(features, 1, Init::Bias(&fc.bias), &mut out);
        Some(out)
    }
}
