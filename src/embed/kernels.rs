//! verger's own CPU kernels for the three layer kinds of the network, on NHWC activations
//! (channels contiguous, so every inner loop runs over channels with unit stride).
//!
//! - 1x1 convolutions ([`pointwise`]) are matrix products `[pixels x C_in] x [C_in x C_out]`
//!   tiled in registers, with bias, ReLU6 or the residual fused into the store.
//! - Depthwise convolutions ([`depthwise_relu6`]) and the 3-channel stem ([`stem_relu6`]) are
//!   direct loops with TensorFlow "SAME" padding, bias and ReLU6 fused, accumulating blocks of
//!   channels in registers.
//!
//! Each kernel is written once over [`Simd`] vectors and compiled per instruction set
//! (AVX-512, AVX2+FMA, SSE2; plain floats elsewhere), picked at run time: one binary runs on any
//! x86-64 and uses AVX-512 where the CPU has it. Everything runs on the calling thread:
//! parallelism comes from timely workers, one per core.

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512, Sse};
use super::simd::{Scalar, Simd};

/// Instruction sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// AVX-512F (with FMA): 16 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX2 + FMA: 8 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The target's baseline (SSE2 on x86-64, scalar elsewhere).
    Baseline,
}

/// The best instruction set of this CPU, detected once.
fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    })
}

/// Geometry of a convolution with TensorFlow "SAME" padding over an NHWC image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Square kernel side.
    pub kernel: usize,
    /// Stride in both dimensions.
    pub stride: usize,
    /// Padding before the first row.
    pub pad_top: usize,
    /// Padding before the first column.
    pub pad_left: usize,
    /// Output height, `ceil(in_h / stride)`.
    pub out_h: usize,
    /// Output width, `ceil(in_w / stride)`.
    pub out_w: usize,
}

impl ConvShape {
    /// "SAME" geometry of a `kernel` x `kernel` convolution with `stride` over `in_h` x `in_w`.
    pub fn same(in_h: usize, in_w: usize, kernel: usize, stride: usize) -> Self {
        use super::architecture::same_padding;
        Self {
            in_h,
            in_w,
            kernel,
            stride,
            pad_top: same_padding(in_h, kernel, stride).0,
            pad_left: same_padding(in_w, kernel, stride).0,
            out_h: in_h.div_ceil(stride),
            out_w: in_w.div_ceil(stride),
        }
    }

    /// Input pixels per image.
    pub fn in_pixels(&self) -> usize {
        self.in_h * self.in_w
    }

    /// Output pixels per image.
    pub fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Kernel taps inside the image for output row `o` (or column, with `in_w` and
    /// `pad_left`): first input coordinate (may be negative) and the valid tap range.
    #[inline(always)]
    fn taps(&self, o: usize, size: usize, pad: usize) -> Taps {
        let first = (o * self.stride) as isize - pad as isize;
        let lo = (-first).max(0) as usize;
        let hi = (size as isize - first).min(self.kernel as isize).max(0) as usize;
        Taps { first, lo, hi }
    }
}

/// Valid kernel taps along one axis for one output coordinate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Taps {
    /// Input coordinate of tap 0 (negative inside the top/left padding).
    first: isize,
    /// First tap inside the image.
    lo: usize,
    /// One past the last tap inside the image.
    hi: usize,
}

/// What a 1x1 convolution's output starts from before the product is accumulated onto it.
#[derive(Clone, Copy, Debug)]
pub enum Init<'a> {
    /// Zero: the consumer adds the bias as it reads (saves a pass over a large output).
    Zero,
    /// The bias, broadcast to every pixel.
    Bias(&'a [f32]),
    /// Bias plus a residual laid out like the output (a projection with shortcut).
    BiasResidual(&'a [f32], &'a [f32]),
}

