//! Decode stage: compressed bytes to the network's input pixels.
//!
//! Formats: JPEG, PNG, WebP, TIFF, BMP and GIF (its first frame), with the `image` crate's
//! decoders ([`FORMATS`]). A picture is turned upright as its EXIF orientation says (phones store
//! most photos sideways with such a tag) unless [`Orientation::Ignore`]. Any colour type
//! (grayscale, RGBA, CMYK JPEG, 16-bit PNG, ...) becomes
//! RGB8; alpha is dropped, as PIL's `convert("RGB")` does. The picture is then resized to the
//! model's square input with a bilinear *convolution* filter, which is what PIL's
//! `Image.BILINEAR` does (a triangle filter whose support widens when shrinking), so embeddings
//! match the PyTorch reference. Normalisation to float happens later, straight into the
//! embedding batch, so an image in flight costs 3 bytes per pixel, not 12.

use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use std::io::Cursor;
use timely::dataflow::StreamVec;

use crate::label::LabelRule;
use crate::operators::{paced_map, Gate, StageContext};
pub use crate::record::Pixels;
use crate::record::{Epoch, Failure, Fetched, Labelled, Miss, Stage};
use crate::stats::TimedStage;

/// The formats verger decodes, as `--help` and the error records name them.
#[cfg(not(feature = "heic"))]
pub const FORMATS: &str = "JPEG, PNG, WebP, TIFF, BMP, GIF (first frame)";
/// The formats verger decodes, as `--help` and the error records name them.
#[cfg(feature = "heic")]
pub const FORMATS: &str = "JPEG, PNG, WebP, TIFF, BMP, GIF (first frame), HEIC/HEIF, AVIF";

/// What is done with a picture's EXIF orientation tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Orientation {
    /// Turn the picture upright as the tag says, as photo viewers do (before resizing; the
    /// row's width and height are the upright picture's).
    #[default]
    Apply,
    /// Use the pixels as stored, as pipelines that ignore the tag do (Keras' `load_img`).
    Ignore,
}

/// What the decode stage makes of fetched bytes: the network's square input of `side`, within
/// a pixel budget, upright or not, labelled by a rule.
#[derive(Clone, Debug)]
pub struct DecodeSettings {
    /// The network's input side.
    pub side: u32,
    /// The pixel budget ([`MAX_PIXELS`] by default).
    pub max_pixels: u64,
    /// What is done with the EXIF orientation.
    pub orientation: Orientation,
    /// Which part of the key is the label (and which extra columns it gives).
    pub labels: LabelRule,
}

impl DecodeSettings {
    /// What decides a row's pixels and label besides the model, as the table's metadata records it
    /// (`orientation=apply label=parent`): an output refuses a run that would derive rows
    /// otherwise, since its committed rows would be kept as they are.
    pub fn derivation(&self) -> String {
        let orientation = match self.orientation {
            Orientation::Apply => "apply",
            Orientation::Ignore => "ignore",
        };
        format!("orientation={orientation} label={}", self.labels)
    }
}

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
    #[error("not a supported image ({FORMATS}): {0}")]
    UnknownFormat(String),
    /// A JPEG whose data ends before its end-of-image marker: the file was cut short.
    #[error("truncated JPEG: its {len} bytes end inside {inside}, before the end-of-image marker")]
    TruncatedJpeg {
        /// The object's size.
        len: usize,
        /// Where the data ran out (a marker segment, or the compressed image data).
        inside: &'static str,
    },
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
    /// A HEIF file (HEIC, AVIF) and a verger built without the `heic` feature.
    #[error(
        "a HEIF file (brand {brand:?}): this verger was built without the `heic` feature (libheif)"
    )]
    HeifNotBuiltIn {
        /// The file's major brand (`heic`, `mif1`, `avif`, ...).
        brand: String,
    },
    /// libheif refused the bytes of a HEIF file.
    #[error("HEIF decoder failed: {reason}")]
    HeifCorrupt {
        /// libheif's message.
        reason: String,
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
    settings: DecodeSettings,
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
                f.and_then(|f| decode_and_label(f, &settings))
            })
        },
    )
}

