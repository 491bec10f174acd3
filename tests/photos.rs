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
    let output = dir.path().join("out");
    run_cli(&dir.path().join("in"), &output, &[]);
    let table = read_output(&output);
    let rows = by_key(table.rows);
    assert_eq!(rows.len(), 5, "{:?}", rows.keys());
    let png = &rows["lemon/photo.png"].embedding;
    for (name, least) in [
        ("webp", 0.9999),
        ("tiff", 0.9999),
        ("bmp", 0.9999),
        ("gif", 0.95),
    ] {
        let row = &rows[&format!("lemon/photo.{name}")];
        let cos = cosine(&row.embedding, png);
        assert!(cos >= least, "{name}: cosine {cos} to the PNG");
        assert_eq!((row.width, row.height), (100, 100), "{name}");
    }
    assert_eq!(table.errors.len(), 1);
    assert!(
        table.errors[0]
            .reason
            .contains("not a supported image (JPEG, PNG, WebP, TIFF, BMP, GIF (first frame))"),
        "{}",
        table.errors[0].reason
    );
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
