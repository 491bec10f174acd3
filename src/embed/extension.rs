//! verger's kernels as a Burn backend extension: three fused operations (the stem, a whole
//! inverted-residual block, the head with its global average pool) declared once as a backend
//! trait, [`FusedKernels`], implemented for Flex and NdArray, and reached from the Burn module
//! through Burn's `Dispatch` like any other tensor operation.
//!
//! Tensors keep Burn's NCHW shape; the operations return theirs in channels-last memory order
//! (NCHW shape, NHWC strides, as PyTorch's `channels_last`), which is what the kernels read, so a
//! chain of them never transposes, and any Burn operation applied to their output still sees an
//! ordinary `[N, C, H, W]` tensor. An input in another memory order is copied into channels-last
//! once.
//!
//! The weights are packed for this CPU once, when the module is prepared
//! ([`Network::with_kernels`](super::network::Network::with_kernels)), and handed
//! to each call as shared state; the module keeps its Burn parameters, which every other backend
//! runs with Burn's own operations.

// Burn deprecates its ndarray backend in favour of flex; verger keeps it selectable, and the
// extension macro's generated dispatch names it.
#![cfg_attr(feature = "ndarray", allow(deprecated))]

use super::kernels::{self, BandScratch, InvertedResidual, Pointwise, StemWeights};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Dispatch, DispatchDevice, Flex};
use burn::tensor::{DType, Tensor};
use std::cell::RefCell;
use std::sync::Arc;

#[cfg(feature = "ndarray")]
use burn::backend::NdArray;

/// The fused operations, on any backend that implements them (Flex, NdArray).
#[backend_extension(Flex, NdArray: cfg(feature = "ndarray"))]
pub trait FusedKernels: Backend {
    /// The stem convolution with bias and ReLU6: `[N, 3, H, W]` to `[N, 32, H', W']`.
    fn stem(input: FloatTensor<Self>, stem: Arc<StemWeights>) -> FloatTensor<Self>;
    /// One inverted-residual block (expansion, depthwise, projection, shortcut), band by band:
    /// `[N, C, H, W]` to `[N, C', H', W']`.
    fn inverted_residual(
        input: FloatTensor<Self>,
        block: Arc<InvertedResidual>,
    ) -> FloatTensor<Self>;
    /// The head: 1x1 convolution with bias and ReLU6, then the mean over every pixel:
    /// `[N, C, H, W]` to `[N, C']`.
    fn head_pool(input: FloatTensor<Self>, head: Arc<Pointwise>) -> FloatTensor<Self>;
}

/// The same host implementation for every CPU backend: its float tensor is a
/// [`host::HostTensor`].
macro_rules! host_fused_kernels {
    ($backend:ty) => {
        impl FusedKernels for $backend {
            fn stem(input: FloatTensor<Self>, stem: Arc<StemWeights>) -> FloatTensor<Self> {
                host::stem(input, &stem)
            }
            fn inverted_residual(
                input: FloatTensor<Self>,
                block: Arc<InvertedResidual>,
            ) -> FloatTensor<Self> {
                host::inverted_residual(input, &block)
            }
            fn head_pool(input: FloatTensor<Self>, head: Arc<Pointwise>) -> FloatTensor<Self> {
                host::head_pool(input, &head)
            }
        }
    };
}

host_fused_kernels!(Flex);
#[cfg(feature = "ndarray")]
host_fused_kernels!(NdArray);

/// Whether the fused operations can run on tensors on `device`: a Flex or NdArray device
/// without autodiff (the operations have no backward pass).
pub fn supports(device: &burn::tensor::Device) -> bool {
    match device.as_dispatch() {
        DispatchDevice::Flex(_) => true,
        #[cfg(feature = "ndarray")]
        DispatchDevice::NdArray(_) => true,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Whether `x` can go through the fused operations: float32 on a [supported](supports) device.
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && supports(&x.device())
}

/// [`FusedKernels::stem`] on a module-level tensor.
pub fn stem(x: Tensor<4>, stem: &Arc<StemWeights>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedKernels>::stem(
        x.into_dispatch(),
        Arc::clone(stem),
    ))
}

/// [`FusedKernels::inverted_residual`] on a module-level tensor.
pub fn inverted_residual(x: Tensor<4>, block: &Arc<InvertedResidual>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedKernels>::inverted_residual(
        x.into_dispatch(),
        Arc::clone(block),
    ))
}

/// [`FusedKernels::head_pool`] on a module-level tensor.
pub fn head_pool(x: Tensor<4>, head: &Arc<Pointwise>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedKernels>::head_pool(
        x.into_dispatch(),
        Arc::clone(head),
    ))
}

thread_local! {
    /// The band buffers of this thread's fused blocks: each timely worker is one thread, so
    /// they are allocated once per worker and never shared.
    static SCRATCH: RefCell<BandScratch> = RefCell::default();
}

/// The operations over host memory, for every CPU backend through [`host::HostTensor`].
mod host {
    use super::*;

    /// A CPU backend's float tensor seen as a buffer of NHWC floats.
    pub(super) trait HostTensor: Sized {
        /// Calls `f` with the values of this `[N, C, H, W]` float32 tensor in NHWC order
        /// (borrowed when it already is channels-last and contiguous) and its dims.
        fn with_nhwc<R>(self, f: impl FnOnce(&[f32], [usize; 4]) -> R) -> R;
        /// A `[N, C, H, W]` tensor over `values` in NHWC order (channels-last strides).
        fn from_nhwc(values: Vec<f32>, dims: [usize; 4]) -> Self;
        /// A row-major `[rows, cols]` tensor.
        fn from_rows(values: Vec<f32>, dims: [usize; 2]) -> Self;
    }

