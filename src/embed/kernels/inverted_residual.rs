//! An inverted-residual block (1x1 expansion with ReLU6, depthwise with ReLU6, linear 1x1
//! projection, optional shortcut) as one fused pass over bands of output rows.
//!
//! The expansion fills a sliding window with just the input rows the band's depthwise taps
//! read (activated as stored), the depthwise convolution turns them into a band buffer, and the
//! projection writes the band's rows of the block output (bias and residual loaded into its
//! accumulators). The expanded tensor (4.8 MB for the first expanded block at 224x224) and the
//! depthwise output never exist whole: a block's working set stays in L2, and only block inputs
//! and outputs, the narrow tensors, go through memory.

use super::depthwise::{depthwise_relu6, DepthwiseWeights};
use super::geometry::{ConvShape, Padding};
use super::pointwise::{Activation, Pointwise};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Output pixels a band aims for: enough rows for the 1x1 kernels' 6-pixel register blocks to
/// stay full, few enough that a band's window and output stay in L2.
const BAND_PIXELS: usize = 96;

/// One inverted-residual block in kernel layouts, packed once at load.
#[derive(Clone, Debug)]
pub struct InvertedResidual {
    expand: Option<Pointwise>,
    depthwise: DepthwiseWeights,
    project: Pointwise,
    residual: bool,
    padding: Padding,
}

/// Buffers of the band pass, kept by the caller between blocks and images (they only grow).
#[derive(Debug, Default)]
pub struct BandScratch {
    /// Expanded (activated) rows that the current band's depthwise taps read.
    window: Vec<f32>,
    /// The current band's depthwise output.
    band: Vec<f32>,
}

impl BandScratch {
    /// `len` floats of `buf`, grown (never shrunk) to hold them.
    fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        &mut buf[..len]
    }
}

impl InvertedResidual {
    /// A block from its packed layers; `residual` adds the block input to its output (stride 1
    /// and as many output as input channels).
    pub fn new(
        expand: Option<Pointwise>,
        depthwise: DepthwiseWeights,
        project: Pointwise,
        residual: bool,
        padding: Padding,
    ) -> Self {
        let hidden = depthwise.channels;
        if let Some(e) = &expand {
            assert_eq!(
                e.c_out(),
                hidden,
                "expansion feeds the depthwise convolution"
            );
        }
        assert_eq!(project.c_in(), hidden, "depthwise feeds the projection");
        let block = Self {
            expand,
            depthwise,
            project,
            residual,
            padding,
        };
        assert!(
            !residual || (block.depthwise.stride == 1 && block.c_in() == block.c_out()),
            "a shortcut needs stride 1 and equal channels"
        );
        block
    }

    /// Input channels.
    pub fn c_in(&self) -> usize {
        self.expand
            .as_ref()
            .map_or(self.depthwise.channels, Pointwise::c_in)
    }

    /// Channels of the expanded (depthwise) tensor.
    pub fn hidden(&self) -> usize {
        self.depthwise.channels
    }

    /// Output channels.
    pub fn c_out(&self) -> usize {
        self.project.c_out()
    }

    /// The depthwise convolution's geometry over an `in_h x in_w` input.
    pub fn shape(&self, in_h: usize, in_w: usize) -> ConvShape {
        let dw = &self.depthwise;
        ConvShape::new(in_h, in_w, dw.kernel, dw.stride, self.padding)
    }

