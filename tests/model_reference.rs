//! The network and its weight import against PyTorch's reference features.

mod common;

use common::*;

/// The exact 224x224 pixels PyTorch was fed (`reference/resized_224/NN_*.png`), in row order.
fn reference_pixels() -> Vec<Vec<u8>> {
    reference_pixels_of(224)
}

/// Runs `embedder` over `pixels` in batches of 8 and asserts every row matches PyTorch's
/// (cosine >= 0.9999, max abs difference <= 1e-3).
fn assert_matches_reference(
    what: &str,
    embedder: &verger::embed::Embedder,
    pixels: &[Vec<u8>],
    reference: &[(String, Vec<f32>)],
) {
    assert_eq!(pixels.len(), reference.len());
    let mut rows = Vec::new();
    for chunk in pixels.chunks(8) {
        let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        rows.extend(embedder.embed(&refs).unwrap());
    }
    for (i, ((path, want), got)) in reference.iter().zip(&rows).enumerate() {
        assert_eq!(got.len(), 1280);
        let cos = cosine(got, want);
        let diff = max_abs_diff(got, want);
        assert!(cos >= 0.9999, "{what} row {i} ({path}): cosine {cos}");
        assert!(diff <= 1e-3, "{what} row {i} ({path}): max abs diff {diff}");
    }
}

/// Every backend compiled in, with and without verger's fused kernels, against PyTorch, row by
/// row.
#[test]
fn features_match_pytorch_on_the_same_pixels() {
    use clap::ValueEnum;
    use verger::embed::{Backend, Embedder, ModelSpec};
    let (reference, pixels) = (reference_rows(), reference_pixels());
    for &backend in Backend::value_variants() {
        let embedder = Embedder::load(&ModelSpec::efficientnet_lite0(), &weights(), backend)
            .expect("weights load");
        assert_matches_reference(&format!("{backend:?}"), &embedder, &pixels, &reference);
    }
}

/// EfficientNet-Lite1 (240 px) and Lite2 (260 px): the same module and kernels, scaled by the
/// descriptors' multipliers, against PyTorch's features of the same pixels, fused and plain.
#[test]
fn lite1_and_lite2_match_pytorch_on_the_same_pixels() {
    use verger::embed::{Backend, Embedder, ModelSpec};
    for (name, file) in [
        ("efficientnet-lite1", "efficientnet_lite1_240.f32"),
        ("efficientnet-lite2", "efficientnet_lite2_260.f32"),
    ] {
        let spec = ModelSpec::named(name).unwrap();
        let (weights, reference) = (weights_of(name), reference_rows_of(file));
        let pixels = reference_pixels_of(spec.input_size);
        for backend in [Backend::Flex, Backend::FlexPlain] {
            let embedder = Embedder::load(&spec, &weights, backend).expect("weights load");
            assert_matches_reference(
                &format!("{name} {backend:?}"),
                &embedder,
                &pixels,
                &reference,
            );
        }
    }
}

/// Batches of 1, 4 and 7 images really go through the module as one tensor each (the fused
/// kernels loop over the batch inside each operation, Burn's own operations take it whole):
/// every image gets the same row whatever batch it was in, on the fused and the plain path.
#[test]
fn batch_size_does_not_change_features() {
    use verger::embed::{Backend, Embedder, ModelSpec};
    let pixels = reference_pixels();
    let images: Vec<&[u8]> = pixels[..7].iter().map(Vec::as_slice).collect();
    for backend in [Backend::Flex, Backend::FlexPlain] {
        let embedder = Embedder::load(&ModelSpec::efficientnet_lite0(), &weights(), backend)
            .expect("weights load");
        let alone: Vec<Vec<f32>> = images
            .iter()
            .map(|img| embedder.embed(&[img]).unwrap().remove(0))
            .collect();
        let seven = embedder.embed(&images).unwrap();
        let four_then_three: Vec<Vec<f32>> = images
            .chunks(4)
            .flat_map(|chunk| embedder.embed(chunk).unwrap())
            .collect();
        assert_eq!(seven.len(), 7);
        assert_eq!(four_then_three.len(), 7);
        for (i, one) in alone.iter().enumerate() {
            for (batch, rows) in [(7, &seven), (4, &four_then_three)] {
                let diff = max_abs_diff(one, &rows[i]);
                assert!(
                    diff <= 1e-5,
                    "{backend:?}: image {i} in a batch of {batch} differs by {diff}"
                );
            }
        }
        // Different images give different rows: the batch is not one image repeated.
        assert!(max_abs_diff(&alone[0], &alone[1]) > 1e-2);
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

/// A checkpoint that does not fit the architecture is refused, naming the first tensor that does
/// not fit (or is missing), instead of running with random weights.
#[test]
fn checkpoint_of_another_shape_is_refused_naming_the_tensor() {
    use verger::embed::import::{load_checkpoint, WeightsError};
    use verger::embed::network::NetworkConfig;
    use verger::embed::Architecture::EfficientnetLite as Lite;
    let device = burn::tensor::Device::flex();
    let mut wider_head = NetworkConfig::lite0();
    wider_head.head_channels = 1536;
    match load_checkpoint(wider_head.init(&device), Lite, &weights()) {
        Err(WeightsError::Mismatch { name, reason }) => {
            assert!(name.starts_with("head."), "{name}: {reason}");
            assert!(
                reason.contains("1280") && reason.contains("1536"),
                "{reason}"
            );
        }
        other => panic!("wider head loaded: {other:?}"),
    }
    let mut deeper = NetworkConfig::lite0();
    deeper.stages.last_mut().unwrap().repeats = 2;
    match load_checkpoint(deeper.init(&device), Lite, &weights()) {
        Err(WeightsError::Missing(name)) => assert!(name.starts_with("blocks.16."), "{name}"),
        other => panic!("a block without weights loaded: {other:?}"),
    }
    // Lite1's checkpoint as Lite0: the same first three blocks, then Lite1's third 3x3 block of
    // stage 2 where Lite0 starts its 5x5 stage 3.
    let lite1 = weights_of("efficientnet-lite1");
    match load_checkpoint(NetworkConfig::lite0().init(&device), Lite, &lite1) {
        Err(WeightsError::Mismatch { name, reason }) => {
            assert_eq!(name, "blocks.3.depthwise.conv.weight", "{reason}");
            assert!(
                reason.contains("[144, 1, 3, 3]") && reason.contains("[144, 1, 5, 5]"),
                "{reason}"
            );
        }
        other => panic!("Lite1 weights loaded as Lite0: {other:?}"),
    }
    let err = load_checkpoint(
        NetworkConfig::lite0().init(&device),
        Lite,
        &shared_dir().join("reference/paths.txt"),
    )
    .unwrap_err();
    assert!(matches!(err, WeightsError::Unreadable { .. }), "{err}");
}
