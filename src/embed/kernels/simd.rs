//! The few vector operations the kernels need, over one register type per instruction set.
//!
//! Kernels are written once, generic over [`Simd`], and run through
//! [`dispatch`](super::dispatch), which instantiates them inside a function compiled with the
//! matching `#[target_feature]`; every method is `#[inline(always)]` so the intrinsics end up
//! inlined into that function. Accumulators are arrays of vector registers, which the compiler
//! keeps in registers (arrays of plain `f32` of the same size are not: they spill).

/// A vector register of `LANES` floats and the operations the kernels use on it.
///
/// # Safety
/// Implementations use instruction-set intrinsics: a caller must only use a type inside code
/// compiled for (and running on a CPU with) its instruction set, and pass pointers valid for
/// the floats each method reads or writes.
pub(crate) unsafe trait Simd: Copy {
    /// Floats per register.
    const LANES: usize;
    /// The instruction set, for logs and reports.
    const NAME: &'static str;
    /// The register.
    type V: Copy;
    /// The next narrower register type of the same CPU (for the channels left over after the
    /// wide registers); `Scalar` is its own.
    type Narrow: Simd;
    /// All lanes set to `x`.
    ///
    /// # Safety
    /// The instruction set is available.
    unsafe fn splat(x: f32) -> Self::V;
    /// Unaligned load of `LANES` floats.
    ///
    /// # Safety
    /// The instruction set is available; `p..p + LANES` is readable.
    unsafe fn load(p: *const f32) -> Self::V;
    /// Unaligned store of `LANES` floats.
    ///
    /// # Safety
    /// The instruction set is available; `p..p + LANES` is writable.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The first `n` floats at `p` (`0 < n <= LANES`), zeros in the other lanes; reads nothing
    /// past `p + n`.
    ///
    /// # Safety
    /// The instruction set is available; `p..p + n` is readable.
    unsafe fn load_first(p: *const f32, n: usize) -> Self::V {
        let mut buf = [0.0f32; 16];
        // SAFETY: `p..p + n` is readable (caller) and `n <= LANES <= 16` fits `buf`; the
        // instruction set is available (caller).
        unsafe {
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
            Self::load(buf.as_ptr())
        }
    }
    /// Stores the first `n` lanes of `v` at `p` (`0 < n <= LANES`); writes nothing past
    /// `p + n`.
    ///
    /// # Safety
    /// The instruction set is available; `p..p + n` is writable.
    unsafe fn store_first(p: *mut f32, v: Self::V, n: usize) {
        let mut buf = [0.0f32; 16];
        // SAFETY: `buf` holds `LANES <= 16` floats and `p..p + n` is writable (caller); the
        // instruction set is available (caller).
        unsafe {
            Self::store(buf.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
        }
    }
    /// `a * b + c` (fused where the instruction set has FMA).
    ///
    /// # Safety
    /// The instruction set is available.
    unsafe fn madd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    ///
    /// # Safety
    /// The instruction set is available.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `min(max(a, 0), 6)`.
    ///
    /// # Safety
    /// The instruction set is available.
    unsafe fn relu6(a: Self::V) -> Self::V;

    /// Rows of the int8 kernel's register blocks two registers wide (twice as many one
    /// register wide): as many as the accumulators, weights, broadcast input and temporaries
    /// leave room for in this instruction set's registers.
    const INT8_ROWS: usize = 6;
    /// `LANES` i32 accumulators of the int8 kernels.
    type I: Copy;
    /// `4 * LANES` bytes: one group of four bytes per lane (four consecutive input channels).
    type Q: Copy;
    /// Accumulators at zero.
    ///
    /// # Safety
    /// The instruction set is available.
    unsafe fn izero() -> Self::I;
    /// Unaligned load of `4 * LANES` bytes.
    ///
    /// # Safety
    /// The instruction set is available; `p..p + 4 * LANES` is readable.
    unsafe fn qload(p: *const u8) -> Self::Q;
    /// The four bytes of `x` (little-endian) in every lane's group.
    ///
    /// # Safety
    /// The instruction set is available.
    unsafe fn qsplat(x: u32) -> Self::Q;
    /// `acc[l] += sum_t x[l][t] * w[l][t]` over each lane's four bytes, `x` unsigned and at
    /// most 127, `w` signed: exact in i32 (the pairwise i16 sums of `vpmaddubsw` stay within
    /// `2 * 127 * 127 = 32,258`, below its saturation at 32,767).
    ///
    /// # Safety
    /// The instruction set is available.
    unsafe fn dot4(acc: Self::I, x: Self::Q, w: Self::Q) -> Self::I;
    /// The accumulators as floats (exact up to 2^24).
    ///
    /// # Safety
    /// The instruction set is available.
    unsafe fn ifloat(a: Self::I) -> Self::V;
    /// `LANES` activation levels: `min(max(x * inverse + shift, 0), 127)` truncated, for the
    /// `LANES` floats at `p`, stored as bytes at `out` (NaN gives 0; no fused multiply-add, so
    /// every instruction set rounds as [`quantize_lane`] does).
    ///
    /// # Safety
    /// The instruction set is available; `p..p + LANES` is readable and `out..out + LANES`
    /// writable.
    unsafe fn quantize(p: *const f32, inverse: f32, shift: f32, out: *mut u8) {
        for i in 0..Self::LANES {
            // SAFETY: `i < LANES`, inside both ranges (caller).
            unsafe { *out.add(i) = quantize_lane(*p.add(i), inverse, shift) };
        }
    }
}

/// One activation level, the reference of [`Simd::quantize`]: `x * inverse + shift` clamped
/// to `0..=127` and truncated.
#[inline(always)]
pub(crate) fn quantize_lane(x: f32, inverse: f32, shift: f32) -> u8 {
    (x * inverse + shift).clamp(0.0, 127.0) as u8
}

/// [`Simd::dot4`] of one lane in plain integers: the reference of every vector version.
#[inline(always)]
pub(crate) fn dot4_lane(acc: i32, x: [u8; 4], w: [u8; 4]) -> i32 {
    let mut acc = acc;
    for t in 0..4 {
        acc += i32::from(x[t]) * i32::from(w[t] as i8);
    }
    acc
}

/// [`Simd::dot4`] over `N` lanes held as plain arrays (the scalar and SSE2 paths).
#[inline(always)]
fn dot4_lanes<const N: usize, const B: usize>(
    mut acc: [i32; N],
    x: [u8; B],
    w: [u8; B],
) -> [i32; N] {
    for (l, a) in acc.iter_mut().enumerate() {
        let at = |v: &[u8; B]| [v[4 * l], v[4 * l + 1], v[4 * l + 2], v[4 * l + 3]];
        *a = dot4_lane(*a, at(&x), at(&w));
    }
    acc
}

/// One float: the portable fallback, and the last step of every channel loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

// SAFETY: plain float arithmetic, no instruction-set requirement; pointers are the caller's.
unsafe impl Simd for Scalar {
    const LANES: usize = 1;
    const NAME: &'static str = "scalar";
    type V = f32;
    type Narrow = Scalar;
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        // SAFETY: `p` is readable (caller).
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        // SAFETY: `p` is writable (caller).
        unsafe { *p = v }
    }
    #[inline(always)]
    unsafe fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    unsafe fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    unsafe fn relu6(a: f32) -> f32 {
        a.clamp(0.0, 6.0)
    }
    type I = i32;
    type Q = [u8; 4];
    #[inline(always)]
    unsafe fn izero() -> i32 {
        0
    }
    #[inline(always)]
    unsafe fn qload(p: *const u8) -> [u8; 4] {
        // SAFETY: 4 bytes at `p` are readable (caller).
        unsafe { p.cast::<[u8; 4]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn qsplat(x: u32) -> [u8; 4] {
        x.to_le_bytes()
    }
    #[inline(always)]
    unsafe fn dot4(acc: i32, x: [u8; 4], w: [u8; 4]) -> i32 {
        dot4_lane(acc, x, w)
    }
    #[inline(always)]
    unsafe fn ifloat(a: i32) -> f32 {
        a as f32
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512, Avx512Vnni, Sse};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{dot4_lanes, Scalar, Simd};
    use std::arch::x86_64::*;

    /// 16 floats in a ZMM register (AVX-512F).
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512;

    // SAFETY: every method only calls AVX-512F intrinsics; the trait's contract makes callers
    // run them on a CPU with AVX-512F (`dispatch` does so only after detecting it).
    unsafe impl Simd for Avx512 {
        const LANES: usize = 16;
        const NAME: &'static str = "AVX-512";
        type V = __m512;
        type Narrow = Avx2;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            // SAFETY: AVX-512F is available (caller).
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            // SAFETY: AVX-512F is available and 16 floats at `p` are readable (caller).
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            // SAFETY: AVX-512F is available and 16 floats at `p` are writable (caller).
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn load_first(p: *const f32, n: usize) -> __m512 {
            // SAFETY: AVX-512F is available and `p..p + n` is readable (caller); the masked
            // load touches no lane past `n`.
            unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as __mmask16, p) }
        }
        #[inline(always)]
        unsafe fn store_first(p: *mut f32, v: __m512, n: usize) {
            // SAFETY: AVX-512F is available and `p..p + n` is writable (caller); the masked
            // store touches no lane past `n`.
            unsafe { _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as __mmask16, v) }
        }
        #[inline(always)]
        unsafe fn madd(a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: AVX-512F is available (caller).
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F is available (caller).
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn relu6(a: __m512) -> __m512 {
            // Operands in this order, max/min return the second one, `a`, when it is NaN: NaN
            // goes through, as in the scalar path.
            // SAFETY: AVX-512F is available (caller).
            unsafe { _mm512_min_ps(_mm512_set1_ps(6.0), _mm512_max_ps(_mm512_setzero_ps(), a)) }
        }
        // Without AVX-512BW there are no 512-bit byte products: two AVX2 halves.
        type I = [__m256i; 2];
        type Q = [__m256i; 2];
        #[inline(always)]
        unsafe fn izero() -> [__m256i; 2] {
            // SAFETY: AVX2 is available with AVX-512F (`dispatch` enables both).
            unsafe { [Avx2::izero(); 2] }
        }
        #[inline(always)]
        unsafe fn qload(p: *const u8) -> [__m256i; 2] {
            // SAFETY: 64 bytes at `p` are readable (caller); AVX2 is available.
            unsafe { [Avx2::qload(p), Avx2::qload(p.add(32))] }
        }
        #[inline(always)]
        unsafe fn qsplat(x: u32) -> [__m256i; 2] {
            // SAFETY: AVX2 is available.
            unsafe { [Avx2::qsplat(x); 2] }
        }
        #[inline(always)]
        unsafe fn dot4(acc: [__m256i; 2], x: [__m256i; 2], w: [__m256i; 2]) -> [__m256i; 2] {
            // SAFETY: AVX2 is available.
            unsafe {
                [
                    Avx2::dot4(acc[0], x[0], w[0]),
                    Avx2::dot4(acc[1], x[1], w[1]),
                ]
            }
        }
        #[inline(always)]
        unsafe fn ifloat(a: [__m256i; 2]) -> __m512 {
            // SAFETY: AVX-512F is available.
            unsafe {
                _mm512_cvtepi32_ps(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(a[0]), a[1]))
            }
        }
        #[inline(always)]
        unsafe fn quantize(p: *const f32, inverse: f32, shift: f32, out: *mut u8) {
            // SAFETY: AVX-512F is available; 16 floats at `p` are readable and 16 bytes at
            // `out` writable (caller).
            unsafe { quantize16(p, inverse, shift, out) }
        }
    }

    /// [`Simd::quantize`] of 16 floats with AVX-512F: `vpmovdb` narrows the i32 levels.
    ///
    /// # Safety
    /// AVX-512F is available; `p..p + 16` is readable and `out..out + 16` writable.
    #[inline(always)]
    unsafe fn quantize16(p: *const f32, inverse: f32, shift: f32, out: *mut u8) {
        // SAFETY: as the caller guarantees. `max(v, 0)` returns 0 for a NaN `v` (the second
        // operand), as the scalar clamp-then-cast does.
        unsafe {
            let v = _mm512_add_ps(
                _mm512_mul_ps(_mm512_loadu_ps(p), _mm512_set1_ps(inverse)),
                _mm512_set1_ps(shift),
            );
            let v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), _mm512_set1_ps(127.0));
            let levels = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v));
            _mm_storeu_si128(out.cast(), levels);
        }
    }

    /// AVX-512F floats, with AVX-512 VNNI's `vpdpbusd` for the int8 kernels: 64 byte products
    /// summed into 16 i32 lanes per instruction.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512Vnni;

    // SAFETY: the float methods are AVX-512F's (as `Avx512`), the int8 ones call AVX-512F, BW
    // and VNNI intrinsics; `dispatch` runs them only after detecting all three.
    unsafe impl Simd for Avx512Vnni {
        const LANES: usize = 16;
        const NAME: &'static str = "AVX-512 VNNI";
        // Blocks of 12 rows (24 of the 32 registers as accumulators) measured no faster than
        // the default 6 on a 2-core AMD EPYC (Zen 4): the default stays.
        type V = __m512;
        type Narrow = Avx2;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            // SAFETY: as `Avx512`'s (caller).
            unsafe { Avx512::splat(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            // SAFETY: as `Avx512`'s (caller).
            unsafe { Avx512::load(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            // SAFETY: as `Avx512`'s (caller).
            unsafe { Avx512::store(p, v) }
        }
        #[inline(always)]
        unsafe fn load_first(p: *const f32, n: usize) -> __m512 {
            // SAFETY: as `Avx512`'s (caller).
            unsafe { Avx512::load_first(p, n) }
        }
        #[inline(always)]
        unsafe fn store_first(p: *mut f32, v: __m512, n: usize) {
            // SAFETY: as `Avx512`'s (caller).
            unsafe { Avx512::store_first(p, v, n) }
        }
        #[inline(always)]
        unsafe fn madd(a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: as `Avx512`'s (caller).
            unsafe { Avx512::madd(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            // SAFETY: as `Avx512`'s (caller).
            unsafe { Avx512::add(a, b) }
        }
        #[inline(always)]
        unsafe fn relu6(a: __m512) -> __m512 {
            // SAFETY: as `Avx512`'s (caller).
            unsafe { Avx512::relu6(a) }
        }
        type I = __m512i;
        type Q = __m512i;
        #[inline(always)]
        unsafe fn izero() -> __m512i {
            // SAFETY: AVX-512F is available (caller).
            unsafe { _mm512_setzero_si512() }
        }
        #[inline(always)]
        unsafe fn qload(p: *const u8) -> __m512i {
            // SAFETY: 64 bytes at `p` are readable (caller); AVX-512F is available.
            unsafe { _mm512_loadu_si512(p.cast()) }
        }
        #[inline(always)]
        unsafe fn qsplat(x: u32) -> __m512i {
            // SAFETY: AVX-512F is available (caller).
            unsafe { _mm512_set1_epi32(x as i32) }
        }
        #[inline(always)]
        unsafe fn dot4(acc: __m512i, x: __m512i, w: __m512i) -> __m512i {
            // `vpdpbusd` sums the four u8 x i8 products of each lane straight into i32: no
            // intermediate saturation at all.
            // SAFETY: AVX-512 VNNI is available (caller).
            unsafe { _mm512_dpbusd_epi32(acc, x, w) }
        }
        #[inline(always)]
        unsafe fn ifloat(a: __m512i) -> __m512 {
            // SAFETY: AVX-512F is available (caller).
            unsafe { _mm512_cvtepi32_ps(a) }
        }
        #[inline(always)]
        unsafe fn quantize(p: *const f32, inverse: f32, shift: f32, out: *mut u8) {
            // SAFETY: AVX-512F is available; the ranges are valid (caller).
            unsafe { quantize16(p, inverse, shift, out) }
        }
    }

    /// 8 floats in a YMM register (AVX2 + FMA).
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2;

    // SAFETY: every method only calls AVX, AVX2 and FMA intrinsics; the trait's contract makes
    // callers run them on a CPU with those (`dispatch` does so only after detecting them).
    unsafe impl Simd for Avx2 {
        const LANES: usize = 8;
        const NAME: &'static str = "AVX2+FMA";
        // 16 registers: 8 accumulators, 2 weight registers, the broadcast input, the pairwise
        // sums and the ones of `vpmaddwd`.
        const INT8_ROWS: usize = 4;
        type V = __m256;
        type Narrow = Sse;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            // SAFETY: AVX is available (caller).
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: AVX is available and 8 floats at `p` are readable (caller).
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            // SAFETY: AVX is available and 8 floats at `p` are writable (caller).
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn load_first(p: *const f32, n: usize) -> __m256 {
            // SAFETY: AVX2 is available and `p..p + n` is readable (caller); the masked load
            // touches no lane past `n`.
            unsafe { _mm256_maskload_ps(p, first_lanes(n)) }
        }
        #[inline(always)]
        unsafe fn store_first(p: *mut f32, v: __m256, n: usize) {
            // SAFETY: AVX2 is available and `p..p + n` is writable (caller); the masked store
            // touches no lane past `n`.
            unsafe { _mm256_maskstore_ps(p, first_lanes(n), v) }
        }
        #[inline(always)]
        unsafe fn madd(a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: FMA is available (caller).
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX is available (caller).
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn relu6(a: __m256) -> __m256 {
            // NaN goes through (see the AVX-512 version).
            // SAFETY: AVX is available (caller).
            unsafe { _mm256_min_ps(_mm256_set1_ps(6.0), _mm256_max_ps(_mm256_setzero_ps(), a)) }
        }
        type I = __m256i;
        type Q = __m256i;
        #[inline(always)]
        unsafe fn izero() -> __m256i {
            // SAFETY: AVX is available (caller).
            unsafe { _mm256_setzero_si256() }
        }
        #[inline(always)]
        unsafe fn qload(p: *const u8) -> __m256i {
            // SAFETY: 32 bytes at `p` are readable (caller); AVX is available.
            unsafe { _mm256_loadu_si256(p.cast()) }
        }
        #[inline(always)]
        unsafe fn qsplat(x: u32) -> __m256i {
            // SAFETY: AVX is available (caller).
            unsafe { _mm256_set1_epi32(x as i32) }
        }
        #[inline(always)]
        unsafe fn dot4(acc: __m256i, x: __m256i, w: __m256i) -> __m256i {
            // `vpmaddubsw`: u8 x i8 products summed in pairs into i16, which saturates past
            // 32,767; activations of at most 127 keep every pair within 32,258. `vpmaddwd`
            // by ones then sums the pairs into i32.
            // SAFETY: AVX2 is available (caller).
            unsafe {
                let pairs = _mm256_maddubs_epi16(x, w);
                _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
            }
        }
        #[inline(always)]
        unsafe fn ifloat(a: __m256i) -> __m256 {
            // SAFETY: AVX is available (caller).
            unsafe { _mm256_cvtepi32_ps(a) }
        }
        #[inline(always)]
        unsafe fn quantize(p: *const f32, inverse: f32, shift: f32, out: *mut u8) {
            // SAFETY: AVX2 is available; 8 floats at `p` are readable and 8 bytes at `out`
            // writable (caller). `max(v, 0)` gives 0 for NaN, as in `quantize16`.
            unsafe {
                let v = _mm256_add_ps(
                    _mm256_mul_ps(_mm256_loadu_ps(p), _mm256_set1_ps(inverse)),
                    _mm256_set1_ps(shift),
                );
                let v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(127.0));
                let i = _mm256_cvttps_epi32(v);
                // Within each 128-bit half: i32 to i16 to u8 (values 0..=127, no saturation),
                // then the two halves' first four bytes side by side.
                let w = _mm256_packs_epi32(i, i);
                let b = _mm256_packus_epi16(w, w);
                let both =
                    _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
                _mm_storel_epi64(out.cast(), _mm256_castsi256_si128(both));
            }
        }
    }

    /// An AVX2 lane mask selecting the first `n` of 8 lanes (`n <= 8`).
    ///
    /// # Safety
    /// AVX is available; `n <= 8`.
    #[inline(always)]
    unsafe fn first_lanes(n: usize) -> __m256i {
        static MASKS: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
        debug_assert!(n <= 8);
        // SAFETY: `8 - n` is in `0..=8`, so the 8 ints read lie inside `MASKS`; AVX is
        // available (caller).
        unsafe { _mm256_loadu_si256(MASKS.as_ptr().add(8 - n) as *const __m256i) }
    }

    /// 4 floats in an XMM register (SSE2, every x86-64; no FMA).
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Sse;

    // SAFETY: every method only calls SSE intrinsics, part of the x86-64 baseline.
    unsafe impl Simd for Sse {
        const LANES: usize = 4;
        const NAME: &'static str = "SSE2";
        type V = __m128;
        type Narrow = Scalar;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m128 {
            // SAFETY: SSE is baseline on x86-64.
            unsafe { _mm_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m128 {
            // SAFETY: 4 floats at `p` are readable (caller); SSE is baseline.
            unsafe { _mm_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m128) {
            // SAFETY: 4 floats at `p` are writable (caller); SSE is baseline.
            unsafe { _mm_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn madd(a: __m128, b: __m128, c: __m128) -> __m128 {
            // SAFETY: SSE is baseline on x86-64.
            unsafe { _mm_add_ps(_mm_mul_ps(a, b), c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m128, b: __m128) -> __m128 {
            // SAFETY: SSE is baseline on x86-64.
            unsafe { _mm_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn relu6(a: __m128) -> __m128 {
            // NaN goes through (see the AVX-512 version).
            // SAFETY: SSE is baseline on x86-64.
            unsafe { _mm_min_ps(_mm_set1_ps(6.0), _mm_max_ps(_mm_setzero_ps(), a)) }
        }
        // SSE2 has no byte products (`pmaddubsw` is SSSE3): plain integers, the fallback.
        type I = [i32; 4];
        type Q = [u8; 16];
        #[inline(always)]
        unsafe fn izero() -> [i32; 4] {
            [0; 4]
        }
        #[inline(always)]
        unsafe fn qload(p: *const u8) -> [u8; 16] {
            // SAFETY: 16 bytes at `p` are readable (caller).
            unsafe { p.cast::<[u8; 16]>().read_unaligned() }
        }
        #[inline(always)]
        unsafe fn qsplat(x: u32) -> [u8; 16] {
            let b = x.to_le_bytes();
            std::array::from_fn(|i| b[i % 4])
        }
        #[inline(always)]
        unsafe fn dot4(acc: [i32; 4], x: [u8; 16], w: [u8; 16]) -> [i32; 4] {
            dot4_lanes(acc, x, w)
        }
        #[inline(always)]
        unsafe fn ifloat(a: [i32; 4]) -> __m128 {
            // SAFETY: SSE2 is baseline on x86-64.
            unsafe { _mm_cvtepi32_ps(_mm_loadu_si128(a.as_ptr().cast())) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::on_every_isa;
    use super::super::{dispatch, Kernel};
    use super::Simd;

    /// ReLU6 over a buffer whose length is a multiple of every register width.
    struct Relu6(Vec<f32>);

    impl Kernel for Relu6 {
        type Output = Vec<f32>;
        #[inline(always)]
        unsafe fn run<V: Simd>(mut self) -> Vec<f32> {
            for chunk in self.0.chunks_exact_mut(V::LANES) {
                // SAFETY: the chunk holds LANES floats; V is usable (dispatch).
                unsafe { V::store(chunk.as_mut_ptr(), V::relu6(V::load(chunk.as_ptr()))) };
            }
            self.0
        }
    }

    /// Every instruction set clamps to [0, 6] and lets NaN through, as the scalar path does
    /// (a NaN activation must not become a plausible 0 on one CPU and stay NaN on another).
    #[test]
    fn relu6_agrees_on_every_isa_nan_included() {
        let special = [
            f32::NAN,
            -1.0,
            -0.0,
            0.0,
            3.5,
            6.0,
            7.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let input: Vec<f32> = special.iter().copied().cycle().take(64).collect();
        let want: Vec<f32> = input.iter().map(|&a| a.clamp(0.0, 6.0)).collect();
        for (isa, got) in on_every_isa(|| dispatch(Relu6(input.clone()))) {
            for ((g, w), a) in got.iter().zip(&want).zip(&input) {
                assert!(
                    (g.is_nan() && w.is_nan()) || g == w,
                    "{isa:?}: relu6({a}) = {g}, scalar {w}"
                );
            }
        }
    }
}
