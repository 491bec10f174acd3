//! Depthwise convolutions with bias and ReLU6 fused, over an activated NHWC input: one filter
//! per channel, so every inner loop runs over channels with unit stride.

use super::geometry::{ConvShape, Taps};
use super::simd::{Scalar, Simd};
use super::{dispatch, Kernel};
use std::ops::Range;

/// Depthwise convolution weights rearranged once at load: `[kernel][kernel][channels]`, so
/// every tap reads the weights of consecutive channels with unit stride.
#[derive(Clone, Debug)]
pub struct DepthwiseWeights {
    data: Vec<f32>,
    bias: Vec<f32>,
    /// Square kernel side.
    pub kernel: usize,
    /// Stride in both dimensions.
    pub stride: usize,
    /// Channels (input and output).
    pub channels: usize,
}

impl DepthwiseWeights {
    /// From PyTorch's `[channels][1][kernel][kernel]` layout, with one bias per channel.
    pub fn new(
        values: &[f32],
        bias: &[f32],
        channels: usize,
        kernel: usize,
        stride: usize,
    ) -> Self {
        assert_eq!(
            values.len(),
            channels * kernel * kernel,
            "depthwise weights"
        );
        assert_eq!(bias.len(), channels, "depthwise bias");
        let taps = kernel * kernel;
        let mut data = vec![0.0; taps * channels];
        for ch in 0..channels {
            for t in 0..taps {
                data[t * channels + ch] = values[ch * taps + t];
            }
        }
        Self {
            data,
            bias: bias.to_vec(),
            kernel,
            stride,
            channels,
        }
    }
}

/// Output rows `rows` of a depthwise convolution with bias and ReLU6 over an activated NHWC
/// input: `out = relu6(bias + sum_taps input * weight)`.
///
/// `input` holds the image's rows from `first_row` on (`shape.in_w x channels` floats each), at
/// least every row that `rows` read ([`ConvShape::input_rows`]): the whole image, or a window of
/// it that a caller fills band by band (see the fused
/// [`inverted_residual`](super::inverted_residual)). `out` receives the output rows in order,
/// `rows.len() x out_w x channels`.
///
/// Each tap's FMA depends on the previous one, so a single output pixel would wait on the FMA
/// latency; neighbouring output pixels are computed together (groups of 8 for a stride-1 3x3,
/// else 4; border pixels too, their taps outside the image skipped), with independent
/// accumulators, each kernel row's weights loaded once for the group, and kernel size and
/// stride compile-time constants so the taps unroll and neighbours share input loads.
pub fn depthwise_relu6(
    weights: &DepthwiseWeights,
    shape: &ConvShape,
    input: &[f32],
    first_row: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    let (s, c) = (shape, weights.channels);
    assert_eq!(
        (s.kernel, s.stride),
        (weights.kernel, weights.stride),
        "depthwise geometry"
    );
    assert!(rows.end <= s.out_h, "depthwise output rows");
    let needed = s.input_rows(rows.clone());
    assert!(
        needed.is_empty() || needed.start >= first_row,
        "depthwise input window starts too late"
    );
    assert!(
        input.len() >= needed.end.saturating_sub(first_row) * s.in_w * c,
        "depthwise input window too short"
    );
    assert!(
        out.len() >= rows.len() * s.out_w * c,
        "depthwise output too short"
    );
    dispatch(DepthwiseCall {
        io: DepthwiseIo {
            s,
            c,
            input,
            first_row,
            weights: &weights.data,
            bias: &weights.bias,
        },
        rows,
        out,
    })
}

/// The read-only operands of one depthwise convolution, checked by [`depthwise_relu6`].
struct DepthwiseIo<'a> {
    s: &'a ConvShape,
    c: usize,
    /// Rows `first_row..` of the input image.
    input: &'a [f32],
    first_row: usize,
    weights: &'a [f32],
    bias: &'a [f32],
}

/// [`depthwise_relu6`]'s body on one instruction set.
struct DepthwiseCall<'a> {
    io: DepthwiseIo<'a>,
    rows: Range<usize>,
    out: &'a mut [f32],
}

impl Kernel for DepthwiseCall<'_> {
    type Output = ();

    /// Wide registers of `V` for most channels, its narrower ones for the rest.
    #[inline(always)]
    unsafe fn run<V: Simd>(self) {
        // SAFETY: `V` (and so `V::Narrow`) is usable on this CPU (`dispatch`).
        unsafe { depthwise_kernel_size::<V, V::Narrow>(&self.io, self.rows, self.out) }
    }
}

