//! EfficientNet-Lite0 on verger's own [`kernels`](super::kernels): NHWC activations, weights
//! rearranged once at load time so every layer reads them with unit stride, one image at a
//! time through buffers allocated once per worker.
//!
//! Each inverted-residual block runs as one fused pass over bands of output rows: the
//! expansion fills a sliding window with just the rows the band's depthwise taps read
//! (activated as stored), the depthwise convolution turns them into a band buffer, and the
//! projection writes the band's rows of the block output (bias and residual loaded into its
//! accumulators). The expanded tensor (4.8 MB for the first expanded block at 224x224) and the
//! depthwise output never exist whole: a block's working set stays in L2, and only block
//! inputs and outputs, the narrow tensors, go through memory.
//!
//! Why not a Burn backend: measured on this network, Burn's CPU backends spend most of their
//! time in depthwise and 1x1 convolutions on NCHW tensors (flex about 3x slower than ONNX
//! Runtime per core). The Burn path stays available (`--backend flex|ndarray`) and the tests
//! hold both to the same PyTorch reference.

use super::architecture::{FoldedConv, FoldedNet, FEATURE_DIM};
use super::kernels::{
    self, Activation, ConvShape, DepthwiseWeights, Init, PackedWeights, STEM_OUT,
};
use crate::decode::normalise_interleaved_into;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Output pixels a band aims for: enough rows for the 1x1 kernels' 6-pixel register blocks to
/// stay full, few enough that a band's window and output stay in L2.
const BAND_PIXELS: usize = 96;

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

    /// The convolution over `pixels` rows of `input`, onto `init`, then `act`.
    fn apply(
        &self,
        input: &[f32],
        pixels: usize,
        init: Init<'_>,
        act: Activation,
        out: &mut [f32],
    ) {
        kernels::pointwise_packed(input, pixels, &self.weights, init, act, out);
    }
}

/// One inverted-residual block in kernel layouts.
#[derive(Debug)]
struct Block {
    expand: Option<Pointwise>,
    depthwise: DepthwiseWeights,
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
}

/// How one block runs at the network's input size.
#[derive(Clone, Copy, Debug)]
struct BlockPlan {
    /// Block input height, width and channels.
    in_h: usize,
    in_w: usize,
    c_in: usize,
    /// The depthwise convolution's geometry.
    shape: ConvShape,
    /// Output rows per band.
    band_rows: usize,
}

/// Geometry of every layer and the buffer sizes it needs, for one input size.
#[derive(Debug)]
struct Plan {
    stem: ConvShape,
    blocks: Vec<BlockPlan>,
    /// Floats in the largest block input or output (stem and head outputs included).
    activation: usize,
    /// Floats in the largest window of expanded rows.
    window: usize,
    /// Floats in the largest band of depthwise output.
    band: usize,
}

impl Plan {
    fn new(w: &Weights, side: usize) -> Self {
        let stem = ConvShape::same(side, side, w.stem_kernel, w.stem_stride);
        let (mut h, mut wd, mut c) = (stem.out_h, stem.out_w, STEM_OUT);
        let mut activation = h * wd * c;
        let (mut window, mut band) = (0, 0);
        let mut blocks = Vec::with_capacity(w.blocks.len());
        for b in &w.blocks {
            let dw = &b.depthwise;
            let shape = ConvShape::same(h, wd, dw.kernel, dw.stride);
            let band_rows = BAND_PIXELS.div_ceil(shape.out_w).clamp(1, shape.out_h);
            if b.expand.is_some() {
                let rows = (band_rows - 1) * dw.stride + dw.kernel;
                window = window.max(rows.min(h) * wd * dw.channels);
            }
            band = band.max(band_rows * shape.out_w * dw.channels);
            blocks.push(BlockPlan {
                in_h: h,
                in_w: wd,
                c_in: c,
                shape,
                band_rows,
            });
            (h, wd, c) = (shape.out_h, shape.out_w, b.project.c_out);
            activation = activation.max(h * wd * c);
        }
        activation = activation.max(h * wd * w.head.c_out);
        Self {
            stem,
            blocks,
            activation,
            window,
            band,
        }
    }

    /// Height and width of the last block's output.
    fn last(&self) -> (usize, usize) {
        let b = self.blocks.last().expect("a network has blocks");
        (b.shape.out_h, b.shape.out_w)
    }
}

/// One line of [`NativeNet::layer_times`].
#[derive(Clone, Debug)]
pub struct LayerTime {
    /// What the layer computes: input size, channels, kernel and stride.
    pub layer: String,
    /// Wall time of the layer.
    pub time: Duration,
    /// For a block: time in its expansion, depthwise and projection kernels.
    pub kernels: Option<[Duration; 3]>,
}

/// Clock readings of a profiled forward pass.
#[derive(Debug)]
struct Profile {
    /// Start, then the end of the stem, of each block and of the head.
    marks: Vec<Instant>,
    /// Per block: expansion, depthwise, projection.
    kernels: Vec<[Duration; 3]>,
}

