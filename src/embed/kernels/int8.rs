//! int8 1x1 convolutions (`--precision int8`): weights quantised once per output channel
//! (symmetric, `-127..=127`), activations per tensor to 7 bits (`0..=127` with a zero point,
//! so negative inputs keep their sign) over a range calibrated once on real images
//! ([`RangeObserver`], `verger model calibrate`). Products accumulate exactly in i32; the
//! epilogue turns each sum back into a float with the bias (and residual) and the activation
//! before its single store, so every layer around stays f32.
//!
//! Why 7-bit activations: AVX2 has no u8 x i8 dot product into i32. `vpmaddubsw` sums pairs of
//! products into i16 and saturates past 32,767, which `2 * 255 * 127 = 64,770` would reach;
//! `2 * 127 * 127 = 32,258` never does. With the same 7-bit levels on every instruction set
//! (AVX-512 VNNI's `vpdpbusd` has no intermediate step at all) the i32 sums, and so the rows,
//! are identical bit for bit whichever CPU embedded them.

use super::pointwise::{blocks_of, load_part, sweep, Activation, Panel, RowBlocks};
use super::simd::{quantize_lane, Simd};
use super::{dispatch, vector_lanes, Kernel};
use std::cell::RefCell;
use std::sync::Mutex;

/// The largest activation level: 7 bits.
pub const ACTIVATION_MAX: u8 = 127;

/// The largest weight magnitude: symmetric int8 (`-128` is never used).
pub const WEIGHT_MAX: i8 = 127;

/// How one layer's input floats map to levels: `level = round(x / scale) + zero`, clamped to
/// `0..=ACTIVATION_MAX`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActivationQuant {
    /// Float step between two levels.
    pub scale: f32,
    /// The level of 0.0.
    pub zero: u8,
}

impl ActivationQuant {
    /// Levels spread over `[min, max]`, widened to hold 0 (so that zero, ReLU's floor, is a
    /// level of its own and a tensor of zeros quantises exactly).
    pub fn from_range(min: f32, max: f32) -> Self {
        let (lo, hi) = (min.min(0.0), max.max(0.0));
        let max_level = f32::from(ACTIVATION_MAX);
        let scale = if hi > lo && (hi - lo).is_finite() {
            (hi - lo) / max_level
        } else {
            1.0
        };
        let zero = (-lo / scale).round().clamp(0.0, max_level) as u8;
        Self { scale, zero }
    }

    /// The level of `x` (NaN gives 0), as every instruction set's kernel computes it.
    pub fn level(self, x: f32) -> u8 {
        quantize_lane(x, 1.0 / self.scale, f32::from(self.zero) + 0.5)
    }
}

/// The extremes a layer's inputs took while calibrating: one per quantised layer, shared by
/// every thread that runs it.
#[derive(Debug, Default)]
pub struct RangeObserver(Mutex<Option<(f32, f32)>>);

