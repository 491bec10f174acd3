//! What the benches share: the sample data in `../shared` (or `$VERGER_SHARED`) and the
//! weights, obtained and verified by verger's own code.
#![allow(dead_code)]

use std::path::PathBuf;

use verger::embed::{weights_file, Backend, Embedder, ModelSpec};

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
