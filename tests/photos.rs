//! Real photos, not only the lab set: EXIF orientation and the formats beyond JPEG and PNG,
//! end to end through `verger run` on sample photos converted by the tests.

mod common;

use std::io::Cursor;
use std::path::Path;

use common::*;
use image::{ImageFormat, RgbImage};

/// The first lemon photo of the sample's Test half: its path.
fn lemon_path() -> std::path::PathBuf {
    let lemons = sample_dir().join("Test/lemon");
    let first = files_under(&lemons).remove(0);
    lemons.join(first)
}

/// The first lemon photo, decoded.
fn lemon() -> RgbImage {
    image::open(lemon_path()).unwrap().into_rgb8()
}

/// The lemon cropped to 100x72, so that a quarter turn shows in the row's size.
fn upright() -> RgbImage {
    image::imageops::crop_imm(&lemon(), 0, 14, 100, 72).to_image()
}

/// Where pixel (column `c`, row `r`) of a picture stored with EXIF orientation `tag` (1 to 8)
/// lies in the upright picture of `w x h`: written out from the tag's definition (where row 0
/// and column 0 of the stored picture lie), not with the library verger applies it with.
fn upright_position(tag: u16, (w, h): (u32, u32), c: u32, r: u32) -> (u32, u32) {
    match tag {
        1 => (c, r),
        2 => (w - 1 - c, r),         // row 0 top, column 0 right
        3 => (w - 1 - c, h - 1 - r), // row 0 bottom, column 0 right
        4 => (c, h - 1 - r),         // row 0 bottom, column 0 left
        5 => (r, c),                 // row 0 left, column 0 top
        6 => (w - 1 - r, c),         // row 0 right, column 0 top
        7 => (w - 1 - r, h - 1 - c), // row 0 right, column 0 bottom
        8 => (r, h - 1 - c),         // row 0 left, column 0 bottom
        _ => unreachable!(),
    }
}

/// Whether orientation `tag` stores the picture turned a quarter (width and height swapped).
fn quarter_turn(tag: u16) -> bool {
    tag >= 5
}

/// The pixels a camera stores for `upright` with orientation `tag`.
fn stored_for(upright: &RgbImage, tag: u16) -> RgbImage {
    let (w, h) = upright.dimensions();
    let (sw, sh) = if quarter_turn(tag) { (h, w) } else { (w, h) };
    RgbImage::from_fn(sw, sh, |c, r| {
        let (x, y) = upright_position(tag, (w, h), c, r);
        *upright.get_pixel(x, y)
    })
}

/// The upright picture of `stored` (orientation `tag`), turned by hand.
fn turned_upright(stored: &RgbImage, tag: u16) -> RgbImage {
    let (sw, sh) = stored.dimensions();
    let (w, h) = if quarter_turn(tag) {
        (sh, sw)
    } else {
        (sw, sh)
    };
    let mut upright = RgbImage::new(w, h);
    for (c, r, pixel) in stored.enumerate_pixels() {
        let (x, y) = upright_position(tag, (w, h), c, r);
        upright.put_pixel(x, y, *pixel);
    }
    upright
}

/// An EXIF segment (APP1) holding only an Orientation tag: "Exif\0\0", a little-endian TIFF
/// header and one IFD entry (tag 0x0112, SHORT, 1 value).
fn exif_orientation(tag: u16) -> Vec<u8> {
    let mut exif = b"Exif\0\0II*\0".to_vec();
    exif.extend(8u32.to_le_bytes()); // the IFD follows the header
    exif.extend(1u16.to_le_bytes()); // one entry
    exif.extend(0x0112u16.to_le_bytes());
    exif.extend(3u16.to_le_bytes()); // SHORT
    exif.extend(1u32.to_le_bytes());
    exif.extend(tag.to_le_bytes());
    exif.extend([0, 0]); // the value's padding to 4 bytes
    exif.extend(0u32.to_le_bytes()); // no next IFD
    exif
}