impl RangeObserver {
    /// Widens the range to `x`'s finite values.
    pub fn record(&self, x: &[f32]) {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in x.iter().filter(|v| v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if lo > hi {
            return;
        }
        let mut range = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *range = Some(match *range {
            None => (lo, hi),
            Some((a, b)) => (a.min(lo), b.max(hi)),
        });
    }

    /// `(min, max)` of every value recorded, if any was.
    pub fn range(&self) -> Option<(f32, f32)> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A 1x1 convolution on int8 weights, packed once for [`Int8Pointwise::apply`]: column panels
/// as wide as two vector registers, each `[c_in / 4][panel][4]` bytes (four consecutive input
/// channels of one column side by side, the operand layout of `vpdpbusd` and `vpmaddubsw`),
/// input channels padded with zero weights to a multiple of 4.
#[derive(Clone, Debug)]
pub struct Int8Pointwise {
    /// Weights as `i8` bit patterns.
    data: Vec<u8>,
    /// Per column: input scale x weight scale, the float value of one unit of the i32 sum;
    /// padded with zeros to whole panels.
    scale: Vec<f32>,
    /// Per column: the bias minus the zero point's share of the sum
    /// (`scale * zero * sum of the column's weights`); padded as `scale`.
    offset: Vec<f32>,
    c_in: usize,
    c_out: usize,
    /// `c_in` rounded up to a multiple of 4: bytes per quantised input row.
    k4: usize,
    panel: usize,
    input: ActivationQuant,
}

thread_local! {
    /// This thread's quantised input rows (they only grow).
    static LEVELS: RefCell<Vec<u8>> = RefCell::default();
}

impl Int8Pointwise {
    /// Quantises and packs PyTorch's `[c_out][c_in]` float weights, one bias per output
    /// channel, for inputs quantised by `input`.
    pub fn from_out_in(
        weights: &[f32],
        bias: &[f32],
        c_out: usize,
        c_in: usize,
        input: ActivationQuant,
    ) -> Self {
        assert_eq!(weights.len(), c_in * c_out, "pointwise weights");
        assert_eq!(bias.len(), c_out, "pointwise bias");
        let panel = 2 * vector_lanes();
        let panels = c_out.div_ceil(panel);
        let k4 = c_in.div_ceil(4) * 4;
        let mut scale = vec![0.0; panels * panel];
        let mut offset = vec![0.0; panels * panel];
        let mut levels = vec![0i8; c_out * c_in];
        for o in 0..c_out {
            let row = &weights[o * c_in..(o + 1) * c_in];
            let amax = row.iter().fold(0f32, |m, w| m.max(w.abs()));
            let step = if amax > 0.0 && amax.is_finite() {
                amax / f32::from(WEIGHT_MAX)
            } else {
                1.0
            };
            let max = f32::from(WEIGHT_MAX);
            let mut sum = 0i64;
            for (l, w) in levels[o * c_in..(o + 1) * c_in].iter_mut().zip(row) {
                *l = (w / step).round().clamp(-max, max) as i8;
                sum += i64::from(*l);
            }
            scale[o] = input.scale * step;
            offset[o] = (f64::from(bias[o])
                - f64::from(scale[o]) * f64::from(input.zero) * sum as f64)
                as f32;
        }
        let mut data = vec![0u8; panels * k4 * panel];
        for (j, packed) in data.chunks_exact_mut(k4 * panel).enumerate() {
            for (q, group) in packed.chunks_exact_mut(4 * panel).enumerate() {
                for (x, lane) in group.chunks_exact_mut(4).enumerate() {
                    let o = j * panel + x;
                    if o >= c_out {
                        continue;
                    }
                    for (t, b) in lane.iter_mut().enumerate() {
                        let i = 4 * q + t;
                        if i < c_in {
                            *b = levels[o * c_in + i] as u8;
                        }
                    }
                }
            }
        }
        Self {
            data,
            scale,
            offset,
            c_in,
            c_out,
            k4,
            panel,
            input,
        }
    }

    /// `out[p][o] = act(scale[o] * sum_i level(input[p][i]) * w[i][o] + offset[o]
    /// (+ residual[p][o]))` for `pixels` rows of `c_in` floats: the rows are quantised into a
    /// buffer of this thread, then multiplied in register blocks of pixels x 2 vectors, as many
    /// pixels as the instruction set's registers hold accumulators for (12 with AVX-512 VNNI,
    /// 4 with AVX2; twice as many when a panel's valid columns fit one register).
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
        assert!(out.len() >= pixels * n, "pointwise output too short");
        if let Some(r) = residual {
            assert!(r.len() >= pixels * n, "pointwise residual too short");
        }
        assert_eq!(
            self.panel,
            2 * vector_lanes(),
            "weights packed for another CPU"
        );
        LEVELS.with_borrow_mut(|levels| {
            let len = pixels * self.k4;
            if levels.len() < len {
                levels.resize(len, 0);
            }
            let levels = &mut levels[..len];
            dispatch(Quantize {
                input: &input[..pixels * k],
                c_in: k,
                k4: self.k4,
                quant: self.input,
                out: levels,
            });
            dispatch(Int8Call {
                io: Int8Io {
                    levels,
                    pixels,
                    w: self,
                    residual,
                    relu6: act == Activation::Relu6,
                },
                out,
            });
        });
    }
}

/// Rows of `c_in` floats to rows of `k4` levels (the padding bytes zero).
struct Quantize<'a> {
    input: &'a [f32],
    c_in: usize,
    k4: usize,
    quant: ActivationQuant,
    out: &'a mut [u8],
}

