//! verger's own CPU kernels for the three layer kinds of the network, on NHWC activations
//! (channels contiguous, so every inner loop runs over channels with unit stride).
//!
//! - 1x1 convolutions ([`pointwise_packed`]) are matrix products `[pixels x C_in] x
//!   [C_in x C_out]` on weights packed once at load, in register blocks of 6 pixels x 2
//!   vectors, starting from the bias (and residual) so the output is written once.
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

/// 1x1 convolution weights `[c_in][c_out]` rearranged once for [`pointwise_packed`]: column
/// panels as wide as two vector registers of this CPU (16 floats with AVX2), each panel
/// `[c_in][panel]` contiguous and the last one zero-padded, so the inner loop reads the
/// weights with unit stride and the product needs no packing per call.
#[derive(Clone, Debug)]
pub struct PackedWeights {
    data: Vec<f32>,
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    panel: usize,
}

/// Floats per column panel on this CPU: two vector registers.
fn panel_width() -> usize {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => 2 * Avx512::LANES,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => 2 * Avx2::LANES,
        #[cfg(target_arch = "x86_64")]
        Isa::Baseline => 2 * Sse::LANES,
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Baseline => 2 * Scalar::LANES,
    }
}

impl PackedWeights {
    /// Packs `weights`, stored `[c_in][c_out]`.
    pub fn new(weights: &[f32], c_in: usize, c_out: usize) -> Self {
        assert_eq!(weights.len(), c_in * c_out, "pointwise weights");
        let panel = panel_width();
        let panels = c_out.div_ceil(panel);
        let mut data = vec![0.0; panels * c_in * panel];
        for j in 0..panels {
            for i in 0..c_in {
                for x in 0..panel.min(c_out - j * panel) {
                    data[(j * c_in + i) * panel + x] = weights[i * c_out + j * panel + x];
                }
            }
        }
        Self {
            data,
            c_in,
            c_out,
            panel,
        }
    }
}

/// Pixels per register block of [`pointwise_packed`]: 6 rows x 2 vectors = 12 accumulators,
/// plus 2 weight vectors and a broadcast input, fit the 16 AVX2 registers.
const PW_ROWS: usize = 6;

/// Input floats kept hot per row chunk: the chunk's pixels are reused across every column
/// panel while they stay in L2.
const PW_CHUNK_FLOATS: usize = 32 * 1024;

