//! The network on Burn's wgpu backend (`--features wgpu`): the module's fallback path, Burn's
//! own operations, on whatever Vulkan device wgpu finds. With no GPU, Mesa's software Vulkan
//! driver (lavapipe, Debian's `mesa-vulkan-drivers`) runs it on the CPU: `.ci/gpu` installs it
//! and runs `cargo test --release --features wgpu --test gpu` (not `.ci/run`: the feature
//! rebuilds the dependency tree, too long for CI's budget).
#![cfg(feature = "wgpu")]

mod common;

use common::*;
use verger::embed::{Backend, Embedder, ModelSpec};

/// EfficientNet-Lite0 on wgpu against PyTorch's features of the same pixels: cosine >= 0.999
/// on every reference row.
#[test]
fn wgpu_features_match_pytorch() {
    let embedder = Embedder::load(&ModelSpec::efficientnet_lite0(), &weights(), Backend::Wgpu)
        .expect("weights load on wgpu");
    assert!(
        !embedder.model().has_kernels(),
        "the CPU kernels are not packed for a GPU"
    );
    let (reference, pixels) = (reference_rows(), reference_pixels_of(224));
    let mut worst = 1.0f64;
    for (chunk, want) in pixels.chunks(8).zip(reference.chunks(8)) {
        let images: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        for (got, (path, want)) in embedder.embed(&images).unwrap().iter().zip(want) {
            let cos = cosine(got, want);
            assert!(cos >= 0.999, "{path}: cosine {cos}");
            worst = worst.min(cos);
        }
    }
    eprintln!("wgpu: lowest cosine to PyTorch over 40 rows {worst:.6}");
}

/// `verger run --backend wgpu` end to end through the binary: every image a row, each within
/// cosine 0.98 of PyTorch's features (the CPU end-to-end tests' bound: verger decodes and resizes
/// the JPEGs itself).
#[test]
fn run_on_wgpu_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let reference = reference_rows();
    for (path, _) in reference.iter().step_by(5) {
        let to = input.join(path);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(sample_dir().join(path), to).unwrap();
    }
    let out = dir.path().join("out");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_verger"))
        .env("VERGER_WEIGHTS", weights())
        .args(["run", "--backend", "wgpu", "-w", "1", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let rows = by_key(read_output(&out).rows);
    assert_eq!(rows.len(), 8);
    for (path, want) in reference.iter().step_by(5) {
        let cos = cosine(&rows[path].embedding, want);
        assert!(
            cos >= 0.98,
            "{path}: cosine {cos} to PyTorch (JPEG decoded by verger)"
        );
    }
}
