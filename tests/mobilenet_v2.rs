//! MobileNetV2 (torchvision's architecture and state-dict layout) against torchvision itself:
//! seeded random weights and the features torchvision computed with them, from the fixture
//! `tests/fixtures/mobilenet_v2.py` generates (reduced width; its `--check` runs this file on a
//! full-width fixture through `VERGER_MOBILENET_V2_FIXTURE`).

mod common;

use burn::tensor::{Tensor, TensorData};
use clap::ValueEnum;
use common::*;
use serde::Deserialize;
use std::path::PathBuf;
use verger::embed::{Backend, Embedder, ModelSpec, WeightsError};

#[derive(Deserialize)]
struct Fixture {
    width_multiplier: f64,
    weights_sha256: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    input_shape: [usize; 4],
    features: Vec<Vec<f32>>,
}

fn fixture_dir() -> PathBuf {
    match std::env::var_os("VERGER_MOBILENET_V2_FIXTURE") {
        Some(dir) => dir.into(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mobilenet-v2-w0.25"),
    }
}

fn fixture() -> Fixture {
    let json = std::fs::read_to_string(fixture_dir().join("fixture.json")).unwrap();
    serde_json::from_str(&json).unwrap()
}

/// MobileNetV2's descriptor at the fixture's width.
fn spec_of(fixture: &Fixture) -> ModelSpec {
    let mut spec = ModelSpec::named("mobilenet-v2").unwrap();
    spec.width_multiplier = fixture.width_multiplier;
    spec
}

/// The input the generator fed torchvision: element `i` is `((i * 37) % 101) / 50 - 1`.
fn input(shape: [usize; 4], embedder: &Embedder) -> Tensor<4> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    Tensor::from_data(TensorData::new(values, shape), embedder.device())
}

/// Every CPU backend, with and without verger's fused kernels (3x3 depthwise and stem with
/// symmetric padding, channel counts of another width, odd and non-square feature maps),
/// gives torchvision's features: cosine >= 0.9999 and max abs difference <= 1e-3 per row.
#[test]
fn features_match_torchvision_on_seeded_weights() {
    let fixture = fixture();
    let spec = spec_of(&fixture);
    let weights = fixture_dir().join("weights.pth");
    for &backend in Backend::value_variants() {
        let embedder = Embedder::load(&spec, &weights, backend).expect("the fixture loads");
        assert_eq!(embedder.weights_sha256(), fixture.weights_sha256);
        assert!(
            !embedder.is_published(),
            "seeded weights are not torchvision's"
        );
        assert!(
            embedder.model().classifier.is_none(),
            "the fixture's 10-class head does not fit the ImageNet classifier: dropped"
        );
        assert_eq!(embedder.model().has_kernels(), backend.fused());
        for case in &fixture.cases {
            let got = embedder
                .model()
                .features(input(case.input_shape, &embedder))
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            assert_eq!(got.len(), case.features.len() * 1280);
            for (i, (got, want)) in got.chunks(1280).zip(&case.features).enumerate() {
                let (cos, diff) = (cosine(got, want), max_abs_diff(got, want));
                let what = format!("{backend:?} {:?} row {i}", case.input_shape);
                assert!(cos >= 0.9999, "{what}: cosine {cos}");
                assert!(diff <= 1e-3, "{what}: max abs diff {diff}");
            }
        }
    }
}

/// Weights of another width, or another architecture's, are refused with the first tensor
/// (in the network's order) that does not fit, or the first one missing.
#[test]
fn checkpoints_that_do_not_fit_name_the_first_tensor() {
    let fixture = fixture();
    let mut wider = spec_of(&fixture);
    wider.width_multiplier = 0.5;
    let weights = fixture_dir().join("weights.pth");
    match Embedder::load(&wider, &weights, Backend::Flex) {
        Err(WeightsError::Mismatch { name, reason }) => {
            assert_eq!(name, "stem.conv.weight");
            assert!(
                reason.contains("[8, 3, 3, 3]") && reason.contains("[16, 3, 3, 3]"),
                "{reason}"
            );
        }
        other => panic!("a 0.25-wide checkpoint loaded as 0.5: {other:?}"),
    }
    let lite0 = weights_of("efficientnet-lite0");
    match Embedder::load(&spec_of(&fixture), &lite0, Backend::Flex) {
        Err(e @ WeightsError::Missing(_)) => {
            assert!(e.to_string().contains("`stem.conv.weight` missing"), "{e}");
        }
        other => panic!("EfficientNet-Lite0 weights loaded as MobileNetV2: {other:?}"),
    }
}