/// Decode, resize and label one fetched object as `settings` say. A decoder that panics on
/// hostile bytes gives the object an error record, like any other decode failure.
pub fn decode_and_label(fetched: Fetched, settings: &DecodeSettings) -> Result<Labelled, Miss> {
    let DecodeSettings {
        side,
        max_pixels,
        orientation,
        ref labels,
    } = *settings;
    let decoded = std::panic::catch_unwind(|| {
        decode_and_resize_oriented(&fetched.bytes, side, max_pixels, orientation)
    })
    .unwrap_or_else(|payload| {
        Err(DecodeError::Panicked {
            message: crate::panic::panic_message(payload.as_ref()),
        })
    });
    match decoded {
        Ok(pixels) => {
            let found = labels.apply(&fetched.key);
            Ok(Labelled {
                label: found.label,
                columns: found.columns,
                key: fetched.key,
                etag: fetched.etag,
                pixels,
            })
        }
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
    decode_and_resize_oriented(bytes, side, max_pixels, Orientation::Apply)
}

/// [`decode_and_resize_within`], with the EXIF orientation applied or ignored.
pub fn decode_and_resize_oriented(
    bytes: &[u8],
    side: u32,
    max_pixels: u64,
    orientation: Orientation,
) -> Result<Pixels, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if let Some(brand) = heif_brand(bytes) {
        return decode_heif(bytes, brand, side, max_pixels);
    }
    let format = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .expect("reading from memory cannot fail")
        .format()
        .ok_or_else(|| DecodeError::UnknownFormat(magic_hint(bytes)))?;
    // A JPEG is decoded up to its end-of-image marker: what follows (the video of a
    // motion photo, a second picture, appended metadata) is not the picture.
    let bytes = if format == ImageFormat::Jpeg {
        &bytes[..jpeg_end(bytes)?]
    } else {
        bytes
    };
    let reader = || {
        let mut reader = ImageReader::new(Cursor::new(bytes));
        reader.set_format(format);
        reader
    };
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
    if format == ImageFormat::Jpeg {
        if let Some(pixels) = decode_jpeg_scaled(bytes, side, max_pixels, orientation) {
            return Ok(pixels);
        }
    }
    let mut reader = reader();
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(max_pixels.saturating_mul(4).max(16 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    // An unreadable orientation tag is no reason to lose the picture: it is taken as upright.
    let turn = match orientation {
        Orientation::Apply => decoder
            .orientation()
            .unwrap_or(image::metadata::Orientation::NoTransforms),
        Orientation::Ignore => image::metadata::Orientation::NoTransforms,
    };
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(turn);
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

/// A JPEG at least twice the network's side both ways, decoded at the smallest DCT scale
/// (1/2, 1/4 or 1/8) that keeps both sides at least `side`, then turned upright and resized as
/// any picture: a 12 MP photo is decoded as 504x378 instead of 4032x3024, several times
/// faster, and the resize to 224x224 averages away what the scaled IDCT leaves out (PIL's
/// `draft()` does the same). The decoder is libjpeg-turbo (`turbojpeg` crate, built from its
/// bundled source): its entropy decoding, which the scaled path still does for every
/// coefficient, measured 1.5x faster than `jpeg-decoder`'s scaled decode (docs/performance.md).
/// `None` when no scale helps (smaller pictures keep the full decode, unchanged), for colour
/// models other than YCbCr and grayscale, and when this decoder refuses the bytes (the full
/// decoder then decides). The row's width and height are the full picture's, upright.
fn decode_jpeg_scaled(
    bytes: &[u8],
    side: u32,
    max_pixels: u64,
    orientation: Orientation,
) -> Option<Pixels> {
    use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};
    let side = usize::try_from(side).ok()?;
    let mut decoder = Decompressor::new().ok()?;
    let header = decoder.read_header(bytes).ok()?;
    if !matches!(header.colorspace, Colorspace::YCbCr | Colorspace::Gray)
        || header.is_lossless
        || header.width < side.saturating_mul(2)
        || header.height < side.saturating_mul(2)
        || (header.width as u64).saturating_mul(header.height as u64) > max_pixels
    {
        return None;
    }
    // The smallest of 1/8, 1/4, 1/2 with both sides still at least `side`.
    let factor = [1, 2, 4]
        .into_iter()
        .map(|eighths| ScalingFactor::new(eighths, 8))
        .find(|f| f.scale(header.width) >= side && f.scale(header.height) >= side)?;
    decoder.set_scaling_factor(factor).ok()?;
    // A progressive JPEG of thousands of scans costs as many passes: refuse past a bound.
    decoder.set_scan_limit(JPEG_SCAN_LIMIT).ok()?;
    let scaled = header.scaled(factor);
    let mut image = Image {
        pixels: vec![0; scaled.width * scaled.height * 3],
        width: scaled.width,
        pitch: scaled.width * 3,
        height: scaled.height,
        format: PixelFormat::RGB,
    };
    decoder.decompress(bytes, image.as_deref_mut()).ok()?;
    let (w, h) = (
        u32::try_from(scaled.width).ok()?,
        u32::try_from(scaled.height).ok()?,
    );
    let mut image = DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, image.pixels)?);
    let (mut width, mut height) = (
        u32::try_from(header.width).ok()?,
        u32::try_from(header.height).ok()?,
    );
    if orientation == Orientation::Apply {
        use image::metadata::Orientation as Turn;
        if let Some(turn) = jpeg_exif(bytes).and_then(Turn::from_exif_chunk) {
            image.apply_orientation(turn);
            if matches!(
                turn,
                Turn::Rotate90 | Turn::Rotate270 | Turn::Rotate90FlipH | Turn::Rotate270FlipH
            ) {
                (width, height) = (height, width);
            }
        }
    }
    let (w, h) = (image.width(), image.height());
    Some(Pixels {
        width,
        height,
        rgb: resize_rgb(image.into_rgb8().into_raw(), w, h, side as u32),
    })
}

