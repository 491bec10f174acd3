//! The few vector operations the kernels need, over one register type per instruction set.
//!
//! Kernels are written once, generic over [`Simd`], and instantiated inside functions compiled
//! with the matching `#[target_feature]`; every method is `#[inline(always)]` so the intrinsics
//! end up inlined into those functions. Accumulators are arrays of vector registers, which the
//! compiler keeps in registers (arrays of plain `f32` of the same size are not: they spill).

/// A vector register of `LANES` floats and the operations the kernels use on it.
///
/// # Safety
/// Implementations use instruction-set intrinsics: callers must only use a type inside code
/// compiled for (and running on a CPU with) its instruction set, and pass pointers valid for
/// `LANES` floats.
pub(crate) unsafe trait Simd: Copy {
    /// Floats per register.
    const LANES: usize;
    /// The register.
    type V: Copy;
    /// All lanes set to `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// Unaligned load of `LANES` floats.
    unsafe fn load(p: *const f32) -> Self::V;
    /// Unaligned store of `LANES` floats.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The first `n` floats at `p` (`0 < n <= LANES`), zeros in the other lanes; reads nothing
    /// past `p + n`.
    unsafe fn load_first(p: *const f32, n: usize) -> Self::V {
        let mut buf = [0.0f32; 16];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
        Self::load(buf.as_ptr())
    }
    /// Stores the first `n` lanes of `v` at `p` (`0 < n <= LANES`); writes nothing past
    /// `p + n`.
    unsafe fn store_first(p: *mut f32, v: Self::V, n: usize) {
        let mut buf = [0.0f32; 16];
        Self::store(buf.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
    }
    /// `a * b + c` (fused where the instruction set has FMA).
    unsafe fn madd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `min(max(a, 0), 6)`.
    unsafe fn relu6(a: Self::V) -> Self::V;
}

/// One float: the portable fallback.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

// SAFETY: plain float arithmetic.
unsafe impl Simd for Scalar {
    const LANES: usize = 1;
    type V = f32;
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        *p
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        *p = v
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
    use super::Simd;
    use std::arch::x86_64::*;

    /// 16 floats in a ZMM register (AVX-512F).
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx512;

    // SAFETY: used only inside `#[target_feature(enable = "avx512f,...")]` functions that run
    // after `is_x86_feature_detected!("avx512f")`.
    unsafe impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_first(p: *const f32, n: usize) -> __m512 {
            _mm512_maskz_loadu_ps(((1u32 << n) - 1) as __mmask16, p)
        }
        #[inline(always)]
        unsafe fn store_first(p: *mut f32, v: __m512, n: usize) {
            _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as __mmask16, v)
        }
        #[inline(always)]
        unsafe fn madd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn relu6(a: __m512) -> __m512 {
            _mm512_min_ps(_mm512_max_ps(a, _mm512_setzero_ps()), _mm512_set1_ps(6.0))
        }
    }

    /// 8 floats in a YMM register (AVX2 + FMA).
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Avx2;

    // SAFETY: used only inside functions compiled with `avx2,fma` that run after detection.
    unsafe impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_first(p: *const f32, n: usize) -> __m256 {
            _mm256_maskload_ps(p, first_lanes(n))
        }
        #[inline(always)]
        unsafe fn store_first(p: *mut f32, v: __m256, n: usize) {
            _mm256_maskstore_ps(p, first_lanes(n), v)
        }
        #[inline(always)]
        unsafe fn madd(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn relu6(a: __m256) -> __m256 {
            _mm256_min_ps(_mm256_max_ps(a, _mm256_setzero_ps()), _mm256_set1_ps(6.0))
        }
    }

    /// An AVX2 lane mask selecting the first `n` of 8 lanes (`n <= 8`).
    #[inline(always)]
    unsafe fn first_lanes(n: usize) -> __m256i {
        static MASKS: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
        _mm256_loadu_si256(MASKS.as_ptr().add(8 - n) as *const __m256i)
    }

    /// 4 floats in an XMM register (SSE2, every x86-64; no FMA).
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Sse;

    // SAFETY: SSE2 is part of the x86-64 baseline.
    unsafe impl Simd for Sse {
        const LANES: usize = 4;
        type V = __m128;
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m128 {
            _mm_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m128 {
            _mm_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m128) {
            _mm_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn madd(a: __m128, b: __m128, c: __m128) -> __m128 {
            _mm_add_ps(_mm_mul_ps(a, b), c)
        }
        #[inline(always)]
        unsafe fn add(a: __m128, b: __m128) -> __m128 {
            _mm_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn relu6(a: __m128) -> __m128 {
            _mm_min_ps(_mm_max_ps(a, _mm_setzero_ps()), _mm_set1_ps(6.0))
        }
    }
}