impl Kernel for Quantize<'_> {
    type Output = ();

    #[inline(always)]
    unsafe fn run<V: Simd>(self) {
        let q = self.quant;
        let (inverse, shift) = (1.0 / q.scale, f32::from(q.zero) + 0.5);
        let rows = self.input.chunks_exact(self.c_in.max(1));
        for (x, levels) in rows.zip(self.out.chunks_exact_mut(self.k4.max(1))) {
            let (levels, pad) = levels.split_at_mut(self.c_in);
            let whole = self.c_in / V::LANES * V::LANES;
            for i in (0..whole).step_by(V::LANES) {
                // SAFETY: `i + LANES <= c_in`, the length of both rows; `V` is usable
                // (`dispatch`).
                unsafe {
                    V::quantize(
                        x.as_ptr().add(i),
                        inverse,
                        shift,
                        levels.as_mut_ptr().add(i),
                    )
                };
            }
            for (l, &x) in levels[whole..].iter_mut().zip(&x[whole..]) {
                *l = quantize_lane(x, inverse, shift);
            }
            pad.fill(0);
        }
    }
}

/// Row chunks are a multiple of this, the largest block.
const ROWS_MAX: usize = 24;

/// Quantised input bytes kept hot per row chunk (L2), as in the f32 kernel.
const CHUNK_BYTES: usize = 128 * 1024;

/// The read-only operands of one int8 product, checked by [`Int8Pointwise::apply`].
struct Int8Io<'a> {
    /// `pixels x k4` levels.
    levels: &'a [u8],
    pixels: usize,
    w: &'a Int8Pointwise,
    residual: Option<&'a [f32]>,
    relu6: bool,
}

/// [`Int8Pointwise::apply`]'s product on one instruction set.
struct Int8Call<'a> {
    io: Int8Io<'a>,
    out: &'a mut [f32],
}

impl Kernel for Int8Call<'_> {
    type Output = ();

    #[inline(always)]
    unsafe fn run<V: Simd>(self) {
        debug_assert!(self.io.w.panel == 2 * V::LANES);
        // SAFETY: the operands' lengths were checked by `apply`; `V` is usable (`dispatch`).
        unsafe { sweep::<V, _>(&self.io, self.out) }
    }
}

impl RowBlocks for Int8Io<'_> {
    fn pixels(&self) -> usize {
        self.pixels
    }

    fn c_out(&self) -> usize {
        self.w.c_out
    }

    fn chunk_rows(&self) -> usize {
        (CHUNK_BYTES / self.w.k4.max(1)).max(ROWS_MAX) / ROWS_MAX * ROWS_MAX
    }

    #[inline(always)]
    unsafe fn block<V: Simd, const M: usize, const NV: usize>(
        &self,
        at: Panel,
        row: usize,
        out: &mut [f32],
    ) {
        // SAFETY: as the caller guarantees.
        unsafe { int8_block::<V, M, NV>(self, at, row, out) }
    }

    /// Blocks of [`Simd::INT8_ROWS`] rows, twice as many when one register wide.
    #[inline(always)]
    unsafe fn wide_blocks<V: Simd, const NV: usize>(&self, at: Panel, out: &mut [f32]) -> usize {
        // SAFETY: as the caller guarantees.
        unsafe {
            match (NV, V::INT8_ROWS) {
                (1, 12) => blocks_of::<V, Self, 24, NV>(self, at, out),
                (1, 4) => blocks_of::<V, Self, 8, NV>(self, at, out),
                (1, _) => blocks_of::<V, Self, 12, NV>(self, at, out),
                (_, 12) => blocks_of::<V, Self, 12, NV>(self, at, out),
                (_, 4) => blocks_of::<V, Self, 4, NV>(self, at, out),
                _ => 0,
            }
        }
    }
}