/// The major brand of a HEIF file (an ISO-BMFF `ftyp` box first, with a brand of the HEIF
/// family: HEIC from phones, AVIF, or the generic `mif1`), `None` for anything else.
fn heif_brand(bytes: &[u8]) -> Option<&str> {
    const BRANDS: [&[u8; 4]; 12] = [
        b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1",
        b"avif", b"avis",
    ];
    let brand = bytes.get(8..12)?;
    (bytes.get(4..8)? == b"ftyp" && BRANDS.iter().any(|b| b.as_slice() == brand))
        .then(|| std::str::from_utf8(brand).ok())
        .flatten()
}

/// A HEIF picture (HEIC, AVIF) decoded by libheif: its primary image, turned as its `irot`
/// and `imir` boxes say (HEIF's own orientation, part of the picture's geometry, so libheif
/// applies it whatever `--orientation` says; the EXIF tag a HEIC may also carry repeats it
/// and is not applied a second time), within the pixel budget checked before decoding.
#[cfg(feature = "heic")]
fn decode_heif(
    bytes: &[u8],
    _brand: &str,
    side: u32,
    max_pixels: u64,
) -> Result<Pixels, DecodeError> {
    use libheif_rs::{ColorSpace, HeifContext, LibHeif, RgbChroma};
    // One libheif for the process, never dropped (its last drop unregisters the codecs).
    static LIBHEIF: std::sync::LazyLock<LibHeif> = std::sync::LazyLock::new(LibHeif::new);
    let corrupt = |e: libheif_rs::HeifError| DecodeError::HeifCorrupt {
        reason: e.to_string().trim_end().to_string(),
    };
    let context = HeifContext::read_from_bytes(bytes).map_err(corrupt)?;
    let handle = context.primary_image_handle().map_err(corrupt)?;
    let (width, height) = (handle.width(), handle.height());
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(DecodeError::Dimensions { width, height });
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DecodeError::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        });
    }
    // No decoding options: libheif-rs 0.20 (the last for Debian 12's libheif 1.15) frees them
    // before libheif reads them; the defaults are what verger wants.
    let image = LIBHEIF
        .decode(&handle, ColorSpace::Rgb(RgbChroma::Rgb), None)
        .map_err(corrupt)?;
    let planes = image.planes();
    let plane = planes.interleaved.ok_or_else(|| DecodeError::HeifCorrupt {
        reason: "no interleaved RGB plane after decoding".into(),
    })?;
    let (w, h) = (plane.width as usize, plane.height as usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for row in plane.data.chunks(plane.stride).take(h) {
        rgb.extend_from_slice(row.get(..w * 3).ok_or_else(|| DecodeError::HeifCorrupt {
            reason: "a row shorter than the picture".into(),
        })?);
    }
    if rgb.len() != w * h * 3 {
        return Err(DecodeError::HeifCorrupt {
            reason: "fewer rows than the picture".into(),
        });
    }
    Ok(Pixels {
        width: plane.width,
        height: plane.height,
        rgb: resize_rgb(rgb, plane.width, plane.height, side),
    })
}

