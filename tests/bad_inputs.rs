//! Bad and unusual files: the good ones are embedded, the bad ones become error records with
//! a reason, and nothing panics.

mod common;

use std::path::Path;

use common::*;
use image::{ImageBuffer, Luma, Rgb, Rgba};

fn sample_jpeg() -> Vec<u8> {
    std::fs::read(sample_dir().join("Test/apple/321_100.jpg")).unwrap()
}

fn sample_rgb() -> image::RgbImage {
    image::load_from_memory(&sample_jpeg()).unwrap().into_rgb8()
}

/// A CMYK JPEG of the sample apple (the encoder stores it Adobe-style, inverted).
fn cmyk_jpeg(path: &Path) {
    let rgb = sample_rgb();
    let mut cmyk = Vec::new();
    for p in rgb.pixels() {
        let [r, g, b] = p.0.map(|v| v as f32 / 255.0);
        let k = 1.0 - r.max(g).max(b);
        let f = |x: f32| {
            if k >= 1.0 {
                0.0
            } else {
                (1.0 - x - k) / (1.0 - k)
            }
        };
        for v in [f(r), f(g), f(b), k] {
            cmyk.push((255.0 * v).round() as u8);
        }
    }
    let encoder = jpeg_encoder::Encoder::new_file(path, 95).unwrap();
    encoder
        .encode(
            &cmyk,
            rgb.width() as u16,
            rgb.height() as u16,
            jpeg_encoder::ColorType::Cmyk,
        )
        .unwrap();
}

fn build_inputs(dir: &Path) {
    let class = dir.join("Odd Files");
    std::fs::create_dir_all(&class).unwrap();
    let jpeg = sample_jpeg();
    std::fs::write(class.join("good.jpg"), &jpeg).unwrap();
    std::fs::write(class.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    std::fs::write(class.join("empty.jpg"), b"").unwrap();
    std::fs::write(class.join("text.jpg"), b"this is not an image, just text\n").unwrap();
    let rgb = sample_rgb();
    let rgba: ImageBuffer<Rgba<u8>, Vec<u8>> =
        ImageBuffer::from_fn(rgb.width(), rgb.height(), |x, y| {
            let [r, g, b] = rgb.get_pixel(x, y).0;
            Rgba([r, g, b, (x * 2) as u8])
        });
    rgba.save(class.join("alpha.png")).unwrap();
    let gray: ImageBuffer<Luma<u8>, Vec<u8>> =
        image::DynamicImage::ImageRgb8(rgb.clone()).into_luma8();
    gray.save(class.join("gray.jpg")).unwrap();
    let deep: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_fn(rgb.width(), rgb.height(), |x, y| {
            Rgb(rgb.get_pixel(x, y).0.map(|v| v as u16 * 257))
        });
    deep.save(class.join("sixteen.png")).unwrap();
    cmyk_jpeg(&class.join("cmyk.jpg"));
    std::fs::write(dir.join("at-the-root.jpg"), &jpeg).unwrap();
}

#[test]
fn bad_files_become_error_records_and_good_ones_are_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let output = dir.path().join("out");
    build_inputs(&input);
    let summary = run(&config(&input, &output, 2, 4));
    assert_eq!((summary.embedded, summary.errors), (6, 3));

    let table = read_output(&output);
    let mut embedded: Vec<_> = table.rows.iter().map(|r| r.key.as_str()).collect();
    embedded.sort();
    assert_eq!(
        embedded,
        [
            "Odd Files/alpha.png",
            "Odd Files/cmyk.jpg",
            "Odd Files/good.jpg",
            "Odd Files/gray.jpg",
            "Odd Files/sixteen.png",
            "at-the-root.jpg"
        ]
    );
    let root = table
        .rows
        .iter()
        .find(|r| r.key == "at-the-root.jpg")
        .unwrap();
    assert_eq!(root.label, None);
    let reason = |key: &str| {
        let e = table
            .errors
            .iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("no error for {key}"));
        assert_eq!(e.stage, verger::record::Stage::Decode);
        e.reason.clone()
    };
    assert!(reason("Odd Files/truncated.jpg").contains("truncated"));
    assert!(reason("Odd Files/empty.jpg").contains("empty"));
    assert!(reason("Odd Files/text.jpg").contains("not a supported image"));

    // Converted colour types carry the same picture: close to the RGB original's features.
    let good = &table
        .rows
        .iter()
        .find(|r| r.key == "Odd Files/good.jpg")
        .unwrap()
        .embedding;
    for key in [
        "Odd Files/alpha.png",
        "Odd Files/sixteen.png",
        "Odd Files/cmyk.jpg",
    ] {
        let row = table.rows.iter().find(|r| r.key == key).unwrap();
        let cos = cosine(&row.embedding, good);
        assert!(cos >= 0.95, "{key}: cosine {cos} to the original");
    }
}

/// A PNG of a few dozen bytes whose header claims `width x height` (a decompression bomb).
fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        let mut crc = !0u32;
        for &b in &out[start..] {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
            }
        }
        out.extend((!crc).to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 6, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
    chunk(&mut png, b"IEND", &[]);
    png
}

