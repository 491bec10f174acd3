//! `--precision int8`: calibration bound to its weights, features close to PyTorch's float
//! ones, the sample's classes as separable as in f32, and an output that never mixes
//! precisions.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use verger::embed::calibration::{Calibration, CalibrationError};
use verger::embed::{Backend, Embedder, ModelSpec, Precision, WeightsError};

/// The published Lite0 weights copied into `dir`, so that the calibration written beside them
/// stays this test's.
fn private_weights(dir: &Path) -> PathBuf {
    let spec = ModelSpec::named("efficientnet-lite0").unwrap();
    let path = dir.join(&spec.file_name);
    std::fs::copy(weights(), &path).unwrap();
    path
}

/// Every 10th training picture of the sample, decoded as the pipeline does.
fn calibration_pictures() -> Vec<Vec<u8>> {
    files_under(&sample_dir())
        .iter()
        .filter(|k| k.starts_with("Training/"))
        .step_by(10)
        .map(|k| {
            let bytes = std::fs::read(sample_dir().join(k)).unwrap();
            verger::decode::decode_and_resize(&bytes, 224).unwrap().rgb
        })
        .collect()
}

/// The int8 network against PyTorch's float features of the 40 reference pictures: cosine of
/// at least 0.99 each and 0.995 on average, after a calibration on other pictures of the sample.
/// Before that calibration, on a backend without verger's kernels, or with a calibration made
/// for other weights, int8 is refused with a line that says what to do.
#[test]
fn int8_features_match_pytorch_and_need_a_calibration_of_their_own_weights() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::efficientnet_lite0();
    let path = private_weights(dir.path());
    let missing = Embedder::load_with(&spec, &path, Backend::Flex, Precision::Int8).unwrap_err();
    assert!(
        matches!(
            missing,
            WeightsError::Calibration(CalibrationError::Missing { .. })
        ),
        "{missing}"
    );
    assert!(
        missing.to_string().contains("verger model calibrate"),
        "{missing}"
    );

    let pictures = calibration_pictures();
    let refs: Vec<&[u8]> = pictures.iter().map(Vec::as_slice).collect();
    let calibration = Embedder::calibrate(&spec, &path, &refs).unwrap();
    assert_eq!(calibration.images, pictures.len());
    assert_eq!(calibration.model, "efficientnet-lite0");
    calibration.write(&Calibration::path_beside(&path)).unwrap();

    let int8 = Embedder::load_with(&spec, &path, Backend::Flex, Precision::Int8).unwrap();
    assert_eq!(int8.model_name(), "efficientnet-lite0+int8");
    let (reference, pixels) = (reference_rows(), reference_pixels_of(224));
    let mut cosines = Vec::new();
    for (chunk, want) in pixels.chunks(8).zip(reference.chunks(8)) {
        let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        for (got, (key, want)) in int8.embed(&refs).unwrap().iter().zip(want) {
            let cos = cosine(got, want);
            assert!(cos >= 0.99, "{key}: cosine {cos}");
            cosines.push(cos);
        }
    }
    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
    let worst = cosines.iter().copied().fold(1.0, f64::min);
    eprintln!(
        "int8 vs PyTorch f32, 40 reference pictures: mean cosine {mean:.5}, worst {worst:.5}"
    );
    assert!(mean >= 0.995, "mean cosine {mean}");
    // Not the float network: the int8 path really ran.
    let float = Embedder::load(&spec, &path, Backend::Flex).unwrap();
    let f = float.embed(&[&pixels[0]]).unwrap();
    let q = int8.embed(&[&pixels[0]]).unwrap();
    assert!(max_abs_diff(&f[0], &q[0]) > 1e-4, "int8 gave the float row");

    let plain = Embedder::load_with(&spec, &path, Backend::FlexPlain, Precision::Int8).unwrap_err();
    assert!(
        matches!(plain, WeightsError::Int8Backend { .. })
            && plain
                .to_string()
                .contains("--backend flex (or ndarray), not flex-plain"),
        "{plain}"
    );

    // The same calibration beside other weights (the published ones with one stored value
    // changed) is refused, naming both digests.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&7u32.to_le_bytes());
    let tuned = dir.path().join("tuned.pth");
    std::fs::write(&tuned, &bytes).unwrap();
    std::fs::copy(
        Calibration::path_beside(&path),
        Calibration::path_beside(&tuned),
    )
    .unwrap();
    let other = Embedder::load_with(&spec, &tuned, Backend::Flex, Precision::Int8).unwrap_err();
    assert!(
        matches!(
            other,
            WeightsError::Calibration(CalibrationError::OtherWeights { .. })
        ),
        "{other}"
    );
    assert!(
        other.to_string().contains("(weights 579344248a93)"),
        "{other}"
    );
}

