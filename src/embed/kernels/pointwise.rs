//! 1x1 convolutions (and linear layers): matrix products `[pixels x C_in] x [C_in x C_out]` on
//! weights packed once at load, in register blocks of 6 pixels x 2 vectors that start from the
//! bias (and residual) and apply the activation before their single store.

use super::int8::{ActivationQuant, Int8Pointwise, RangeObserver};
use super::simd::Simd;
use super::{dispatch, vector_lanes, Kernel};
use std::sync::Arc;

/// What a 1x1 convolution applies to its accumulators before storing them: in registers, so
/// the activation costs no pass over the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// None: a linear projection.
    Identity,
    /// `min(max(x, 0), 6)`: expansions and the head.
    Relu6,
}

/// A 1x1 convolution with its bias, weights rearranged once for [`Pointwise::apply`]: column
/// panels as wide as two vector registers of this CPU (32 floats with AVX-512), each panel
/// `[c_in][panel]` contiguous and the last one zero-padded, so the inner loop reads the weights
/// with unit stride and a call packs nothing.
///
/// The same layer can instead run on int8 weights ([`Pointwise::int8`]), or record the range of
/// its inputs while it runs in f32 ([`Pointwise::observed`], for calibration): the blocks and
/// the head hold a `Pointwise` whatever the precision.
#[derive(Clone, Debug)]
pub struct Pointwise {
    data: Vec<f32>,
    bias: Vec<f32>,
    c_in: usize,
    c_out: usize,
    panel: usize,
    /// The int8 layer that runs instead of the float one, when quantised.
    int8: Option<Box<Int8Pointwise>>,
    /// Where the range of the inputs is recorded, when calibrating.
    observer: Option<Arc<RangeObserver>>,
}

impl Pointwise {
    /// Packs PyTorch's `[c_out][c_in]` layout (a 1x1 convolution's OIHW weight or a linear
    /// layer's weight) with one bias per output channel.
    pub fn from_out_in(weights: &[f32], bias: &[f32], c_out: usize, c_in: usize) -> Self {
        assert_eq!(weights.len(), c_in * c_out, "pointwise weights");
        assert_eq!(bias.len(), c_out, "pointwise bias");
        let panel = 2 * vector_lanes();
        let panels = c_out.div_ceil(panel);
        let mut data = vec![0.0; panels * c_in * panel];
        for (j, packed) in data.chunks_exact_mut(c_in * panel).enumerate() {
            for (i, row) in packed.chunks_exact_mut(panel).enumerate() {
                for (x, w) in row.iter_mut().enumerate().take(c_out - j * panel) {
                    *w = weights[(j * panel + x) * c_in + i];
                }
            }
        }
        Self {
            data,
            bias: bias.to_vec(),
            c_in,
            c_out,
            panel,
            int8: None,
            observer: None,
        }
    }

    /// The layer on int8 weights (see [`Int8Pointwise`]), its inputs quantised by `input`.
    pub fn int8(
        weights: &[f32],
        bias: &[f32],
        c_out: usize,
        c_in: usize,
        input: ActivationQuant,
    ) -> Self {
        Self {
            data: Vec::new(),
            bias: Vec::new(),
            c_in,
            c_out,
            panel: 0,
            int8: Some(Box::new(Int8Pointwise::from_out_in(
                weights, bias, c_out, c_in, input,
            ))),
            observer: None,
        }
    }