/// 1x1 convolution without activation: `out[p][o] = init[p][o] + sum_i input[p][i] *
/// weights[i][o]` for `pixels` rows of `c_in` channels, `weights` stored `[c_in][c_out]`.
///
/// The product is one call to the `gemm` crate (cache-blocked, packed, runtime-selected
/// AVX-512/AVX2/SSE micro-kernels), single-threaded, accumulating onto `out` after it has been
/// filled with the bias (and residual): no pass over the output after the product. ReLU6, where
/// the network wants it, is applied by the consumer as it reads ([`depthwise_relu6`] clamps
/// its input, [`sum_rows_relu6`] the head's), so it costs no extra pass either.
pub fn pointwise(
    input: &[f32],
    pixels: usize,
    c_in: usize,
    weights: &[f32],
    c_out: usize,
    init: Init<'_>,
    out: &mut [f32],
) {
    assert!(input.len() >= pixels * c_in, "pointwise input too short");
    assert_eq!(weights.len(), c_in * c_out, "pointwise weights");
    let out = &mut out[..pixels * c_out];
    match init {
        Init::Zero => {}
        Init::Bias(bias) => {
            assert_eq!(bias.len(), c_out, "pointwise bias");
            for row in out.chunks_exact_mut(c_out) {
                row.copy_from_slice(bias);
            }
        }
        Init::BiasResidual(bias, residual) => {
            assert_eq!(bias.len(), c_out, "pointwise bias");
            assert!(
                residual.len() >= pixels * c_out,
                "pointwise residual too short"
            );
            for (row, res) in out
                .chunks_exact_mut(c_out)
                .zip(residual.chunks_exact(c_out))
            {
                for ((o, b), r) in row.iter_mut().zip(bias).zip(res) {
                    *o = b + r;
                }
            }
        }
    }
    // SAFETY: the three row-major matrices lie within their slices (checked above) and `out`
    // does not alias the inputs (it is a `&mut`).
    unsafe {
        gemm::gemm(
            pixels,
            c_out,
            c_in,
            out.as_mut_ptr(),
            1,
            c_out as isize,
            !matches!(init, Init::Zero),
            input.as_ptr(),
            1,
            c_in as isize,
            weights.as_ptr(),
            1,
            c_out as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Adds `relu6(x + bias)` of every row of `x` (rows of `sum.len()` values) to `sum`: the
/// head's bias, activation and global average pooling in one pass (scaled by the caller).
pub fn sum_rows_bias_relu6(x: &[f32], bias: &[f32], sum: &mut [f32]) {
    assert_eq!(bias.len(), sum.len(), "one bias per column");
    for row in x.chunks_exact(sum.len()) {
        for ((s, v), b) in sum.iter_mut().zip(row).zip(bias) {
            *s += (v + b).clamp(0.0, 6.0);
        }
    }
}

/// Depthwise convolution of one NHWC image, finishing the previous layer as it reads:
/// `out = relu6(bias + sum_taps relu6(input + in_bias) * weight)`. `input` is
/// `in_h x in_w x channels`: the expansion's raw product, whose bias `in_bias` and ReLU6 are
/// applied here (or an activated tensor with a zero `in_bias`: ReLU6 is idempotent).
/// `weights` are `[kernel][kernel][channels]`, `out` `out_h x out_w x channels`.
///
/// Each tap's FMA depends on the previous one, so a single output pixel would wait on the FMA
/// latency; away from the left/right borders, four neighbouring output pixels are computed
/// together (independent accumulators, weights loaded once per tap for the four).
#[allow(clippy::too_many_arguments)]
pub fn depthwise_relu6(
    shape: &ConvShape,
    channels: usize,
    input: &[f32],
    in_bias: &[f32],
    weights: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    let s = shape;
    assert_eq!(input.len(), s.in_pixels() * channels, "depthwise input");
    assert_eq!(in_bias.len(), channels, "depthwise input bias");
    assert_eq!(
        weights.len(),
        s.kernel * s.kernel * channels,
        "depthwise weights"
    );
    assert_eq!(bias.len(), channels, "depthwise bias");
    assert!(
        out.len() >= s.out_pixels() * channels,
        "depthwise output too short"
    );
    let io = DepthwiseIo {
        s,
        c: channels,
        input,
        in_bias,
        weights,
        bias,
    };
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn avx512(io: &DepthwiseIo<'_>, o: &mut [f32]) {
            depthwise_body::<Avx512, Avx2>(io, o)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(io: &DepthwiseIo<'_>, o: &mut [f32]) {
            depthwise_body::<Avx2, Sse>(io, o)
        }
        match isa() {
            // SAFETY: `isa()` detected these features on this CPU.
            Isa::Avx512 => return unsafe { avx512(&io, out) },
            Isa::Avx2 => return unsafe { avx2(&io, out) },
            Isa::Baseline => {}
        }
        depthwise_body::<Sse, Scalar>(&io, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    depthwise_body::<Scalar, Scalar>(&io, out)
}

/// The read-only operands of one depthwise convolution.
struct DepthwiseIo<'a> {
    s: &'a ConvShape,
    c: usize,
    input: &'a [f32],
    in_bias: &'a [f32],
    weights: &'a [f32],
    bias: &'a [f32],
}

/// Output pixels computed together away from the borders.
const DW_PIXELS: usize = 4;

#[inline(always)]
fn depthwise_body<W: Simd, N: Simd>(io: &DepthwiseIo<'_>, out: &mut [f32]) {
    let s = io.s;
    // Output columns whose taps all fall inside the image horizontally.
    let inner_lo = s.pad_left.div_ceil(s.stride).min(s.out_w);
    let inner_hi = if s.in_w + s.pad_left >= s.kernel {
        ((s.in_w + s.pad_left - s.kernel) / s.stride + 1).clamp(inner_lo, s.out_w)
    } else {
        inner_lo
    };
    for oy in 0..s.out_h {
        let y = s.taps(oy, s.in_h, s.pad_top);
        let mut ox = 0;
        while ox < s.out_w {
            let group = if ox >= inner_lo && ox + DW_PIXELS <= inner_hi {
                DW_PIXELS
            } else {
                1
            };
            // SAFETY: output pixels ox..ox+group exist, their taps are inside the image (`taps`,
            // and the inner range for groups), and the slices have the lengths checked above.
            unsafe {
                if group == DW_PIXELS {
                    depthwise_pixels::<W, N, DW_PIXELS>(io, y, oy, ox, out);
                } else {
                    depthwise_pixels::<W, N, 1>(io, y, oy, ox, out);
                }
            }
            ox += group;
        }
    }
}

/// All channels of output pixels `ox..ox + P` of row `oy`: blocks of two wide vectors, one
/// wide, one narrow, then single floats.
///
/// # Safety
/// As in [`depthwise_body`]; when `P > 1` every pixel of the group must have all its
/// horizontal taps inside the image.
#[inline(always)]
unsafe fn depthwise_pixels<W: Simd, N: Simd, const P: usize>(
    io: &DepthwiseIo<'_>,
    y: Taps,
    oy: usize,
    ox: usize,
    out: &mut [f32],
) {
    let x = io.s.taps(ox, io.s.in_w, io.s.pad_left);
    let mut cb = 0;
    while cb + 2 * W::LANES <= io.c {
        depthwise_block::<W, 2, P>(io, cb, y, x, oy, ox, out);
        cb += 2 * W::LANES;
    }
    while cb + W::LANES <= io.c {
        depthwise_block::<W, 1, P>(io, cb, y, x, oy, ox, out);
        cb += W::LANES;
    }
    while cb + N::LANES <= io.c {
        depthwise_block::<N, 1, P>(io, cb, y, x, oy, ox, out);
        cb += N::LANES;
    }
    while cb < io.c {
        depthwise_block::<Scalar, 1, P>(io, cb, y, x, oy, ox, out);
        cb += 1;
    }
}

/// Channels `cb..cb + NV * S::LANES` of output pixels `ox..ox + P` (stride apart in the input).
/// `x` are the horizontal taps of pixel `ox`; with `P > 1` they are all valid.
///
/// # Safety
/// See [`depthwise_pixels`].
#[inline(always)]
unsafe fn depthwise_block<S: Simd, const NV: usize, const P: usize>(
    io: &DepthwiseIo<'_>,
    cb: usize,
    y: Taps,
    x: Taps,
    oy: usize,
    ox: usize,
    out: &mut [f32],
) {
    let (s, c) = (io.s, io.c);
    let b = io.bias.as_ptr().add(cb);
    let start: [S::V; NV] = std::array::from_fn(|v| S::load(b.add(v * S::LANES)));
    let ib = io.in_bias.as_ptr().add(cb);
    let in_bias: [S::V; NV] = std::array::from_fn(|v| S::load(ib.add(v * S::LANES)));
    let mut acc = [start; P];
    let step = s.stride * c;
    for ky in y.lo..y.hi {
        let row = (y.first + ky as isize) as usize * s.in_w;
        for kx in x.lo..x.hi {
            let at = (row + (x.first + kx as isize) as usize) * c + cb;
            let i = io.input.as_ptr().add(at);
            let w = io.weights.as_ptr().add((ky * s.kernel + kx) * c + cb);
            for v in 0..NV {
                let off = v * S::LANES;
                let wv = S::load(w.add(off));
                for (p, acc) in acc.iter_mut().enumerate() {
                    let xv = S::relu6(S::add(S::load(i.add(p * step + off)), in_bias[v]));
                    acc[v] = S::madd(xv, wv, acc[v]);
                }
            }
        }
    }
    for (p, acc) in acc.iter().enumerate() {
        let o = out.as_mut_ptr().add((oy * s.out_w + ox + p) * c + cb);
        for (v, &a) in acc.iter().enumerate() {
            S::store(o.add(v * S::LANES), S::relu6(a));
        }
    }
}

/// Output channels of the stem (fixed by the architecture).
pub const STEM_OUT: usize = super::architecture::STEM_CHANNELS;

/// The stem: a dense convolution from 3 input channels to [`STEM_OUT`], bias and ReLU6 fused.
/// `input` is `in_h x in_w x 3`, `weights` `[kernel][kernel][3][STEM_OUT]`.
pub fn stem_relu6(
    shape: &ConvShape,
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    let s = shape;
    assert_eq!(input.len(), s.in_pixels() * 3, "stem input");
    assert_eq!(
        weights.len(),
        s.kernel * s.kernel * 3 * STEM_OUT,
        "stem weights"
    );
    assert_eq!(bias.len(), STEM_OUT, "stem bias");
    assert!(
        out.len() >= s.out_pixels() * STEM_OUT,
        "stem output too short"
    );
    // SAFETY (every arm): the lengths are checked above and each ISA is used only once detected.
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn avx512(s: &ConvShape, i: &[f32], w: &[f32], b: &[f32], o: &mut [f32]) {
            unsafe { stem_body::<Avx512, 2>(s, i, w, b, o) }
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(s: &ConvShape, i: &[f32], w: &[f32], b: &[f32], o: &mut [f32]) {
            unsafe { stem_body::<Avx2, 4>(s, i, w, b, o) }
        }
        match isa() {
            Isa::Avx512 => return unsafe { avx512(s, input, weights, bias, out) },
            Isa::Avx2 => return unsafe { avx2(s, input, weights, bias, out) },
            Isa::Baseline => {}
        }
        unsafe { stem_body::<Sse, 8>(s, input, weights, bias, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unsafe {
        stem_body::<Scalar, STEM_OUT>(s, input, weights, bias, out)
    }
}

/// # Safety
/// Slices as checked by [`stem_relu6`]; `NV * S::LANES == STEM_OUT`; `S` supported.
#[inline(always)]
unsafe fn stem_body<S: Simd, const NV: usize>(
    s: &ConvShape,
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    const C_IN: usize = 3;
    assert_eq!(NV * S::LANES, STEM_OUT);
    let start: [S::V; NV] = std::array::from_fn(|v| S::load(bias.as_ptr().add(v * S::LANES)));
    for oy in 0..s.out_h {
        let y = s.taps(oy, s.in_h, s.pad_top);
        for ox in 0..s.out_w {
            let x = s.taps(ox, s.in_w, s.pad_left);
            let mut acc = start;
            for ky in y.lo..y.hi {
                let row = (y.first + ky as isize) as usize * s.in_w;
                for kx in x.lo..x.hi {
                    let px = row + (x.first + kx as isize) as usize;
                    for ci in 0..C_IN {
                        let v = S::splat(*input.as_ptr().add(px * C_IN + ci));
                        let w = weights
                            .as_ptr()
                            .add(((ky * s.kernel + kx) * C_IN + ci) * STEM_OUT);
                        for (l, a) in acc.iter_mut().enumerate() {
                            *a = S::madd(v, S::load(w.add(l * S::LANES)), *a);
                        }
                    }
                }
            }
            let o = out.as_mut_ptr().add((oy * s.out_w + ox) * STEM_OUT);
            for (l, &a) in acc.iter().enumerate() {
                S::store(o.add(l * S::LANES), S::relu6(a));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Straightforward NCHW-free reference: every tap checked against the image bounds.
    fn depthwise_reference(
        s: &ConvShape,
        c: usize,
        input: &[f32],
        in_bias: &[f32],
        weights: &[f32],
        bias: &[f32],
    ) -> Vec<f32> {
        let mut out = vec![0.0; s.out_pixels() * c];
        for oy in 0..s.out_h {
            for ox in 0..s.out_w {
                for ch in 0..c {
                    let mut acc = bias[ch] as f64;
                    for ky in 0..s.kernel {
                        for kx in 0..s.kernel {
                            let iy = (oy * s.stride + ky) as isize - s.pad_top as isize;
                            let ix = (ox * s.stride + kx) as isize - s.pad_left as isize;
                            if iy < 0 || ix < 0 || iy >= s.in_h as isize || ix >= s.in_w as isize {
                                continue;
                            }
                            let v = (input[(iy as usize * s.in_w + ix as usize) * c + ch]
                                + in_bias[ch])
                                .clamp(0.0, 6.0);
                            acc += v as f64 * weights[(ky * s.kernel + kx) * c + ch] as f64;
                        }
                    }
                    out[(oy * s.out_w + ox) * c + ch] = (acc as f32).clamp(0.0, 6.0);
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        // A small deterministic generator: the property is about geometry, not randomness.
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    proptest! {
        #[test]
        fn depthwise_matches_reference(
            h in 1usize..12, w in 1usize..12, c in 1usize..150,
            k in prop::sample::select(vec![3usize, 5]), stride in 1usize..3, seed in 0u64..1000,
        ) {
            let s = ConvShape::same(h, w, k, stride);
            let input = values(h * w * c, seed);
            let weights = values(k * k * c, seed + 1);
            let bias = values(c, seed + 2);
            let in_bias = values(c, seed + 3);
            let mut out = vec![f32::NAN; s.out_pixels() * c];
            depthwise_relu6(&s, c, &input, &in_bias, &weights, &bias, &mut out);
            let want = depthwise_reference(&s, c, &input, &in_bias, &weights, &bias);
            for (a, b) in out.iter().zip(&want) {
                prop_assert!((a - b).abs() < 1e-4, "{} vs {}", a, b);
            }
        }
    }

    #[test]
    fn stem_matches_a_direct_convolution() {
        let s = ConvShape::same(9, 7, 3, 2);
        let input = values(s.in_pixels() * 3, 7);
        let weights = values(9 * 3 * STEM_OUT, 8);
        let bias = values(STEM_OUT, 9);
        let mut out = vec![0.0; s.out_pixels() * STEM_OUT];
        stem_relu6(&s, &input, &weights, &bias, &mut out);
        for p in 0..s.out_pixels() {
            let (oy, ox) = (p / s.out_w, p % s.out_w);
            for co in 0..STEM_OUT {
                let mut want = bias[co] as f64;
                for (ky, kx, ci) in kernel_taps() {
                    let iy = (oy * 2 + ky) as isize - s.pad_top as isize;
                    let ix = (ox * 2 + kx) as isize - s.pad_left as isize;
                    if iy < 0 || ix < 0 || iy as usize >= s.in_h || ix as usize >= s.in_w {
                        continue;
                    }
                    let v = input[(iy as usize * s.in_w + ix as usize) * 3 + ci];
                    want += v as f64 * weights[((ky * 3 + kx) * 3 + ci) * STEM_OUT + co] as f64;
                }
                let got = out[p * STEM_OUT + co];
                assert!(
                    (got - (want as f32).clamp(0.0, 6.0)).abs() < 1e-4,
                    "{got} vs {want}"
                );
            }
        }
    }

    /// Every (ky, kx, input channel) of a 3x3 kernel over RGB.
    fn kernel_taps() -> impl Iterator<Item = (usize, usize, usize)> {
        (0..3).flat_map(|ky| (0..3).flat_map(move |kx| (0..3).map(move |ci| (ky, kx, ci))))
    }

    #[test]
    fn pointwise_is_a_matrix_product_onto_bias_and_residual() {
        for (pixels, c_in, c_out) in [(13, 24, 40), (7, 5, 64 + 16 + 8 + 3), (1, 1, 1)] {
            let input = values(pixels * c_in, 3);
            let weights = values(c_in * c_out, 4);
            let bias = values(c_out, 5);
            let residual = values(pixels * c_out, 6);
            let dot = |p: usize, o: usize| -> f64 {
                (0..c_in)
                    .map(|i| input[p * c_in + i] as f64 * weights[i * c_out + o] as f64)
                    .sum::<f64>()
                    + bias[o] as f64
            };
            for with_residual in [false, true] {
                let init = match with_residual {
                    false => Init::Bias(&bias),
                    true => Init::BiasResidual(&bias, &residual),
                };
                let mut out = vec![f32::NAN; pixels * c_out];
                pointwise(&input, pixels, c_in, &weights, c_out, init, &mut out);
                for p in 0..pixels {
                    for o in 0..c_out {
                        let mut want = dot(p, o);
                        if with_residual {
                            want += residual[p * c_out + o] as f64;
                        }
                        let got = out[p * c_out + o] as f64;
                        assert!((got - want).abs() < 1e-4, "{init:?} {p} {o}");
                    }
                }
            }
        }
    }

    #[test]
    fn head_pooling_adds_bias_and_applies_relu6() {
        let x = [-1.0, 2.0, 7.0, 0.5, 3.0, -2.0];
        let mut sum = [0.0; 3];
        sum_rows_bias_relu6(&x, &[0.5, 0.0, -1.0], &mut sum);
        assert_eq!(sum, [1.0, 5.0, 6.0]);
    }

    #[test]
    fn padding_is_same_and_asymmetric() {
        let s = ConvShape::same(224, 224, 3, 2);
        assert_eq!((s.out_h, s.pad_top, s.pad_left), (112, 0, 0));
        let s = ConvShape::same(28, 28, 5, 2);
        assert_eq!((s.out_h, s.pad_top), (14, 1));
        // Last output row of a stride-2 5x5 over 28 rows reads rows 25..=28: row 28 is padding.
        assert_eq!(
            s.taps(13, 28, 1),
            Taps {
                first: 25,
                lo: 0,
                hi: 3
            }
        );
    }
}
