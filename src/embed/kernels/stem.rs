//! The stem: a dense convolution from the 3 image channels to any number of outputs, bias and
//! ReLU6 fused, over a normalised NHWC image.

use super::geometry::{ConvShape, Padding, Taps};
use super::simd::Simd;
use super::{dispatch, Kernel};

/// Output channels the stem kernel computes at once (its register block): the stem of every
/// EfficientNet-Lite and of MobileNetV2 at width 1.0 is exactly one block. Other widths are
/// computed in blocks of this many channels, the last one zero-padded.
pub const STEM_BLOCK: usize = 32;

/// Image channels the stem reads.
const C_IN: usize = 3;

/// The stem convolution packed once at load: weights `[kernel][kernel][3][padded]` (output
/// channels zero-padded to a multiple of [`STEM_BLOCK`]), so each tap reads the weights of a
/// block of output channels with unit stride, and its geometry.
#[derive(Clone, Debug)]
pub struct StemWeights {
    data: Vec<f32>,
    bias: Vec<f32>,
    channels: usize,
    padded: usize,
    kernel: usize,
    stride: usize,
    padding: Padding,
}

impl StemWeights {
    /// From PyTorch's OIHW layout `[out][3][kernel][kernel]`, with one bias per output.
    pub fn new(oihw: &[f32], bias: &[f32], kernel: usize, stride: usize, padding: Padding) -> Self {
        let taps = kernel * kernel;
        let channels = bias.len();
        assert!(channels > 0, "stem without outputs");
        assert_eq!(oihw.len(), channels * C_IN * taps, "stem weights");
        let padded = channels.div_ceil(STEM_BLOCK) * STEM_BLOCK;
        let mut data = vec![0.0; taps * C_IN * padded];
        for o in 0..channels {
            for i in 0..C_IN {
                for t in 0..taps {
                    data[(t * C_IN + i) * padded + o] = oihw[(o * C_IN + i) * taps + t];
                }
            }
        }
        let mut bias = bias.to_vec();
        bias.resize(padded, 0.0);
        Self {
            data,
            bias,
            channels,
            padded,
            kernel,
            stride,
            padding,
        }
    }

    /// Output channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The stem's geometry over an `in_h x in_w` image.
    pub fn shape(&self, in_h: usize, in_w: usize) -> ConvShape {
        ConvShape::new(in_h, in_w, self.kernel, self.stride, self.padding)
    }
}

/// The stem over one image: `input` is `in_h x in_w x 3`, `out` `out_h x out_w x channels`.
/// A channel count that is not a multiple of [`STEM_BLOCK`] goes through a padded scratch
/// buffer, then is copied out.
pub fn stem_relu6(shape: &ConvShape, input: &[f32], weights: &StemWeights, out: &mut [f32]) {
    let s = shape;
    assert_eq!(
        (s.kernel, s.stride),
        (weights.kernel, weights.stride),
        "stem geometry"
    );
    assert_eq!(input.len(), s.in_pixels() * C_IN, "stem input");
    let c = weights.channels;
    assert!(out.len() >= s.out_pixels() * c, "stem output too short");
    if c == weights.padded {
        return dispatch(StemCall {
            s,
            input,
            weights,
            out,
        });
    }
    let mut padded = vec![0.0; s.out_pixels() * weights.padded];
    dispatch(StemCall {
        s,
        input,
        weights,
        out: &mut padded,
    });
    for (to, from) in out
        .chunks_exact_mut(c)
        .zip(padded.chunks_exact(weights.padded))
    {
        to.copy_from_slice(&from[..c]);
    }
}

/// [`stem_relu6`]'s operands, as it checked them.
struct StemCall<'a> {
    s: &'a ConvShape,
    input: &'a [f32],
    weights: &'a StemWeights,
    out: &'a mut [f32],
}

