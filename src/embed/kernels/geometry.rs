//! Geometry of a convolution over an NHWC image: padding, output size, and which kernel taps
//! of an output pixel fall inside the image.

use std::ops::Range;

/// How a convolution pads its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// TensorFlow "SAME": `ceil(size / stride)` outputs, the odd pixel of padding at the
    /// bottom/right (what the EfficientNet-Lite weights were trained with).
    Same,
    /// `(kernel - 1) / 2` on every side, PyTorch style: `(size + 2p - kernel) / stride + 1`
    /// outputs.
    Symmetric,
}

impl Padding {
    /// Padding `(begin, end)` along one dimension of `size` pixels, and the output length.
    pub fn along(self, size: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
        match self {
            Padding::Same => {
                let (begin, end) = same_padding(size, kernel, stride);
                (begin, end, size.div_ceil(stride))
            }
            Padding::Symmetric => {
                let p = (kernel - 1) / 2;
                (p, p, (size + 2 * p).saturating_sub(kernel) / stride + 1)
            }
        }
    }
}

/// TensorFlow "SAME" padding `(begin, end)` for one spatial dimension: the output has
/// `ceil(size / stride)` positions and the extra pixel, if any, goes at the end.
pub fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out.max(1) - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// Geometry of a square convolution over an NHWC image.
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
    /// Output height.
    pub out_h: usize,
    /// Output width.
    pub out_w: usize,
}

impl ConvShape {
    /// The geometry of a `kernel` x `kernel` convolution with `stride` and `padding` over
    /// `in_h` x `in_w`.
    pub fn new(in_h: usize, in_w: usize, kernel: usize, stride: usize, padding: Padding) -> Self {
        let (pad_top, _, out_h) = padding.along(in_h, kernel, stride);
        let (pad_left, _, out_w) = padding.along(in_w, kernel, stride);
        Self {
            in_h,
            in_w,
            kernel,
            stride,
            pad_top,
            pad_left,
            out_h,
            out_w,
        }
    }

    /// "SAME" geometry ([`Padding::Same`]).
    pub fn same(in_h: usize, in_w: usize, kernel: usize, stride: usize) -> Self {
        Self::new(in_h, in_w, kernel, stride, Padding::Same)
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
    pub(super) fn taps(&self, o: usize, size: usize, pad: usize) -> Taps {
        let first = (o * self.stride) as isize - pad as isize;
        let lo = (-first).max(0) as usize;
        let hi = (size as isize - first).min(self.kernel as isize).max(0) as usize;
        Taps { first, lo, hi }
    }
}

/// Valid kernel taps along one axis for one output coordinate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Taps {
    /// Input coordinate of tap 0 (negative inside the top/left padding).
    pub first: isize,
    /// First tap inside the image.
    pub lo: usize,
    /// One past the last tap inside the image.
    pub hi: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_is_asymmetric_on_stride_two() {
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(112, 5, 2), (1, 2));
        assert_eq!(same_padding(225, 3, 2), (1, 1));
        assert_eq!(same_padding(56, 3, 1), (1, 1));
        assert_eq!(same_padding(14, 5, 1), (2, 2));
        assert_eq!(same_padding(7, 1, 1), (0, 0));
    }

    #[test]
    fn symmetric_padding_matches_pytorch_output_sizes() {
        // torchvision's MobileNetV2 stem: 3x3 stride 2, padding 1, over 224 and odd sizes.
        assert_eq!(Padding::Symmetric.along(224, 3, 2), (1, 1, 112));
        assert_eq!(Padding::Symmetric.along(7, 3, 2), (1, 1, 4));
        assert_eq!(Padding::Symmetric.along(14, 5, 1), (2, 2, 14));
        let s = ConvShape::new(7, 9, 3, 2, Padding::Symmetric);
        assert_eq!((s.out_h, s.out_w, s.pad_top, s.pad_left), (4, 5, 1, 1));
    }

    #[test]
    fn same_geometry_reads_the_right_rows() {
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
        assert_eq!(s.input_rows(13..14), 25..28);
        // Row 0 reads rows -1..4: the first is padding.
        assert_eq!(s.input_rows(0..1), 0..4);
    }
}
