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
use timely::dataflow::StreamVec;

use crate::label::label_of;
use crate::operators::{paced_map, Gate, StageContext};
pub use crate::record::Pixels;
use crate::record::{Epoch, Failure, Fetched, Labelled, Miss, Stage};
use crate::stats::TimedStage;

/// Largest width or height accepted: a guard against decompression bombs.
pub const MAX_SIDE: u32 = 16_384;

/// Default pixel budget of one decoded picture (width x height): 64 megapixels. Checked
/// from the header, before anything is allocated, so a decompression bomb (a PNG of a few
/// KB claiming 30000x30000, a JPEG header claiming 65500x65500) is refused at once. The
/// decoder's own allocations are capped at 4 bytes per pixel of the budget (256 MiB: an
/// 8-bit RGBA picture at the full budget; 16-bit pictures count double), so one worker's
/// decode holds at most about 7 bytes per budget pixel (the decoded picture and its RGB8
/// copy): 450 MiB at the default.
pub const MAX_PIXELS: u64 = 64_000_000;

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
    /// The header claims more pixels than the budget (a decompression bomb, or simply too
    /// large a picture): refused before decoding.
    #[error(
        "{width}x{height} is {} megapixels, over the limit of {} (--max-megapixels)",
        (*width as u64 * *height as u64).div_ceil(1_000_000),
        limit / 1_000_000
    )]
    TooManyPixels {
        /// Width claimed by the header.
        width: u32,
        /// Height claimed by the header.
        height: u32,
        /// The budget, in pixels.
        limit: u64,
    },
    /// The decoder panicked on these bytes (a decoder bug hostile input can reach).
    #[error("decoder panicked: {message}")]
    Panicked {
        /// The panic's message.
        message: String,
    },
}

/// The decode stage: decodes, resizes and labels at most `per_activation` fetched objects per
/// scheduling (so decoded pixels stay in step with the embed stage), giving each object's
/// permit back to `gate` (the fetch stage's bound). A picture that cannot be decoded becomes
/// an error record (stage `decode`).
pub fn stage<'s>(
    fetched: StreamVec<'s, Epoch, Result<Fetched, Miss>>,
    ctx: &StageContext,
    side: u32,
    max_pixels: u64,
    per_activation: usize,
    gate: Gate,
) -> StreamVec<'s, Epoch, Result<Labelled, Miss>> {
    let clock = ctx.clock.clone();
    paced_map(
        fetched,
        "DecodeLabel",
        ctx,
        per_activation,
        Some(gate),
        move |f| {
            clock.time(TimedStage::Decode, || {
                f.and_then(|f| decode_and_label(f, side, max_pixels))
            })
        },
    )
}

/// Decode, resize and label one fetched object. A decoder that panics on hostile bytes
/// gives the object an error record, like any other decode failure.
pub fn decode_and_label(fetched: Fetched, side: u32, max_pixels: u64) -> Result<Labelled, Miss> {
    let decoded =
        std::panic::catch_unwind(|| decode_and_resize_within(&fetched.bytes, side, max_pixels))
            .unwrap_or_else(|payload| {
                Err(DecodeError::Panicked {
                    message: crate::panic::panic_message(payload.as_ref()),
                })
            });
    match decoded {
        Ok(pixels) => Ok(Labelled {
            label: label_of(&fetched.key).map(str::to_string),
            key: fetched.key,
            etag: fetched.etag,
            pixels,
        }),
        Err(e) => Err(Miss::Failed(Failure {
            key: fetched.key,
            etag: fetched.etag,
            stage: Stage::Decode,
            reason: e.to_string(),
        })),
    }
}

/// Decodes `bytes`, converts to RGB8 and resizes to `side x side` (PIL-compatible bilinear),
/// within the default pixel budget [`MAX_PIXELS`].
pub fn decode_and_resize(bytes: &[u8], side: u32) -> Result<Pixels, DecodeError> {
    decode_and_resize_within(bytes, side, MAX_PIXELS)
}

/// [`decode_and_resize`] with a pixel budget of `max_pixels`, checked from the header before
/// decoding (see [`MAX_PIXELS`]).
pub fn decode_and_resize_within(
    bytes: &[u8],
    side: u32,
    max_pixels: u64,
) -> Result<Pixels, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .expect("reading from memory cannot fail")
    };
    let format = reader()
        .format()
        .ok_or_else(|| DecodeError::UnknownFormat(magic_hint(bytes)))?;
    if format == ImageFormat::Jpeg && !has_jpeg_end_marker(bytes) {
        return Err(DecodeError::TruncatedJpeg);
    }
    let corrupt = |e: image::ImageError| DecodeError::Corrupt {
        format,
        reason: e.to_string(),
    };
    let (width, height) = reader().into_dimensions().map_err(corrupt)?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DecodeError::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        });
    }
    let mut reader = reader();
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(max_pixels.saturating_mul(4).max(16 << 20));
    reader.limits(limits);
    let image = reader.decode().map_err(corrupt)?;
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

    /// A PNG of a few dozen bytes whose header claims `width x height` RGB pixels: what a
    /// decompression bomb looks like before its (here absent) pixel data.
    pub(crate) fn png_header_claiming(width: u32, height: u32) -> Vec<u8> {
        fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
            out.extend((data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend(kind);
            out.extend(data);
            let crc = crc32(&out[start..]);
            out.extend(crc.to_be_bytes());
        }
        fn crc32(bytes: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in bytes {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
                }
            }
            !crc
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend(width.to_be_bytes());
        ihdr.extend(height.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
        chunk(&mut png, b"IEND", &[]);
        png
    }

    /// A real 8x8 JPEG whose frame header is rewritten to claim `width x height`.
    pub(crate) fn jpeg_header_claiming(width: u16, height: u16) -> Vec<u8> {
        let mut jpeg = Vec::new();
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([200, 30, 30]));
        img.write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        let sof = jpeg
            .windows(2)
            .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0..=0xC2))
            .expect("a frame header");
        jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
        jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
        jpeg
    }

    #[test]
    fn decompression_bombs_are_refused_from_the_header() {
        for (bytes, w, h) in [
            (png_header_claiming(30_000, 30_000), 30_000, 30_000),
            // Under the old 16384-pixel side limit, still 256 megapixels.
            (png_header_claiming(16_000, 16_000), 16_000, 16_000),
            (jpeg_header_claiming(65_500, 65_500), 65_500, 65_500),
        ] {
            assert!(bytes.len() < 2_000, "a bomb of {} bytes", bytes.len());
            let err = decode_and_resize(&bytes, 224).unwrap_err();
            match err {
                DecodeError::TooManyPixels { width, height, .. } => {
                    assert_eq!((width, height), (w, h))
                }
                other => panic!("{w}x{h}: {other}"),
            }
            assert!(
                err_text(&bytes).contains("megapixels, over the limit of 64"),
                "{}",
                err_text(&bytes)
            );
        }
    }

    fn err_text(bytes: &[u8]) -> String {
        decode_and_resize(bytes, 224).unwrap_err().to_string()
    }

    #[test]
    fn the_pixel_budget_is_a_parameter() {
        let mut png = Vec::new();
        image::RgbImage::from_pixel(300, 200, image::Rgb([1, 2, 3]))
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        assert!(decode_and_resize_within(&png, 224, 60_000).is_ok());
        assert!(matches!(
            decode_and_resize_within(&png, 224, 59_999),
            Err(DecodeError::TooManyPixels { limit: 59_999, .. })
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