/// Per-worker buffers, sized once from the [`Plan`].
#[derive(Debug, Default)]
struct Scratch {
    input: Vec<f32>,
    /// Block input.
    current: Vec<f32>,
    /// Block output.
    next: Vec<f32>,
    /// Expanded (activated) rows that the current band's depthwise taps read.
    window: Vec<f32>,
    /// The current band's depthwise output.
    band: Vec<f32>,
}

impl Scratch {
    fn size_for(&mut self, plan: &Plan, side: usize) {
        for (buf, len) in [
            (&mut self.current, plan.activation),
            (&mut self.next, plan.activation),
            (&mut self.window, plan.window),
            (&mut self.band, plan.band),
            (&mut self.input, side * side * 3),
        ] {
            if buf.len() != len {
                buf.resize(len, 0.0);
            }
        }
    }
}

/// The network on verger's kernels. Cloning shares the weights and gives the clone its own
/// buffers, so each timely worker holds one clone and never contends.
#[derive(Debug)]
pub struct NativeNet {
    weights: Arc<Weights>,
    plan: Arc<Plan>,
    side: usize,
    scratch: Mutex<Scratch>,
}

impl Clone for NativeNet {
    fn clone(&self) -> Self {
        Self {
            weights: Arc::clone(&self.weights),
            plan: Arc::clone(&self.plan),
            side: self.side,
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
            .map(|b| {
                let dw = &b.depthwise;
                Block {
                    expand: b.expand.as_ref().map(Pointwise::new),
                    depthwise: DepthwiseWeights::new(
                        &dw.weight.values,
                        &dw.bias,
                        dw.out_channels(),
                        dw.kernel,
                        dw.stride,
                    ),
                    project: Pointwise::new(&b.project),
                    residual: b.residual,
                }
            })
            .collect();
        let classifier = net
            .classifier
            .as_ref()
            .map(|(w, b)| Pointwise::from_out_in(&w.values, w.shape[0], w.shape[1], b));
        let weights = Weights {
            stem: stem_w,
            stem_bias: stem.bias.clone(),
            stem_kernel: k,
            stem_stride: stem.stride,
            blocks,
            head: Pointwise::new(&net.head),
            classifier,
        };
        Self {
            plan: Arc::new(Plan::new(&weights, side)),
            weights: Arc::new(weights),
            side,
            scratch: Mutex::default(),
        }
    }

    fn scratch(&self) -> MutexGuard<'_, Scratch> {
        // A panic mid-forward leaves only stale numbers in the buffers, never bad state.
        self.scratch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Features of one `side x side` RGB8 image, normalised with `mean` and `std` here.
    pub fn features(&self, rgb: &[u8], mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
        self.forward(rgb, mean, std, None)
    }

    /// Where one forward pass spends its time: the stem, each block (with its expansion,
    /// depthwise and projection kernels apart) and the head with pooling, in order, named by
    /// what they compute. For `cargo bench --bench embed`: profile first, then fix the largest
    /// share.
    pub fn layer_times(&self, rgb: &[u8], mean: [f32; 3], std: [f32; 3]) -> Vec<LayerTime> {
        let mut profile = Profile {
            marks: vec![Instant::now()],
            kernels: vec![[Duration::ZERO; 3]; self.plan.blocks.len()],
        };
        self.forward(rgb, mean, std, Some(&mut profile));
        let (w, plan) = (&*self.weights, &*self.plan);
        let stem = &plan.stem;
        let mut names = vec![format!(
            "stem {0}x{0} 3->{STEM_OUT} k{1}/{2}",
            stem.in_h, stem.kernel, stem.stride
        )];
        for (i, (b, at)) in w.blocks.iter().zip(&plan.blocks).enumerate() {
            let s = &at.shape;
            names.push(format!(
                "block {i:>2} {}x{} {}->{}->{} k{}/{}",
                at.in_h,
                at.in_w,
                at.c_in,
                b.depthwise.channels,
                b.project.c_out,
                s.kernel,
                s.stride
            ));
        }
        let (h, wd) = plan.last();
        names.push(format!(
            "head {h}x{wd} {}->{} + pool",
            w.head.weights.c_in, w.head.c_out
        ));
        let mut kernels = profile.kernels.into_iter();
        names
            .into_iter()
            .zip(profile.marks.windows(2).map(|m| m[1] - m[0]))
            .enumerate()
            .map(|(i, (layer, time))| LayerTime {
                layer,
                time,
                kernels: (1..=w.blocks.len())
                    .contains(&i)
                    .then(|| kernels.next())
                    .flatten(),
            })
            .collect()
    }

    /// The forward pass, timed into `profile` when there is one.
    fn forward(
        &self,
        rgb: &[u8],
        mean: [f32; 3],
        std: [f32; 3],
        mut profile: Option<&mut Profile>,
    ) -> Vec<f32> {
        let mark = |profile: &mut Option<&mut Profile>| {
            if let Some(p) = profile {
                p.marks.push(Instant::now());
            }
        };
        let (w, plan) = (&*self.weights, &*self.plan);
        let mut guard = self.scratch();
        let scratch = &mut *guard;
        scratch.size_for(plan, self.side);
        normalise_interleaved_into(rgb, mean, std, &mut scratch.input);
        kernels::stem_relu6(
            &plan.stem,
            &scratch.input,
            &w.stem,
            &w.stem_bias,
            &mut scratch.current,
        );
        mark(&mut profile);
        for (i, (block, at)) in w.blocks.iter().zip(&plan.blocks).enumerate() {
            let times = profile.as_deref_mut().map(|p| &mut p.kernels[i]);
            run_block(block, at, scratch, times);
            std::mem::swap(&mut scratch.current, &mut scratch.next);
            mark(&mut profile);
        }
        let (h, wd) = plan.last();
        let pixels = h * wd;
        let c = w.head.weights.c_in;
        let head_out = &mut scratch.next[..pixels * w.head.c_out];
        w.head.apply(
            &scratch.current[..pixels * c],
            pixels,
            Init::Bias(&w.head.bias),
            Activation::Relu6,
            head_out,
        );
        let mut pooled = vec![0.0; FEATURE_DIM];
        kernels::sum_rows(head_out, &mut pooled);
        let scale = 1.0 / pixels as f32;
        pooled.iter_mut().for_each(|v| *v *= scale);
        mark(&mut profile);
        pooled
    }

    /// ImageNet logits of one feature row, when the checkpoint had a classifier.
    pub fn logits(&self, features: &[f32]) -> Option<Vec<f32>> {
        let fc = self.weights.classifier.as_ref()?;
        let mut out = vec![0.0; fc.c_out];
        fc.apply(
            features,
            1,
            Init::Bias(&fc.bias),
            Activation::Identity,
            &mut out,
        );
        Some(out)
    }
}

/// One block, `scratch.current` to `scratch.next`, band by band: expand the input rows the
/// band's taps need and that the window does not hold yet (rows the previous band also read
/// are moved to the window's front), depthwise into the band buffer, project into the output.
fn run_block(
    block: &Block,
    at: &BlockPlan,
    scratch: &mut Scratch,
    mut times: Option<&mut [Duration; 3]>,
) {
    let Scratch {
        current,
        next,
        window,
        band,
        ..
    } = scratch;
    let s = &at.shape;
    let hidden = block.depthwise.channels;
    let in_row = at.in_w * at.c_in;
    let c_out = block.project.c_out;
    let input = &current[..at.in_h * in_row];
    // Input rows held by the window: `held.start` is at the window's first float.
    let mut held = 0..0;
    let mut oy = 0;
    let mut clock = times.is_some().then(Instant::now);
    while oy < s.out_h {
        let rows = oy..(oy + at.band_rows).min(s.out_h);
        let needed = s.input_rows(rows.clone());
        let (dw_in, first_row): (&[f32], usize) = match &block.expand {
            None => (input, 0),
            Some(expand) => {
                let row = at.in_w * hidden;
                let kept = needed.start.max(held.start)..held.end.max(needed.start);
                if !kept.is_empty() {
                    let from = (kept.start - held.start) * row..(kept.end - held.start) * row;
                    window.copy_within(from, 0);
                }
                let fresh = kept.end..needed.end;
                let at_row = (fresh.start - needed.start) * row;
                expand.apply(
                    &input[fresh.start * in_row..fresh.end * in_row],
                    fresh.len() * at.in_w,
                    Init::Bias(&expand.bias),
                    Activation::Relu6,
                    &mut window[at_row..at_row + fresh.len() * row],
                );
                held = needed.clone();
                (&window[..needed.len() * row], needed.start)
            }
        };
        lap(&mut times, 0, &mut clock);
        let pixels = rows.len() * s.out_w;
        let band = &mut band[..pixels * hidden];
        kernels::depthwise_relu6(&block.depthwise, s, dw_in, first_row, rows.clone(), band);
        lap(&mut times, 1, &mut clock);
        let first = rows.start * s.out_w;
        let init = match block.residual {
            true => Init::BiasResidual(
                &block.project.bias,
                &input[first * at.c_in..(first + pixels) * at.c_in],
            ),
            false => Init::Bias(&block.project.bias),
        };
        let out = &mut next[first * c_out..(first + pixels) * c_out];
        block
            .project
            .apply(band, pixels, init, Activation::Identity, out);
        lap(&mut times, 2, &mut clock);
        oy = rows.end;
    }
}

/// Adds the time since `since` to `times[i]` and restarts the clock (profiling only).
fn lap(times: &mut Option<&mut [Duration; 3]>, i: usize, since: &mut Option<Instant>) {
    if let (Some(k), Some(t)) = (times.as_deref_mut(), since.as_mut()) {
        let now = Instant::now();
        k[i] += now - *t;
        *t = now;
    }
}