fn jpeg_with_orientation(pixels: &RgbImage, tag: u16, path: &Path) {
    let mut encoder = jpeg_encoder::Encoder::new_file(path, 100).unwrap();
    // No chroma subsampling: the stored pixels come back as written whichever way they are
    // turned, so what is compared is the orientation, not the compression of a turned picture.
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_4_4);
    encoder.add_app_segment(1, exif_orientation(tag)).unwrap();
    encoder
        .encode(
            pixels.as_raw(),
            pixels.width() as u16,
            pixels.height() as u16,
            jpeg_encoder::ColorType::Rgb,
        )
        .unwrap();
}

fn run_cli(input: &Path, output: &Path, extra: &[&str]) {
    succeeds(
        verger()
            .args(["run", "-w", "2", "--no-progress", "--input"])
            .arg(input)
            .arg("--output")
            .arg(output)
            .args(extra),
    );
}

/// A photo stored with each of the 8 EXIF orientations is embedded upright: every row is the
/// embedding of its stored pixels turned upright by hand (1e-4), with the upright size, and
/// close to the row of the photo stored upright (JPEG codes a turned picture a little
/// differently: cosine 0.9988 at worst here); with `--orientation ignore` the pictures are
/// taken as stored (quarter turns come out 72x100 and differ).
#[test]
fn every_exif_orientation_gives_the_upright_photos_row() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in/lemon");
    std::fs::create_dir_all(&input).unwrap();
    let upright = upright();
    for tag in 1..=8 {
        jpeg_with_orientation(
            &stored_for(&upright, tag),
            tag,
            &input.join(format!("o{tag}.jpg")),
        );
    }
    let applied = dir.path().join("applied");
    run_cli(&dir.path().join("in"), &applied, &[]);
    let rows = by_key(read_output(&applied).rows);
    let reference = &rows["lemon/o1.jpg"];
    assert_eq!((reference.width, reference.height), (100, 72));
    for tag in 1..=8 {
        let key = format!("lemon/o{tag}.jpg");
        let row = &rows[&key];
        assert_eq!((row.width, row.height), (100, 72), "orientation {tag}");
        // Exactly the stored pixels turned upright by hand, through the network.
        let stored = image::open(dir.path().join("in").join(&key))
            .unwrap()
            .into_rgb8();
        let upright = turned_upright(&stored, tag);
        let want = &shared_embedder()
            .embed(&[&verger::decode::resize_rgb(
                upright.into_raw(),
                100,
                72,
                224,
            )])
            .unwrap()[0];
        assert!(
            max_abs_diff(&row.embedding, want) <= 1e-4,
            "orientation {tag}: not the stored pixels turned upright"
        );
        // And the upright photo's row, but for what JPEG loses on a turned picture.
        let cos = cosine(&row.embedding, &reference.embedding);
        println!("orientation {tag}: cosine {cos:.6} to the photo stored upright");
        assert!(cos >= 0.995, "orientation {tag}: cosine {cos}");
    }

    let ignored = dir.path().join("ignored");
    run_cli(
        &dir.path().join("in"),
        &ignored,
        &["--orientation", "ignore"],
    );
    let rows = by_key(read_output(&ignored).rows);
    for tag in 5..=8 {
        let row = &rows[&format!("lemon/o{tag}.jpg")];
        assert_eq!(
            (row.width, row.height),
            (72, 100),
            "orientation {tag} ignored"
        );
        let cos = cosine(&row.embedding, &reference.embedding);
        assert!(cos < 0.99, "orientation {tag} ignored: cosine {cos}");
    }
}

/// The same photo as PNG, WebP (lossless), TIFF, BMP and GIF (a palette, so a little lossy) is
/// embedded like the PNG; text named `.webp` is an error record that lists the formats.
#[test]
fn webp_tiff_bmp_and_gif_are_embedded_like_png() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in/lemon");
    std::fs::create_dir_all(&input).unwrap();
    let photo = lemon();
    for (name, format) in [
        ("photo.png", ImageFormat::Png),
        ("photo.webp", ImageFormat::WebP),
        ("photo.tiff", ImageFormat::Tiff),
        ("photo.bmp", ImageFormat::Bmp),
        ("photo.gif", ImageFormat::Gif),
    ] {
        let mut bytes = Vec::new();
        photo
            .write_to(&mut Cursor::new(&mut bytes), format)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        std::fs::write(input.join(name), bytes).unwrap();
    }
    std::fs::write(input.join("notes.webp"), b"RIFF, but not really").unwrap();
    let errors = embedded_like_the_png(
        dir.path(),
        &[
            ("photo.webp", 0.9999),
            ("photo.tiff", 0.9999),
            ("photo.bmp", 0.9999),
            ("photo.gif", 0.95),
        ],
    );
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].reason.contains(&format!(
            "not a supported image ({})",
            verger::decode::FORMATS
        )),
        "{}",
        errors[0].reason
    );
}