/// Without the `heic` feature a HEIF file is an error record that says why.
#[cfg(not(feature = "heic"))]
fn decode_heif(
    _bytes: &[u8],
    brand: &str,
    _side: u32,
    _max_pixels: u64,
) -> Result<Pixels, DecodeError> {
    Err(DecodeError::HeifNotBuiltIn {
        brand: brand.to_string(),
    })
}

/// Most scans a progressive JPEG may have on the scaled path (libjpeg-turbo's own advice
/// against a file of thousands of tiny scans, each a pass over the whole picture).
const JPEG_SCAN_LIMIT: u32 = 500;

/// The TIFF data of a JPEG's EXIF segment (APP1 starting `Exif\0\0`), found in the marker
/// segments before the first scan.
fn jpeg_exif(bytes: &[u8]) -> Option<&[u8]> {
    let mut pos = 2; // after SOI
    loop {
        if bytes.get(pos)? != &0xFF {
            return None;
        }
        let code = *bytes.get(pos + 1)?;
        if code == 0xFF {
            pos += 1; // fill byte
            continue;
        }
        if code == 0xDA || code == 0xD9 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([
            *bytes.get(pos + 2)?,
            *bytes.get(pos + 3)?,
        ]));
        let segment = bytes.get(pos + 4..pos + 2 + len)?;
        if code == 0xE1 {
            if let Some(tiff) = segment.strip_prefix(b"Exif\0\0") {
                return Some(tiff);
            }
        }
        pos += 2 + len;
    }
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