impl Kernel for StemCall<'_> {
    type Output = ();

    /// Each pixel's block of 32 channels in `32 / LANES` registers, and as many pixels per
    /// tap's weight load as the remaining registers allow (measured: 6 with AVX-512, 2 with
    /// AVX2).
    #[inline(always)]
    unsafe fn run<V: Simd>(self) {
        let (s, i, w, o) = (self.s, self.input, self.weights, self.out);
        // SAFETY: the lengths are as `stem_relu6` checked them (`o` holds `padded` channels
        // per pixel) and `V` is usable (`dispatch`); each arm's register count times
        // `V::LANES` is `STEM_BLOCK`.
        unsafe {
            match V::LANES {
                16 => stem_body::<V, 2, 6>(s, i, w, o),
                8 => stem_body::<V, 4, 2>(s, i, w, o),
                4 => stem_body::<V, 8, 1>(s, i, w, o),
                _ => stem_body::<V, STEM_BLOCK, 1>(s, i, w, o),
            }
        }
    }
}

/// For each block of 32 output channels, output pixels in groups of `P` (the rest one by one),
/// the block in `NV` registers: a tap's weights are loaded once for the group.
///
/// # Safety
/// Slices as checked by [`stem_relu6`], `out` holding `weights.padded` channels per pixel;
/// `NV * S::LANES == STEM_BLOCK`; `S` is usable.
#[inline(always)]
unsafe fn stem_body<S: Simd, const NV: usize, const P: usize>(
    s: &ConvShape,
    input: &[f32],
    weights: &StemWeights,
    out: &mut [f32],
) {
    assert_eq!(NV * S::LANES, STEM_BLOCK);
    assert!(out.len() >= s.out_pixels() * weights.padded);
    for block in (0..weights.padded).step_by(STEM_BLOCK) {
        // SAFETY: the bias holds `padded` floats, `block + STEM_BLOCK <= padded`; `S` is
        // usable (caller).
        let start: [S::V; NV] = std::array::from_fn(|v| unsafe {
            S::load(weights.bias.as_ptr().add(block + v * S::LANES))
        });
        let io = StemIo {
            s,
            input,
            weights: &weights.data,
            padded: weights.padded,
            block,
            start,
        };
        for oy in 0..s.out_h {
            let mut ox = 0;
            // SAFETY: pixels `ox..ox + P` (or `ox`) of row `oy` exist; slices and `S` as the
            // caller guarantees.
            unsafe {
                while ox + P <= s.out_w {
                    stem_pixels::<S, NV, P>(&io, oy, ox, out);
                    ox += P;
                }
                while ox < s.out_w {
                    stem_pixels::<S, NV, 1>(&io, oy, ox, out);
                    ox += 1;
                }
            }
        }
    }
}

/// The read-only operands of the stem, for one block of output channels.
struct StemIo<'a, S: Simd, const NV: usize> {
    s: &'a ConvShape,
    input: &'a [f32],
    weights: &'a [f32],
    /// Output channels per pixel, in the packed weights and in the output.
    padded: usize,
    /// First output channel of the block.
    block: usize,
    /// The block's bias, in registers.
    start: [S::V; NV],
}