/// Runs `verger run` over `dir/in` (the lemon photo as `lemon/photo.png` and in other files
/// beside it) and checks that each of `files` is embedded like the PNG (cosine at least its
/// bound), at the photo's 100x100 size, labelled `lemon`, and that nothing else is a row.
/// Returns the error records.
fn embedded_like_the_png(dir: &Path, files: &[(&str, f64)]) -> Vec<verger::record::Failure> {
    let output = dir.join("out");
    run_cli(&dir.join("in"), &output, &[]);
    let table = read_output(&output);
    let rows = by_key(table.rows);
    assert_eq!(rows.len(), files.len() + 1, "{:?}", rows.keys());
    let png = &rows["lemon/photo.png"].embedding;
    for (name, least) in files {
        let row = &rows[&format!("lemon/{name}")];
        let cos = cosine(&row.embedding, png);
        println!("{name}: cosine {cos:.6} to the PNG");
        assert!(cos >= *least, "{name}: cosine {cos} to the PNG");
        assert_eq!((row.width, row.height), (100, 100), "{name}");
        assert_eq!(row.label.as_deref(), Some("lemon"), "{name}");
    }
    table.errors
}

/// Mean and largest difference of two pixel buffers of the same size.
#[cfg(feature = "heic")]
fn pixel_difference(a: &[u8], b: &[u8]) -> (f64, u8) {
    assert_eq!(a.len(), b.len());
    let sum: u64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);
    (sum as f64 / a.len() as f64, max)
}

/// `heif-enc` (Debian's libheif-examples) run on `png`, writing `out` with `flags`.
#[cfg(feature = "heic")]
fn heif_enc(png: &Path, out: &Path, flags: &[&str]) {
    let status = std::process::Command::new("heif-enc")
        .args(flags)
        .arg(png)
        .arg("-o")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("heif-enc (Debian: libheif-examples) must be installed for the HEIC tests");
    assert!(status.success(), "heif-enc {flags:?}: {status}");
}

/// The sample photo converted by libheif's own encoder: HEIC (HEVC, quality 90), AVIF (AV1,
/// quality 90) and lossless HEIC are embedded like the PNG they were made from (the lossless one
/// to the same pixels within one level, libheif's RGB rounding); a HEIC cut in half and garbage in an `ftyp heic` box are error records
/// naming the HEIF decoder's reason; the formats are listed in the error of an unknown file.
#[cfg(feature = "heic")]
#[test]
fn heic_and_avif_photos_are_embedded_like_the_png_they_were_made_from() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in/lemon");
    std::fs::create_dir_all(&input).unwrap();
    let png = dir.path().join("photo.png");
    lemon().save(&png).unwrap();
    std::fs::copy(&png, input.join("photo.png")).unwrap();
    heif_enc(&png, &input.join("photo.heic"), &["-q", "90"]);
    heif_enc(&png, &input.join("photo.avif"), &["-A", "-q", "90"]);
    let lossless = dir.path().join("lossless.heic");
    heif_enc(
        &png,
        &lossless,
        &["-L", "-p", "chroma=444", "--matrix_coefficients=0"],
    );
    std::fs::copy(&lossless, input.join("lossless.heic")).unwrap();
    let heic = std::fs::read(input.join("photo.heic")).unwrap();
    std::fs::write(input.join("cut.heic"), &heic[..heic.len() / 2]).unwrap();
    let mut fake = heic[..12].to_vec();
    fake.extend(b"not the rest of a HEIF file");
    std::fs::write(input.join("fake.heic"), fake).unwrap();

    let lossless =
        verger::decode::decode_and_resize(&std::fs::read(&lossless).unwrap(), 224).unwrap();
    let from_png = verger::decode::decode_and_resize(&std::fs::read(&png).unwrap(), 224).unwrap();
    let (mean, max) = pixel_difference(&lossless.rgb, &from_png.rgb);
    println!("lossless HEIC against the PNG: mean difference {mean:.4}, max {max}");
    assert!(
        mean < 0.2 && max <= 1,
        "lossless HEIC: mean {mean}, max {max}"
    );

    let failures = embedded_like_the_png(
        dir.path(),
        &[
            ("photo.heic", 0.99),
            ("photo.avif", 0.99),
            ("lossless.heic", 0.9995),
        ],
    );
    let mut errors: Vec<_> = failures
        .iter()
        .map(|e| (e.key.as_str(), e.reason.as_str()))
        .collect();
    errors.sort();
    assert_eq!(errors.len(), 2, "{errors:?}");
    for (key, reason) in errors {
        assert!(
            key.ends_with("cut.heic") || key.ends_with("fake.heic"),
            "{key}"
        );
        assert!(
            reason.starts_with("HEIF decoder failed: "),
            "{key}: {reason}"
        );
    }
    assert!(verger::decode::FORMATS.contains("HEIC"));
}

