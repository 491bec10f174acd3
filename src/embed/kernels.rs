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
use std::ops::Range;

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

/// The instruction set the kernels use: the best one of this CPU (unit tests can force a
/// fallback, to check every compiled path on one machine).
fn isa() -> Isa {
    #[cfg(test)]
    if let Some(forced) = tests::FORCED_ISA.with(std::cell::Cell::get) {
        return forced;
    }
    detected_isa()
}

/// The best instruction set of this CPU, detected once.
fn detected_isa() -> Isa {
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

    /// Input rows (inside the image) that output rows `rows` read.
    pub fn input_rows(&self, rows: Range<usize>) -> Range<usize> {
        if rows.is_empty() {
            return 0..0;
        }
        let first = self.taps(rows.start, self.in_h, self.pad_top);
        let last = self.taps(rows.end - 1, self.in_h, self.pad_top);
        let lo = (first.first + first.lo as isize) as usize;
        let hi = (last.first + last.hi as isize).max(lo as isize) as usize;
        lo..hi
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
    /// The bias, broadcast to every pixel.
    Bias(&'a [f32]),
    /// Bias plus a residual laid out like the output (a projection with shortcut).
    BiasResidual(&'a [f32], &'a [f32]),
}

/// What a 1x1 convolution applies to its accumulators before storing them: in registers, so
/// the activation costs no pass over the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// None: a linear projection.
    Identity,
    /// `min(max(x, 0), 6)`: expansions and the head.
    Relu6,
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

/// 1x1 convolution: `out[p][o] = act(init[p][o] + sum_i input[p][i] * weights[i][o])` for
/// `pixels` rows of `c_in` channels, on weights packed once ([`PackedWeights`]). The initial
/// value (bias, or bias plus residual) is loaded straight into the accumulators and the
/// activation applied to them before the single store: one pass over the output, no per-call
/// packing. Register blocks of 6 pixels x 2 vectors run over all input channels; rows are taken
/// in chunks that stay in L2 while every column panel passes over them.
pub fn pointwise_packed(
    input: &[f32],
    pixels: usize,
    weights: &PackedWeights,
    init: Init<'_>,
    act: Activation,
    out: &mut [f32],
) {
    let (k, n) = (weights.c_in, weights.c_out);
    assert!(input.len() >= pixels * k, "pointwise input too short");
    assert!(out.len() >= pixels * n, "pointwise output too short");
    match init {
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
        relu6: act == Activation::Relu6,
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
    /// Clamp to `[0, 6]` before storing.
    relu6: bool,
}

#[inline(always)]
fn pointwise_body<V: Simd>(io: &PointwiseIo<'_>, out: &mut [f32]) {
    let (k, n, panel) = (io.w.c_in, io.w.c_out, io.w.panel);
    debug_assert!(panel == 2 * V::LANES && panel <= 64);
    let chunk = (PW_CHUNK_FLOATS / k.max(1)).max(PW_ROWS_NARROW) / PW_ROWS_NARROW * PW_ROWS_NARROW;
    let mut first = 0;
    while first < io.pixels {
        let rows = chunk.min(io.pixels - first);
        for j in 0..n.div_ceil(panel) {
            let width = panel.min(n - j * panel);
            let at = Panel {
                first,
                rows,
                j,
                width,
            };
            // SAFETY: the rows exist in input and out, panel j exists in the packed weights;
            // the bounds were checked by `pointwise_packed`.
            unsafe {
                if width > V::LANES {
                    pointwise_panel::<V, 2>(io, at, out)
                } else {
                    pointwise_panel::<V, 1>(io, at, out)
                }
            }
        }
        first += rows;
    }
}

/// Rows `first..first + rows` of column panel `j`, whose first `width` columns exist.
#[derive(Clone, Copy)]
struct Panel {
    first: usize,
    rows: usize,
    j: usize,
    width: usize,
}

/// Pixels per register block when a panel's valid columns fit one register (the last panel
/// of a narrow layer): 12 accumulators again.
const PW_ROWS_NARROW: usize = 12;

/// One panel over its rows, in register blocks of `PW_ROWS` rows x `NV` registers (12 rows
/// when `NV` is 1).
///
/// # Safety
/// As [`pointwise_block`].
#[inline(always)]
unsafe fn pointwise_panel<V: Simd, const NV: usize>(
    io: &PointwiseIo<'_>,
    at: Panel,
    out: &mut [f32],
) {
    let mut r = 0;
    if NV == 1 {
        while at.rows - r >= PW_ROWS_NARROW {
            pointwise_block::<V, PW_ROWS_NARROW, NV>(io, at, at.first + r, out);
            r += PW_ROWS_NARROW;
        }
    }
    while r < at.rows {
        let row = at.first + r;
        match (at.rows - r).min(PW_ROWS) {
            6 => pointwise_block::<V, 6, NV>(io, at, row, out),
            5 => pointwise_block::<V, 5, NV>(io, at, row, out),
            4 => pointwise_block::<V, 4, NV>(io, at, row, out),
            3 => pointwise_block::<V, 3, NV>(io, at, row, out),
            2 => pointwise_block::<V, 2, NV>(io, at, row, out),
            _ => pointwise_block::<V, 1, NV>(io, at, row, out),
        }
        r += PW_ROWS;
    }
}

/// `n` floats at `p` into a register: all lanes, or the first `n` (masked, reading nothing
/// past them) in a panel's last, partial register.
///
/// # Safety
/// `p..p + n` readable (all `LANES` floats when `n == LANES`).
#[inline(always)]
unsafe fn load_part<V: Simd>(p: *const f32, n: usize) -> V::V {
    if n == V::LANES {
        V::load(p)
    } else {
        V::load_first(p, n)
    }
}

/// Output rows `row..row + M`, the columns of panel `at.j`: the accumulators start from the
/// bias (plus residual), run over every input channel, get the activation and are stored
/// once. In a partial last panel, the last register's loads and stores are masked to the
/// columns that exist.
///
/// # Safety
/// Rows `row..row + M` must exist and panel `at.j` too; `V` must be usable on this CPU.
#[inline(always)]
unsafe fn pointwise_block<V: Simd, const M: usize, const NV: usize>(
    io: &PointwiseIo<'_>,
    at: Panel,
    row: usize,
    out: &mut [f32],
) {
    let (n, l) = (io.w.c_out, V::LANES);
    let col = at.j * io.w.panel;
    // Floats of each register that exist: all but (maybe) the last.
    let lanes = |v: usize| (at.width - v * l).min(l);
    let mut acc = [[V::splat(0.0); NV]; M];
    for (r, a) in acc.iter_mut().enumerate() {
        for (v, a) in a.iter_mut().enumerate() {
            let c = col + v * l;
            *a = match io.init {
                Init::Bias(b) => load_part::<V>(b.as_ptr().add(c), lanes(v)),
                Init::BiasResidual(b, res) => V::add(
                    load_part::<V>(b.as_ptr().add(c), lanes(v)),
                    load_part::<V>(res.as_ptr().add((row + r) * n + c), lanes(v)),
                ),
            };
        }
    }
    let acc = pointwise_product::<V, M, NV>(io, row, at.j, acc);
    for (r, acc) in acc.iter().enumerate() {
        for (v, &a) in acc.iter().enumerate() {
            let a = if io.relu6 { V::relu6(a) } else { a };
            let o = out.as_mut_ptr().add((row + r) * n + col + v * l);
            match lanes(v) {
                x if x == l => V::store(o, a),
                x => V::store_first(o, a, x),
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

/// Adds every row of `x` (rows of `sum.len()` values) to `sum`: the head's global average
/// pooling (scaled by the caller).
pub fn sum_rows(x: &[f32], sum: &mut [f32]) {
    for row in x.chunks_exact(sum.len()) {
        for (s, v) in sum.iter_mut().zip(row) {
            *s += v;
        }
    }
}

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
/// least every row that `rows` read ([`ConvShape::input_rows`]): the whole image, or a window
/// of it that a caller fills band by band (see the native engine's fused blocks). `out`
/// receives the output rows in order, `rows.len() x out_w x channels`.
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
    let io = DepthwiseIo {
        s,
        c,
        input,
        first_row,
        weights: &weights.data,
        bias: &weights.bias,
    };
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn avx512(io: &DepthwiseIo<'_>, r: Range<usize>, o: &mut [f32]) {
            depthwise_kernel_size::<Avx512, Avx2>(io, r, o)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(io: &DepthwiseIo<'_>, r: Range<usize>, o: &mut [f32]) {
            depthwise_kernel_size::<Avx2, Sse>(io, r, o)
        }
        match isa() {
            // SAFETY: `isa()` detected these features on this CPU.
            Isa::Avx512 => return unsafe { avx512(&io, rows, out) },
            Isa::Avx2 => return unsafe { avx2(&io, rows, out) },
            Isa::Baseline => {}
        }
        depthwise_kernel_size::<Sse, Scalar>(&io, rows, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    depthwise_kernel_size::<Scalar, Scalar>(&io, rows, out)
}

/// The read-only operands of one depthwise convolution.
struct DepthwiseIo<'a> {
    s: &'a ConvShape,
    c: usize,
    /// Rows `first_row..` of the input image.
    input: &'a [f32],
    first_row: usize,
    weights: &'a [f32],
    bias: &'a [f32],
}

/// Output pixels of a row computed together by a stride-1 3x3 kernel (measured: with 8, its
/// few taps amortise each group's bias loads and stores; larger kernels and stride 2 are
/// faster in groups of 4). The rest of a row goes in groups of 4, 3, 2, 1.
const DW_PIXELS_3X3: usize = 8;

/// The body with the network's kernel sizes and strides as constants (`0`: any other value,
/// read at run time): the taps then unroll, and neighbouring pixels' loads of the same input
/// column become one load.
#[inline(always)]
fn depthwise_kernel_size<W: Simd, N: Simd>(
    io: &DepthwiseIo<'_>,
    rows: Range<usize>,
    out: &mut [f32],
) {
    match (io.s.kernel, io.s.stride) {
        (3, 1) => depthwise_body::<W, N, 3, 1>(io, rows, out),
        (3, 2) => depthwise_body::<W, N, 3, 2>(io, rows, out),
        (5, 1) => depthwise_body::<W, N, 5, 1>(io, rows, out),
        (5, 2) => depthwise_body::<W, N, 5, 2>(io, rows, out),
        _ => depthwise_body::<W, N, 0, 0>(io, rows, out),
    }
}

#[inline(always)]
fn depthwise_body<W: Simd, N: Simd, const K: usize, const S: usize>(
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
            // SAFETY: output pixels ox..ox+group exist, the taps read are inside the image
            // (`taps` for rows, the column range for columns) and inside the input window, and
            // the slices have the lengths checked by `depthwise_relu6`.
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
/// As in [`depthwise_body`].
#[inline(always)]
unsafe fn depthwise_group<W: Simd, N: Simd, const P: usize, const K: usize, const S: usize>(
    io: &DepthwiseIo<'_>,
    at: Pixel,
    out: &mut [f32],
) {
    let mut cb = 0;
    if P == 1 {
        while cb + 4 * W::LANES <= io.c {
            depthwise_block::<W, 4, P, K, S>(io, cb, at, out);
            cb += 4 * W::LANES;
        }
    }
    // Two vectors per pixel where the registers hold them (accumulators plus a row of weights).
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

/// Channels `cb..cb + NV * V::LANES` of output pixels `ox..ox + P`, `S` apart in the input.
///
/// Row by row, the kernel row's weights are loaded once, then each input column the group
/// reads is loaded once and multiplied into every pixel whose taps cover it (the loops unroll:
/// `K`, `S` and `P` are constants). Columns outside the image (left and right borders) are
/// skipped, rows outside it are not visited.
///
/// # Safety
/// See [`depthwise_body`].
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
    let b = io.bias.as_ptr().add(cb);
    let start: [V::V; NV] = std::array::from_fn(|v| V::load(b.add(v * V::LANES)));
    let mut acc = [start; P];
    let y = at.y;
    for ky in y.lo..y.hi {
        let row = ((y.first + ky as isize) as usize - io.first_row) * s.in_w;
        // Column `x.first + j` of this row is at `i + j * c` (only dereferenced for j_lo..j_hi).
        let i = io
            .input
            .as_ptr()
            .wrapping_add(cb)
            .wrapping_offset((row as isize + x.first) * c as isize);
        let wrow = io.weights.as_ptr().add(ky * K * c + cb);
        let w: [[V::V; NV]; K] = std::array::from_fn(|kx| {
            std::array::from_fn(|v| V::load(wrow.add(kx * c + v * V::LANES)))
        });
        for j in 0..span {
            if j < j_lo || j >= j_hi {
                continue;
            }
            for v in 0..NV {
                let xv = V::load(i.add(j * c + v * V::LANES));
                for (p, acc) in acc.iter_mut().enumerate() {
                    if j >= p * S && j - p * S < K {
                        acc[v] = V::madd(xv, w[j - p * S][v], acc[v]);
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

/// One output pixel for any kernel size and stride (read at run time): the fallback for
/// geometries the network does not have.
///
/// # Safety
/// As in [`depthwise_body`].
#[inline(always)]
unsafe fn depthwise_pixel(io: &DepthwiseIo<'_>, at: Pixel, out: &mut [f32]) {
    let (s, c) = (io.s, io.c);
    let x = s.taps(at.ox, s.in_w, s.pad_left);
    let o = out.as_mut_ptr().add((at.r * s.out_w + at.ox) * c);
    let mut cb = 0;
    while cb < c {
        let mut acc = io.bias[cb];
        for ky in at.y.lo..at.y.hi {
            let row = ((at.y.first + ky as isize) as usize - io.first_row) * s.in_w;
            for kx in x.lo..x.hi {
                let col = (x.first + kx as isize) as usize;
                acc += io.input[(row + col) * c + cb] * io.weights[(ky * s.kernel + kx) * c + cb];
            }
        }
        *o.add(cb) = acc.clamp(0.0, 6.0);
        cb += 1;
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
            unsafe { stem_body::<Avx512, 2, 6>(s, i, w, b, o) }
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(s: &ConvShape, i: &[f32], w: &[f32], b: &[f32], o: &mut [f32]) {
            unsafe { stem_body::<Avx2, 4, 2>(s, i, w, b, o) }
        }
        match isa() {
            Isa::Avx512 => return unsafe { avx512(s, input, weights, bias, out) },
            Isa::Avx2 => return unsafe { avx2(s, input, weights, bias, out) },
            Isa::Baseline => {}
        }
        unsafe { stem_body::<Sse, 8, 1>(s, input, weights, bias, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unsafe {
        stem_body::<Scalar, STEM_OUT, 1>(s, input, weights, bias, out)
    }
}

/// Output pixels in groups of `P` (the rest one by one), each pixel's 32 channels in `NV`
/// registers: a tap's weights are loaded once for the group.
///
/// # Safety
/// Slices as checked by [`stem_relu6`]; `NV * S::LANES == STEM_OUT`; `S` supported.
#[inline(always)]
unsafe fn stem_body<S: Simd, const NV: usize, const P: usize>(
    s: &ConvShape,
    input: &[f32],
    weights: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    assert_eq!(NV * S::LANES, STEM_OUT);
    let start: [S::V; NV] = std::array::from_fn(|v| S::load(bias.as_ptr().add(v * S::LANES)));
    let io = StemIo {
        s,
        input,
        weights,
        start,
    };
    for oy in 0..s.out_h {
        let mut ox = 0;
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

/// The read-only operands of the stem.
struct StemIo<'a, S: Simd, const NV: usize> {
    s: &'a ConvShape,
    input: &'a [f32],
    weights: &'a [f32],
    /// The bias, in registers.
    start: [S::V; NV],
}

/// Output pixels `ox..ox + P` of row `oy`, all 32 channels. Taps outside the image (the
/// "SAME" padding) are skipped pixel by pixel.
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
    const C_IN: usize = 3;
    let s = io.s;
    let y = s.taps(oy, s.in_h, s.pad_top);
    let xs: [Taps; P] = std::array::from_fn(|p| s.taps(ox + p, s.in_w, s.pad_left));
    let inside = xs.iter().all(|x| x.lo == 0 && x.hi == s.kernel);
    let mut acc = [io.start; P];
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    thread_local! {
        /// The instruction set [`isa`] reports on this thread, when set.
        pub(super) static FORCED_ISA: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
    }

    /// `f`'s result on each instruction set this CPU can run (the best and every fallback),
    /// weights packed and kernels run as if it were the only one.
    fn on_every_isa<T>(mut f: impl FnMut() -> T) -> Vec<(Isa, T)> {
        #[cfg(target_arch = "x86_64")]
        let all = match detected_isa() {
            Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Baseline],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Baseline],
            Isa::Baseline => vec![Isa::Baseline],
        };
        #[cfg(not(target_arch = "x86_64"))]
        let all = vec![Isa::Baseline];
        all.into_iter()
            .map(|isa| {
                FORCED_ISA.with(|f| f.set(Some(isa)));
                let out = f();
                FORCED_ISA.with(|f| f.set(None));
                (isa, out)
            })
            .collect()
    }

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
            k in prop::sample::select(vec![3usize, 5, 7]), stride in 1usize..3, seed in 0u64..1000,
        ) {
            let s = ConvShape::same(h, w, k, stride);
            let input = values(h * w * c, seed);
            let dw = DepthwiseWeights::new(&values(k * k * c, seed + 1), &values(c, seed + 2), c, k, stride);
            let want = depthwise_reference(&s, c, &input, &values(k * k * c, seed + 1), &dw.bias);
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
            band in (0usize..7, 1usize..7), seed in 0u64..1000,
        ) {
            let s = ConvShape::same(h, w, k, stride);
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

    proptest! {
        #[test]
        fn packed_pointwise_matches_a_direct_product(
            pixels in 1usize..40, c_in in 1usize..70, c_out in 1usize..90,
            mode in 0usize..4, seed in 0u64..1000,
        ) {
            let input = values(pixels * c_in, seed);
            let weights = values(c_in * c_out, seed + 1);
            let bias = values(c_out, seed + 2);
            let residual = values(pixels * c_out, seed + 3);
            let init = match mode % 2 {
                0 => Init::Bias(&bias),
                _ => Init::BiasResidual(&bias, &residual),
            };
            let act = if mode >= 2 { Activation::Relu6 } else { Activation::Identity };
            for (isa, out) in on_every_isa(|| {
                let packed = PackedWeights::new(&weights, c_in, c_out);
                let mut out = vec![f32::NAN; pixels * c_out];
                pointwise_packed(&input, pixels, &packed, init, act, &mut out);
                out
            }) {
            for p in 0..pixels {
                for o in 0..c_out {
                    let mut want = match mode % 2 {
                        0 => bias[o] as f64,
                        _ => (bias[o] + residual[p * c_out + o]) as f64,
                    };
                    for i in 0..c_in {
                        want += input[p * c_in + i] as f64 * weights[i * c_out + o] as f64;
                    }
                    if act == Activation::Relu6 {
                        want = want.clamp(0.0, 6.0);
                    }
                    let got = out[p * c_out + o];
                    prop_assert!((got as f64 - want).abs() < 1e-3, "{:?}: {} vs {}", isa, got, want);
                }
            }
            }
        }
    }

    proptest! {
        /// Wide enough for the register groups of pixels and the remainder, both paddings.
        #[test]
        fn stem_matches_a_direct_convolution(
            h in 1usize..20, w in 1usize..40, stride in 1usize..3, seed in 0u64..1000,
        ) {
            let s = ConvShape::same(h, w, 3, stride);
            let input = values(s.in_pixels() * 3, seed);
            let weights = values(9 * 3 * STEM_OUT, seed + 1);
            let bias = values(STEM_OUT, seed + 2);
            for (isa, out) in on_every_isa(|| {
                let mut out = vec![f32::NAN; s.out_pixels() * STEM_OUT];
                stem_relu6(&s, &input, &weights, &bias, &mut out);
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
                        want += v as f64 * weights[((ky * 3 + kx) * 3 + ci) * STEM_OUT + co] as f64;
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

    #[test]
    fn pooling_sums_columns() {
        let x = [-1.0, 2.0, 7.0, 0.5, 3.0, -2.0];
        let mut sum = [1.0; 3];
        sum_rows(&x, &mut sum);
        assert_eq!(sum, [0.5, 6.0, 6.0]);
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
