//! `verger demo`: a small labelled image set made on the spot, so a user with no images at
//! hand sees the whole chain work (list, fetch, decode, label, embed, Parquet, commit).
//!
//! Four classes of 100x100 JPEGs (coloured discs, squares, stripes and rings on noisy
//! backgrounds, with random position, size and tint), split into `Training/` and `Test/` like
//! Fruits-360.

use std::path::Path;

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The demo's classes, folder names as in Fruits-360 (spaces included).
pub const CLASSES: [&str; 4] = ["Red Disc", "Green Square", "Blue Stripes", "Yellow Ring"];

/// Writes `per_class` training and `per_class / 3` test images per class under `dir`.
/// Returns how many files were written.
pub fn write_demo_set(dir: &Path, per_class: usize, seed: u64) -> std::io::Result<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut written = 0;
    for (split, count) in [("Training", per_class), ("Test", per_class.div_ceil(3))] {
        for (class, name) in CLASSES.iter().enumerate() {
            let folder = dir.join(split).join(name);
            std::fs::create_dir_all(&folder)?;
            for i in 0..count {
                let img = draw(class, &mut rng);
                let path = folder.join(format!("{i}_100.jpg"));
                img.save_with_format(&path, image::ImageFormat::Jpeg)
                    .map_err(std::io::Error::other)?;
                written += 1;
            }
        }
    }
    Ok(written)
}

fn draw(class: usize, rng: &mut StdRng) -> RgbImage {
    let jitter = |rng: &mut StdRng, v: i32| (v + rng.random_range(-40..=40)).clamp(0, 255) as u8;
    let base = [[220, 40, 40], [40, 180, 60], [40, 80, 220], [230, 210, 40]][class];
    let colour = Rgb([
        jitter(rng, base[0]),
        jitter(rng, base[1]),
        jitter(rng, base[2]),
    ]);
    let bg = rng.random_range(180..=255u8);
    let (cx, cy) = (
        rng.random_range(30..70) as f32,
        rng.random_range(30..70) as f32,
    );
    let size = rng.random_range(18..32) as f32;
    let period = rng.random_range(8..16);
    let mut img = RgbImage::new(100, 100);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32 - cx, y as f32 - cy);
        let r = (fx * fx + fy * fy).sqrt();
        let inside = match class {
            0 => r < size,
            1 => fx.abs() < size && fy.abs() < size,
            2 => (x / period) % 2 == 0,
            _ => (r - size).abs() < 6.0,
        };
        let noise = rng.random_range(-12..=12);
        *px = if inside {
            colour
        } else {
            let v = (bg as i32 + noise).clamp(0, 255) as u8;
            Rgb([v, v, v])
        };
    }
    img
}