    /// This layer, recording the range of every input it is applied to into `observer`.
    pub fn observed(mut self, observer: Arc<RangeObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Input channels.
    pub fn c_in(&self) -> usize {
        self.c_in
    }

    /// Output channels.
    pub fn c_out(&self) -> usize {
        self.c_out
    }

    /// `out[p][o] = act(bias[o] (+ residual[p][o]) + sum_i input[p][i] * w[i][o])` for `pixels`
    /// rows of `c_in` channels. The initial value is loaded straight into the accumulators and
    /// the activation applied to them before the single store: one pass over the output.
    /// Register blocks of 6 pixels x 2 vectors run over all input channels; rows are taken in
    /// chunks that stay in L2 while every column panel passes over them.
    pub fn apply(
        &self,
        input: &[f32],
        pixels: usize,
        residual: Option<&[f32]>,
        act: Activation,
        out: &mut [f32],
    ) {
        let (k, n) = (self.c_in, self.c_out);
        assert!(input.len() >= pixels * k, "pointwise input too short");
        if let Some(observer) = &self.observer {
            observer.record(&input[..pixels * k]);
        }
        if let Some(int8) = &self.int8 {
            return int8.apply(input, pixels, residual, act, out);
        }
        assert!(out.len() >= pixels * n, "pointwise output too short");
        if let Some(r) = residual {
            assert!(r.len() >= pixels * n, "pointwise residual too short");
        }
        assert_eq!(
            self.panel,
            2 * vector_lanes(),
            "weights packed for another CPU"
        );
        dispatch(PointwiseCall {
            io: PointwiseIo {
                input,
                pixels,
                w: self,
                residual,
                relu6: act == Activation::Relu6,
            },
            out,
        })
    }
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

/// Pixels per register block: 6 rows x 2 vectors = 12 accumulators, plus 2 weight vectors and a
/// broadcast input, fit the 16 AVX2 registers.
const PW_ROWS: usize = 6;

/// Pixels per register block when a panel's valid columns fit one register (the last panel of
/// a narrow layer): 12 accumulators again.
const PW_ROWS_NARROW: usize = 12;

/// Input floats kept hot per row chunk: the chunk's pixels are reused across every column panel
/// while they stay in L2.
const PW_CHUNK_FLOATS: usize = 32 * 1024;

/// The read-only operands of one packed 1x1 convolution, checked by [`Pointwise::apply`]:
/// `input` holds `pixels x c_in` floats, `residual` (if any) `pixels x c_out`.
struct PointwiseIo<'a> {
    input: &'a [f32],
    pixels: usize,
    w: &'a Pointwise,
    residual: Option<&'a [f32]>,
    /// Clamp to `[0, 6]` before storing.
    relu6: bool,
}

/// [`Pointwise::apply`]'s body on one instruction set; `out` holds `pixels x c_out` floats.
struct PointwiseCall<'a> {
    io: PointwiseIo<'a>,
    out: &'a mut [f32],
}

impl Kernel for PointwiseCall<'_> {
    type Output = ();

    #[inline(always)]
    unsafe fn run<V: Simd>(self) {
        debug_assert!(self.io.w.panel == 2 * V::LANES && self.io.w.panel <= 64);
        // SAFETY: the operands' lengths were checked by `apply`; `V` is usable (`dispatch`).
        unsafe { sweep::<V, _>(&self.io, self.out) }
    }
}

/// Rows `first..first + rows` of column panel `j`, whose first `width` columns exist.
#[derive(Clone, Copy)]
pub(super) struct Panel {
    pub(super) first: usize,
    pub(super) rows: usize,
    pub(super) j: usize,
    pub(super) width: usize,
}

/// A 1x1 product computed in register blocks (float or int8): what [`sweep`] runs over every
/// chunk of rows and every column panel.
pub(super) trait RowBlocks {
    /// Rows of the product.
    fn pixels(&self) -> usize;
    /// Output columns.
    fn c_out(&self) -> usize;
    /// Rows taken at a time, so that they stay in L2 while every panel passes over them.
    fn chunk_rows(&self) -> usize;
    /// Output rows `row..row + M` of panel `at`, `NV` registers wide.
    ///
    /// # Safety
    /// The rows exist in the operands and `out`, the panel in the weights; `V` is usable.
    unsafe fn block<V: Simd, const M: usize, const NV: usize>(
        &self,
        at: Panel,
        row: usize,
        out: &mut [f32],
    );
    /// The largest blocks this product uses at `NV` registers wide, from `at`'s first row
    /// (see [`blocks_of`]); returns the rows they covered (0: none but the blocks of at most
    /// 6 rows that [`sweep`] runs for the rest).
    ///
    /// # Safety
    /// As [`block`](Self::block), for every row of `at`.
    unsafe fn wide_blocks<V: Simd, const NV: usize>(&self, at: Panel, out: &mut [f32]) -> usize;
}