/// Output rows `row..row + M`, the columns of panel `at.j`: i32 sums over every group of four
/// input channels, then `scale * sum + offset` (+ residual), the activation and one store,
/// masked to the columns that exist in a partial last panel.
///
/// # Safety
/// Rows `row..row + M` exist in levels, residual and `out`; panel `at.j` exists in the packed
/// weights; `V` is usable on this CPU.
#[inline(always)]
unsafe fn int8_block<V: Simd, const M: usize, const NV: usize>(
    io: &Int8Io<'_>,
    at: Panel,
    row: usize,
    out: &mut [f32],
) {
    let (k4, n, l, panel) = (io.w.k4, io.w.c_out, V::LANES, io.w.panel);
    let col = at.j * panel;
    let lanes = |v: usize| (at.width - v * l).min(l);
    // SAFETY: level rows `row..row + M` hold `k4` bytes each and panel j holds `k4 / 4` groups
    // of `4 * panel >= 4 * NV * l` bytes (caller), so every read is inside the slices;
    // `scale` and `offset` hold whole panels; columns `col + v * l .. + lanes(v)` exist in the
    // residual and `out` rows (caller). `V` is usable (caller).
    unsafe {
        let mut acc = [[V::izero(); NV]; M];
        let mut a = io.levels.as_ptr().add(row * k4);
        let mut b = io.w.data.as_ptr().add(at.j * k4 * panel);
        for _ in 0..k4 / 4 {
            let mut w = [V::qsplat(0); NV];
            for (v, w) in w.iter_mut().enumerate() {
                *w = V::qload(b.add(4 * v * l));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = V::qsplat(a.add(r * k4).cast::<u32>().read_unaligned());
                for (acc, w) in acc.iter_mut().zip(&w) {
                    *acc = V::dot4(*acc, x, *w);
                }
            }
            a = a.add(4);
            b = b.add(4 * panel);
        }
        let mut scale = [V::splat(0.0); NV];
        let mut offset = [V::splat(0.0); NV];
        for v in 0..NV {
            scale[v] = V::load(io.w.scale.as_ptr().add(col + v * l));
            offset[v] = V::load(io.w.offset.as_ptr().add(col + v * l));
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &a) in acc.iter().enumerate() {
                let c = col + v * l;
                let mut y = V::madd(V::ifloat(a), scale[v], offset[v]);
                if let Some(res) = io.residual {
                    let p = res.as_ptr().add((row + r) * n + c);
                    y = V::add(y, load_part::<V>(p, lanes(v)));
                }
                if io.relu6 {
                    y = V::relu6(y);
                }
                let o = out.as_mut_ptr().add((row + r) * n + c);
                match lanes(v) {
                    x if x == l => V::store(o, y),
                    x => V::store_first(o, y, x),
                }
            }
        }
    }
}

#[cfg(test)]
impl Int8Pointwise {
    /// The weight level of input `i`, output `o`, read back from the packed layout.
    fn weight_level(&self, o: usize, i: usize) -> i8 {
        let (j, x) = (o / self.panel, o % self.panel);
        let at = j * self.k4 * self.panel + ((i / 4) * self.panel + x) * 4 + i % 4;
        self.data[at] as i8
    }