    /// Dims of one image of a `[N, C, H, W]` batch, and its floats.
    fn image(dims: [usize; 4]) -> (usize, usize, usize, usize) {
        let [_, c, h, w] = dims;
        (c, h, w, c * h * w)
    }

    pub(super) fn stem<T: HostTensor>(input: T, stem: &StemWeights) -> T {
        input.with_nhwc(|x, dims| {
            let (c, h, w, per) = image(dims);
            assert_eq!(c, 3, "the stem reads RGB images");
            let s = stem.shape(h, w);
            let out_per = s.out_pixels() * stem.channels();
            let mut out = vec![0.0; dims[0] * out_per];
            for (x, out) in x.chunks_exact(per).zip(out.chunks_exact_mut(out_per)) {
                kernels::stem_relu6(&s, x, stem, out);
            }
            T::from_nhwc(out, [dims[0], stem.channels(), s.out_h, s.out_w])
        })
    }

    pub(super) fn inverted_residual<T: HostTensor>(input: T, block: &InvertedResidual) -> T {
        input.with_nhwc(|x, dims| {
            let (c, h, w, per) = image(dims);
            assert_eq!(c, block.c_in(), "block input channels");
            let s = block.shape(h, w);
            let out_per = s.out_pixels() * block.c_out();
            let mut out = vec![0.0; dims[0] * out_per];
            SCRATCH.with_borrow_mut(|scratch| {
                for (x, out) in x.chunks_exact(per).zip(out.chunks_exact_mut(out_per)) {
                    block.run(x, h, w, scratch, out);
                }
            });
            T::from_nhwc(out, [dims[0], block.c_out(), s.out_h, s.out_w])
        })
    }

    pub(super) fn head_pool<T: HostTensor>(input: T, head: &Pointwise) -> T {
        input.with_nhwc(|x, dims| {
            let (c, h, w, per) = image(dims);
            assert_eq!(c, head.c_in(), "head input channels");
            let (pixels, width) = (h * w, head.c_out());
            let mut expanded = vec![0.0; pixels * width];
            let mut pooled = vec![0.0; dims[0] * width];
            for (x, pooled) in x.chunks_exact(per).zip(pooled.chunks_exact_mut(width)) {
                head.apply(x, pixels, None, kernels::Activation::Relu6, &mut expanded);
                kernels::sum_rows(&expanded, pooled);
                let scale = 1.0 / pixels as f32;
                pooled.iter_mut().for_each(|v| *v *= scale);
            }
            T::from_rows(pooled, [dims[0], width])
        })
    }

    /// NCHW axes to NHWC, and back.
    const TO_NHWC: [usize; 4] = [0, 2, 3, 1];
    const TO_NCHW: [usize; 4] = [0, 3, 1, 2];

    /// `[N, C, H, W]` dims from a shape's four dimensions.
    fn dims4(shape: &[usize]) -> [usize; 4] {
        shape
            .try_into()
            .unwrap_or_else(|_| panic!("a fused operation takes 4-d tensors, got {shape:?}"))
    }

    mod flex {
        use super::*;
        use burn::backend::flex::{FlexTensor, Layout};
        use burn::backend::Bytes;

        impl HostTensor for FlexTensor {
            fn with_nhwc<R>(self, f: impl FnOnce(&[f32], [usize; 4]) -> R) -> R {
                assert_eq!(self.dtype(), DType::F32, "the fused kernels run on float32");
                let dims = dims4(self.layout().shape());
                let nhwc = self.permute(&TO_NHWC);
                match nhwc.as_slice::<f32>() {
                    Some(values) => f(values, dims),
                    None => f(
                        nhwc.to_contiguous()
                            .as_slice::<f32>()
                            .expect("a contiguous copy"),
                        dims,
                    ),
                }
            }

            fn from_nhwc(values: Vec<f32>, [n, c, h, w]: [usize; 4]) -> Self {
                let layout = Layout::contiguous([n, h, w, c].into());
                FlexTensor::new(Bytes::from_elems(values), layout, DType::F32).permute(&TO_NCHW)
            }

            fn from_rows(values: Vec<f32>, dims: [usize; 2]) -> Self {
                FlexTensor::new(
                    Bytes::from_elems(values),
                    Layout::contiguous(dims.into()),
                    DType::F32,
                )
            }
        }
    }

    #[cfg(feature = "ndarray")]
    mod ndarray_tensor {
        use super::*;
        use burn::backend::ndarray::NdArrayTensor;
        use ndarray::{ArcArray, IxDyn};

        impl HostTensor for NdArrayTensor {
            fn with_nhwc<R>(self, f: impl FnOnce(&[f32], [usize; 4]) -> R) -> R {
                let NdArrayTensor::F32(storage) = self else {
                    panic!("the fused kernels run on float32");
                };
                let view = storage.view();
                let dims = dims4(view.shape());
                let nhwc = view.permuted_axes(IxDyn(&TO_NHWC));
                match nhwc.as_slice() {
                    Some(values) => f(values, dims),
                    None => f(
                        nhwc.as_standard_layout()
                            .as_slice()
                            .expect("a standard-layout copy"),
                        dims,
                    ),
                }
            }

            fn from_nhwc(values: Vec<f32>, [n, c, h, w]: [usize; 4]) -> Self {
                let array = ArcArray::from_shape_vec(IxDyn(&[n, h, w, c]), values)
                    .expect("values match the dims")
                    .permuted_axes(IxDyn(&TO_NCHW));
                NdArrayTensor::from(array)
            }

            fn from_rows(values: Vec<f32>, dims: [usize; 2]) -> Self {
                let array =
                    ArcArray::from_shape_vec(IxDyn(&dims), values).expect("values match the dims");
                NdArrayTensor::from(array)
            }
        }
    }
}