/// 1x1 convolution without activation: `out[p][o] = init[p][o] + sum_i input[p][i] *
/// weights[i][o]` for `pixels` rows of `c_in` channels, on weights packed once
/// ([`PackedWeights`]), with the initial value (zero, bias, bias plus residual) loaded straight
/// into the accumulators: one pass over the output, no per-call packing. ReLU6, where the
/// network wants it, is applied by the consumer as it reads ([`depthwise_relu6`] clamps its
/// input, [`sum_rows_bias_relu6`] the head's), so it costs no extra pass either. Register blocks of 6 pixels x 2 vectors run
/// over all input channels; rows are taken in chunks that stay in L2 while every column panel
/// passes over them.
pub fn pointwise_packed(
    input: &[f32],
    pixels: usize,
    weights: &PackedWeights,
    init: Init<'_>,
    out: &mut [f32],
) {
    let (k, n) = (weights.c_in, weights.c_out);
    assert!(input.len() >= pixels * k, "pointwise input too short");
    assert!(out.len() >= pixels * n, "pointwise output too short");
    match init {
        Init::Zero => {}
        Init::Bias(b) => assert_eq!(b.len(), n, "pointwise bias"),
        Init::BiasResidual(b, r) => {
            assert_eq!(b.len(), n, "pointwise bias");
            assert!(r.len() >= pixels * n, "pointwise residual too short");
        }
    }
    assert_eq!(
        weights.panel,
        panel_width(),
        "weights packed for another CPU"
    );
    let io = PointwiseIo {
        input,
        pixels,
        w: weights,
        init,
    };
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn avx512(io: &PointwiseIo<'_>, o: &mut [f32]) {
            pointwise_body::<Avx512>(io, o)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(io: &PointwiseIo<'_>, o: &mut [f32]) {
            pointwise_body::<Avx2>(io, o)
        }
        match isa() {
            // SAFETY: `isa()` detected these features on this CPU.
            Isa::Avx512 => return unsafe { avx512(&io, out) },
            Isa::Avx2 => return unsafe { avx2(&io, out) },
            Isa::Baseline => {}
        }
        pointwise_body::<Sse>(&io, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    pointwise_body::<Scalar>(&io, out)
}

/// The read-only operands of one packed 1x1 convolution.
struct PointwiseIo<'a> {
    input: &'a [f32],
    pixels: usize,
    w: &'a PackedWeights,
    init: Init<'a>,
}

#[inline(always)]
fn pointwise_body<V: Simd>(io: &PointwiseIo<'_>, out: &mut [f32]) {
    let (k, n, panel) = (io.w.c_in, io.w.c_out, io.w.panel);
    debug_assert!(panel == 2 * V::LANES && panel <= 64);
    let chunk = (PW_CHUNK_FLOATS / k.max(1)).max(PW_ROWS) / PW_ROWS * PW_ROWS;
    let mut first = 0;
    while first < io.pixels {
        let rows = chunk.min(io.pixels - first);
        for j in 0..n.div_ceil(panel) {
            let mut r = 0;
            while r < rows {
                let row = first + r;
                // SAFETY: rows row..row+m exist in input and out, panel j exists in the packed
                // weights; the bounds were checked by `pointwise_packed`.
                unsafe {
                    match (rows - r).min(PW_ROWS) {
                        6 => pointwise_block::<V, 6>(io, row, j, out),
                        5 => pointwise_block::<V, 5>(io, row, j, out),
                        4 => pointwise_block::<V, 4>(io, row, j, out),
                        3 => pointwise_block::<V, 3>(io, row, j, out),
                        2 => pointwise_block::<V, 2>(io, row, j, out),
                        _ => pointwise_block::<V, 1>(io, row, j, out),
                    }
                }
                r += PW_ROWS;
            }
        }
        first += rows;
    }
}

/// Output rows `row..row + M`, columns of panel `j`.
///
/// # Safety
/// Rows `row..row + M` must exist and panel `j` too; `V` must be usable on this CPU.
#[inline(always)]
unsafe fn pointwise_block<V: Simd, const M: usize>(
    io: &PointwiseIo<'_>,
    row: usize,
    j: usize,
    out: &mut [f32],
) {
    let (n, panel) = (io.w.c_out, io.w.panel);
    let l = V::LANES;
    let col = j * panel;
    let width = panel.min(n - col);
    if width < panel {
        return pointwise_tail::<V, M>(io, row, j, width, out);
    }
    let mut acc = [[V::splat(0.0); 2]; M];
    for (r, a) in acc.iter_mut().enumerate() {
        match io.init {
            Init::Zero => {}
            Init::Bias(b) => {
                let bias = b.as_ptr().add(col);
                a[0] = V::load(bias);
                a[1] = V::load(bias.add(l));
            }
            Init::BiasResidual(b, res) => {
                let base = res.as_ptr().add((row + r) * n + col);
                let bias = b.as_ptr().add(col);
                a[0] = V::add(V::load(bias), V::load(base));
                a[1] = V::add(V::load(bias.add(l)), V::load(base.add(l)));
            }
        }
    }
    let acc = pointwise_product::<V, M, 2>(io, row, j, acc);
    for (r, acc) in acc.iter().enumerate() {
        let o = out.as_mut_ptr().add((row + r) * n + col);
        V::store(o, acc[0]);
        V::store(o.add(l), acc[1]);
    }
}

/// A partial last panel: the product goes to a small buffer, then the valid columns, with
/// the initial value added, to the output (no load or store past the end of a row).
///
/// # Safety
/// As [`pointwise_block`]; `width` is the number of valid columns of panel `j`.
#[inline(always)]
unsafe fn pointwise_tail<V: Simd, const M: usize>(
    io: &PointwiseIo<'_>,
    row: usize,
    j: usize,
    width: usize,
    out: &mut [f32],
) {
    let (n, l) = (io.w.c_out, V::LANES);
    let col = j * io.w.panel;
    // A tail of at most one register needs half the multiplications.
    let mut bufs = [[0.0f32; 64]; M];
    if width <= l {
        let acc = pointwise_product::<V, M, 1>(io, row, j, [[V::splat(0.0); 1]; M]);
        for (buf, acc) in bufs.iter_mut().zip(&acc) {
            V::store(buf.as_mut_ptr(), acc[0]);
        }
    } else {
        let acc = pointwise_product::<V, M, 2>(io, row, j, [[V::splat(0.0); 2]; M]);
        for (buf, acc) in bufs.iter_mut().zip(&acc) {
            V::store(buf.as_mut_ptr(), acc[0]);
            V::store(buf.as_mut_ptr().add(l), acc[1]);
        }
    }
    for (r, buf) in bufs.iter().enumerate() {
        let o = &mut out[(row + r) * n + col..][..width];
        match io.init {
            Init::Zero => o.copy_from_slice(&buf[..width]),
            Init::Bias(b) => {
                for ((o, v), b) in o.iter_mut().zip(buf).zip(&b[col..]) {
                    *o = v + b;
                }
            }
            Init::BiasResidual(b, res) => {
                let res = &res[(row + r) * n + col..];
                for (((o, v), b), x) in o.iter_mut().zip(buf).zip(&b[col..]).zip(res) {
                    *o = v + b + x;
                }
            }
        }
    }
}

/// `acc += input rows row..row+M x the first NV registers of panel j`, over every input
/// channel.
///
/// # Safety
/// As [`pointwise_block`]; `NV` is 1 or 2.
#[inline(always)]
unsafe fn pointwise_product<V: Simd, const M: usize, const NV: usize>(
    io: &PointwiseIo<'_>,
    row: usize,
    j: usize,
    mut acc: [[V::V; NV]; M],
) -> [[V::V; NV]; M] {
    let (k, panel) = (io.w.c_in, io.w.panel);
    let l = V::LANES;
    let mut a = io.input.as_ptr().add(row * k);
    let mut b = io.w.data.as_ptr().add(j * k * panel);
    for _ in 0..k {
        let mut w = [V::splat(0.0); NV];
        for (v, w) in w.iter_mut().enumerate() {
            *w = V::load(b.add(v * l));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = V::splat(*a.add(r * k));
            for (acc, w) in acc.iter_mut().zip(&w) {
                *acc = V::madd(x, *w, *acc);
            }
        }
        a = a.add(1);
        b = b.add(panel);
    }
    acc
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

    proptest! {
        #[test]
        fn packed_pointwise_matches_a_direct_product(
            pixels in 1usize..40, c_in in 1usize..70, c_out in 1usize..90,
            mode in 0usize..3, seed in 0u64..1000,
        ) {
            let input = values(pixels * c_in, seed);
            let weights = values(c_in * c_out, seed + 1);
            let bias = values(c_out, seed + 2);
            let residual = values(pixels * c_out, seed + 3);
            let init = match mode {
                0 => Init::Zero,
                1 => Init::Bias(&bias),
                _ => Init::BiasResidual(&bias, &residual),
            };
            let packed = PackedWeights::new(&weights, c_in, c_out);
            let mut out = vec![f32::NAN; pixels * c_out];
            pointwise_packed(&input, pixels, &packed, init, &mut out);
            for p in 0..pixels {
                for o in 0..c_out {
                    let mut want = match mode {
                        0 => 0.0,
                        1 => bias[o] as f64,
                        _ => (bias[o] + residual[p * c_out + o]) as f64,
                    };
                    for i in 0..c_in {
                        want += input[p * c_in + i] as f64 * weights[i * c_out + o] as f64;
                    }
                    let got = out[p * c_out + o];
                    prop_assert!((got as f64 - want).abs() < 1e-3, "{} vs {}", got, want);
                }
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