    /// The block over one NHWC image: `input` is `in_h x in_w x c_in`, `out` receives
    /// `out_h x out_w x c_out` ([`shape`](Self::shape)). Band by band: expand the input rows
    /// the band's taps need and that the window does not hold yet (rows the previous band also
    /// read are moved to the window's front), depthwise into the band buffer, project into the
    /// output.
    pub fn run(
        &self,
        input: &[f32],
        in_h: usize,
        in_w: usize,
        scratch: &mut BandScratch,
        out: &mut [f32],
    ) {
        let s = self.shape(in_h, in_w);
        let (c_in, hidden, c_out) = (self.c_in(), self.hidden(), self.c_out());
        let in_row = in_w * c_in;
        assert_eq!(input.len(), in_h * in_row, "block input");
        assert!(
            out.len() >= s.out_pixels() * c_out,
            "block output too short"
        );
        let band_rows = BAND_PIXELS.div_ceil(s.out_w).clamp(1, s.out_h);
        let window_rows = ((band_rows - 1) * s.stride + s.kernel).min(in_h);
        let row = in_w * hidden;
        let BandScratch { window, band } = scratch;
        let window = match self.expand {
            Some(_) => BandScratch::sized(window, window_rows * row),
            None => &mut [],
        };
        let band = BandScratch::sized(band, band_rows * s.out_w * hidden);
        let mut clock = Laps::start();
        // Input rows held by the window: `held.start` is at the window's first float.
        let mut held = 0..0;
        let mut oy = 0;
        while oy < s.out_h {
            let rows = oy..(oy + band_rows).min(s.out_h);
            let needed = s.input_rows(rows.clone());
            let (dw_in, first_row): (&[f32], usize) = match &self.expand {
                None => (input, 0),
                Some(expand) => {
                    let kept = needed.start.max(held.start)..held.end.max(needed.start);
                    if !kept.is_empty() {
                        let from = (kept.start - held.start) * row..(kept.end - held.start) * row;
                        window.copy_within(from, 0);
                    }
                    let fresh = kept.end..needed.end;
                    let at_row = (fresh.start - needed.start) * row;
                    expand.apply(
                        &input[fresh.start * in_row..fresh.end * in_row],
                        fresh.len() * in_w,
                        None,
                        Activation::Relu6,
                        &mut window[at_row..at_row + fresh.len() * row],
                    );
                    held = needed.clone();
                    (&window[..needed.len() * row], needed.start)
                }
            };
            clock.lap(0);
            let pixels = rows.len() * s.out_w;
            let band = &mut band[..pixels * hidden];
            depthwise_relu6(&self.depthwise, &s, dw_in, first_row, rows.clone(), band);
            clock.lap(1);
            let first = rows.start * s.out_w;
            let residual = self
                .residual
                .then(|| &input[first * c_in..(first + pixels) * c_in]);
            let out = &mut out[first * c_out..(first + pixels) * c_out];
            self.project
                .apply(band, pixels, residual, Activation::Identity, out);
            clock.lap(2);
            oy = rows.end;
        }
        clock.finish();
    }
}

thread_local! {
    /// Time this thread's blocks spent in expansion, depthwise and projection, while
    /// [`kernel_times`] is measuring.
    static KERNEL_TIMES: Cell<Option<[Duration; 3]>> = const { Cell::new(None) };
}

/// Runs `f` and returns, with its result, the time the blocks it ran on this thread spent in
/// their expansion, depthwise and projection kernels (profiling: `cargo bench --bench embed`).
pub fn kernel_times<R>(f: impl FnOnce() -> R) -> (R, [Duration; 3]) {
    KERNEL_TIMES.with(|t| t.set(Some([Duration::ZERO; 3])));
    let result = f();
    let times = KERNEL_TIMES.with(|t| t.take()).unwrap_or_default();
    (result, times)
}

/// The clock of one block while [`kernel_times`] measures (nothing otherwise).
struct Laps {
    since: Option<Instant>,
    times: [Duration; 3],
}

impl Laps {
    fn start() -> Self {
        let on = KERNEL_TIMES.with(|t| t.get().is_some());
        Self {
            since: on.then(Instant::now),
            times: [Duration::ZERO; 3],
        }
    }

    /// Adds the time since the last lap to kernel `i`.
    fn lap(&mut self, i: usize) {
        if let Some(since) = &mut self.since {
            let now = Instant::now();
            self.times[i] += now - *since;
            *since = now;
        }
    }