/// Panics with libheif's message unless `e` is a success.
#[cfg(feature = "heic")]
fn heif_ok(e: libheif_sys::heif_error) {
    if e.code != 0 {
        // SAFETY: libheif's error messages are static, NUL-terminated strings.
        let message = unsafe { std::ffi::CStr::from_ptr(e.message) };
        panic!("libheif: {message:?}");
    }
}

/// Writes a 160x90 HEIC stored as is, with an `irot`/`imir` orientation of `orientation`
/// (libheif's encoder writes the boxes): a green 40x30 block at the top left, the rest of the
/// left half red, the right half blue. Through libheif's C API, because the safe crate's
/// encoding options are freed before use in the only version Debian 12's libheif builds.
#[cfg(feature = "heic")]
fn heic_with_orientation(path: &Path, orientation: libheif_sys::heif_orientation) {
    use libheif_sys as lh;
    let (w, h) = (160i32, 90i32);
    let mut pixels = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            pixels.extend(match (x, y) {
                (x, y) if x < 40 && y < 30 => [0u8, 255, 0],
                (x, _) if x < 80 => [255, 0, 0],
                _ => [0, 0, 255],
            });
        }
    }
    let name = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: every pointer passed is either null where the API allows it or one that libheif
    // allocated just before and that is released once, after its last use; the plane copied
    // into has `stride` bytes per row for `h` rows, as libheif reported, and each row copy
    // is `w * 3` bytes, within both the stride and `pixels`.
    unsafe {
        let mut image = std::ptr::null_mut();
        heif_ok(lh::heif_image_create(
            w,
            h,
            lh::heif_colorspace_heif_colorspace_RGB,
            lh::heif_chroma_heif_chroma_interleaved_RGB,
            &mut image,
        ));
        heif_ok(lh::heif_image_add_plane(
            image,
            lh::heif_channel_heif_channel_interleaved,
            w,
            h,
            8,
        ));
        let mut stride = 0;
        let plane = lh::heif_image_get_plane(
            image,
            lh::heif_channel_heif_channel_interleaved,
            &mut stride,
        );
        for (y, row) in pixels.chunks((w * 3) as usize).enumerate() {
            std::ptr::copy_nonoverlapping(row.as_ptr(), plane.add(y * stride as usize), row.len());
        }
        let context = lh::heif_context_alloc();
        let mut encoder = std::ptr::null_mut();
        heif_ok(lh::heif_context_get_encoder_for_format(
            context,
            lh::heif_compression_format_heif_compression_HEVC,
            &mut encoder,
        ));
        heif_ok(lh::heif_encoder_set_lossy_quality(encoder, 95));
        let options = lh::heif_encoding_options_alloc();
        (*options).image_orientation = orientation;
        heif_ok(lh::heif_context_encode_image(
            context,
            image,
            encoder,
            options,
            std::ptr::null_mut(),
        ));
        heif_ok(lh::heif_context_write_to_file(context, name.as_ptr()));
        lh::heif_encoding_options_free(options);
        lh::heif_encoder_release(encoder);
        lh::heif_image_release(image);
        lh::heif_context_free(context);
    }
}