/// Runs `product` over its rows in chunks and, in each chunk, over every column panel (two
/// registers wide; the last one maybe one): its widest blocks first, then blocks of at most
/// `PW_ROWS` rows for the rows left.
///
/// # Safety
/// `out` and the product's operands hold every row and column; `V` is usable on this CPU.
#[inline(always)]
pub(super) unsafe fn sweep<V: Simd, B: RowBlocks>(product: &B, out: &mut [f32]) {
    let (n, panel) = (product.c_out(), 2 * V::LANES);
    let (pixels, chunk) = (product.pixels(), product.chunk_rows());
    let mut first = 0;
    while first < pixels {
        let rows = chunk.min(pixels - first);
        for j in 0..n.div_ceil(panel) {
            let at = Panel {
                first,
                rows,
                j,
                width: panel.min(n - j * panel),
            };
            // SAFETY: the chunk's rows and panel j exist (caller); `V` is usable (caller).
            unsafe {
                if at.width > V::LANES {
                    panel_rows::<V, B, 2>(product, at, out)
                } else {
                    panel_rows::<V, B, 1>(product, at, out)
                }
            }
        }
        first += rows;
    }
}

/// One panel over its rows: the product's widest blocks, then blocks of at most `PW_ROWS`.
///
/// # Safety
/// As [`RowBlocks::block`], for every row of `at`.
#[inline(always)]
unsafe fn panel_rows<V: Simd, B: RowBlocks, const NV: usize>(
    product: &B,
    at: Panel,
    out: &mut [f32],
) {
    // SAFETY: the blocks stay within `at`'s rows, which exist (caller); `V` is usable.
    let mut r = unsafe { product.wide_blocks::<V, NV>(at, out) };
    while r < at.rows {
        let row = at.first + r;
        // SAFETY: the block's `min(rows - r, 6)` rows lie within `at`'s rows, which exist
        // (caller), and `V` is usable (caller).
        unsafe {
            match (at.rows - r).min(PW_ROWS) {
                6 => product.block::<V, 6, NV>(at, row, out),
                5 => product.block::<V, 5, NV>(at, row, out),
                4 => product.block::<V, 4, NV>(at, row, out),
                3 => product.block::<V, 3, NV>(at, row, out),
                2 => product.block::<V, 2, NV>(at, row, out),
                _ => product.block::<V, 1, NV>(at, row, out),
            }
        }
        r += PW_ROWS;
    }
}

/// Blocks of `M` rows from `at`'s first row while `M` rows are left; returns the rows covered.
///
/// # Safety
/// As [`RowBlocks::block`], for every row of `at`.
#[inline(always)]
pub(super) unsafe fn blocks_of<V: Simd, B: RowBlocks, const M: usize, const NV: usize>(
    product: &B,
    at: Panel,
    out: &mut [f32],
) -> usize {
    let mut r = 0;
    while at.rows - r >= M {
        // SAFETY: rows `r..r + M` lie within `at`'s rows (the loop's condition).
        unsafe { product.block::<V, M, NV>(at, at.first + r, out) };
        r += M;
    }
    r
}

impl RowBlocks for PointwiseIo<'_> {
    fn pixels(&self) -> usize {
        self.pixels
    }

    fn c_out(&self) -> usize {
        self.w.c_out
    }

    fn chunk_rows(&self) -> usize {
        (PW_CHUNK_FLOATS / self.w.c_in.max(1)).max(PW_ROWS_NARROW) / PW_ROWS_NARROW * PW_ROWS_NARROW
    }

    #[inline(always)]
    unsafe fn block<V: Simd, const M: usize, const NV: usize>(
        &self,
        at: Panel,
        row: usize,
        out: &mut [f32],
    ) {
        // SAFETY: as the caller guarantees.
        unsafe { pointwise_block::<V, M, NV>(self, at, row, out) }
    }

    #[inline(always)]
    unsafe fn wide_blocks<V: Simd, const NV: usize>(&self, at: Panel, out: &mut [f32]) -> usize {
        match NV {
            // SAFETY: as the caller guarantees.
            1 => unsafe { blocks_of::<V, Self, PW_ROWS_NARROW, NV>(self, at, out) },
            _ => 0,
        }
    }
}