/// Output pixels of a row computed together by a stride-1 3x3 kernel (measured: with 8, its few
/// taps amortise each group's bias loads and stores; larger kernels and stride 2 are faster in
/// groups of 4). The rest of a row goes in groups of 4, 3, 2, 1.
const DW_PIXELS_3X3: usize = 8;

/// The body with the network's kernel sizes and strides as constants (`0`: any other value,
/// read at run time): the taps then unroll, and neighbouring pixels' loads of the same input
/// column become one load.
///
/// # Safety
/// `W` and `N` are usable on this CPU; the operands are as [`depthwise_relu6`] checked them.
#[inline(always)]
unsafe fn depthwise_kernel_size<W: Simd, N: Simd>(
    io: &DepthwiseIo<'_>,
    rows: Range<usize>,
    out: &mut [f32],
) {
    // SAFETY: as the caller guarantees.
    unsafe {
        match (io.s.kernel, io.s.stride) {
            (3, 1) => depthwise_body::<W, N, 3, 1>(io, rows, out),
            (3, 2) => depthwise_body::<W, N, 3, 2>(io, rows, out),
            (5, 1) => depthwise_body::<W, N, 5, 1>(io, rows, out),
            (5, 2) => depthwise_body::<W, N, 5, 2>(io, rows, out),
            _ => depthwise_body::<W, N, 0, 0>(io, rows, out),
        }
    }
}

/// Every output row of `rows`, in groups of neighbouring pixels.
///
/// # Safety
/// As [`depthwise_kernel_size`]; `K` and `S` are the shape's kernel and stride, or both 0.
#[inline(always)]
unsafe fn depthwise_body<W: Simd, N: Simd, const K: usize, const S: usize>(
    io: &DepthwiseIo<'_>,
    rows: Range<usize>,
    out: &mut [f32],
) {
    let s = io.s;
    for (r, oy) in rows.enumerate() {
        let y = s.taps(oy, s.in_h, s.pad_top);
        let mut ox = 0;
        while ox < s.out_w {
            let at = Pixel { y, r, ox };
            let rest = s.out_w - ox;
            let group = match rest {
                _ if K == 0 => 1,
                _ if K == 3 && S == 1 && rest >= DW_PIXELS_3X3 => DW_PIXELS_3X3,
                4.. => 4,
                _ => rest,
            };
            // SAFETY: output pixels `ox..ox + group` exist in row `r` of `out`, the rows the
            // taps read are inside the image (`taps`) and inside the input window, whose
            // lengths `depthwise_relu6` checked; `W` and `N` are usable (caller).
            unsafe {
                match group {
                    DW_PIXELS_3X3 => depthwise_group::<W, N, DW_PIXELS_3X3, K, S>(io, at, out),
                    4 => depthwise_group::<W, N, 4, K, S>(io, at, out),
                    3 => depthwise_group::<W, N, 3, K, S>(io, at, out),
                    2 => depthwise_group::<W, N, 2, K, S>(io, at, out),
                    _ if K == 0 => depthwise_pixel(io, at, out),
                    _ => depthwise_group::<W, N, 1, K, S>(io, at, out),
                }
            }
            ox += group;
        }
    }
}

/// Where a group of output pixels is: vertical taps, output row within the call, first column.
#[derive(Clone, Copy)]
struct Pixel {
    y: Taps,
    r: usize,
    ox: usize,
}

/// All channels of `P` neighbouring output pixels, for a known kernel size `K` and stride `S`:
/// blocks of up to two wide vectors per pixel (four with one pixel), then narrower ones.
///
/// # Safety
/// As in [`depthwise_body`]: pixels `at.ox..at.ox + P` exist.
#[inline(always)]
unsafe fn depthwise_group<W: Simd, N: Simd, const P: usize, const K: usize, const S: usize>(
    io: &DepthwiseIo<'_>,
    at: Pixel,
    out: &mut [f32],
) {
    let mut cb = 0;
    // SAFETY: in every block below, channels `cb..cb + NV * LANES` are `<= io.c` by its loop's
    // condition, the pixels exist (caller), and the register types are usable (caller).
    unsafe {
        if P == 1 {
            while cb + 4 * W::LANES <= io.c {
                depthwise_block::<W, 4, P, K, S>(io, cb, at, out);
                cb += 4 * W::LANES;
            }
        }
        // Two vectors per pixel where the registers hold them (accumulators plus a row of
        // weights).
        if W::LANES >= 16 || P <= 2 {
            while cb + 2 * W::LANES <= io.c {
                depthwise_block::<W, 2, P, K, S>(io, cb, at, out);
                cb += 2 * W::LANES;
            }
        }
        while cb + W::LANES <= io.c {
            depthwise_block::<W, 1, P, K, S>(io, cb, at, out);
            cb += W::LANES;
        }
        while cb + N::LANES <= io.c {
            depthwise_block::<N, 1, P, K, S>(io, cb, at, out);
            cb += N::LANES;
        }
        while cb < io.c {
            depthwise_block::<Scalar, 1, P, K, S>(io, cb, at, out);
            cb += 1;
        }
    }
}