/// A HEIC turned by its `irot` box (HEIF's orientation, which libheif applies) comes out
/// upright: stored 160x90 with "rotate 90 clockwise", its row is 90x160 and the green block of
/// the stored top left is at the top right; the same pixels stored plainly stay 160x90.
#[cfg(feature = "heic")]
#[test]
fn a_heic_turned_by_its_irot_box_is_upright() {
    use verger::decode::decode_and_resize;
    let dir = tempfile::tempdir().unwrap();
    let colour = |rgb: &[u8], (x, y): (usize, usize)| {
        let p = &rgb[(y * 224 + x) * 3..][..3];
        match (p[0] > 160, p[1] > 160, p[2] > 160) {
            (false, true, false) => "green",
            (true, false, false) => "red",
            (false, false, true) => "blue",
            _ => "other",
        }
    };
    let plain = dir.path().join("plain.heic");
    heic_with_orientation(
        &plain,
        libheif_sys::heif_orientation_heif_orientation_normal,
    );
    let plain = decode_and_resize(&std::fs::read(&plain).unwrap(), 224).unwrap();
    assert_eq!((plain.width, plain.height), (160, 90));
    assert_eq!(colour(&plain.rgb, (10, 10)), "green");
    assert_eq!(colour(&plain.rgb, (200, 100)), "blue");

    let turned = dir.path().join("turned.heic");
    heic_with_orientation(
        &turned,
        libheif_sys::heif_orientation_heif_orientation_rotate_90_cw,
    );
    let turned = decode_and_resize(&std::fs::read(&turned).unwrap(), 224).unwrap();
    assert_eq!((turned.width, turned.height), (90, 160));
    assert_eq!(
        colour(&turned.rgb, (200, 20)),
        "green",
        "the stored top left, turned"
    );
    assert_eq!(colour(&turned.rgb, (20, 20)), "red");
    assert_eq!(colour(&turned.rgb, (20, 200)), "blue");
}

/// A 12 MP phone-size JPEG (a sample photo upscaled to 4032x3024 with noise, quality 90) is
/// decoded at a DCT scale (1/8 here): through the network it gives the full-size decode's
/// embedding (cosine >= 0.99), and the row keeps the photo's full size. A 100x100 photo is
/// not scaled: the same pixels as the full decode, bit for bit.
#[test]
fn a_12_megapixel_jpeg_decoded_at_a_dct_scale_embeds_like_the_full_decode() {
    use verger::decode::{decode_and_resize, resize_rgb};
    let small = std::fs::read(lemon_path()).unwrap();
    let photo = verger::bench::phone_photo(&small, (4032, 3024), 90).unwrap();
    let full_of = |bytes: &[u8]| {
        let full = image::load_from_memory(bytes).unwrap().into_rgb8();
        let (w, h) = full.dimensions();
        resize_rgb(full.into_raw(), w, h, 224)
    };
    let scaled = decode_and_resize(&photo, 224).unwrap();
    assert_eq!((scaled.width, scaled.height), (4032, 3024));
    let full = full_of(&photo);
    let rows = shared_embedder().embed(&[&scaled.rgb, &full]).unwrap();
    let cos = cosine(&rows[0], &rows[1]);
    println!("12 MP photo, DCT-scaled decode vs full decode: cosine {cos:.6}");
    assert!(cos >= 0.99, "cosine {cos}");
    assert_ne!(scaled.rgb, full, "the scaled path was taken");

    assert_eq!(decode_and_resize(&small, 224).unwrap().rgb, full_of(&small));
}