/// The length of the JPEG that starts `bytes`: up to and including the end-of-image marker
/// of its primary picture, found by walking its marker segments (each skipped by its length,
/// so a thumbnail inside the EXIF segment is not taken for the end) and the compressed data
/// of its scans. Bytes after it are a trailer, not part of the picture. Data that ends before
/// the marker is a truncated file: the decoder would fill the missing rows with grey and
/// succeed, a silently wrong picture.
fn jpeg_end(bytes: &[u8]) -> Result<usize, DecodeError> {
    let truncated = |inside| DecodeError::TruncatedJpeg {
        len: bytes.len(),
        inside,
    };
    let mut pos = 2; // after SOI
    loop {
        // The next marker: 0xFF, any fill bytes 0xFF, then the marker code. Bytes that are
        // not a marker where one belongs are skipped, as tolerant decoders do.
        let Some(ff) = bytes[pos..].iter().position(|&b| b == 0xFF) else {
            return Err(truncated("the headers"));
        };
        pos += ff;
        while bytes.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        let Some(&code) = bytes.get(pos + 1) else {
            return Err(truncated("a marker"));
        };
        pos += 2;
        match code {
            0xD9 => return Ok(pos),
            // Stand-alone markers: restart markers, TEM, and a stray stuffed zero.
            0xD0..=0xD7 | 0x01 | 0x00 => continue,
            _ => {}
        }
        let Some(len) = bytes.get(pos..pos + 2) else {
            return Err(truncated("a marker segment's length"));
        };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len < 2 || pos + len > bytes.len() {
            return Err(truncated("a marker segment"));
        }
        pos += len;
        if code == 0xDA {
            // Start of scan: compressed data up to the next marker other than a stuffed
            // zero (FF 00) or a restart marker (FF D0..D7).
            loop {
                let Some(ff) = bytes[pos..].iter().position(|&b| b == 0xFF) else {
                    return Err(truncated("the compressed image data"));
                };
                pos += ff;
                match bytes.get(pos + 1) {
                    None => return Err(truncated("the compressed image data")),
                    Some(0x00 | 0xD0..=0xD7 | 0xFF) => pos += 1,
                    Some(_) => break,
                }
            }
        }
    }
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
    fn heif_files_are_known_by_their_ftyp_brand() {
        let ftyp = |brand: &[u8; 4]| {
            let mut bytes = vec![0, 0, 0, 24];
            bytes.extend(b"ftyp");
            bytes.extend(brand);
            bytes.extend([0; 12]);
            bytes
        };
        assert_eq!(heif_brand(&ftyp(b"heic")), Some("heic"));
        assert_eq!(heif_brand(&ftyp(b"mif1")), Some("mif1"));
        assert_eq!(heif_brand(&ftyp(b"avif")), Some("avif"));
        assert_eq!(heif_brand(&ftyp(b"isom")), None, "an MP4 is no HEIF");
        assert_eq!(heif_brand(b"ftyp"), None);
        #[cfg(not(feature = "heic"))]
        assert_eq!(
            err_text(&ftyp(b"heic")),
            "a HEIF file (brand \"heic\"): this verger was built without the `heic` feature (libheif)"
        );
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

    /// A 96x64 JPEG with detail in every block (so its compressed data is long), baseline
    /// or progressive, with or without restart markers.
    fn textured_jpeg(progressive: bool, restart: u16) -> Vec<u8> {
        let (w, h) = (96u16, 64u16);
        let mut rgb = Vec::new();
        for y in 0..h as u32 {
            for x in 0..w as u32 {
                let v = (x * 7 + y * 13) ^ (x * y);
                rgb.extend([v as u8, (v >> 3) as u8, (x * 3 + y) as u8]);
            }
        }
        let mut out = Vec::new();
        let mut encoder = jpeg_encoder::Encoder::new(&mut out, 90);
        encoder.set_progressive(progressive);
        if restart > 0 {
            encoder.set_restart_interval(restart);
        }
        encoder
            .encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        out
    }

    fn jpeg_variants() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("baseline", textured_jpeg(false, 0)),
            ("progressive", textured_jpeg(true, 0)),
            ("baseline with restarts", textured_jpeg(false, 2)),
        ]
    }

    /// Bytes after the end-of-image marker (a motion photo's video, a second picture,
    /// padding) are not the picture: the same pixels come out, however long the trailer.
    #[test]
    fn bytes_after_the_end_of_a_jpeg_are_ignored() {
        let mut noise = Vec::new();
        let mut x = 0x9E37_79B9u32;
        for _ in 0..(1 << 20) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            noise.push(x as u8);
        }
        for (name, jpeg) in jpeg_variants() {
            let want = decode_and_resize(&jpeg, 224).unwrap();
            let mut mp4 = b"\0\0\0\x18ftypmp42".to_vec();
            mp4.extend(&noise[..8192]);
            for (trailer_name, trailer) in [
                ("4 KiB of noise", noise[..4096].to_vec()),
                ("1 MiB of noise", noise.clone()),
                ("a second JPEG", textured_jpeg(false, 0)),
                ("a video", mp4),
                ("zeros", vec![0; 600]),
            ] {
                let mut bytes = jpeg.clone();
                bytes.extend(&trailer);
                let got = decode_and_resize(&bytes, 224)
                    .unwrap_or_else(|e| panic!("{name} + {trailer_name}: {e}"));
                assert_eq!(got.rgb, want.rgb, "{name} + {trailer_name}");
            }
        }
    }

    /// A JPEG cut anywhere before its end-of-image marker is refused as truncated, naming
    /// its length, instead of being decoded with grey rows.
    #[test]
    fn a_jpeg_cut_short_is_truncated_wherever_it_is_cut() {
        for (name, jpeg) in jpeg_variants() {
            let n = jpeg.len();
            for cut in [3, 20, n / 10, n / 3, n / 2, n * 9 / 10, n - 3, n - 2, n - 1] {
                match decode_and_resize(&jpeg[..cut], 224) {
                    Err(DecodeError::TruncatedJpeg { len, .. }) => assert_eq!(len, cut),
                    other => panic!("{name} cut at {cut} of {n}: {:?}", other.map(|_| ())),
                }
            }
        }
    }

    /// An end-of-image marker inside a marker segment (the thumbnail in the EXIF segment)
    /// is not the picture's end: a file cut after the thumbnail is still truncated.
    #[test]
    fn a_thumbnails_end_marker_is_not_the_pictures() {
        let jpeg = textured_jpeg(false, 0);
        let thumb = textured_jpeg(false, 0);
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(&thumb);
        let mut with_thumb = jpeg[..2].to_vec();
        with_thumb.extend([0xFF, 0xE1]);
        with_thumb.extend(((app1.len() + 2) as u16).to_be_bytes());
        with_thumb.extend(&app1);
        with_thumb.extend(&jpeg[2..]);
        let whole = decode_and_resize(&with_thumb, 224).unwrap();
        assert_eq!(whole.rgb, decode_and_resize(&jpeg, 224).unwrap().rgb);
        let cut = with_thumb.len() - jpeg.len() / 2;
        assert!(
            matches!(
                decode_and_resize(&with_thumb[..cut], 224),
                Err(DecodeError::TruncatedJpeg { .. })
            ),
            "cut after the thumbnail's end marker"
        );
        let err = decode_and_resize(&with_thumb[..cut], 224).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "truncated JPEG: its {cut} bytes end inside the compressed image data, \
                 before the end-of-image marker"
            )
        );
    }
}