/// Channels `cb..cb + NV * V::LANES` of output pixels `ox..ox + P`, `S` apart in the input.
///
/// Row by row, the kernel row's weights are loaded once, then each input column the group reads
/// is loaded once and multiplied into every pixel whose taps cover it (the loops unroll: `K`,
/// `S` and `P` are constants). Columns outside the image (left and right borders) are skipped,
/// rows outside it are not visited, and no pointer is formed outside the input.
///
/// # Safety
/// As in [`depthwise_group`]: the channels and pixels exist, `V` is usable.
#[inline(always)]
unsafe fn depthwise_block<
    V: Simd,
    const NV: usize,
    const P: usize,
    const K: usize,
    const S: usize,
>(
    io: &DepthwiseIo<'_>,
    cb: usize,
    at: Pixel,
    out: &mut [f32],
) {
    let (s, c) = (io.s, io.c);
    let x = s.taps(at.ox, s.in_w, s.pad_left);
    // Input columns the group reads, relative to `x.first`, and those inside the image.
    let span = (P - 1) * S + K;
    let j_lo = (-x.first).max(0) as usize;
    let j_hi = (s.in_w as isize - x.first).clamp(0, span as isize) as usize;
    // SAFETY: bias and weights hold `c` floats per tap and `cb + NV * LANES <= c` (caller); an
    // input row read is inside the image (`y.lo..y.hi`) and at or after `first_row`, so inside
    // the window `depthwise_relu6` checked, and the columns read, `x.first + j` for `j` in
    // `j_lo..j_hi`, are inside the image: `col0` is the first of them, so every pointer below
    // stays inside `input`. Output pixel `ox + p` of row `r` exists (caller). `V` is usable.
    unsafe {
        let b = io.bias.as_ptr().add(cb);
        let start: [V::V; NV] = std::array::from_fn(|v| V::load(b.add(v * V::LANES)));
        let mut acc = [start; P];
        let y = at.y;
        if j_lo < j_hi {
            let col0 = (x.first + j_lo as isize) as usize;
            for ky in y.lo..y.hi {
                let row = ((y.first + ky as isize) as usize - io.first_row) * s.in_w;
                // Column `x.first + j` of this row is at `i + (j - j_lo) * c`.
                let i = io.input.as_ptr().add((row + col0) * c + cb);
                let wrow = io.weights.as_ptr().add(ky * K * c + cb);
                let w: [[V::V; NV]; K] = std::array::from_fn(|kx| {
                    std::array::from_fn(|v| V::load(wrow.add(kx * c + v * V::LANES)))
                });
                for j in 0..span {
                    if j < j_lo || j >= j_hi {
                        continue;
                    }
                    for v in 0..NV {
                        let xv = V::load(i.add((j - j_lo) * c + v * V::LANES));
                        for (p, acc) in acc.iter_mut().enumerate() {
                            if j >= p * S && j - p * S < K {
                                acc[v] = V::madd(xv, w[j - p * S][v], acc[v]);
                            }
                        }
                    }
                }
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add((at.r * s.out_w + at.ox + p) * c + cb);
            for (v, &a) in acc.iter().enumerate() {
                V::store(o.add(v * V::LANES), V::relu6(a));
            }
        }
    }
}

/// One output pixel for any kernel size and stride (read at run time): the fallback for
/// geometries the network does not have (bounds-checked: it is never the hot path).
fn depthwise_pixel(io: &DepthwiseIo<'_>, at: Pixel, out: &mut [f32]) {
    let (s, c) = (io.s, io.c);
    let x = s.taps(at.ox, s.in_w, s.pad_left);
    let first = (at.r * s.out_w + at.ox) * c;
    let o = &mut out[first..first + c];
    for (cb, o) in o.iter_mut().enumerate() {
        let mut acc = io.bias[cb];
        for ky in at.y.lo..at.y.hi {
            let row = ((at.y.first + ky as isize) as usize - io.first_row) * s.in_w;
            for kx in x.lo..x.hi {
                let col = (x.first + kx as isize) as usize;
                acc += io.input[(row + col) * c + cb] * io.weights[(ky * s.kernel + kx) * c + cb];
            }
        }
        *o = acc.clamp(0.0, 6.0);
    }
}

#[cfg(test)]
mod tests {
    use super::super::geometry::Padding;
    use super::super::testing::{on_every_isa, values};
    use super::*;
    use proptest::prelude::*;

    /// Straightforward reference: every tap checked against the image bounds; `weights` in
    /// PyTorch's `[channels][k][k]` layout.
    fn depthwise_reference(
        s: &ConvShape,
        c: usize,
        input: &[f32],
        weights: &[f32],
        bias: &[f32],
    ) -> Vec<f32> {
        let k = s.kernel;
        let mut out = vec![0.0; s.out_pixels() * c];
        for oy in 0..s.out_h {
            for ox in 0..s.out_w {
                for ch in 0..c {
                    let mut acc = bias[ch] as f64;
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * s.stride + ky) as isize - s.pad_top as isize;
                            let ix = (ox * s.stride + kx) as isize - s.pad_left as isize;
                            if iy < 0 || ix < 0 || iy >= s.in_h as isize || ix >= s.in_w as isize {
                                continue;
                            }
                            let v = input[(iy as usize * s.in_w + ix as usize) * c + ch];
                            acc += v as f64 * weights[(ch * k + ky) * k + kx] as f64;
                        }
                    }
                    out[(oy * s.out_w + ox) * c + ch] = (acc as f32).clamp(0.0, 6.0);
                }
            }
        }
        out
    }

    fn padding(symmetric: bool) -> Padding {
        if symmetric {
            Padding::Symmetric
        } else {
            Padding::Same
        }
    }

    proptest! {
        #[test]
        fn depthwise_matches_reference(
            h in 1usize..12, w in 1usize..12, c in 1usize..150,
            k in prop::sample::select(vec![3usize, 5, 7]), stride in 1usize..3,
            symmetric: bool, seed in 0u64..1000,
        ) {
            let s = ConvShape::new(h, w, k, stride, padding(symmetric));
            let input = values(h * w * c, seed);
            let raw = values(k * k * c, seed + 1);
            let bias = values(c, seed + 2);
            let dw = DepthwiseWeights::new(&raw, &bias, c, k, stride);
            let want = depthwise_reference(&s, c, &input, &raw, &bias);
            for (isa, out) in on_every_isa(|| {
                let mut out = vec![f32::NAN; s.out_pixels() * c];
                depthwise_relu6(&dw, &s, &input, 0, 0..s.out_h, &mut out);
                out
            }) {
                for (a, b) in out.iter().zip(&want) {
                    prop_assert!((a - b).abs() < 1e-4, "{:?}: {} vs {}", isa, a, b);
                }
            }
        }

        /// A band of output rows computed from a window holding only the input rows it reads
        /// (guarded by huge values on both sides, which would show in the output if read)
        /// equals the same rows of the whole-image result.
        #[test]
        fn depthwise_band_reads_only_its_window(
            h in 1usize..14, w in 1usize..10, c in 1usize..40,
            k in prop::sample::select(vec![3usize, 5]), stride in 1usize..3,
            band in (0usize..7, 1usize..7), symmetric: bool, seed in 0u64..1000,
        ) {
            let s = ConvShape::new(h, w, k, stride, padding(symmetric));
            let lo = band.0.min(s.out_h - 1);
            let rows = lo..(lo + band.1).min(s.out_h);
            let input = values(h * w * c, seed);
            let dw = DepthwiseWeights::new(&values(k * k * c, seed + 1), &values(c, seed + 2), c, k, stride);
            let needed = s.input_rows(rows.clone());
            let row = w * c;
            let mut guarded = vec![1e20f32; row];
            guarded.extend_from_slice(&input[needed.start * row..needed.end * row]);
            guarded.extend(std::iter::repeat_n(1e20f32, row));
            let window = &guarded[row..row + needed.len() * row];
            for (isa, (whole, out)) in on_every_isa(|| {
                let mut whole = vec![f32::NAN; s.out_pixels() * c];
                depthwise_relu6(&dw, &s, &input, 0, 0..s.out_h, &mut whole);
                let mut out = vec![f32::NAN; rows.len() * s.out_w * c];
                depthwise_relu6(&dw, &s, window, needed.start, rows.clone(), &mut out);
                (whole, out)
            }) {
                let want = &whole[rows.start * s.out_w * c..rows.end * s.out_w * c];
                prop_assert_eq!(&out[..], want, "{:?}", isa);
            }
        }
    }
}