    /// [`apply`](Self::apply) in f64 from the packed levels: the exact i32 sum of the same
    /// quantised inputs, then the epilogue; with each value, the magnitude of the terms the
    /// f32 epilogue rounds.
    fn reference(
        &self,
        input: &[f32],
        pixels: usize,
        residual: Option<&[f32]>,
        act: Activation,
    ) -> Vec<(f64, f64)> {
        let (k, n) = (self.c_in, self.c_out);
        let mut out = Vec::with_capacity(pixels * n);
        for p in 0..pixels {
            for o in 0..n {
                let sum: i64 = (0..k)
                    .map(|i| {
                        i64::from(self.input.level(input[p * k + i]))
                            * i64::from(self.weight_level(o, i))
                    })
                    .sum();
                let product = sum as f64 * f64::from(self.scale[o]);
                let mut y = product + f64::from(self.offset[o]);
                let mut magnitude = product.abs() + f64::from(self.offset[o]).abs();
                if let Some(r) = residual {
                    y += f64::from(r[p * n + o]);
                    magnitude += f64::from(r[p * n + o]).abs();
                }
                if act == Activation::Relu6 {
                    y = y.clamp(0.0, 6.0);
                }
                out.push((y, magnitude));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{on_every_isa, values};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every instruction set's kernel gives the exact i32 sums of the same levels: equal to
        /// the f64 reference up to the float epilogue's rounding, for any shape (partial panels,
        /// input channels not a multiple of 4), with and without residual and ReLU6.
        #[test]
        fn int8_kernel_matches_the_exact_sums_on_every_isa(
            pixels in 1usize..40, c_in in 1usize..70, c_out in 1usize..90,
            mode in 0usize..4, seed in 0u64..1000, lo in -3.0f32..0.5, width in 0.5f32..8.0,
        ) {
            let input = values(pixels * c_in, seed);
            let weights = values(c_in * c_out, seed + 1);
            let bias = values(c_out, seed + 2);
            let residual = values(pixels * c_out, seed + 3);
            let res = (mode % 2 == 1).then_some(residual.as_slice());
            let act = if mode >= 2 { Activation::Relu6 } else { Activation::Identity };
            let quant = ActivationQuant::from_range(lo, lo + width);
            for (isa, (got, want)) in on_every_isa(|| {
                let packed = Int8Pointwise::from_out_in(&weights, &bias, c_out, c_in, quant);
                let mut out = vec![f32::NAN; pixels * c_out];
                packed.apply(&input, pixels, res, act, &mut out);
                (out, packed.reference(&input, pixels, res, act))
            }) {
                for (i, (g, (w, magnitude))) in got.iter().zip(&want).enumerate() {
                    // Two f32 roundings at most (a multiply and an add without FMA).
                    let tolerance = 2.5e-7 * magnitude + 1e-7;
                    prop_assert!(
                        (f64::from(*g) - w).abs() <= tolerance,
                        "{:?} [{}]: {} vs {}", isa, i, g, w
                    );
                }
            }
        }

        /// Quantised, the product stays close to the float one: within the rounding of the
        /// levels (half a step of input and weights per term).
        #[test]
        fn int8_product_approximates_the_float_product(
            pixels in 1usize..8, c_in in 1usize..64, c_out in 1usize..40, seed in 0u64..1000,
        ) {
            let input = values(pixels * c_in, seed);
            let weights = values(c_in * c_out, seed + 1);
            let bias = values(c_out, seed + 2);
            let quant = ActivationQuant::from_range(-2.0, 2.0);
            let packed = Int8Pointwise::from_out_in(&weights, &bias, c_out, c_in, quant);
            let mut out = vec![0.0; pixels * c_out];
            packed.apply(&input, pixels, None, Activation::Identity, &mut out);
            for p in 0..pixels {
                for o in 0..c_out {
                    let mut want = f64::from(bias[o]);
                    let mut bound = 0.0;
                    let amax = (0..c_in).map(|i| weights[o * c_in + i].abs()).fold(0f32, f32::max);
                    let w_step = f64::from(amax) / 127.0;
                    for i in 0..c_in {
                        let (x, w) = (f64::from(input[p * c_in + i]), f64::from(weights[o * c_in + i]));
                        want += x * w;
                        bound += f64::from(quant.scale) / 2.0 * (w.abs() + w_step / 2.0)
                            + w_step / 2.0 * x.abs();
                    }
                    let got = f64::from(out[p * c_out + o]);
                    prop_assert!((got - want).abs() <= bound + 1e-4, "{} vs {} (bound {})", got, want, bound);
                }
            }
        }
    }

    /// The worst case for `vpmaddubsw`: every level 127 against weights of +-127, where 8-bit
    /// activations would saturate the pairwise i16 sums; every instruction set gives the exact
    /// sum.
    #[test]
    fn largest_levels_do_not_saturate() {
        let (c_in, c_out, pixels) = (64, 32, 6);
        let quant = ActivationQuant::from_range(0.0, 127.0);
        assert_eq!(
            quant,
            ActivationQuant {
                scale: 1.0,
                zero: 0
            }
        );
        let input = vec![500.0; pixels * c_in];
        let weights: Vec<f32> = (0..c_out * c_in)
            .map(|i| if (i / c_in) % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let bias = vec![0.0; c_out];
        for (isa, out) in on_every_isa(|| {
            let packed = Int8Pointwise::from_out_in(&weights, &bias, c_out, c_in, quant);
            let mut out = vec![0.0; pixels * c_out];
            packed.apply(&input, pixels, None, Activation::Identity, &mut out);
            out
        }) {
            for (i, &y) in out.iter().enumerate() {
                let sign = if (i % c_out) % 2 == 0 { 1.0 } else { -1.0 };
                // 64 inputs at level 127 x weight 127 x (1 / 127 per weight unit).
                assert_eq!(y, sign * 64.0 * 127.0, "{isa:?} [{i}]");
            }
        }
    }

    /// The vector quantisation of every instruction set gives the scalar levels, at the edges
    /// (NaN, infinities, halves, the clamps) and over rows whose length is no multiple of any
    /// register width; the padding bytes are zeroed.
    #[test]
    fn quantisation_agrees_on_every_isa() {
        let special = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            -1.0,
            3.0,
            -0.01,
            1.0 / 127.0 * 10.5,
            2.99,
            1e30,
            -1e30,
        ];
        let (c_in, k4, rows) = (37, 40, 5);
        let mut input: Vec<f32> = special.iter().copied().cycle().take(c_in * 2).collect();
        input.extend(values(c_in * (rows - 2), 9).iter().map(|v| v * 2.0));
        let quant = ActivationQuant::from_range(-1.0, 3.0);
        for (isa, got) in on_every_isa(|| {
            let mut out = vec![0xAA; rows * k4];
            dispatch(Quantize {
                input: &input,
                c_in,
                k4,
                quant,
                out: &mut out,
            });
            out
        }) {
            for (p, row) in got.chunks_exact(k4).enumerate() {
                for (i, &l) in row.iter().enumerate() {
                    let want = if i < c_in {
                        quant.level(input[p * c_in + i])
                    } else {
                        0
                    };
                    assert_eq!(l, want, "{isa:?} row {p} channel {i}");
                }
            }
        }
    }

    #[test]
    fn levels_round_clamp_and_keep_zero_exact() {
        let q = ActivationQuant::from_range(-1.0, 3.0);
        assert_eq!(q.level(0.0), q.zero);
        assert_eq!(q.level(-1.0), 0);
        assert_eq!(q.level(3.0), ACTIVATION_MAX);
        assert_eq!(q.level(100.0), ACTIVATION_MAX);
        assert_eq!(q.level(-100.0), 0);
        assert_eq!(q.level(f32::NAN), 0);
        // A range of non-negative values starts at zero.
        let relu = ActivationQuant::from_range(0.5, 6.0);
        assert_eq!(relu.zero, 0);
        assert!((relu.scale - 6.0 / 127.0).abs() < 1e-7);
        // Nothing recorded: a unit scale, not a division by zero.
        assert_eq!(ActivationQuant::from_range(0.0, 0.0).scale, 1.0);
    }

    #[test]
    fn observer_keeps_the_extremes_of_finite_values() {
        let o = RangeObserver::default();
        assert_eq!(o.range(), None);
        o.record(&[1.0, f32::NAN, -2.0]);
        o.record(&[f32::INFINITY, 5.0]);
        o.record(&[]);
        assert_eq!(o.range(), Some((-2.0, 5.0)));
    }
}