/// Through the binary: `verger model calibrate`, then the whole sample in int8. Its classes are
/// as separable by nearest centroid as with f32 features (within half a point), the table
/// records `efficientnet-lite0+int8`, and an f32 run on that output is refused without
/// writing anything.
#[test]
fn int8_run_keeps_the_sample_separable_and_its_output_to_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = private_weights(dir.path());
    let printed = succeeds(
        verger()
            .env("VERGER_WEIGHTS", &path)
            .args(["model", "calibrate", "--images", "64", "--input"])
            .arg(sample_dir().join("Training")),
    );
    assert!(
        printed.contains("from 64 images") && printed.contains(".int8.json"),
        "{printed}"
    );
    assert!(Calibration::path_beside(&path).exists());
    let listed = succeeds(
        verger()
            .args(["model", "list", "--model-dir"])
            .arg(dir.path()),
    );
    assert!(
        listed
            .lines()
            .next()
            .unwrap()
            .ends_with("(cached, calibrated for int8)"),
        "{listed}"
    );
    assert!(listed.lines().nth(1).unwrap().ends_with("(not downloaded)"));

    // A folder with no picture verger decodes: one line naming it, no calibration written.
    let empty = dir.path().join("no-pictures");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.jpg"), b"not a picture").unwrap();
    let other = dir
        .path()
        .join("other")
        .join(&ModelSpec::named("efficientnet-lite0").unwrap().file_name);
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    std::fs::copy(&path, &other).unwrap();
    let refused = verger()
        .env("VERGER_WEIGHTS", &other)
        .args(["model", "calibrate", "--input"])
        .arg(&empty)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("verger: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("no image to calibrate on in") && errors[0].contains("no-pictures"),
        "{stderr}"
    );
    assert!(!Calibration::path_beside(&other).exists());

    let accuracy = |precision: &str, out: &Path| {
        succeeds(
            verger()
                .env("VERGER_WEIGHTS", &path)
                .args(["run", "-w", "2", "--precision", precision, "--input"])
                .arg(sample_dir())
                .arg("--output")
                .arg(out),
        );
        let table = read_output(out);
        let (accuracy, _) = sample_nearest_centroid(&table.rows);
        (accuracy, table.identity.unwrap().model)
    };
    let (out_int8, out_f32) = (dir.path().join("int8"), dir.path().join("f32"));
    let (int8, model) = accuracy("int8", &out_int8);
    assert_eq!(model, "efficientnet-lite0+int8");
    let (f32, model) = accuracy("f32", &out_f32);
    assert_eq!(model, "efficientnet-lite0");
    eprintln!("nearest-centroid accuracy on the sample: f32 {f32:.4}, int8 {int8:.4}");
    assert!((int8 - f32).abs() <= 0.005, "int8 {int8} vs f32 {f32}");

    let before = read_output(&out_int8).version;
    let mixed = verger()
        .env("VERGER_WEIGHTS", &path)
        .args(["run", "--precision", "f32", "--input"])
        .arg(sample_dir())
        .arg("--output")
        .arg(&out_int8)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&mixed.stderr);
    assert_eq!(mixed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("holds features of efficientnet-lite0+int8")
            && stderr.contains("this run computes efficientnet-lite0 (weights"),
        "{stderr}"
    );
    assert_eq!(read_output(&out_int8).version, before, "nothing committed");
}