/// Output pixels `ox..ox + P` of row `oy`, the block's 32 channels. Taps outside the image
/// (the padding) are skipped pixel by pixel.
///
/// # Safety
/// As [`stem_body`]; the pixels exist.
#[inline(always)]
unsafe fn stem_pixels<S: Simd, const NV: usize, const P: usize>(
    io: &StemIo<'_, S, NV>,
    oy: usize,
    ox: usize,
    out: &mut [f32],
) {
    let s = io.s;
    let y = s.taps(oy, s.in_h, s.pad_top);
    let xs: [Taps; P] = std::array::from_fn(|p| s.taps(ox + p, s.in_w, s.pad_left));
    let inside = xs.iter().all(|x| x.lo == 0 && x.hi == s.kernel);
    let mut acc = [io.start; P];
    // SAFETY: rows `y.first + ky` for `ky` in `y.lo..y.hi` and columns `x.first + kx` for `kx`
    // in `x.lo..x.hi` are inside the image (`taps`), so every input read is inside `input`
    // (`in_h x in_w x 3`); a tap's block of weights is `STEM_BLOCK` floats inside
    // `[k][k][3][padded]` (`block + STEM_BLOCK <= padded`); output pixels `ox..ox + P` of row
    // `oy` exist, `padded` channels each (caller). `S` is usable (caller).
    unsafe {
        for ky in y.lo..y.hi {
            let row = (y.first + ky as isize) as usize * s.in_w;
            for kx in 0..s.kernel {
                for ci in 0..C_IN {
                    let w = io
                        .weights
                        .as_ptr()
                        .add(((ky * s.kernel + kx) * C_IN + ci) * io.padded + io.block);
                    let wv: [S::V; NV] = std::array::from_fn(|v| S::load(w.add(v * S::LANES)));
                    for (acc, x) in acc.iter_mut().zip(&xs) {
                        if !inside && (kx < x.lo || kx >= x.hi) {
                            continue;
                        }
                        let px = row + (x.first + kx as isize) as usize;
                        let v = S::splat(*io.input.as_ptr().add(px * C_IN + ci));
                        for (a, w) in acc.iter_mut().zip(&wv) {
                            *a = S::madd(v, *w, *a);
                        }
                    }
                }
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            let o = out
                .as_mut_ptr()
                .add((oy * s.out_w + ox + p) * io.padded + io.block);
            for (l, &a) in acc.iter().enumerate() {
                S::store(o.add(l * S::LANES), S::relu6(a));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::geometry::Padding;
    use super::super::testing::{on_every_isa, values};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Wide enough for the register groups of pixels and the remainder, both paddings,
        /// the family's stem widths (8, 16, 24: narrow MobileNetV2s; 32; 48: width 1.4) and
        /// an odd one.
        #[test]
        fn stem_matches_a_direct_convolution(
            h in 1usize..20, w in 1usize..40, stride in 1usize..3, symmetric: bool,
            channels in prop::sample::select(vec![8usize, 16, 24, 32, 48, 5]),
            seed in 0u64..1000,
        ) {
            let padding = if symmetric { Padding::Symmetric } else { Padding::Same };
            let s = ConvShape::new(h, w, 3, stride, padding);
            let input = values(s.in_pixels() * 3, seed);
            let oihw = values(9 * 3 * channels, seed + 1);
            let bias = values(channels, seed + 2);
            for (isa, out) in on_every_isa(|| {
                let weights = StemWeights::new(&oihw, &bias, 3, stride, padding);
                let mut out = vec![f32::NAN; s.out_pixels() * channels];
                stem_relu6(&s, &input, &weights, &mut out);
                out
            }) {
                for p in 0..s.out_pixels() {
                    let (oy, ox) = (p / s.out_w, p % s.out_w);
                    for co in 0..channels {
                        let mut want = bias[co] as f64;
                        for (ky, kx, ci) in kernel_taps() {
                            let iy = (oy * stride + ky) as isize - s.pad_top as isize;
                            let ix = (ox * stride + kx) as isize - s.pad_left as isize;
                            if iy < 0 || ix < 0 || iy as usize >= s.in_h || ix as usize >= s.in_w {
                                continue;
                            }
                            let v = input[(iy as usize * s.in_w + ix as usize) * 3 + ci];
                            want += v as f64 * oihw[((co * 3 + ci) * 3 + ky) * 3 + kx] as f64;
                        }
                        let got = out[p * channels + co];
                        prop_assert!(
                            (got - (want as f32).clamp(0.0, 6.0)).abs() < 1e-4,
                            "{:?}: {} vs {}", isa, got, want
                        );
                    }
                }
            }
        }
    }

    /// Every (ky, kx, input channel) of a 3x3 kernel over RGB.
    fn kernel_taps() -> impl Iterator<Item = (usize, usize, usize)> {
        (0..3).flat_map(|ky| (0..3).flat_map(move |kx| (0..3).map(move |ci| (ky, kx, ci))))
    }
}
