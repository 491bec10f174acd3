//! Decode stage: compressed bytes to the network's input pixels.
//!
//! Any colour type the `image` crate reads (grayscale, RGBA, CMYK JPEG, 16-bit PNG, ...) becomes
//! RGB8; alpha is dropped, as PIL's `convert("RGB")` does. The picture is then resized to the
//! model's square input with a bilinear *convolution* filter, which is what PIL's
//! `Image.BILINEAR` does (a triangle filter whose support widens when shrinking), so embeddings
//! match the PyTorch reference. Normalisation to float happens later, straight into the
//! embedding batch, so an image in flight costs 3 bytes per pixel, not 12.

use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{ImageFormat, ImageReader, Limits};
use std::io::Cursor;

/// Largest width or height accepted: a guard against decompression bombs.
pub const MAX_SIDE: u32 = 16_384;

/// Why an object could not be turned into pixels.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Zero bytes.
    #[error("empty object (0 bytes)")]
    Empty,
    /// The bytes are not an image format verger reads.
    #[error("not a supported image (JPEG or PNG): {0}")]
    UnknownFormat(String),
    /// A JPEG whose end-of-image marker is missing: the file was cut short.
    #[error("truncated JPEG: no end-of-image marker")]
    TruncatedJpeg,
    /// The decoder refused the bytes.
    #[error("{format:?} decoder failed: {reason}")]
    Corrupt {
        /// The format that was detected.
        format: ImageFormat,
        /// The decoder's message.
        reason: String,
    },
    /// The image has a zero or excessive dimension.
    #[error("unsupported dimensions {width}x{height}")]
    Dimensions {
        /// Original width.
        width: u32,
        /// Original height.
        height: u32,
    },
}

/// An image ready for the network: `side x side` RGB8, row-major, plus its original size.
#[derive(Clone, Debug)]
pub struct Pixels {
    /// Width of the original picture.
    pub width: u32,
    /// Height of the original picture.
    pub height: u32,
    /// `side * side * 3` bytes, RGB interleaved.
    pub rgb: Vec<u8>,
}

/// Decodes `bytes`, converts to RGB8 and resizes to `side x side` (PIL-compatible bilinear).
pub fn decode_and_resize(bytes: &[u8], side: u32) -> Result<Pixels, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .expect("reading from memory cannot fail");
    let format = reader
        .format()
        .ok_or_else(|| DecodeError::UnknownFormat(magic_hint(bytes)))?;
    if format == ImageFormat::Jpeg && !has_jpeg_end_marker(bytes) {
        return Err(DecodeError::TruncatedJpeg);
    }
    let mut reader = reader;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    reader.limits(limits);
    let image = reader.decode().map_err(|e| DecodeError::Corrupt {
        format,
        reason: e.to_string(),
    })?;
    let (width, height) = (image.width(), image.height());
    if width == 0 || height == 0 {
        return Err(DecodeError::Dimensions { width, height });
    }
    let rgb = image.into_rgb8().into_raw();
    Ok(Pixels {
        width,
        height,
        rgb: resize_rgb(rgb, width, height, side),
    })
}

/// Resizes an RGB8 buffer to `side x side` with PIL's bilinear filter.
pub fn resize_rgb(rgb: Vec<u8>, width: u32, height: u32, side: u32) -> Vec<u8> {
    if width == side && height == side {
        return rgb;
    }
    let src = Image::from_vec_u8(width, height, rgb, PixelType::U8x3)
        .expect("buffer length matches dimensions");
    let mut dst = Image::new(side, side, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .expect("same pixel type on both sides");
    dst.into_vec()
}

/// RGB8 pixels to normalised floats, interleaved (NHWC, the memory order of the network's
/// input tensor):
/// `out[3p + c] = (rgb[3p + c] / 255 - mean[c]) / std[c]`.
pub fn normalise_interleaved_into(rgb: &[u8], mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    assert_eq!(out.len(), rgb.len(), "output must hold every channel");
    let scale = std.map(|s| 1.0 / (255.0 * s));
    let shift = [0, 1, 2].map(|c| mean[c] / std[c]);
    for (d, px) in out.chunks_exact_mut(3).zip(rgb.chunks_exact(3)) {
        for c in 0..3 {
            d[c] = px[c] as f32 * scale[c] - shift[c];
        }
    }
}

/// A JPEG ends with the EOI marker `FF D9`; some writers append padding after it, so the
/// last few hundred bytes are searched, as tolerant readers do.
fn has_jpeg_end_marker(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(512)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// The first bytes of an unknown object, printable, for the error record.
fn magic_hint(bytes: &[u8]) -> String {
    let head: String = bytes
        .iter()
        .take(8)
        .map(|&b| {
            if b.is_ascii_graphic() {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect();
    format!("unrecognised leading bytes \"{head}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_matches_the_formula() {
        let rgb = [0u8, 128, 255, 10, 20, 30];
        let mean = [0.485, 0.456, 0.406];
        let std = [0.229, 0.224, 0.225];
        let mut nhwc = [0f32; 6];
        normalise_interleaved_into(&rgb, mean, std, &mut nhwc);
        let expect = |v: f32, c: usize| (v / 255.0 - mean[c]) / std[c];
        // Pixel by pixel: (0, 128, 255), then (10, 20, 30).
        let want = [
            expect(0.0, 0),
            expect(128.0, 1),
            expect(255.0, 2),
            expect(10.0, 0),
            expect(20.0, 1),
            expect(30.0, 2),
        ];
        for (a, b) in nhwc.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn text_is_refused_with_its_leading_bytes() {
        let err = decode_and_resize(b"hello, I am not a JPEG", 224).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownFormat(_)), "{err}");
        assert!(err.to_string().contains("hello,"), "{err}");
    }

    #[test]
    fn empty_is_refused() {
        assert!(matches!(
            decode_and_resize(&[], 224),
            Err(DecodeError::Empty)
        ));
    }

    #[test]
    fn resize_keeps_a_flat_colour_flat() {
        let rgb = [7u8, 100, 250].repeat(100 * 100);
        let out = resize_rgb(rgb, 100, 100, 224);
        assert_eq!(out.len(), 224 * 224 * 3);
        assert!(out.chunks_exact(3).all(|p| p == [7, 100, 250]));
    }
}
