//! verger's own CPU kernels for the layer kinds of the network, on NHWC activations (channels
//! contiguous, so every inner loop runs over channels with unit stride). The Burn backend
//! extension ([`super::extension`]) runs them on Flex and NdArray tensors.
//!
//! - [`pointwise`]: 1x1 convolutions on weights packed once at load.
//! - [`depthwise`]: depthwise convolutions, bias and ReLU6 fused.
//! - [`stem`]: the 3-channel stem convolution.
//! - [`inverted_residual`]: a whole block fused band by band over the three.
//! - [`int8`]: 1x1 convolutions on int8 weights and 7-bit activations (`--precision int8`).
//! - [`geometry`]: padding and output sizes ([`Padding::Same`] is TensorFlow's, asymmetric on
//!   stride 2).
//!
//! Each kernel is written once over [`simd::Simd`] vectors and run through [`dispatch`], the one
//! place that picks the instruction set (AVX-512 with or without VNNI, AVX2+FMA, SSE2; plain
//! floats elsewhere) at run time: one binary runs on any x86-64 and uses AVX-512 where the CPU
//! has it. Everything runs on the calling thread: parallelism comes from timely workers, one
//! per core.

pub mod depthwise;
pub mod geometry;
pub mod int8;
pub mod inverted_residual;
pub mod pointwise;
mod simd;
pub mod stem;

pub use depthwise::{depthwise_relu6, DepthwiseWeights};
pub use geometry::{same_padding, ConvShape, Padding};
pub use int8::{ActivationQuant, Int8Pointwise, RangeObserver};
pub use inverted_residual::{kernel_times, BandScratch, InvertedResidual};
pub use pointwise::{sum_rows, Activation, Pointwise};
pub use stem::{stem_relu6, StemWeights, STEM_BLOCK};

#[cfg(not(target_arch = "x86_64"))]
use simd::Scalar;
use simd::Simd;
#[cfg(target_arch = "x86_64")]
use simd::{Avx2, Avx512, Avx512Vnni, Sse};

/// Instruction sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F, BW and VNNI (with AVX2 and FMA): 16 lanes, `vpdpbusd` for int8.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// AVX-512F (with AVX2 and FMA): 16 lanes.
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
    if let Some(forced) = testing::FORCED_ISA.with(std::cell::Cell::get) {
        return forced;
    }
    chosen_isa()
}

/// The instruction set the kernels use in this process: the best of this CPU, or a lesser one
/// named by `VERGER_ISA` (`avx512-vnni`, `avx512`, `avx2`, `baseline`), to measure one CPU's
/// fallbacks; a name this CPU cannot run, or does not know, is ignored with a warning.
fn chosen_isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detected_isa();
        let Ok(name) = std::env::var("VERGER_ISA") else {
            return best;
        };
        let runnable = runnable_isas(best);
        let named = runnable.iter().copied().find(|isa| isa_name(*isa) == name);
        match named {
            Some(isa) => isa,
            None => {
                tracing::warn!(
                    asked = %name,
                    using = isa_name(best),
                    "VERGER_ISA names no instruction set this CPU runs: using its best"
                );
                best
            }
        }
    })
}

/// The `VERGER_ISA` name of an instruction set.
fn isa_name(isa: Isa) -> &'static str {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => "avx512-vnni",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => "avx512",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2",
        Isa::Baseline => "baseline",
    }
}

/// `best` and every instruction set below it, best first: what this CPU can run.
fn runnable_isas(best: Isa) -> Vec<Isa> {
    #[cfg(target_arch = "x86_64")]
    let all = match best {
        Isa::Avx512Vnni => vec![Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2, Isa::Baseline],
        Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Baseline],
        Isa::Avx2 => vec![Isa::Avx2, Isa::Baseline],
        Isa::Baseline => vec![Isa::Baseline],
    };
    #[cfg(not(target_arch = "x86_64"))]
    let all = {
        let _ = best;
        vec![Isa::Baseline]
    };
    all
}

/// The best instruction set of this CPU, detected once.
fn detected_isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx512Vnni;
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx2")
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

/// A kernel body written once over the vector type, run by [`dispatch`] on this CPU's best
/// instruction set.
pub(crate) trait Kernel {
    /// What the kernel returns.
    type Output;
    /// The body with `V` as its vector type; implementations are `#[inline(always)]`, so it is
    /// compiled inside `dispatch`'s function for `V`'s instruction set.
    ///
    /// # Safety
    /// `V` is usable on this CPU.
    unsafe fn run<V: Simd>(self) -> Self::Output;
}

/// Runs `kernel` on the instruction set [`isa`] picks: the one `match` over instruction sets.
pub(crate) fn dispatch<K: Kernel>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
        fn avx512_vnni<K: Kernel>(kernel: K) -> K::Output {
            // SAFETY: compiled for AVX-512F, BW and VNNI, called once `isa()` reported them.
            unsafe { kernel.run::<Avx512Vnni>() }
        }
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn avx512<K: Kernel>(kernel: K) -> K::Output {
            // SAFETY: this function is compiled for AVX-512F and only called once `isa()`
            // reported it on this CPU.
            unsafe { kernel.run::<Avx512>() }
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<K: Kernel>(kernel: K) -> K::Output {
            // SAFETY: compiled for AVX2 + FMA, called once `isa()` reported both.
            unsafe { kernel.run::<Avx2>() }
        }
        match isa() {
            // SAFETY: `isa()` detected AVX-512F, BW, VNNI, AVX2 and FMA on this CPU.
            Isa::Avx512Vnni => unsafe { avx512_vnni(kernel) },
            // SAFETY: `isa()` detected AVX-512F, AVX2 and FMA on this CPU.
            Isa::Avx512 => unsafe { avx512(kernel) },
            // SAFETY: `isa()` detected AVX2 and FMA on this CPU.
            Isa::Avx2 => unsafe { avx2(kernel) },
            // SAFETY: SSE2 is part of the x86-64 baseline.
            Isa::Baseline => unsafe { kernel.run::<Sse>() },
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: plain floats run everywhere.
    unsafe {
        kernel.run::<Scalar>()
    }
}

/// Floats per vector register of the instruction set [`dispatch`] uses.
pub(crate) fn vector_lanes() -> usize {
    struct Lanes;
    impl Kernel for Lanes {
        type Output = usize;
        #[inline(always)]
        unsafe fn run<V: Simd>(self) -> usize {
            V::LANES
        }
    }
    dispatch(Lanes)
}

/// The instruction set the kernels run with, for logs and benchmark reports.
pub fn instruction_set() -> &'static str {
    struct Name;
    impl Kernel for Name {
        type Output = &'static str;
        #[inline(always)]
        unsafe fn run<V: Simd>(self) -> &'static str {
            V::NAME
        }
    }
    dispatch(Name)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers of the kernels' tests: every instruction set of this CPU, deterministic values.
    use super::{detected_isa, Isa};

    thread_local! {
        /// The instruction set [`isa`](super::isa) reports on this thread, when set.
        pub(crate) static FORCED_ISA: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
    }

    /// `f`'s result on each instruction set this CPU can run (the best and every fallback),
    /// weights packed and kernels run as if it were the only one.
    pub(crate) fn on_every_isa<T>(mut f: impl FnMut() -> T) -> Vec<(Isa, T)> {
        let all = super::runnable_isas(detected_isa());
        // Under Miri only the baseline path runs: Miri does not emulate AVX.
        #[cfg(miri)]
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

    /// `n` values in `[-2, 2)` from a small deterministic generator: the properties are about
    /// geometry, not randomness.
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
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
}