    fn finish(self) {
        if self.since.is_some() {
            KERNEL_TIMES.with(|t| {
                if let Some(mut sum) = t.get() {
                    for (s, x) in sum.iter_mut().zip(self.times) {
                        *s += x;
                    }
                    t.set(Some(sum));
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::values;
    use super::*;
    use proptest::prelude::*;

    /// The block computed layer by layer on whole tensors (expansion, depthwise, projection,
    /// shortcut), in f64.
    #[allow(clippy::too_many_arguments)] // one argument per layer and geometry, as in the block
    fn unfused(
        input: &[f32],
        (h, w): (usize, usize),
        expand: Option<(&[f32], &[f32])>,
        dw: (&[f32], &[f32]),
        project: (&[f32], &[f32]),
        (c_in, hidden, c_out, k, stride): (usize, usize, usize, usize, usize),
        residual: bool,
        padding: Padding,
    ) -> Vec<f32> {
        let relu6 = |x: f64| x.clamp(0.0, 6.0);
        let expanded: Vec<f64> = match expand {
            None => input.iter().map(|&x| x as f64).collect(),
            Some((we, be)) => (0..h * w)
                .flat_map(|p| {
                    (0..hidden).map(move |o| {
                        let sum: f64 = (0..c_in)
                            .map(|i| input[p * c_in + i] as f64 * we[o * c_in + i] as f64)
                            .sum();
                        relu6(be[o] as f64 + sum)
                    })
                })
                .collect(),
        };
        let s = ConvShape::new(h, w, k, stride, padding);
        let mut depth = vec![0f64; s.out_pixels() * hidden];
        for oy in 0..s.out_h {
            for ox in 0..s.out_w {
                for ch in 0..hidden {
                    let mut acc = dw.1[ch] as f64;
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * stride + ky) as isize - s.pad_top as isize;
                            let ix = (ox * stride + kx) as isize - s.pad_left as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            acc += expanded[(iy as usize * w + ix as usize) * hidden + ch]
                                * dw.0[(ch * k + ky) * k + kx] as f64;
                        }
                    }
                    depth[(oy * s.out_w + ox) * hidden + ch] = relu6(acc);
                }
            }
        }
        (0..s.out_pixels())
            .flat_map(|p| {
                let depth = &depth;
                (0..c_out).map(move |o| {
                    let mut acc = project.1[o] as f64;
                    for i in 0..hidden {
                        acc += depth[p * hidden + i] * project.0[o * hidden + i] as f64;
                    }
                    if residual {
                        acc += input[p * c_out + o] as f64;
                    }
                    acc as f32
                })
            })
            .collect()
    }

    proptest! {
        /// The band pass (windows of expanded rows, bands of depthwise output) equals the
        /// block computed layer by layer on whole tensors, for sizes that make several bands,
        /// odd sizes, both strides and paddings, with and without expansion and shortcut.
        #[test]
        fn fused_block_equals_the_layers_one_after_another(
            h in 1usize..30, w in 1usize..30, c_in in 1usize..24, ratio in 1usize..4,
            c_out in 1usize..24, k in prop::sample::select(vec![3usize, 5]),
            stride in 1usize..3, symmetric: bool, shortcut: bool, seed in 0u64..1000,
        ) {
            let padding = if symmetric { Padding::Symmetric } else { Padding::Same };
            let hidden = c_in * ratio;
            let residual = shortcut && stride == 1;
            let c_out = if residual { c_in } else { c_out };
            let input = values(h * w * c_in, seed);
            let (we, be) = (values(hidden * c_in, seed + 1), values(hidden, seed + 2));
            let (wd, bd) = (values(hidden * k * k, seed + 3), values(hidden, seed + 4));
            let (wp, bp) = (values(c_out * hidden, seed + 5), values(c_out, seed + 6));
            let expand = (ratio > 1).then_some((we.as_slice(), be.as_slice()));
            let want = unfused(
                &input, (h, w), expand, (&wd, &bd), (&wp, &bp),
                (c_in, hidden, c_out, k, stride), residual, padding,
            );
            let block = InvertedResidual::new(
                expand.map(|(w, b)| Pointwise::from_out_in(w, b, hidden, c_in)),
                DepthwiseWeights::new(&wd, &bd, hidden, k, stride),
                Pointwise::from_out_in(&wp, &bp, c_out, hidden),
                residual,
                padding,
            );
            let s = block.shape(h, w);
            let mut out = vec![f32::NAN; s.out_pixels() * c_out];
            block.run(&input, h, w, &mut BandScratch::default(), &mut out);
            prop_assert_eq!(out.len(), want.len());
            for (a, b) in out.iter().zip(&want) {
                prop_assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
        }
    }
}