/// A large photo stored with each EXIF orientation takes the DCT-scaled path (libjpeg-turbo,
/// which reads no EXIF itself) and still comes out upright: its pixels are those of the upright
/// photo resized (mean difference under 2 levels of 255, against more than 8 for the stored
/// pixels of every turned tag), and the row has the upright size.
#[test]
fn a_large_photo_is_turned_upright_on_the_scaled_path_too() {
    use verger::decode::{decode_and_resize_oriented, resize_rgb, Orientation, MAX_PIXELS};
    let upright =
        image::imageops::resize(&upright(), 1000, 720, image::imageops::FilterType::Triangle);
    let expected = resize_rgb(upright.as_raw().clone(), 1000, 720, 224);
    let mean_difference = |a: &[u8], b: &[u8]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(x.abs_diff(*y)))
            .sum::<f64>()
            / a.len() as f64
    };
    let dir = tempfile::tempdir().unwrap();
    for tag in 1..=8u16 {
        let path = dir.path().join(format!("{tag}.jpg"));
        jpeg_with_orientation(&stored_for(&upright, tag), tag, &path);
        let bytes = std::fs::read(&path).unwrap();
        let turned =
            decode_and_resize_oriented(&bytes, 224, MAX_PIXELS, Orientation::Apply).unwrap();
        assert_eq!(
            (turned.width, turned.height),
            (1000, 720),
            "orientation {tag}"
        );
        let difference = mean_difference(&turned.rgb, &expected);
        println!("orientation {tag}: mean difference {difference:.3} to the upright photo");
        assert!(difference < 2.0, "orientation {tag}: {difference}");
        let stored =
            decode_and_resize_oriented(&bytes, 224, MAX_PIXELS, Orientation::Ignore).unwrap();
        if tag != 1 {
            let difference = mean_difference(&stored.rgb, &expected);
            assert!(difference > 8.0, "orientation {tag} ignored: {difference}");
        }
    }
}