/// `n` floats at `p` into a register: all lanes, or the first `n` (masked, reading nothing past
/// them) in a panel's last, partial register.
///
/// # Safety
/// `V` is usable; `p..p + n` is readable (all `LANES` floats when `n == LANES`).
#[inline(always)]
pub(super) unsafe fn load_part<V: Simd>(p: *const f32, n: usize) -> V::V {
    // SAFETY: as the caller guarantees.
    unsafe {
        if n == V::LANES {
            V::load(p)
        } else {
            V::load_first(p, n)
        }
    }
}

/// Output rows `row..row + M`, the columns of panel `at.j`: the accumulators start from the
/// bias (plus residual), run over every input channel, get the activation and are stored once.
/// In a partial last panel, the last register's loads and stores are masked to the columns that
/// exist.
///
/// # Safety
/// Rows `row..row + M` exist in input, residual and `out`, panel `at.j` exists in the packed
/// weights; `V` is usable on this CPU.
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
    // SAFETY: columns `col + v * l .. + lanes(v)` exist (`at.width` columns of panel j, so
    // inside the `c_out` bias and rows) and rows `row..row + M` exist (caller); `V` is usable
    // (caller).
    unsafe {
        let mut acc = [[V::splat(0.0); NV]; M];
        for (r, a) in acc.iter_mut().enumerate() {
            for (v, a) in a.iter_mut().enumerate() {
                let c = col + v * l;
                let bias = load_part::<V>(io.w.bias.as_ptr().add(c), lanes(v));
                *a = match io.residual {
                    None => bias,
                    Some(res) => V::add(
                        bias,
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
    // SAFETY: input rows `row..row + M` hold `k` floats each and panel j holds `k` rows of
    // `panel >= NV * l` floats (caller), so every read below is inside the slices; pointers
    // advance to one past their last read at most. `V` is usable (caller).
    unsafe {
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
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::super::testing::{on_every_isa, values};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn packed_pointwise_matches_a_direct_product(
            pixels in 1usize..40, c_in in 1usize..70, c_out in 1usize..90,
            mode in 0usize..4, seed in 0u64..1000,
        ) {
            let input = values(pixels * c_in, seed);
            // PyTorch layout: [c_out][c_in].
            let weights = values(c_in * c_out, seed + 1);
            let bias = values(c_out, seed + 2);
            let residual = values(pixels * c_out, seed + 3);
            let res = (mode % 2 == 1).then_some(residual.as_slice());
            let act = if mode >= 2 { Activation::Relu6 } else { Activation::Identity };
            for (isa, out) in on_every_isa(|| {
                let packed = Pointwise::from_out_in(&weights, &bias, c_out, c_in);
                let mut out = vec![f32::NAN; pixels * c_out];
                packed.apply(&input, pixels, res, act, &mut out);
                out
            }) {
                for p in 0..pixels {
                    for o in 0..c_out {
                        let mut want = bias[o] as f64;
                        if let Some(r) = res {
                            want += r[p * c_out + o] as f64;
                        }
                        for i in 0..c_in {
                            want += input[p * c_in + i] as f64 * weights[o * c_in + i] as f64;
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

    #[test]
    fn pooling_sums_columns() {
        let x = [-1.0, 2.0, 7.0, 0.5, 3.0, -2.0];
        let mut sum = [1.0; 3];
        sum_rows(&x, &mut sum);
        assert_eq!(sum, [0.5, 6.0, 6.0]);
    }
}
