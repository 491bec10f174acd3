//! The stem: a dense convolution from the 3 image channels to [`STEM_OUT`], bias and ReLU6
//! fused, over a normalised NHWC image.

use super::geometry::{ConvShape, Padding, Taps};
use super::simd::Simd;
use super::{dispatch, Kernel};

/// Output channels of the stem kernel: every model of the family starts with 32 (the Lite
/// variants do not scale their stem).
pub const STEM_OUT: usize = 32;

/// Image channels the stem reads.
const C_IN: usize = 3;

/// The stem convolution packed once at load: weights `[kernel][kernel][3][STEM_OUT]`, so each
/// tap reads the weights of all output channels with unit stride, and its geometry.
#[derive(Clone, Debug)]
pub struct StemWeights {
    data: Vec<f32>,
    bias: Vec<f32>,
    kernel: usize,
    stride: usize,
    padding: Padding,
}

impl StemWeights {
    /// From PyTorch's OIHW layout `[STEM_OUT][3][kernel][kernel]`, with one bias per output.
    pub fn new(oihw: &[f32], bias: &[f32], kernel: usize, stride: usize, padding: Padding) -> Self {
        let taps = kernel * kernel;
        assert_eq!(oihw.len(), STEM_OUT * C_IN * taps, "stem weights");
        assert_eq!(bias.len(), STEM_OUT, "stem bias");
        let mut data = vec![0.0; taps * C_IN * STEM_OUT];
        for o in 0..STEM_OUT {
            for i in 0..C_IN {
                for t in 0..taps {
                    data[(t * C_IN + i) * STEM_OUT + o] = oihw[(o * C_IN + i) * taps + t];
                }
            }
        }
        Self {
            data,
            bias: bias.to_vec(),
            kernel,
            stride,
            padding,
        }
    }

    /// The stem's geometry over an `in_h x in_w` image.
    pub fn shape(&self, in_h: usize, in_w: usize) -> ConvShape {
        ConvShape::new(in_h, in_w, self.kernel, self.stride, self.padding)
    }
}

/// The stem over one image: `input` is `in_h x in_w x 3`, `out` `out_h x out_w x STEM_OUT`.
pub fn stem_relu6(shape: &ConvShape, input: &[f32], weights: &StemWeights, out: &mut [f32]) {
    let s = shape;
    assert_eq!(
        (s.kernel, s.stride),
        (weights.kernel, weights.stride),
        "stem geometry"
    );
    assert_eq!(input.len(), s.in_pixels() * C_IN, "stem input");
    assert!(
        out.len() >= s.out_pixels() * STEM_OUT,
        "stem output too short"
    );
    dispatch(StemCall {
        s,
        input,
        weights,
        out,
    })
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

    /// Each pixel's 32 channels in `32 / LANES` registers, and as many pixels per tap's weight
    /// load as the remaining registers allow (measured: 6 with AVX-512, 2 with AVX2).
    #[inline(always)]
    unsafe fn run<V: Simd>(self) {
        let (s, i, w, o) = (self.s, self.input, self.weights, self.out);
        // SAFETY: the lengths are as `stem_relu6` checked them and `V` is usable (`dispatch`);
        // each arm's register count times `V::LANES` is `STEM_OUT`.
        unsafe {
            match V::LANES {
                16 => stem_body::<V, 2, 6>(s, i, w, o),
                8 => stem_body::<V, 4, 2>(s, i, w, o),
                4 => stem_body::<V, 8, 1>(s, i, w, o),
                _ => stem_body::<V, STEM_OUT, 1>(s, i, w, o),
            }
        }
    }
}

/// Output pixels in groups of `P` (the rest one by one), each pixel's 32 channels in `NV`
/// registers: a tap's weights are loaded once for the group.
///
/// # Safety
/// Slices as checked by [`stem_relu6`]; `NV * S::LANES == STEM_OUT`; `S` is usable.
#[inline(always)]
unsafe fn stem_body<S: Simd, const NV: usize, const P: usize>(
    s: &ConvShape,
    input: &[f32],
    weights: &StemWeights,
    out: &mut [f32],
) {
    assert_eq!(NV * S::LANES, STEM_OUT);
    // SAFETY: the bias holds `STEM_OUT = NV * LANES` floats; `S` is usable (caller).
    let start: [S::V; NV] =
        std::array::from_fn(|v| unsafe { S::load(weights.bias.as_ptr().add(v * S::LANES)) });
    let io = StemIo {
        s,
        input,
        weights: &weights.data,
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

/// The read-only operands of the stem.
struct StemIo<'a, S: Simd, const NV: usize> {
    s: &'a ConvShape,
    input: &'a [f32],
    weights: &'a [f32],
    /// The bias, in registers.
    start: [S::V; NV],
}

/// Output pixels `ox..ox + P` of row `oy`, all 32 channels. Taps outside the image (the
/// padding) are skipped pixel by pixel.
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
    // (`in_h x in_w x 3`); a tap's weights are `STEM_OUT` floats inside `[k][k][3][STEM_OUT]`;
    // output pixels `ox..ox + P` of row `oy` exist (caller). `S` is usable (caller).
    unsafe {
        for ky in y.lo..y.hi {
            let row = (y.first + ky as isize) as usize * s.in_w;
            for kx in 0..s.kernel {
                for ci in 0..C_IN {
                    let w = io
                        .weights
                        .as_ptr()
                        .add(((ky * s.kernel + kx) * C_IN + ci) * STEM_OUT);
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
            let o = out.as_mut_ptr().add((oy * s.out_w + ox + p) * STEM_OUT);
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
        /// Wide enough for the register groups of pixels and the remainder, both paddings.
        #[test]
        fn stem_matches_a_direct_convolution(
            h in 1usize..20, w in 1usize..40, stride in 1usize..3, symmetric: bool,
            seed in 0u64..1000,
        ) {
            let padding = if symmetric { Padding::Symmetric } else { Padding::Same };
            let s = ConvShape::new(h, w, 3, stride, padding);
            let input = values(s.in_pixels() * 3, seed);
            let oihw = values(9 * 3 * STEM_OUT, seed + 1);
            let bias = values(STEM_OUT, seed + 2);
            for (isa, out) in on_every_isa(|| {
                let weights = StemWeights::new(&oihw, &bias, 3, stride, padding);
                let mut out = vec![f32::NAN; s.out_pixels() * STEM_OUT];
                stem_relu6(&s, &input, &weights, &mut out);
                out
            }) {
                for p in 0..s.out_pixels() {
                    let (oy, ox) = (p / s.out_w, p % s.out_w);
                    for co in 0..STEM_OUT {
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
                        let got = out[p * STEM_OUT + co];
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
