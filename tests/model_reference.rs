//! The network and its weight import against PyTorch's reference features.

mod common;

use common::*;

/// The exact 224x224 pixels PyTorch was fed (`reference/resized_224/NN_*.png`), in row order.
fn reference_pixels() -> Vec<Vec<u8>> {
    let dir = shared_dir().join("reference/resized_224");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| image::open(p).unwrap().into_rgb8().into_raw())
        .collect()
}

/// Every engine compiled in (native, and the Burn backends) against PyTorch, row by row.
#[test]
fn features_match_pytorch_on_the_same_pixels() {
    use clap::ValueEnum;
    use verger::embed::{Backend, Embedder, ModelSpec};
    let reference = reference_rows();
    let pixels = reference_pixels();
    assert_eq!(pixels.len(), reference.len());
    for &backend in Backend::value_variants() {
        let embedder = Embedder::load(&ModelSpec::efficientnet_lite0(), &weights(), backend)
            .expect("weights load");
        let mut rows = Vec::new();
        for chunk in pixels.chunks(8) {
            let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
            rows.extend(embedder.embed(&refs).unwrap());
        }
        for (i, ((path, want), got)) in reference.iter().zip(&rows).enumerate() {
            assert_eq!(got.len(), 1280);
            let cos = cosine(got, want);
            let diff = max_abs_diff(got, want);
            assert!(cos >= 0.9999, "{backend:?} row {i} ({path}): cosine {cos}");
            assert!(
                diff <= 1e-3,
                "{backend:?} row {i} ({path}): max abs diff {diff}"
            );
        }
    }
}

#[test]
fn batch_size_does_not_change_features() {
    let embedder = embedder();
    let pixels = reference_pixels();
    let refs: Vec<&[u8]> = pixels[..5].iter().map(Vec::as_slice).collect();
    let together = embedder.embed(&refs).unwrap();
    for (i, one) in refs.iter().enumerate() {
        let alone = embedder.embed(&[one]).unwrap();
        assert!(max_abs_diff(&alone[0], &together[i]) <= 1e-5);
    }
}

#[test]
fn imagenet_top1_matches_pytorch_with_the_classifier_kept() {
    let embedder = embedder();
    let want: Vec<usize> =
        std::fs::read_to_string(shared_dir().join("reference/top1_imagenet.txt"))
            .unwrap()
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect();
    let pixels = reference_pixels();
    let refs: Vec<&[u8]> = pixels.iter().map(Vec::as_slice).collect();
    let got = embedder.imagenet_top1(&refs).unwrap();
    assert_eq!(got.len(), want.len());
    let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert!(
        same * 100 >= want.len() * 95,
        "{same}/{} top-1 agree",
        want.len()
    );
}
