//! Bad and unusual files: the good ones are embedded, the bad ones become error records with
//! a reason, and nothing panics.

mod common;

use std::path::Path;

use common::*;
use image::{ImageBuffer, Luma, Rgb, Rgba};

fn sample_jpeg() -> Vec<u8> {
    std::fs::read(sample_dir().join("Test/apple/r_321_100.jpg")).unwrap()
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
