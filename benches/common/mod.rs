//! What the benches share: the sample data in `../shared` (or `$VERGER_SHARED`) and the
//! weights, obtained and verified by verger's own code.
#![allow(dead_code)]

use std::path::PathBuf;

use verger::embed::{weights_file, Backend, Embedder, ModelSpec, Precision};

/// `../shared` beside the project, or `$VERGER_SHARED`.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("VERGER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// The Fruits-360 sample (2,624 JPEGs in class folders).
pub fn sample_dir() -> PathBuf {
    shared_dir().join("data/fruits-360-sample")
}

/// The first reference image of the sample: a real 100x100 Fruits-360 JPEG.
pub fn sample_jpeg() -> Vec<u8> {
    let paths =
        std::fs::read_to_string(shared_dir().join("reference/paths.txt")).expect("shared data");
    let first = paths.lines().next().expect("a reference path");
    std::fs::read(sample_dir().join(first)).expect("sample image")
}

/// The network on `backend`.
pub fn embedder(backend: Backend) -> Embedder {
    let spec = ModelSpec::efficientnet_lite0();
    let weights = weights_file::ensure_weights(&spec, None, None).expect("weights");
    Embedder::load(&spec, &weights, backend).expect("weights load")
}

/// The network on flex in int8, calibrated (as `verger model calibrate --images 256` does, on
/// the sample's Training pictures) when the cached weights have no calibration yet.
#[allow(dead_code)] // not every bench runs int8
pub fn int8_embedder() -> Embedder {
    use verger::embed::calibration::Calibration;
    let spec = ModelSpec::efficientnet_lite0();
    let weights = weights_file::ensure_weights(&spec, None, None).expect("weights");
    let beside = Calibration::path_beside(&weights);
    if !beside.exists() {
        let dir = sample_dir().join("Training");
        let files = verger::bench::files_under(&dir).expect("sample");
        let count = 256.min(files.len());
        let pictures: Vec<Vec<u8>> = (0..count)
            .map(|i| {
                let bytes = std::fs::read(dir.join(&files[i * files.len() / count])).unwrap();
                verger::decode::decode_and_resize(&bytes, spec.input_size)
                    .unwrap()
                    .rgb
            })
            .collect();
        let refs: Vec<&[u8]> = pictures.iter().map(Vec::as_slice).collect();
        let calibration = Embedder::calibrate(&spec, &weights, &refs).expect("calibrates");
        calibration.write(&beside).expect("calibration written");
    }
    Embedder::load_with(&spec, &weights, Backend::Flex, Precision::Int8).expect("int8 loads")
}
