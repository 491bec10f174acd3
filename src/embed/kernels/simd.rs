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
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512, Sse};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Scalar, Simd};
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
    }

    /// 8 floats in a YMM register (AVX2 + FMA).
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2;

    // SAFETY: every method only calls AVX, AVX2 and FMA intrinsics; the trait's contract makes
    // callers run them on a CPU with those (`dispatch` does so only after detecting them).
    unsafe impl Simd for Avx2 {
        const LANES: usize = 8;
        const NAME: &'static str = "AVX2+FMA";
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