/// Labels from another folder of the key: in `<year>/<field>/<crop>/photo.jpg`, `--label dir:2`
/// labels by field, `dir:-3` by year, the default by crop; a rule past the key's folders gives
/// no label.
#[test]
fn label_rules_pick_any_folder_of_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let photo = std::fs::read(lemon_path()).unwrap();
    let keys = [
        "2025/field3/lemon/a.jpg",
        "2026/field7/lemon/b.jpg",
        "2026/field7/apple/c.jpg",
    ];
    for key in keys {
        let path = input.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &photo).unwrap();
    }
    let labels_with = |rule: &[&str]| {
        let output = dir.path().join(format!("out{}", rule.join("")));
        run_cli(&input, &output, rule);
        let rows = by_key(read_output(&output).rows);
        keys.iter()
            .map(|k| rows[*k].label.clone())
            .collect::<Vec<_>>()
    };
    let some = |v: [&str; 3]| v.map(|s| Some(s.to_string())).to_vec();
    assert_eq!(labels_with(&[]), some(["lemon", "lemon", "apple"]));
    assert_eq!(
        labels_with(&["--label", "dir:2"]),
        some(["field3", "field7", "field7"])
    );
    assert_eq!(
        labels_with(&["--label", "dir:-3"]),
        some(["2025", "2026", "2026"])
    );
    assert_eq!(labels_with(&["--label", "dir:9"]), vec![None, None, None]);
    let refused = verger()
        .args(["run", "--label", "dir:0", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("never"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("expected `parent` or `dir:N`"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// `--label-pattern` on a `<year>/<field>/<crop>/` layout of sample photos: the crop is the
/// label, year and field are string columns of the table; a key the pattern does not match has
/// no label and null columns, and the summary counts it. The output then refuses a run that
/// would label otherwise (its committed rows would keep the old labels) and accepts the same
/// options again (nothing to redo). With no split folders, `--split hash:F` scores the
/// nearest-centroid classifier in `inspect` and a head in `train`; `--train`/`--test` take
/// several folder names; a bad or conflicting split is a usage error.
#[test]
fn a_label_pattern_gives_labels_and_columns_and_splits_work_without_split_folders() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let mut expected = std::collections::BTreeMap::new();
    for class in ["apple", "lemon", "mango", "raspberry"] {
        let photos = sample_dir().join("Training").join(class);
        for (i, name) in files_under(&photos).into_iter().take(20).enumerate() {
            let (year, field) = [("2025", "north"), ("2026", "south"), ("2026", "east")][i % 3];
            let key = format!("{year}/{field}/{class}/{name}");
            let path = input.join(&key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::copy(photos.join(&name), path).unwrap();
            expected.insert(key, (class, year, field));
        }
    }
    std::fs::create_dir_all(input.join("misc")).unwrap();
    std::fs::copy(lemon_path(), input.join("misc/unsorted.jpg")).unwrap();
    let output = dir.path().join("out");
    let pattern = r"^(?P<year>\d{4})/(?P<field>[^/]+)/(?P<label>[^/]+)/";
    let run = |extra: &[&str]| {
        verger()
            .args(["run", "-w", "2", "--no-progress", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args(extra)
            .output()
            .unwrap()
    };
    let first = run(&["--label-pattern", pattern]);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(stdout.contains("embedded 81, errors 0"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "1 of 81 rows have no label: --label-pattern {pattern}"
        )),
        "{stdout}"
    );
    let rows = by_key(read_output(&output).rows);
    assert_eq!(rows.len(), 81);
    for (key, (class, year, field)) in &expected {
        let row = &rows[key];
        assert_eq!(row.label.as_deref(), Some(*class), "{key}");
        let some = |v: &str| Some(v.to_string());
        assert_eq!(
            row.columns,
            [
                ("year".to_string(), some(year)),
                ("field".to_string(), some(field))
            ],
            "{key}"
        );
    }
    let unsorted = &rows["misc/unsorted.jpg"];
    assert_eq!(unsorted.label, None);
    assert_eq!(
        unsorted.columns,
        [("year".to_string(), None), ("field".to_string(), None)]
    );

    let other = run(&["--label", "dir:2"]);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success(),
        "another label rule must be refused"
    );
    assert!(
        stderr.contains(&format!(
            "holds rows made with orientation=apply label=pattern:{pattern}"
        )) && stderr.contains("this run asks for orientation=apply label=dir:2"),
        "{stderr}"
    );
    let turned = run(&["--label-pattern", pattern, "--orientation", "ignore"]);
    assert!(
        !turned.status.success(),
        "another orientation must be refused"
    );
    let again = run(&["--label-pattern", pattern]);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(
        stdout.contains("embedded 0, errors 0") && stdout.contains("81 skipped"),
        "{stdout}"
    );

    let inspect = |extra: &[&str]| {
        verger()
            .arg("inspect")
            .arg(&output)
            .args(extra)
            .output()
            .unwrap()
    };
    let folders = inspect(&[]);
    let described = String::from_utf8_lossy(&folders.stdout);
    assert!(
        !described.contains("nearest-centroid"),
        "no Training/Test folders: no default split"
    );
    assert!(
        described.contains(&format!(
            "rows made by efficientnet-lite0, orientation=apply label=pattern:{pattern}"
        )) && described.contains("columns from the key: year, field"),
        "{described}"
    );
    let hashed = succeeds(
        verger()
            .arg("inspect")
            .arg(&output)
            .args(["--split", "hash:0.3"]),
    );
    let line = hashed
        .lines()
        .find(|l| l.starts_with("nearest-centroid accuracy on hash 0.3 ("))
        .unwrap_or_else(|| panic!("{hashed}"));
    let accuracy: f64 = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.trim_end_matches('%').parse().ok())
        .unwrap();
    assert!(accuracy >= 90.0, "{line}");
    let by_year = succeeds(verger().arg("inspect").arg(&output).args([
        "--train",
        "2025",
        "--test",
        "2026,misc",
    ]));
    assert!(
        by_year.contains("nearest-centroid accuracy on 2026+misc (52 images, centroids from 2025)"),
        "{by_year}"
    );
    let head = dir.path().join("head");
    let trained = succeeds(
        verger()
            .args(["train", "--input"])
            .arg(&output)
            .arg("--output")
            .arg(&head)
            .args(["--split", "hash:0.3"]),
    );
    assert!(trained.contains("hash 0.3 ("), "{trained}");
    for bad in [
        &["--split", "hash:1.5"][..],
        &["--split", "random"],
        &["--split", "hash:0.2", "--train", "2025"],
    ] {
        let refused = inspect(bad);
        assert_eq!(refused.status.code(), Some(2), "{bad:?}");
    }
    let both = run(&["--label", "dir:1", "--label-pattern", pattern]);
    assert_eq!(both.status.code(), Some(2), "--label and --label-pattern");
    let no_label_group = run(&["--label-pattern", "(?P<crop>[^/]+)/"]);
    assert_eq!(no_label_group.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_label_group.stderr).contains("has no group named `label`"));
}