/// Decompression bombs and an object over `--max-object-bytes` are error records naming the
/// limit, and the good image beside them is embedded.
#[test]
fn bombs_and_huge_objects_are_error_records_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let output = dir.path().join("out");
    let class = input.join("Hostile");
    std::fs::create_dir_all(&class).unwrap();
    std::fs::write(class.join("good.jpg"), sample_jpeg()).unwrap();
    std::fs::write(class.join("bomb.png"), png_bomb(30_000, 30_000)).unwrap();
    std::fs::write(class.join("under-side-limit.png"), png_bomb(16_000, 16_000)).unwrap();
    let mut jpeg = sample_jpeg();
    let sof = jpeg
        .windows(2)
        .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0 | 0xC2))
        .unwrap();
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]); // 65500x65500
    std::fs::write(class.join("bomb.jpg"), &jpeg).unwrap();
    std::fs::write(class.join("huge.jpg"), vec![0u8; 300_000]).unwrap();

    let mut config = config(&input, &output, 2, 8);
    config.limits.max_object_bytes = 200_000;
    let summary = run(&config);
    assert_eq!((summary.embedded, summary.errors), (1, 4));
    let table = read_output(&output);
    assert_eq!(table.rows[0].key, "Hostile/good.jpg");
    let error = |key: &str| {
        table
            .errors
            .iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("no error record for {key}"))
    };
    for key in [
        "Hostile/bomb.png",
        "Hostile/under-side-limit.png",
        "Hostile/bomb.jpg",
    ] {
        let e = error(key);
        assert_eq!(e.stage, verger::record::Stage::Decode, "{key}");
        assert!(
            e.reason.contains("megapixels, over the limit of 64"),
            "{key}: {}",
            e.reason
        );
    }
    let huge = error("Hostile/huge.jpg");
    assert_eq!(huge.stage, verger::record::Stage::Size);
    assert!(
        huge.reason
            .contains("300000 bytes, over the limit of 200000"),
        "{}",
        huge.reason
    );
    // Not retried by the next run: the version is too large, not unreadable.
    let again = run(&config);
    assert_eq!((again.embedded, again.errors), (0, 0));
}

/// An output inside the input is left out of the listing: its Parquet files never come back
/// as error records, and a rerun finds nothing new. The input itself as output is refused.
#[test]
fn an_output_inside_the_input_is_not_taken_as_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let class = input.join("apple");
    std::fs::create_dir_all(&class).unwrap();
    for name in ["321_100.jpg", "322_100.jpg", "323_100.jpg"] {
        std::fs::copy(sample_dir().join("Test/apple").join(name), class.join(name)).unwrap();
    }
    let output = input.join("features");
    let first = run(&config(&input, &output, 1, 8));
    assert_eq!((first.embedded, first.errors), (3, 0));
    let second = run(&config(&input, &output, 1, 8));
    assert_eq!((second.embedded, second.errors), (0, 0), "{second:?}");
    assert!(
        second.source.filtered >= 3,
        "the output's lease, Delta log and Parquet file are left out: {second:?}"
    );

    let err = verger::dataflow::run(&config(&input, &input, 1, 8), shared_embedder()).unwrap_err();
    assert!(
        err.to_string().contains("is the input directory itself"),
        "{err}"
    );

    // A folder of images as output (`--output in/apple`) is refused before anything is
    // written: verger would write its table among the pictures.
    let err = verger::dataflow::run(&config(&input, &class, 1, 8), shared_embedder()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with("the output ")
            && message.ends_with(
                "apple holds 321_100.jpg, which verger did not write: give the output an empty \
                 folder (or one verger wrote)"
            ),
        "{message}"
    );
    let mut left: Vec<String> = files_under(&class);
    left.sort();
    assert_eq!(
        left,
        ["321_100.jpg", "322_100.jpg", "323_100.jpg"],
        "nothing written"
    );
}

/// Sample photos with bytes after their end-of-image marker (a motion photo's video, a second
/// JPEG, appended metadata) are the same pictures: rows equal to the plain photo's. The same
/// photos cut short anywhere before that marker are error records saying "truncated JPEG".
#[test]
fn jpeg_trailers_are_the_same_picture_and_cut_photos_are_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let output = dir.path().join("out");
    let class = input.join("apple");
    std::fs::create_dir_all(&class).unwrap();
    let photo = sample_jpeg();
    let second = std::fs::read(sample_dir().join("Test/apple/322_100.jpg")).unwrap();
    let noise: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let with = |trailer: &[u8]| [photo.as_slice(), trailer].concat();
    std::fs::write(class.join("plain.jpg"), &photo).unwrap();
    std::fs::write(class.join("trailer-4k.jpg"), with(&noise[..4096])).unwrap();
    std::fs::write(class.join("trailer-1m.jpg"), with(&noise)).unwrap();
    std::fs::write(class.join("second-jpeg.jpg"), with(&second)).unwrap();
    let cuts = [
        photo.len() / 5,
        photo.len() / 2,
        photo.len() * 4 / 5,
        photo.len() - 2,
    ];
    for cut in cuts {
        std::fs::write(class.join(format!("cut-{cut}.jpg")), &photo[..cut]).unwrap();
    }
    let summary = run(&config(&input, &output, 2, 8));
    assert_eq!((summary.embedded, summary.errors), (4, cuts.len() as u64));

    let table = read_output(&output);
    let rows = by_key(table.rows);
    let plain = &rows["apple/plain.jpg"].embedding;
    for key in ["trailer-4k", "trailer-1m", "second-jpeg"] {
        let row = &rows[&format!("apple/{key}.jpg")];
        assert!(max_abs_diff(&row.embedding, plain) <= 1e-5, "{key}");
    }
    for cut in cuts {
        let key = format!("apple/cut-{cut}.jpg");
        let error = table
            .errors
            .iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("no error record for {key}"));
        assert!(
            error
                .reason
                .starts_with(&format!("truncated JPEG: its {cut} bytes end inside")),
            "{key}: {}",
            error.reason
        );
    }
}
